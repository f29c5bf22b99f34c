"""PD transfer between SGLang 0.5.1.post3's own Python NIXL connector and nixl-rs, in two
processes, both directions, plus nixl-rs on both sides under SGLang's class names.

Cases: prefill=sglang/decode=ours, prefill=ours/decode=sglang, prefill=ours/decode=ours. Each case
has a prefill and a decode in two processes; the processes are long-lived workers (this file with
`--worker IMPL`) that import SGLang once and serve several cases, so the three cases cost three
imports (started together) instead of six: `sglang` (the prefill of case 1, the decode of case
2), `ours-a` (decode of case 1, prefill of cases 2 and 3) and `ours-b` (decode of case 3).

Every case builds fresh managers over fresh memory. The prefill fills its KV pool (2 layers, K
and V: 4 buffers of 64 pages x 4 KiB) and SGLang 0.5.1's six-buffer `MetadataBuffers` aux layout
(16 slots; 64, 64, 64, 512, 512, 8192 bytes per row) with a pattern; the decode asks for 3
requests of 8 pages (sent in two chunks of 4) into other page and aux indices, and checks every
byte of every page and of the aux rows that SGLang 0.5.1 sends (its prefill writes only the first
aux buffer), and that nothing else was written.

The KV pool is host memory: this machine has no GPU. SGLang's classes register it as "VRAM" and
pass `is_sorted=`, which NIXL 1.5.1's Python API no longer takes, so in SGLang's processes the
test wraps `nixl_agent.register_memory`/`get_xfer_descs` to say "DRAM" and drop `is_sorted`
(the only adaptation, `sglang_pd.adapt_sglang_nixl`); ours run with `NIXL_RS_KV_MEMORY=DRAM`.
Classes come from SGLang's own `get_kv_class(TransferBackend.NIXL, ...)`, after
`nixl_rs.sglang.install()` for ours.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import sglang_pd  # noqa: E402
from sglang_pd import AUX_ROWS  # noqa: E402

PAGES, PAGE = 64, 4096
KV_BUFFERS = 4
SLOTS = 16
REQUESTS = 3
PER_REQ = 8
TIMEOUT = 60.0

#: (prefill, decode) implementations and the worker that plays each role.
CASES = [
    (("sglang", "sglang"), ("ours", "ours-a")),
    (("ours", "ours-a"), ("sglang", "sglang")),
    (("ours", "ours-a"), ("ours", "ours-b")),
]


def kv_pattern(buf, page):
    return ((np.arange(PAGE) + buf * 131 + page * 7) % 251).astype(np.uint8)


def aux_pattern(buf, slot, row):
    return ((np.arange(row) + buf * 17 + slot * 13 + 1) % 253).astype(np.uint8)


def src_pages(r):
    return np.arange(10 + r * PER_REQ, 10 + (r + 1) * PER_REQ, dtype=np.int32)


def dst_pages(r):
    return np.arange(40 - r * PER_REQ - PER_REQ, 40 - r * PER_REQ, dtype=np.int32)[::-1].copy()


def wait(poll_fn, want, what):
    sglang_pd.wait_poll(poll_fn, want, what, timeout=TIMEOUT, nap=0.0005)


def run_prefill(c, port, ready):
    """One case's prefill: fresh pools, bootstrap server and manager; `ready()` once it listens;
    returns the objects to keep alive until the decode has verified."""
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    kv = [np.zeros(PAGES * PAGE, dtype=np.uint8) for _ in range(KV_BUFFERS)]
    aux = [np.zeros(SLOTS * row, dtype=np.uint8) for row in AUX_ROWS]
    for b in range(KV_BUFFERS):
        for p in range(PAGES):
            kv[b][p * PAGE:(p + 1) * PAGE] = kv_pattern(b, p)
    for b, row in enumerate(AUX_ROWS):
        for s in range(SLOTS):
            aux[b][s * row:(s + 1) * row] = aux_pattern(b, s, row)
    server = c[KVClassType.BOOTSTRAP_SERVER](port)
    sglang_pd.wait_listening(port, TIMEOUT)
    mgr = c[KVClassType.MANAGER](sglang_pd.make_args(c[KVClassType.KVARGS], kv, aux, PAGE),
                                 DisaggregationMode.PREFILL, sglang_pd.server_args(port), False)
    ready()
    senders = []
    for r in range(REQUESTS):
        room = 1000 + r
        tx = c[KVClassType.SENDER](mgr, f"127.0.0.1:{port}", room, [0], 0)
        wait(tx.poll, KVPoll.WaitingForInput, f"prefill room {room} bootstrap")
        tx.init(PER_REQ, r)
        pages = src_pages(r)
        tx.send(pages[: PER_REQ // 2])
        tx.send(pages[PER_REQ // 2:])
        wait(tx.poll, KVPoll.Success, f"prefill room {room} transfer")
        senders.append(tx)
    return [server, mgr, senders, kv, aux]


def run_decode(c, port):
    """One case's decode: fresh pools and manager, the requests, every byte checked."""
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    kv = [np.zeros(PAGES * PAGE, dtype=np.uint8) for _ in range(KV_BUFFERS)]
    aux = [np.zeros(SLOTS * row, dtype=np.uint8) for row in AUX_ROWS]
    mgr = c[KVClassType.MANAGER](sglang_pd.make_args(c[KVClassType.KVARGS], kv, aux, PAGE),
                                 DisaggregationMode.DECODE, sglang_pd.server_args(port), False)
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
    return f"VERIFIED {REQUESTS * PER_REQ * KV_BUFFERS} pages and {REQUESTS} aux rows"


def worker_main(impl):
    """Serves cases: reads JSON commands on stdin, answers JSON lines on a private copy of
    stdout (fd 1 goes to stderr, so library prints cannot corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    c = sglang_pd.classes(impl)
    reply(ready=True)
    held = []
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "prefill":
                held = run_prefill(c, cmd["port"], lambda: reply(listening=True))
                reply(ok=True, result="sent")
            elif cmd["op"] == "decode":
                reply(ok=True, result=run_decode(c, cmd["port"]))
            elif cmd["op"] == "release":  # the case is over: drop its objects
                for obj in held:
                    close = getattr(obj, "close", None)
                    if impl == "ours" and close is not None:
                        close()
                held = []
                reply(ok=True, result="released")
        except BaseException as e:  # noqa: BLE001 - reported to the driver, which fails
            reply(ok=False, result=f"{type(e).__name__}: {e}")
    os._exit(0)  # SGLang's bootstrap thread is not a daemon


class Worker:
    def __init__(self, impl, env):
        self.impl = impl
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", impl],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def send(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def read(self, what):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"{what}: worker ({self.impl}) exited with {self.p.wait()}")
        msg = json.loads(line)
        if msg.get("ok") is False:
            raise SystemExit(f"{what}: {msg['result']}")
        return msg

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=20)
        except Exception:  # noqa: BLE001
            self.p.kill()


def run_case(workers, prefill, decode):
    (pre_impl, pre_w), (dec_impl, dec_w) = prefill, decode
    p, d = workers[pre_w], workers[dec_w]
    port = sglang_pd.free_port()
    start = time.time()
    p.send(op="prefill", port=port)
    p.read(f"prefill ({pre_impl}) start")
    d.send(op="decode", port=port)
    res = d.read(f"decode ({dec_impl})")
    p.read(f"prefill ({pre_impl})")
    p.send(op="release")
    p.read(f"prefill ({pre_impl}) release")
    print(f"prefill={pre_impl:6} decode={dec_impl:6}: {res['result']} ({time.time() - start:.1f}s)",
          flush=True)


def main():
    env = dict(os.environ)
    env.pop("NIXL_RS_SGLANG", None)
    start = time.time()
    names = {w: impl for case in CASES for impl, w in case}
    workers = {w: Worker(impl, env) for w, impl in names.items()}
    try:
        for w in workers.values():
            w.read(f"worker ({w.impl}) start")
        print(f"workers {', '.join(workers)} imported SGLang in {time.time() - start:.1f}s", flush=True)
        for prefill, decode in CASES:
            run_case(workers, prefill, decode)
    finally:
        for w in workers.values():
            w.close()
    print(f"KV interop: {len(CASES)} of {len(CASES)} cases passed ({time.time() - start:.1f}s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        worker_main(a.worker)
    else:
        main()
