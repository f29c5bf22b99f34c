"""nixl-rs inside SGLang 0.5.23 (PyPI's wheel), through its plugin entry point. Run with the
per-clone venv that sees the cached SGLang 0.5.23 packages and holds the nixl-rs wheel
(`cargo xtask wheel --test`).

1. Activation, each in a fresh process and in a child it spawns (as SGLang starts its
   schedulers; the child runs SGLang's plugin loader itself): with `NIXL_RS_SGLANG=1`, or
   `SGLANG_PLUGINS=nixl_rs`, `get_kv_class(TransferBackend.NIXL, ...)` returns our four classes
   and HiCache's `nixl` backend is ours; unset, or `NIXL_RS_SGLANG=0`, or an allowlist without
   `nixl_rs`, everything stays SGLang's; an SGLang we do not serve (0.5.22, monkeypatched) is
   refused with the supported releases named; the start-up line names engine, SGLang version,
   wire profile and runtime.
2. The class contract: every method and attribute that 0.5.23's `disaggregation/prefill.py`,
   `decode.py` and the scheduler use on a manager, sender or receiver (the list below; each
   name is checked to occur in those files, and on our objects); requests SGLang asks for and
   we do not serve (state buffers, a decode-side prefix, host destinations) fail with SGLang's
   `KVTransferError` and our reason.
3. PD transfer between our classes and SGLang's own, both ways, and ours on both sides
   (`sglang0523_pd.py pair`: two processes each, every byte of every page and aux row checked;
   a bad destination page and an aborted room fail with reasons on both sides).
4. HiCache through `StorageBackendFactory.create_backend("nixl", ...)` with host pools built
   by SGLang (MHA and MLA; `page_first`, `page_first_direct`, `layer_first`, and MHA
   `page_head`): `batch_set_v1` then `batch_get_v1` into other pages, every byte;
   `batch_exists`' prefix rule.
5. Files: SGLang 0.5.23's own `HiCacheNixl` (its `nixl` package is in the venv) and ours on one
   directory, each reading every page the other wrote, for every layout, MHA and MLA, with and
   without direct I/O configured (which decides the object layout of unaligned pools).
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# --------------------------------------------------------------------------- activation

PROBE = r"""
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
if len(sys.argv) > 1:  # pretend another SGLang release is installed
    import importlib.metadata as md
    real = md.version
    md.version = lambda name: sys.argv[1] if name == "sglang" else real(name)

def probe(build=False):
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    kv = {t.name: get_kv_class(TransferBackend.NIXL, t).__module__ for t in
          (KVClassType.MANAGER, KVClassType.SENDER, KVClassType.RECEIVER, KVClassType.BOOTSTRAP_SERVER)}
    out = {"kv": kv, "hicache": StorageBackendFactory._registry["nixl"]["module_path"]}
    if build and out["hicache"].startswith("nixl_rs"):
        import tempfile
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
        cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
            attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
            is_page_first_layout=True, model_name="m", extra_config={})
        os.environ["SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"] = tempfile.mkdtemp()
        be = StorageBackendFactory.create_backend("nixl", cfg, None)
        out["built"] = type(be).__module__
    return out

def spawned(q):
    q.put(probe())

if __name__ == "__main__":
    out = {"self": probe(build=True)}
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=spawned, args=(q,))
    p.start()
    out["spawned"] = q.get(timeout=300)
    p.join(60)
    print("RESULT " + json.dumps(out), flush=True)
"""

#: (name, environment, pretended SGLang version or None, whose classes are expected).
ACTIVATION = [
    ("NIXL_RS_SGLANG=1", {"NIXL_RS_SGLANG": "1"}, None, "nixl_rs."),
    ("SGLANG_PLUGINS=nixl_rs", {"SGLANG_PLUGINS": "nixl_rs"}, None, "nixl_rs."),
    ("unset", {}, None, "sglang."),
    ("NIXL_RS_SGLANG=0, SGLANG_PLUGINS=nixl_rs", {"NIXL_RS_SGLANG": "0", "SGLANG_PLUGINS": "nixl_rs"}, None, "sglang."),
    ("NIXL_RS_SGLANG=1, SGLANG_PLUGINS=other", {"NIXL_RS_SGLANG": "1", "SGLANG_PLUGINS": "other"}, None, "sglang."),
    ("NIXL_RS_SGLANG=1, sglang 0.5.22", {"NIXL_RS_SGLANG": "1"}, "0.5.22", "sglang."),
]

_TMP = tempfile.mkdtemp(prefix="nixl-rs-0523-")


def start_probe(env_add, fake):
    env = {k: v for k, v in os.environ.items() if k not in ("NIXL_RS_SGLANG", "SGLANG_PLUGINS")}
    env.update(env_add)
    script = os.path.join(_TMP, f"probe_{len(os.listdir(_TMP))}.py")
    with open(script, "w") as f:
        f.write(PROBE)
    return subprocess.Popen([sys.executable, script] + ([fake] if fake else []), env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(p):
    out, err = p.communicate(timeout=600)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\n{out}\n{err[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):]), err


def test_activation(started):
    for (name, _, fake, want), p in zip(ACTIVATION, started):
        if fake:
            # Refused twice, loudly: SGLang logs the plugin's refusal, and the start-up hook
            # (the variable is set) fails the import of SGLang's NIXL module with the reason.
            out, err = p.communicate(timeout=600)
            assert p.returncode != 0, f"{name}: ran with an SGLang we do not serve:\n{out}"
            assert "Failed to execute general plugin" in err, f"{name}:\n{err[-3000:]}"
            assert err.count("nixl-rs supports SGLang") >= 2 and fake in err and "0.5.23" in err, \
                f"{name}: no refusal naming the releases:\n{err[-3000:]}"
            continue
        res, err = result(p)
        for where in ("self", "spawned"):
            for cls, mod in res[where]["kv"].items():
                assert mod.startswith(want), f"{name}, {where}: {cls} is {mod}, want {want}*"
            hc = res[where]["hicache"]
            assert hc.startswith("nixl_rs" if want == "nixl_rs." else "sglang."), f"{name}, {where}: HiCache {hc}"
        if want == "nixl_rs.":
            assert res["self"]["built"] == "nixl_rs.sglang.hicache0523", res
            line = [ln for ln in err.splitlines() if "engine (Rust) serves SGLang 0.5.23" in ln]
            assert line and "wire profile" in line[0] and "NIXL runtime" in line[0], f"{name}: no start-up line:\n{err[-3000:]}"
        if want == "sglang.":
            assert "engine (Rust)" not in err, f"{name}: our engine announced itself:\n{err[-3000:]}"
    print(f"  activation: {len(ACTIVATION)} cases, each in a process and a spawned child "
          "(entry point on by variable or allowlist; off unset, by 0, by another allowlist; "
          "0.5.22 refused naming the releases; start-up line)")


# --------------------------------------------------------------------------- class contract

#: What SGLang 0.5.23's scheduler side (prefill.py, decode.py, scheduler.py, utils.py) uses.
SCHEDULER_FILES = ("disaggregation/prefill.py", "disaggregation/decode.py",
                   "managers/scheduler.py", "disaggregation/utils.py")
MANAGER_USES = ("kv_args", "prefill_info_table", "try_ensure_parallel_info",
                "_ensure_prefill_recompute_executor", "submit_prefill_recompute",
                "supports_host_destination", "enable_deferred_decode_kv_release",
                "should_verify_kv_checksum", "transfer_infos")
SENDER_USES = ("init", "send", "poll", "failure_exception", "clear", "abort",
               "get_transfer_metric", "pop_decode_prefix_len", "get_max_transfer_tokens",
               "should_send_kv_chunk", "kv_mgr")
RECEIVER_USES = ("init", "send_metadata", "poll", "failure_exception", "clear", "abort",
                 "conclude_state", "require_staging", "abort_notified", "bootstrap_infos",
                 "kv_mgr", "is_abort_release_safe", "ensure_abort_notified",
                 "supports_host_destination")
#: Used outside those files: role switch (role_switch.py) and the bootstrap-server service.
OTHER_USES = {"supports_role_switch": "disaggregation/role_switch.py",
              "teardown": "disaggregation/role_switch.py"}


def test_contract():
    import numpy as np
    import sglang
    from sglang.srt.disaggregation.base.conn import KVPoll, KVTransferDestination
    from sglang.srt.disaggregation.common.conn import KVTransferError
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    import sglang0523_pd as h
    from nixl_rs.sglang import kv0523

    srt = os.path.join(os.path.dirname(sglang.__file__), "srt")
    code = "".join(open(os.path.join(srt, f)).read() for f in SCHEDULER_FILES)
    for name in MANAGER_USES + SENDER_USES + RECEIVER_USES:
        assert f".{name}" in code, f"SGLang's scheduler no longer uses .{name}: update the list"
    for name, f in OTHER_USES.items():
        assert f".{name}" in open(os.path.join(srt, f)).read(), f"{f} no longer uses .{name}"
    for cls in kv0523.KV_CLASSES.values():
        assert not getattr(cls, "__abstractmethods__", None), f"{cls.__name__}: {cls.__abstractmethods__}"

    # A decode manager in this process (host memory), its senders' and receivers' attributes,
    # and what we refuse.
    os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    h.IMPL["impl"] = "ours"
    a = type("A", (), dict(layers=1, page_bytes=4096, page_tokens=16, aux_slots=4, hidden=64))()
    server = kv0523.NixlKVBootstrapServer(host="127.0.0.1", port=h.free_port())
    h.publish_server_args("prefill", "127.0.0.1", server.port, 30000)
    c = {t: getattr(kv0523, n, None) for t, n in (
        (KVClassType.MANAGER, "NixlKVManager"), (KVClassType.SENDER, "NixlKVSender"),
        (KVClassType.RECEIVER, "NixlKVReceiver"))}
    from sglang.srt.disaggregation.base.conn import KVArgs

    c[KVClassType.KVARGS] = KVArgs
    kv, meta, aux, infos = h.make_pools(a, np, 8)
    pre = kv0523.NixlKVManager(h.make_kv_args(c, a, kv, infos), DisaggregationMode.PREFILL, None, False)
    h.publish_server_args("decode", "127.0.0.1", server.port, 30000)
    kv2, meta2, aux2, infos2 = h.make_pools(a, np, 8)
    dec = kv0523.NixlKVManager(h.make_kv_args(c, a, kv2, infos2), DisaggregationMode.DECODE, None, False)
    for name in MANAGER_USES + tuple(OTHER_USES):
        assert hasattr(dec, name) and hasattr(pre, name), f"manager lacks .{name}"
    addr = f"127.0.0.1:{server.port}"
    deadline = time.monotonic() + 60
    while not dec.try_ensure_parallel_info(addr):
        assert time.monotonic() < deadline, "no parallel info"
        time.sleep(0.05)
    info = dec.prefill_info_table[addr]
    assert info.dp_size == 1 and info.page_size == 16, info

    def failed_with(x, words):
        deadline = time.monotonic() + 30
        while int(x.poll()) != KVPoll.Failed:
            assert time.monotonic() < deadline, f"{type(x).__name__} never failed"
            time.sleep(0.005)
        try:
            x.failure_exception()
        except KVTransferError as e:
            assert all(w in str(e) for w in words), f"{e} lacks {words}"
            return str(e)
        raise AssertionError("failure_exception did not raise")

    room = 1000
    reasons = []
    for case, kwargs in (("state", {"state_indices": [np.arange(2)]}),
                         ("prefix", {"decode_prefix_len": 16}),
                         ("host", {"destination": KVTransferDestination.HOST})):
        tx = kv0523.NixlKVSender(pre, addr, room)
        rx = kv0523.NixlKVReceiver(dec, addr, room)
        for name in SENDER_USES:
            assert hasattr(tx, name), f"sender lacks .{name}"
        for name in RECEIVER_USES:
            assert hasattr(rx, name), f"receiver lacks .{name}"
        rx.init(0)
        assert int(rx.poll()) == KVPoll.WaitingForInput
        rx.send_metadata(np.arange(2, dtype=np.int32), 0, **kwargs)
        words = {"state": ["state buffers"], "prefix": ["decode_prefix_len 16"],
                 "host": ["host destinations"]}[case]
        reasons.append(failed_with(rx, words))
        # The prefill's sender learns of it (ABORT from our decode) and fails too.
        reasons.append(failed_with(tx, ["abort"]))
        m = tx.get_transfer_metric()
        assert m.transfer_total_bytes is None, m
        room += 1
    # A prefill sender asked to send state fails with the reason, and its decode hears it.
    tx = kv0523.NixlKVSender(pre, addr, room)
    rx = kv0523.NixlKVReceiver(dec, addr, room)
    rx.init(0)
    rx.send_metadata(np.arange(2, dtype=np.int32), 1)
    deadline = time.monotonic() + 30
    while int(tx.poll()) != KVPoll.WaitingForInput:
        assert time.monotonic() < deadline, "sender never bootstrapped"
        time.sleep(0.005)
    tx.init(2, 1)
    tx.send(np.arange(2, dtype=np.int64), [np.arange(1)])
    reasons.append(failed_with(tx, ["state buffers"]))
    reasons.append(failed_with(rx, ["state buffers"]))
    server.close()
    print(f"  class contract: {len(MANAGER_USES + SENDER_USES + RECEIVER_USES + tuple(OTHER_USES))} "
          "names SGLang uses, all present; state, prefix and host-destination requests fail on "
          "both sides with KVTransferError and a reason")


# --------------------------------------------------------------------------- PD pairs

PAIRS = [("ours", "sglang"), ("sglang", "ours"), ("ours", "ours")]


def start_pairs():
    procs = []
    for pre, dec in PAIRS:
        args = [sys.executable, os.path.join(HERE, "sglang0523_pd.py"), "pair",
                "--prefill-impl", pre, "--decode-impl", dec, "--requests", "8",
                # Per-room bounds, not waits: a prefill's rooms start counting when it is ready,
                # and under CI load its decode's SGLang import alone took 59 s once.
                "--bad-page", "1", "--abort-room-after-metadata", "3", "--timeout", "300",
                "--pair-timeout", "900"]
        procs.append(subprocess.Popen(args, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def test_pairs(procs):
    for (pre, dec), p in zip(PAIRS, procs):
        out, err = p.communicate(timeout=1200)
        events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
        done = {e["role"]: e for e in events if e.get("event") == "done"}
        assert done.get("pair", {}).get("pass"), \
            f"prefill {pre} / decode {dec}:\n" + "\n".join(json.dumps(e)[:400] for e in events[-20:]) + err[-3000:]
        ready = {e["role"]: e for e in events if e.get("event") == "ready"}
        for role, impl in (("prefill", pre), ("decode", dec)):
            want = "nixl_rs." if impl == "ours" else "sglang."
            assert ready[role]["manager_class"].startswith(want), ready[role]
        if pre == "ours":  # SGLang reads the metric after clear()
            sent = [e for e in events if e.get("event") == "result" and e["role"] == "prefill" and e["ok"]]
            want = 16 * 4 * 4096 + sum((64, 64, 64, 64, 512, 512, 64, 128, 128, 64))
            assert sent and all(e["metric_bytes"] == want and e["metric_latency_s"] > 0 for e in sent), sent[:2]
        d = done["decode"]
        assert d["ok"] == 6 and d["passed"] == 8 and d["kv_bytes_verified"] == 6 * 16 * 4 * 4096, d
        print(f"  PD prefill {pre} -> decode {dec}: 6 requests, {d['kv_bytes_verified']} KV bytes and "
              f"{d['aux_rows_verified']} aux rows verified; bad page and abort failed with reasons")


# --------------------------------------------------------------------------- HiCache

GEOMETRY = {"aligned": (16, 4, 4, 32), "unaligned": (4, 3, 2, 8)}  # PS, L, H, D


def host_pool(layout, mla, geom):
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    ps, layers, heads, dim = GEOMETRY[geom]
    common = dict(layer_num=layers, device="cpu", enable_memory_saver=False, start_layer=0, end_layer=layers - 1)
    if mla:
        dev = MLATokenToKVPool(size=256, page_size=ps, dtype=torch.bfloat16, kv_lora_rank=dim * 3,
                               qk_rope_head_dim=dim, **common)
        host = MLATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, ps, layout,
                                    pin_memory=False, device="cpu", device_capacity_tokens=dev.size,
                                    start_layer=0, end_layer=layers - 1, target_layer_num=layers)
    else:
        dev = MHATokenToKVPool(size=256, page_size=ps, dtype=torch.bfloat16, head_num=heads,
                               head_dim=dim, **common)
        host = MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, ps, layout,
                                    pin_memory=False, device="cpu", device_capacity_tokens=dev.size,
                                    start_layer=0, end_layer=layers - 1)
    g = torch.Generator().manual_seed(hash((layout, mla, geom)) & 0xFFFF)
    host.kv_buffer.view(torch.uint8).copy_(torch.randint(0, 256, host.kv_buffer.view(torch.uint8).shape,
                                                         dtype=torch.uint8, generator=g))
    return host


def storage_config(mla, direct, model="org/My-Model"):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=True,
        model_name=model, extra_config={"use_direct_io": direct, "l3_cleaner_enabled": False,
                                        "plugin": {"posix": {"active": True}}})


def page(host, start):
    """The page's bytes (random bytes are NaNs as bf16: compare bytes, not values)."""
    import torch

    return host.get_data_page(int(start), flat=True).contiguous().view(-1).view(torch.uint8).clone()


def ours(cfg, host):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    be = StorageBackendFactory.create_backend("nixl", cfg, host)
    assert type(be).__module__ == "nixl_rs.sglang.hicache0523", type(be)
    be.register_mem_pool_host(host)
    return be


HICACHE_CASES = [(layout, mla) for layout in ("page_first", "page_first_direct", "layer_first")
                 for mla in (False, True)] + [("page_head", False)]


def keys_of(tag, n):
    import hashlib

    return [hashlib.sha256(f"{tag}/{i}".encode()).hexdigest() for i in range(n)]


def test_hicache(root):
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

    n = 5
    for layout, mla in HICACHE_CASES:
        os.environ["SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"] = os.path.join(root, f"own-{layout}-{mla}")
        host = host_pool(layout, mla, "aligned")
        ps = host.page_size
        be = ours(storage_config(mla, True), host)
        assert be.is_zero_copy == (layout in ("page_first", "page_first_direct")), (layout, be.is_zero_copy)
        keys = keys_of(layout, n)
        src = host.alloc(n * ps)
        want = [page(host, src[i * ps]) for i in range(n)]
        assert be.batch_exists(keys) == 0
        assert be.batch_set_v1(keys, src, HiCacheStorageExtraInfo()) == [True] * n
        assert be.batch_exists(keys) == n and be.batch_exists(keys[:2] + ["0" * 64] + keys[2:]) == 2
        dst = host.alloc(n * ps)
        assert be.batch_get_v1(keys, dst, HiCacheStorageExtraInfo()) == [True] * n
        for i in range(n):
            assert torch.equal(page(host, dst[i * ps]), want[i]), f"{layout} mla={mla}: page {i}"
        miss = keys[:2] + ["f" * 64] + keys[3:]
        got = be.batch_get_v1(miss, dst)
        assert got[:2] == [True, True] and got[2] is False, got
        be.clear()
        assert be.batch_exists(keys) == 0
        be.close()
    print(f"  HiCache zero-copy: {len(HICACHE_CASES)} pool layouts (MHA, MLA), {n} pages set and "
          "got back through the pool, every byte; batch_exists stops at the first missing page")


def test_files(root):
    """SGLang 0.5.23's HiCacheNixl and ours on one directory: each reads what the other wrote."""
    import torch
    from sglang.srt.mem_cache.storage.nixl.hicache_nixl import HiCacheNixl as TheirHiCacheNixl

    n, cases = 3, 0
    for geom, direct in (("aligned", True), ("aligned", False), ("unaligned", False)):
        for layout, mla in HICACHE_CASES:
            d = os.path.join(root, f"files-{geom}-{direct}-{layout}-{mla}")
            os.environ["SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"] = d
            host = host_pool(layout, mla, geom)
            ps = host.page_size
            cfg = storage_config(mla, direct)
            theirs = TheirHiCacheNixl(cfg, d)
            theirs.register_mem_pool_host(host)
            mine = ours(cfg, host)
            assert mine.is_zero_copy == theirs.is_zero_copy, (geom, direct, layout, mla)
            for writer, reader, tag in ((theirs, mine, "theirs"), (mine, theirs, "ours")):
                keys = keys_of(f"{geom}{direct}{layout}{mla}{tag}", n)
                src = host.alloc(n * ps)
                want = [page(host, src[i * ps]) for i in range(n)]
                assert all(writer.batch_set_v1(keys, src)), f"{tag} set: {geom} {direct} {layout} mla={mla}"
                assert reader.batch_exists(keys) == n, f"{tag} -> exists: {geom} {direct} {layout} mla={mla}"
                dst = host.alloc(n * ps)
                assert reader.batch_get_v1(keys, dst) == [True] * n, f"{tag} -> get: {geom} {direct} {layout} mla={mla}"
                for i in range(n):
                    assert torch.equal(page(host, dst[i * ps]), want[i]), \
                        f"written by {tag}, {geom} direct={direct} {layout} mla={mla}: page {i}"
                host.free(src)
                host.free(dst)
                cases += 1
            theirs.close()
            mine.close()
    print(f"  files: {cases} directions (SGLang 0.5.23's HiCacheNixl <-> ours; aligned pools with "
          "and without direct I/O, unaligned without), every page of every layout read back, every byte")


if __name__ == "__main__":
    t0 = time.time()
    os.environ.pop("NIXL_RUNTIME_DIR", None)  # SGLang's nixl package and ours share its wheel
    probes = [start_probe(env, fake) for _, env, fake, _ in ACTIVATION]
    pairs = start_pairs()
    # SGLang's NIXL package first: ours then loads the same runtime (its wheel).
    import nixl._api  # noqa: F401
    from sglang.srt.plugins import load_plugins

    os.environ["NIXL_RS_SGLANG"] = "1"
    load_plugins()
    root = tempfile.mkdtemp(prefix="hicache-0523-", dir=os.environ.get("NIXL_RS_TEST_DIR"))
    test_contract()
    test_hicache(root)
    test_files(root)
    test_activation(probes)
    test_pairs(pairs)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(_TMP, ignore_errors=True)
    print(f"sglang 0.5.23: 5 of 5 passed ({time.time() - t0:.1f}s)")
