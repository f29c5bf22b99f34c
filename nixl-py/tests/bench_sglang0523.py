"""`cargo xtask bench py` (SGLang 0.5.23 part): SGLang 0.5.23's own NIXL classes against ours
(nixl-rs through its plugin entry point, under SGLang's names), the same workloads in one run,
rounds alternating.

PD: `sglang0523_pd.py pair` per implementation, workload and round (a prefill and a decode
process, both sides the same implementation), host memory, 0.5.23's ten aux buffers, source
pages of a request never adjacent, one request in flight. Two workloads: "large", 64 KV buffers
(32 layers, K and V) of 32 KiB pages and 32-page requests sent as one chunk (2048 descriptors,
64 MiB a request: bound by the copy itself on a CPU machine); "small", 4 buffers of 4 KiB pages
and 16-page requests sent in four chunks (what the protocol and the engine cost). Time-to-Success per
request: the decode's `poll()` returning Success minus the moment just before its
`send_metadata()` (the prefill polls its sender, sees WaitingForInput, sends; the decode polls
for Success), the harness's default poll loop (0.2 ms naps) on both sides. Each run's every
byte is checked by the harness.

HiCache: one process, both backends built by `StorageBackendFactory`/SGLang's class over one
SGLang host pool (MHA, `page_first`, 16 tokens x 8 layers x 8 heads x 128 dims bf16: 512 KiB a
page as a `_k` and a `_v` object of 256 KiB), POSIX plugin, a directory per implementation.
Per round and implementation: `batch_set_v1` of 256 pages in SGLang's batches of 128 under
fresh keys, `sync`, then `batch_get_v1` of them into other pages of the pool; GB/s = bytes /
time of the calls. SGLang's class runs with its defaults (direct I/O, the pool pre-registered)
and, as a second row, with `use_direct_io` off. Every page read back is compared with what was
written (outside the timing).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NAMES = {"sglang": "SGLang 0.5.23 (Python)", "ours": "nixl-rs (ours)",
         "sglang-buffered": "SGLang 0.5.23, use_direct_io off"}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


#: PD workloads: (row label, harness options).
PD_SHAPES = {
    "large": ("32 pages x 64 buffers x 32 KiB (64 MiB), one chunk",
              ["--layers", "32", "--page-bytes", str(32 * 1024), "--chunks", "1",
               "--pages-per-chunk", "32", "--prefill-pages", "257", "--decode-pages", "512"]),
    "small": ("16 pages x 4 buffers x 4 KiB (256 KiB), four chunks",
              ["--layers", "2", "--page-bytes", "4096", "--chunks", "4", "--pages-per-chunk", "4"]),
}


def bench_pd(rounds, requests, shape):
    tts = {"sglang": [], "ours": []}
    for r in range(rounds):
        order = ("sglang", "ours") if r % 2 == 0 else ("ours", "sglang")
        for impl in order:
            args = [sys.executable, os.path.join(HERE, "sglang0523_pd.py"), "pair", "--impl", impl,
                    "--requests", str(requests)] + PD_SHAPES[shape][1] + [
                    "--window", "1", "--timeout", "60", "--pair-timeout", "900"]
            p = subprocess.run(args, text=True, capture_output=True, timeout=1200)
            events = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
            done = [e for e in events if e.get("event") == "done" and e["role"] == "pair"]
            if not done or not done[0]["pass"]:
                sys.exit(f"PD {impl} round {r} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            got = [e["tts_ms"] for e in events
                   if e.get("event") == "result" and e["role"] == "decode" and e["ok"]]
            # The first request of a pair pays for connections and registrations.
            tts[impl].extend(got[1:])
            print(f"  PD {shape} round {r} {impl}: p50 {pct(got[1:], 0.5):.3f} ms over {len(got) - 1}",
                  file=sys.stderr, flush=True)
    return {impl: {"p50_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9), "n": len(v)} for impl, v in tts.items()}


def host_pool():
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    ps, layers = 16, 8
    dev = MHATokenToKVPool(size=2048, page_size=ps, dtype=torch.bfloat16, head_num=8, head_dim=128,
                           layer_num=layers, device="cpu", enable_memory_saver=False,
                           start_layer=0, end_layer=layers - 1)
    host = MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 4.0, 0, ps, "page_first",
                                pin_memory=False, device="cpu", device_capacity_tokens=dev.size,
                                start_layer=0, end_layer=layers - 1)
    del dev
    host.kv_buffer.view(torch.uint8).copy_(
        torch.randint(0, 256, host.kv_buffer.view(torch.uint8).shape, dtype=torch.uint8))
    return host


def config(direct):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
        model_name="bench/model", extra_config={"use_direct_io": direct, "l3_cleaner_enabled": False,
                                                "plugin": {"posix": {"active": True}}})


def bench_hicache(rounds, root):
    import hashlib

    import torch
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.mem_cache.storage.nixl.hicache_nixl import HiCacheNixl as Theirs

    host = host_pool()
    ps = host.page_size
    n = 256
    page_bytes = host.get_dummy_flat_data_page().numel() * host.dtype.itemsize
    backends = {}
    for impl, direct in (("sglang", True), ("sglang-buffered", False), ("ours", True)):
        d = os.path.join(root, impl)
        os.environ["SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"] = d
        be = (StorageBackendFactory.create_backend("nixl", config(direct), host) if impl == "ours"
              else Theirs(config(direct), d))
        be.register_mem_pool_host(host)
        assert type(be).__module__.startswith("nixl_rs" if impl == "ours" else "sglang"), type(be)
        backends[impl] = be
    res = {impl: {"set": [], "get": []} for impl in backends}
    src = host.alloc(n * ps)
    dst = host.alloc(n * ps)

    def page(idx, i):
        return host.get_data_page(int(idx[i * ps]), flat=True).contiguous().view(torch.uint8)

    for r in range(rounds):
        order = list(backends) if r % 2 == 0 else list(reversed(backends))
        for impl in order:
            be = backends[impl]
            keys = [hashlib.sha256(f"{impl}/{r}/{i}".encode()).hexdigest() for i in range(n)]
            os.sync()
            t = time.perf_counter()
            for b in range(0, n, 128):
                ok = be.batch_set_v1(keys[b:b + 128], src[b * ps:(b + 128) * ps])
                assert all(ok), f"{impl} set failed"
            res[impl]["set"].append(n * page_bytes / (time.perf_counter() - t) / 1e9)
            os.sync()
            dst_view = host.kv_buffer.view(torch.uint8)
            t = time.perf_counter()
            for b in range(0, n, 128):
                ok = be.batch_get_v1(keys[b:b + 128], dst[b * ps:(b + 128) * ps])
                assert all(ok), f"{impl} get failed"
            res[impl]["get"].append(n * page_bytes / (time.perf_counter() - t) / 1e9)
            for i in range(0, n, 37):
                assert torch.equal(page(src, i), page(dst, i)), f"{impl}: page {i} differs"
            del dst_view
    for be in backends.values():
        be.close()
    return {impl: {op: pct(v, 0.5) for op, v in ops.items()} for impl, ops in res.items()}, page_bytes, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="PD runs per implementation")
    ap.add_argument("--requests", type=int, default=101, help="PD requests per run")
    ap.add_argument("--hc-rounds", type=int, default=4, help="HiCache rounds per implementation")
    ap.add_argument("--only", choices=("pd", "hicache"))
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args()
    os.environ.pop("NIXL_RUNTIME_DIR", None)
    out = {}
    if a.only != "hicache":
        out["pd"] = {shape: bench_pd(a.rounds, a.requests, shape) for shape in PD_SHAPES}
    if a.only != "pd":
        import nixl._api  # noqa: F401 - SGLang's NIXL first: ours loads the same runtime
        from sglang.srt.plugins import load_plugins

        os.environ["NIXL_RS_SGLANG"] = "1"
        load_plugins()
        root = tempfile.mkdtemp(prefix="bench-hicache-0523-", dir=os.environ.get("BENCH_DIR"))
        try:
            out["hicache"], page_bytes, n = bench_hicache(a.hc_rounds, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| SGLang 0.5.23, one run | " + " | ".join(NAMES[i] for i in ("sglang", "ours")) + " | ours / SGLang |")
    print("|---|---|---|---|")
    for shape, res in out.get("pd", {}).items():
        s, o = res["sglang"]["p50_ms"], res["ours"]["p50_ms"]
        print(f"| PD time-to-Success p50, {PD_SHAPES[shape][0]} (ms) | {s:.3f} | {o:.3f} | {s / o:.2f}x faster |")
    if "hicache" in out:
        h = out["hicache"]
        for op in ("set", "get"):
            s, o, b = h["sglang"][op], h["ours"][op], h["sglang-buffered"][op]
            print(f"| HiCache batch_{op}_v1 GB/s, {n} pages of {page_bytes // 1024} KiB | {s:.2f} | {o:.2f} | {o / s:.2f}x |")
            print(f"| ... against SGLang with use_direct_io off | {b:.2f} | {o:.2f} | {o / b:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
