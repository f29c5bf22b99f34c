"""`cargo xtask bench py`: SGLang 0.5.1.post3's own Python NIXL classes against ours (nixl-rs
under SGLang's class names), the same workloads, measured in one run with rounds alternating.

PD: a prefill and a decode process per implementation (classes from SGLang's `get_kv_class`),
64 KV buffers of 32 KiB pages (POOL pages each, host memory), SGLang 0.5.1's six-buffer aux
layout, 32-page requests sent as one chunk, pages scattered (no two adjacent, so neither side
can merge descriptors: 2048 per request). Per request: `send()` time on the prefill, and
time-to-Success = the decode's first `poll()` returning Success minus the moment just before
`send()` (CLOCK_MONOTONIC is shared by the processes). While one implementation's pair runs, the
other's is stopped (SIGSTOP), so an idle pair that spins cannot slow the measured one. Idle CPU:
utime+stime of the prefill and decode processes (/proc/PID/stat) over IDLE_S seconds with no
request in flight, the other pair stopped.

HiCache: one process per implementation, 1000 pages of 64 KiB in torch CPU tensors (one
registered buffer, as SGLang's host pool is), `batch_set` then `batch_get` in batches of 64 under
fresh keys each round, POSIX plugin, files under one directory per implementation; `sync` before
each phase; batches alternate between the implementations. SGLang's class opens two descriptors
per key per call and never closes them: between rounds (not timed) the harness closes those
left open in either process and counts them.

Timing passes do not verify; a separate pass per implementation checks every byte (KV pages of
every buffer and the aux row SGLang 0.5.1 sends; every HiCache page read back).

Protocol: workers read JSON lines on stdin and answer JSON lines on a private copy of stdout
(fd 1 is pointed at stderr so library prints cannot corrupt it).
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from sglang_pd import AUX_ROWS, free_port  # noqa: E402

PAGE = 32 * 1024
BUFFERS = 64
POOL = 128
PER_REQ = 32
SLOTS = 16
IMPLS = ("sglang", "ours")
NAMES = {"sglang": "SGLang 0.5.1.post3 (Python)", "ours": "nixl-rs (ours)"}

HC_PAGES = 1000
HC_PAGE = 64 * 1024
HC_BATCH = 64


# ---------------------------------------------------------------- workers


def proto():
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    return reply


def kv_expected(b, pages):
    """The pattern of buffer `b`'s `pages`, as uint64 words: (b, page, word) in every word."""
    words = PAGE // 8
    p = np.asarray(pages, dtype=np.uint64)[:, None]
    return (np.uint64(b) << np.uint64(48)) | (p << np.uint64(32)) | np.arange(words, dtype=np.uint64)[None, :]


def aux_expected(slot):
    return ((np.arange(AUX_ROWS[0]) + slot * 13 + 1) % 253).astype(np.uint8)


def request_pages(i):
    """Request `i`'s source and destination pages: scattered, never adjacent."""
    rng = np.random.default_rng(1000 + i)
    src = rng.choice(np.arange(0, POOL, 2), PER_REQ, replace=False).astype(np.int32)
    dst = rng.choice(np.arange(1, POOL, 2), PER_REQ, replace=False).astype(np.int32)
    return src, dst


def pd_worker(role, impl, port):
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    import sglang_pd

    reply = proto()
    c = sglang_pd.classes(impl)
    words = PAGE // 8
    kv = [np.zeros(POOL * PAGE, dtype=np.uint8) for _ in range(BUFFERS)]
    aux = [np.zeros(SLOTS * row, dtype=np.uint8) for row in AUX_ROWS]
    if role == "prefill":
        for b in range(BUFFERS):
            kv[b].view(np.uint64).reshape(POOL, words)[:] = kv_expected(b, range(POOL))
        for s in range(SLOTS):
            aux[0][s * AUX_ROWS[0]:(s + 1) * AUX_ROWS[0]] = aux_expected(s)
        server = c[KVClassType.BOOTSTRAP_SERVER](port)
        sglang_pd.wait_listening(port)
        mode = DisaggregationMode.PREFILL
    else:
        for b in range(BUFFERS):
            kv[b][:] = 1  # fault the pool in
            kv[b][:] = 0
        mode = DisaggregationMode.DECODE
    mgr = c[KVClassType.MANAGER](sglang_pd.make_args(c[KVClassType.KVARGS], kv, aux, PAGE),
                                 mode, sglang_pd.server_args(port), False)
    reply({"ready": True, "pid": os.getpid()})
    senders = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        room = cmd.get("room")
        if op == "prep":  # prefill
            tx = c[KVClassType.SENDER](mgr, f"127.0.0.1:{port}", room, [0], 0)
            tx.init(PER_REQ, room % SLOTS)
            senders[room] = tx
            reply({"ok": True})
        elif op == "send":  # prefill
            tx = senders.pop(room)
            src, _ = request_pages(cmd["i"])
            sglang_pd.wait_poll(tx.poll, KVPoll.WaitingForInput, f"prefill room {room} bootstrap")
            t0 = time.monotonic()
            tx.send(src)
            t1 = time.monotonic()
            t2 = sglang_pd.wait_poll(tx.poll, KVPoll.Success, f"prefill room {room} transfer")
            reply({"t0": t0, "t1": t1, "t2": t2})
        elif op == "recv":  # decode
            src, dst = request_pages(cmd["i"])
            slot = (room + 1) % SLOTS
            verify = cmd.get("verify", False)
            if verify:
                for b in range(BUFFERS):
                    kv[b].view(np.uint64).reshape(POOL, words)[dst] = 0
                aux[0][slot * AUX_ROWS[0]:(slot + 1) * AUX_ROWS[0]] = 0
            rx = c[KVClassType.RECEIVER](mgr, f"127.0.0.1:{port}", room, None)
            rx.init(dst, slot)
            t3 = sglang_pd.wait_poll(rx.poll, KVPoll.Success, f"decode room {room}")
            out = {"t3": t3}
            if verify:
                bad = []
                for b in range(BUFFERS):
                    got = kv[b].view(np.uint64).reshape(POOL, words)[dst]
                    if not np.array_equal(got, kv_expected(b, src)):
                        bad.append(b)
                row = aux[0][slot * AUX_ROWS[0]:(slot + 1) * AUX_ROWS[0]]
                out["bad_buffers"] = bad
                out["aux_ok"] = bool(np.array_equal(row, aux_expected(room % SLOTS)))
                out["bytes"] = BUFFERS * PER_REQ * PAGE
            if hasattr(rx, "clear"):
                rx.clear()
            reply(out)
        elif op == "quit":
            break
    os._exit(0)  # SGLang's bootstrap thread is not a daemon


def open_under(directory, close):
    """Counts descriptors of files under `directory` open in this process, and closes them when
    `close` (SGLang's HiCacheNixl opens two per key per call and never closes them: a run would
    hit RLIMIT_NOFILE after about ten rounds). Ours are its bounded read cache: counted only."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(directory + "/"):
                if close:
                    os.close(int(fd))
                n += 1
        except OSError:
            pass
    return n


def hicache_worker(impl, directory):
    directory = os.path.abspath(directory)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ["SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"] = directory
    if impl == "ours":
        import nixl_rs.sglang

        nixl_rs.sglang.install()
    import torch
    from sglang.srt.mem_cache.storage.nixl.hicache_nixl import HiCacheNixl

    want = "nixl_rs" if impl == "ours" else "sglang"
    assert HiCacheNixl.__module__.startswith(want), f"{impl}: HiCacheNixl is {HiCacheNixl.__module__}"
    reply = proto()
    hc = HiCacheNixl(directory, "POSIX")
    src = torch.zeros(HC_PAGES * HC_PAGE, dtype=torch.uint8)
    dst = torch.zeros(HC_PAGES * HC_PAGE, dtype=torch.uint8)
    assert hc.register_buffers(src) and hc.register_buffers(dst), "register_buffers failed"
    src_pages = [src[i * HC_PAGE:(i + 1) * HC_PAGE] for i in range(HC_PAGES)]
    dst_pages = [dst[i * HC_PAGE:(i + 1) * HC_PAGE] for i in range(HC_PAGES)]
    rng = np.random.default_rng(7)
    reply({"ready": True, "pid": os.getpid()})
    keys = []
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "fill":  # a round's fresh keys and data (SGLang's keys: 64 hex digits)
            keys = [hashlib.sha256(f"{cmd['tag']}_{i}".encode()).hexdigest() for i in range(HC_PAGES)]
            src.numpy()[:] = rng.integers(0, 256, src.numel(), dtype=np.uint8)
            dst.zero_()
            reply({"ok": True})
        elif op in ("set", "get"):
            s = cmd["batch"] * HC_BATCH
            if op == "set":
                t = time.perf_counter()
                ok = hc.batch_set(keys[s:s + HC_BATCH], src_pages[s:s + HC_BATCH])
                t = time.perf_counter() - t
                assert ok, f"{impl}: batch_set failed"
            else:
                t = time.perf_counter()
                got = hc.batch_get(keys[s:s + HC_BATCH], dst_pages[s:s + HC_BATCH])
                t = time.perf_counter() - t
                assert got and all(g is not None for g in got), f"{impl}: batch_get failed"
            reply({"t": t})
        elif op == "verify":
            bad = [i for i in range(HC_PAGES) if not torch.equal(src_pages[i], dst_pages[i])]
            reply({"bad_pages": bad, "bytes": HC_PAGES * HC_PAGE})
        elif op == "clean":  # not timed: keep the disk small
            # Ours deletes through its own API, which also drops its cached descriptors of the
            # files (an unlinked file held open would be freed by the next round's first read).
            for k in keys:
                if impl == "ours":
                    hc.delete(k)
                    continue
                try:
                    os.remove(os.path.join(directory, k))
                except FileNotFoundError:
                    pass
            reply({"ok": True, "open": open_under(directory, close=impl == "sglang")})
    os._exit(0)


# ---------------------------------------------------------------- driver


class Worker:
    def __init__(self, args, env):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.pid = self.p.pid

    def ready(self):
        r = self.read()
        assert r.get("ready"), r
        return self

    def send(self, obj):
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.pid} died (exit {self.p.wait()})")
        return json.loads(line)

    def call(self, obj):
        self.send(obj)
        return self.read()

    def stop(self):
        os.kill(self.pid, signal.SIGSTOP)

    def cont(self):
        os.kill(self.pid, signal.SIGCONT)

    def quit(self):
        try:
            self.cont()
            self.send({"op": "quit"})
            self.p.stdin.close()
            self.p.wait(timeout=20)
        except Exception:  # noqa: BLE001
            self.p.kill()


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


class Pair:
    def __init__(self, impl, env):
        self.impl = impl
        self.port = free_port()
        self.prefill = Worker(["--pd", "prefill", "--impl", impl, "--port", str(self.port)], env)
        self.decode = Worker(["--pd", "decode", "--impl", impl, "--port", str(self.port)], env)
        self.room = 0
        self.i = 0

    def ready(self):
        self.prefill.ready()
        self.decode.ready()

    def request(self, verify=False):
        self.room += 1
        self.i += 1
        room, i = self.room, self.i
        assert self.prefill.call({"op": "prep", "room": room}).get("ok")
        self.decode.send({"op": "recv", "room": room, "i": i, "verify": verify})
        s = self.prefill.call({"op": "send", "room": room, "i": i})
        d = self.decode.read()
        return s, d

    def stop(self):
        self.prefill.stop()
        self.decode.stop()

    def cont(self):
        self.prefill.cont()
        self.decode.cont()

    def quit(self):
        self.prefill.quit()
        self.decode.quit()


def bench_pd(env, rounds, per_round, idle_s, verify_n):
    pairs = {impl: Pair(impl, env) for impl in IMPLS}
    try:
        for p in pairs.values():
            p.ready()
        for p in pairs.values():
            p.stop()
        res = {impl: {"send": [], "tts": [], "idle": None, "verified": 0} for impl in IMPLS}
        for impl, p in pairs.items():  # warm-up: connections, first-touch
            p.cont()
            for _ in range(3):
                p.request()
            p.stop()
        for r in range(rounds):
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for impl in order:
                p = pairs[impl]
                p.cont()
                for _ in range(per_round):
                    s, d = p.request()
                    res[impl]["send"].append(s["t1"] - s["t0"])
                    res[impl]["tts"].append(d["t3"] - s["t0"])
                p.stop()
            if (r + 1) % 5 == 0:
                print(f"  PD turn {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        tck = os.sysconf("SC_CLK_TCK")
        for impl, p in pairs.items():
            p.cont()
            time.sleep(0.5)
            pids = (p.prefill.pid, p.decode.pid)
            before = [cpu_ticks(x) for x in pids]
            t = time.monotonic()
            time.sleep(idle_s)
            el = time.monotonic() - t
            after = [cpu_ticks(x) for x in pids]
            res[impl]["idle"] = [100.0 * (a - b) / tck / el for a, b in zip(after, before)]
            # Verification pass, separate from the timed requests.
            for _ in range(verify_n):
                _, d = p.request(verify=True)
                if d["bad_buffers"] or not d["aux_ok"]:
                    raise SystemExit(f"{impl}: verification failed: {d}")
                res[impl]["verified"] += d["bytes"]
            p.stop()
        return res
    finally:
        for p in pairs.values():
            p.quit()


def bench_hicache(env, rounds):
    top = tempfile.mkdtemp(prefix="nixl-rs-bench-py-", dir=os.environ.get("BENCH_DIR"))
    workers = {}
    try:
        for impl in IMPLS:
            d = os.path.join(top, impl)
            os.makedirs(d)
            workers[impl] = Worker(["--hicache", impl, "--dir", d], env)
        for w in workers.values():
            w.ready()
        res = {impl: {"set": [], "get": [], "verified": 0, "open_fds": []} for impl in IMPLS}
        batches = range((HC_PAGES + HC_BATCH - 1) // HC_BATCH)

        def one_round(tag, record):
            for w in workers.values():
                w.call({"op": "fill", "tag": tag})
            for ph in ("set", "get"):
                os.sync()
                for k in batches:  # alternate by batch: load spikes hit both alike
                    order = IMPLS if k % 2 == 0 else IMPLS[::-1]
                    for impl in order:
                        t = workers[impl].call({"op": ph, "batch": k})["t"]
                        if record:
                            res[impl][ph].append(t)

        def clean():
            for impl, w in workers.items():
                res[impl]["open_fds"].append(w.call({"op": "clean"})["open"])

        one_round("warm", False)
        clean()
        for r in range(rounds):
            one_round(f"r{r}", True)
            clean()
            print(f"  HiCache round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        one_round("verify", False)
        for impl, w in workers.items():
            out = w.call({"op": "verify"})
            if out["bad_pages"]:
                raise SystemExit(f"{impl}: HiCache pages differ: {out['bad_pages'][:10]}")
            res[impl]["verified"] = out["bytes"]
        return res
    finally:
        for w in workers.values():
            w.quit()
        shutil.rmtree(top, ignore_errors=True)


def table(pd, hc, args):
    req_bytes = BUFFERS * PER_REQ * PAGE
    rows = []

    def row(name, a, b, unit, higher_better=False, fmt="{:.2f}"):
        better = (b > a) if higher_better else (b < a)
        ratio = (b / a) if a else float("inf")
        rows.append((name, fmt.format(a), fmt.format(b), unit, f"{ratio:.3f}", "yes" if better else "**no**"))

    if pd:
        s, o = pd["sglang"], pd["ours"]
        for q in (50, 99):
            row(f"PD `send()` p{q}", pct(s["send"], q) * 1e3, pct(o["send"], q) * 1e3, "ms")
        for q in (50, 99):
            row(f"PD time-to-Success p{q}", pct(s["tts"], q) * 1e3, pct(o["tts"], q) * 1e3, "ms")
        row("PD GB/s (64 MiB requests, one after another)",
            req_bytes * len(s["tts"]) / sum(s["tts"]) / 1e9,
            req_bytes * len(o["tts"]) / sum(o["tts"]) / 1e9, "GB/s", higher_better=True)
        row("PD idle CPU, prefill + decode", sum(s["idle"]), sum(o["idle"]), "% of a core")
    if hc:
        tot = HC_PAGES * HC_PAGE
        for ph in ("set", "get"):
            a, b = hc["sglang"][ph], hc["ours"][ph]
            row(f"HiCache batch_{ph} GB/s", tot * args.hc_rounds / sum(a) / 1e9,
                tot * args.hc_rounds / sum(b) / 1e9, "GB/s", higher_better=True)
            for q in (50, 99):
                row(f"HiCache batch_{ph} p{q} (64 × 64 KiB)", pct(a, q) * 1e3, pct(b, q) * 1e3, "ms")
    lines = [
        f"| row | {NAMES['sglang']} | {NAMES['ours']} | unit | ours/SGLang | ours better |",
        "|---|---|---|---|---|---|",
    ] + [f"| {n} | {a} | {b} | {u} | {r} | {w} |" for n, a, b, u, r, w in rows]
    return "\n".join(lines), all(w == "yes" for *_, w in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pd")
    ap.add_argument("--hicache")
    ap.add_argument("--impl")
    ap.add_argument("--port", type=int)
    ap.add_argument("--dir")
    ap.add_argument("--rounds", type=int, default=20, help="PD turns per side")
    ap.add_argument("--requests", type=int, default=4, help="PD requests per turn")
    ap.add_argument("--hc-rounds", type=int, default=8, help="HiCache rounds (1000 pages each)")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle-CPU sampling")
    ap.add_argument("--verify", type=int, default=4, help="verified PD requests per side")
    ap.add_argument("--only", choices=("pd", "hicache"))
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args()
    if a.pd:
        return pd_worker(a.pd, a.impl, a.port)
    if a.hicache:
        return hicache_worker(a.hicache, a.dir)
    env = dict(os.environ)
    env.pop("NIXL_RS_SGLANG", None)
    start = time.time()
    pd = hc = {}
    if a.only in (None, "pd"):
        pd = bench_pd(env, a.rounds, a.requests, a.idle, a.verify)
    if a.only in (None, "hicache"):
        hc = bench_hicache(env, a.hc_rounds)
    md, all_better = table(pd, hc, a)
    load = open("/proc/loadavg").read().split()[:3]
    print()
    print(f"PD: {a.rounds} alternating turns of {a.requests} requests per side, {BUFFERS} buffers × {PAGE // 1024} KiB pages, "
          f"{PER_REQ}-page requests ({BUFFERS * PER_REQ * PAGE >> 20} MiB, {BUFFERS * PER_REQ} "
          f"descriptors), host memory; HiCache: {a.hc_rounds} rounds of {HC_PAGES} × "
          f"{HC_PAGE // 1024} KiB, batches of {HC_BATCH} alternating, POSIX. {os.cpu_count()} CPUs, load "
          f"average {' '.join(load)}.")
    print()
    print(md)
    print()
    v = []
    for impl in IMPLS:
        if pd:
            v.append(f"{impl} PD {pd[impl]['verified'] >> 20} MiB")
        if hc:
            v.append(f"{impl} HiCache {hc[impl]['verified'] >> 20} MiB")
    print(f"Every byte verified in a separate pass: {', '.join(v)}. Took {time.time() - start:.0f}s.")
    if hc:
        print("Page-file descriptors open after each HiCache round: SGLang "
              f"{max(hc['sglang']['open_fds'])} (never closed; the harness closes them between "
              f"rounds), ours at most {max(hc['ours']['open_fds'])} (its bounded read cache).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pd": pd, "hicache": hc, "load": load}, f)
    return 0 if all_better else 3


if __name__ == "__main__":
    sys.exit(main())
