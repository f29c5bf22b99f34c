"""PD transfer between SGLang 0.5.1.post3's own Python NIXL connector and nixl-rs, in two
processes, both directions, plus nixl-rs on both sides under SGLang's class names.

Each case starts a prefill process and a decode process (this file with `--role`). The prefill
fills its KV pool (2 layers, K and V: 4 buffers of 64 pages x 4 KiB) and SGLang 0.5.1's six-buffer
`MetadataBuffers` aux layout (16 slots; 64, 64, 64, 512, 512, 8192 bytes per row) with a pattern;
the decode asks for 3 requests of 8 pages (sent in two chunks of 4) into other page and aux
indices, and checks every byte of every page and of the aux rows that SGLang 0.5.1 sends (its
prefill writes only the first aux buffer), and that nothing else was written.

The KV pool is host memory: this machine has no GPU. SGLang's classes register it as "VRAM" and
pass `is_sorted=`, which NIXL 1.5.1's Python API no longer takes, so in SGLang's processes the
test wraps `nixl_agent.register_memory`/`get_xfer_descs` to say "DRAM" and drop `is_sorted`
(the only adaptation); ours run with `NIXL_RS_KV_MEMORY=DRAM`. Classes come from SGLang's own
`get_kv_class(TransferBackend.NIXL, ...)`, after `nixl_rs.sglang.install()` for ours.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np

PAGES, PAGE = 64, 4096
KV_BUFFERS = 4
SLOTS = 16
AUX_ROWS = [64, 64, 64, 512, 512, 8192]
REQUESTS = 3
PER_REQ = 8
TIMEOUT = 60.0


def kv_pattern(buf, page):
    return ((np.arange(PAGE) + buf * 131 + page * 7) % 251).astype(np.uint8)


def aux_pattern(buf, slot, row):
    return ((np.arange(row) + buf * 17 + slot * 13 + 1) % 253).astype(np.uint8)


def src_pages(r):
    return np.arange(10 + r * PER_REQ, 10 + (r + 1) * PER_REQ, dtype=np.int32)


def dst_pages(r):
    return np.arange(40 - r * PER_REQ - PER_REQ, 40 - r * PER_REQ, dtype=np.int32)[::-1].copy()


def adapt_sglang_nixl():
    """SGLang 0.5.1.post3 on host memory with NIXL 1.5.1: VRAM -> DRAM, no is_sorted."""
    import nixl._api as api

    agent = api.nixl_agent
    reg, xfer = agent.register_memory, agent.get_xfer_descs

    def fix(mem_type):
        return "DRAM" if mem_type == "VRAM" else mem_type

    def register_memory(self, reg_list, mem_type=None, is_sorted=None, **kw):
        return reg(self, reg_list, fix(mem_type), **kw)

    def get_xfer_descs(self, descs, mem_type=None, is_sorted=None, **kw):
        return xfer(self, descs, fix(mem_type), **kw)

    agent.register_memory = register_memory
    agent.get_xfer_descs = get_xfer_descs


def classes(impl):
    if impl == "ours":
        os.environ["NIXL_RS_KV_MEMORY"] = "DRAM"
        import nixl_rs.sglang

        nixl_rs.sglang.install()
    else:
        adapt_sglang_nixl()
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    c = {t: get_kv_class(TransferBackend.NIXL, t) for t in KVClassType}
    want = "nixl_rs" if impl == "ours" else "sglang"
    for t in (KVClassType.MANAGER, KVClassType.SENDER, KVClassType.RECEIVER):
        assert c[t].__module__.startswith(want), f"{impl}: {t} is {c[t].__module__}"
    return c


def make_args(kv_args_class, kv, aux):
    a = kv_args_class()
    a.engine_rank = 0
    a.kv_data_ptrs = [b.__array_interface__["data"][0] for b in kv]
    a.kv_data_lens = [b.nbytes for b in kv]
    a.kv_item_lens = [PAGE] * len(kv)
    a.aux_data_ptrs = [b.__array_interface__["data"][0] for b in aux]
    a.aux_data_lens = [b.nbytes for b in aux]
    a.aux_item_lens = list(AUX_ROWS)
    a.ib_device = None
    a.gpu_id = 0
    a.pp_rank = 0
    a.system_dp_rank = 0
    a.decode_tp_size = 1
    a.prefill_pp_size = 1
    a.prefill_start_layer = 0
    a.page_size = 1
    a.kv_head_num = 1
    return a


def wait(poll_fn, want, what):
    from sglang.srt.disaggregation.base.conn import KVPoll

    start = time.time()
    while True:
        s = int(poll_fn())
        if s == want:
            return
        if s == KVPoll.Failed:
            raise SystemExit(f"{what}: Failed")
        if time.time() - start > TIMEOUT:
            raise SystemExit(f"{what}: stuck at {s}")
        time.sleep(0.0005)


def role_main(role, impl, port):
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    c = classes(impl)
    server_args = types.SimpleNamespace(
        disaggregation_bootstrap_port=port, dist_init_addr=f"127.0.0.1:{port}",
        tp_size=1, dp_size=1, enable_dp_attention=False,
    )
    kv = [np.zeros(PAGES * PAGE, dtype=np.uint8) for _ in range(KV_BUFFERS)]
    aux = [np.zeros(SLOTS * row, dtype=np.uint8) for row in AUX_ROWS]
    if role == "prefill":
        for b in range(KV_BUFFERS):
            for p in range(PAGES):
                kv[b][p * PAGE:(p + 1) * PAGE] = kv_pattern(b, p)
        for b, row in enumerate(AUX_ROWS):
            for s in range(SLOTS):
                aux[b][s * row:(s + 1) * row] = aux_pattern(b, s, row)
        server = c[KVClassType.BOOTSTRAP_SERVER](port)
        start = time.time()
        while True:  # SGLang's server starts listening on its own thread
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() - start > TIMEOUT:
                    raise SystemExit("bootstrap server never listened")
                time.sleep(0.01)
        mgr = c[KVClassType.MANAGER](make_args(c[KVClassType.KVARGS], kv, aux),
                                     DisaggregationMode.PREFILL, server_args, False)
        print("READY", flush=True)
        for r in range(REQUESTS):
            room = 1000 + r
            tx = c[KVClassType.SENDER](mgr, f"127.0.0.1:{port}", room, [0], 0)
            wait(tx.poll, KVPoll.WaitingForInput, f"prefill room {room} bootstrap")
            tx.init(PER_REQ, r)
            pages = src_pages(r)
            tx.send(pages[: PER_REQ // 2])
            tx.send(pages[PER_REQ // 2:])
            wait(tx.poll, KVPoll.Success, f"prefill room {room} transfer")
        # Stay until the decode has verified (it closes our stdin).
        sys.stdin.read()
        del server
    else:
        mgr = c[KVClassType.MANAGER](make_args(c[KVClassType.KVARGS], kv, aux),
                                     DisaggregationMode.DECODE, server_args, False)
        for r in range(REQUESTS):
            room = 1000 + r
            rx = c[KVClassType.RECEIVER](mgr, f"127.0.0.1:{port}", room, None)
            rx.init(dst_pages(r), r + 1)
            wait(rx.poll, KVPoll.Success, f"decode room {room}")
        written = set()
        for r in range(REQUESTS):
            for sp, dp in zip(src_pages(r), dst_pages(r)):
                written.add(int(dp))
                for b in range(KV_BUFFERS):
                    got = kv[b][dp * PAGE:(dp + 1) * PAGE]
                    assert np.array_equal(got, kv_pattern(b, int(sp))), f"room {r} buf {b} page {dp}"
            row = AUX_ROWS[0]
            got = aux[0][(r + 1) * row:(r + 2) * row]
            assert np.array_equal(got, aux_pattern(0, r, row)), f"aux row of room {r}"
        for b in range(KV_BUFFERS):
            for p in set(range(PAGES)) - written:
                assert not kv[b][p * PAGE:(p + 1) * PAGE].any(), f"page {p} written"
        print(f"VERIFIED {REQUESTS * PER_REQ * KV_BUFFERS} pages and {REQUESTS} aux rows", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(prefill, decode):
    port = free_port()
    me = [sys.executable, os.path.abspath(__file__)]
    env = dict(os.environ)
    env.pop("NIXL_RS_SGLANG", None)
    start = time.time()
    p = subprocess.Popen(me + ["--role", "prefill", "--impl", prefill, "--port", str(port)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        while True:
            line = p.stdout.readline()
            if not line or line.strip() == "READY":
                break
            seen.append(line)
        assert line.strip() == "READY", f"prefill ({prefill}) did not start: {''.join(seen)}"
        d = subprocess.run(me + ["--role", "decode", "--impl", decode, "--port", str(port)],
                           env=env, timeout=TIMEOUT * 2, capture_output=True, text=True)
        if d.returncode != 0:
            raise SystemExit(f"decode ({decode}) failed:\n{d.stdout}\n{d.stderr[-4000:]}")
        print(f"prefill={prefill:6} decode={decode:6}: {d.stdout.strip()} ({time.time() - start:.1f}s)")
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    if p.returncode not in (0, None):
        raise SystemExit(f"prefill ({prefill}) exited with {p.returncode}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("--impl")
    ap.add_argument("--port", type=int)
    a = ap.parse_args()
    if a.role:
        role_main(a.role, a.impl, a.port)
        os._exit(0)  # SGLang's bootstrap thread is not a daemon
    for pre, dec in [("sglang", "ours"), ("ours", "sglang"), ("ours", "ours")]:
        run_case(pre, dec)
    print("KV interop: 3 of 3 cases passed")
