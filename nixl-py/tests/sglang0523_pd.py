"""One side (prefill or decode) of SGLang 0.5.23's own NIXL KV-transfer classes, on host memory,
driven from another process through JSON lines (the 0.5.23 counterpart of `sglang_pd.py` +
`test_kv_interop.py`, which target 0.5.1.post3).

The classes are SGLang's: `get_kv_class(TransferBackend.NIXL, KVClassType.X)` for KVARGS,
MANAGER, SENDER, RECEIVER and BOOTSTRAP_SERVER (`NixlKVManager`, `NixlKVSender`,
`NixlKVReceiver`, `NixlKVBootstrapServer` = `CommonKVBootstrapServer`), and its own
`MetadataBuffers` for the aux buffers (0.5.23's default ten: 64, 64, 64, 64, 512, 512, 64, 128,
2*hidden, 64 bytes per slot). TP = PP = CP = DP = DCP = 1, 127.0.0.1 (SGLANG_HOST_IP).

Run with the SGLang 0.5.23 venv (`sglang-0523-requirements.txt` + `pip install --no-deps
sglang==0.5.23`):

    python sglang0523_pd.py prefill [--bootstrap 127.0.0.1:PORT] [--no-bootstrap-server] ...
    python sglang0523_pd.py decode  --bootstrap 127.0.0.1:PORT [--abort-room-after-metadata [I]]
                                    [--bad-page [I]] ...
    python sglang0523_pd.py bootstrap [--bootstrap 127.0.0.1:PORT]   (SGLang's server alone)
    python sglang0523_pd.py pair [...]    (reference driver: prefill + decode subprocesses)

Roles: `prefill` starts SGLang's bootstrap server (at --bootstrap, default 127.0.0.1:<free
port>) unless --no-bootstrap-server (then it registers to the one at --bootstrap), builds a
prefill NixlKVManager and serves the N rooms. `decode` builds a decode manager and runs the N
requests against --bootstrap. Either side can be replaced by a peer in another language: both
sides must get the same workload options (--requests, --chunks, --pages-per-chunk,
--prefill-pages, --room-base, and for the geometry --layers, --page-bytes, --page-tokens,
--hidden); the rooms, source pages and byte patterns below are derived from them only.

Workload (request i = 0..N-1, T = chunks * pages_per_chunk pages per request):
- room(i)            = room_base + i                     (default room_base 2**62 + 12345)
- src page(i, n)     = ((i*T + n) * 7) % prefill_pages   (n = 0..T-1; prefill_pages not a multiple
                       of 7, so pages of one request are distinct and never adjacent)
- prefill chunk c    = src pages [c*K, (c+1)*K)          (K = pages_per_chunk; one send() each)
- prefill aux slot   = i % aux_slots
- decode dst page(w, n) = ((w*T + n) * 5 + 3) % decode_pages and decode aux slot =
  aux_slots - 1 - w, where w is the lowest window slot (0..window-1) free when the request is
  started (a slot is freed when its request concludes); only the decode needs these, and its
  result events carry them
- KV bytes: byte j of page p of KV buffer b = (7b + 13p + j) % 251 (p = prefill page; the decode
  checks dst page(w, n) against src page(i, n)); buffers = 2 * layers (K0..K(L-1), V0..V(L-1)),
  each `prefill_pages` (resp. `decode_pages`) pages of `page_bytes`.
- aux: byte j of the row of aux buffer k for room R = (R + 17k + j) % 256, for all 10 buffers.
The decode zeroes a request's dst pages and aux row before sending its metadata, so a page left
over from an earlier request cannot pass.

Runtime adaptations (the only ones; nothing in SGLang or NIXL is patched):
- SGLang 0.5.23 reads its configuration from a process-wide runtime context, not from the
  `server_args` argument: the script builds a `ServerArgs(model_path="dummy", device="cpu",
  disaggregation_mode=..., disaggregation_transfer_backend="nixl", host, port,
  disaggregation_bootstrap_port, load_balance_method)` and publishes it as the scheduler does
  (`runtime_context.publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))`),
  then states the one group the managers read without torch.distributed,
  `get_parallel().override_permanently(pp_group=None)` (read by the prefill manager, used only
  with PP > 1). The "dummy" model makes resolution skip model loading, so
  `load_balance_method` is given explicitly with the value resolution would pick
  (prefill: follow_bootstrap_room, decode: round_robin).
- KV memory is host memory, declared as such through SGLang's own NIXL option
  `kv_args.kv_data_mem_kinds = ["DRAM"] * n` on both sides (the decode scheduler sets it for
  HiSparse; the prefill manager reads it with getattr). With DRAM kinds NIXL 1.5.1 needs no
  patch (0.5.23 no longer passes `is_sorted`), and registration wire frame 18 (parser index 17)
  reads "DRAM,DRAM,...". (Declared "VRAM", host memory fails in NIXL's UCX registerMem with
  NIXL_ERR_BACKEND on a machine without CUDA, which is why SGLang's default needs a GPU.)
- Aux buffers are SGLang's `MetadataBuffers` (CPU tensors in 0.5.23 on every non-NPU device).

stdout carries only JSON objects, one per line, flushed (fd 1 is pointed at stderr, so library
prints and logs cannot corrupt it). Events:

  {"event":"ready","role":"prefill","bootstrap":"127.0.0.1:P","rank_port":N,"agent":"...",
   "sglang":"0.5.23","pid":N,"bootstrap_server":true,"import_s":F,"rooms":[...]}        manager up, registered
  {"event":"ready","role":"decode","bootstrap":"...","rank_port":N,"agent":"...","pid":N,...}
  {"event":"ready","role":"bootstrap","bootstrap":"127.0.0.1:P","pid":N,"server":"..."}
  {"event":"sent","role":"prefill","i":I,"room":R,"src_pages":[...],"chunks":C}
  {"event":"result","role":"prefill","i":I,"room":R,"ok":true|false,"reason":S|null,
   "wait_ms":F,"send_ms":F,"done_ms":F}                       wait: sender created -> bootstrapped
  {"event":"result","role":"decode","i":I,"room":R,"case":"normal"|"abort"|"bad_page",
   "ok":true|false, "pass":true|false, "reason":S|null, "tts_ms":F|null,
   "kv_bytes_verified":N, "aux_rows_verified":N, "bad":[...],          (normal)
   "abort_ack":true|false, "abort_ack_ms":F|null,                         (abort)
   "dst_pages":[...]}
  {"event":"done","role":"prefill"|"decode","ok":N,"failed":N,"pass":true|false,...}
      (decode also: passed, requests, kv_bytes_verified, aux_rows_verified, tts_ms_p50,
       tts_ms_max, stray_writes = pages/aux rows outside every destination that are not zero)
  {"event":"done","role":"pair","prefill_rc":N,"decode_rc":N,"wall_s":F,"pass":...}
      (the pair driver forwards every event of both children, then prints its own "done")
  {"event":"error","role":...,"error":"Type: message"}                     then exit code 2

tts_ms = first decode poll() returning Success minus the moment just before send_metadata().

`pass` on a decode result: normal request = Success and every byte of its pages and of the 10
aux rows as expected; abort request = the prefill's ABORT_ACK for it arrived (the decode marks
the room Failed itself); bad_page request = Failed with a reason sent by the prefill (KV_STATUS
0 + reason, e.g. NIXL_ERR_INVALID_PARAM), not a local timeout. The decode exits 0 iff every
request passed. The prefill reports each room's outcome (a bad-page or aborted room ends Failed
with SGLang's reason; an aborted room may also end ok if the prefill finished it before the
ABORT arrived) and exits 0 iff every room concluded (ok or failed) within --timeout.

Prefill lifetime: after its N rooms concluded it prints "done" and then, with the default
`--hold stdin`, keeps serving (its bootstrap server, pending ABORT_ACKs, KV_STATUS sends) until
stdin reaches EOF or a line "quit"; with `--hold N` it exits N seconds after "done". A driver
closes the prefill's stdin after the decode's "done". The decode exits after its "done".
"""

import argparse
import ctypes
import json
import os
import socket
import sys
import threading
import time

AUX_BUFFERS = 10
DEFAULT_ROOM_BASE = 2**62 + 12345


# ---------------------------------------------------------------- output


class Out:
    """JSON lines on a private copy of stdout; fd 1 and sys.stdout go to stderr."""

    def __init__(self, role):
        self.role = role
        self.f = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.lock = threading.Lock()

    def forward(self, obj):
        with self.lock:
            self.f.write(json.dumps(obj) + "\n")
            self.f.flush()

    def __call__(self, event, **kw):
        obj = {"event": event, "role": self.role, **kw}
        with self.lock:
            self.f.write(json.dumps(obj) + "\n")
            self.f.flush()


# ---------------------------------------------------------------- workload


def pages_per_request(a):
    return a.chunks * a.pages_per_chunk


def room_of(a, i):
    return a.room_base + i


def src_pages(a, i):
    t = pages_per_request(a)
    return [((i * t + n) * 7) % a.prefill_pages for n in range(t)]


def dst_pages(a, w):
    """Destination pages of the request in decode window slot `w`."""
    t = pages_per_request(a)
    return [((w * t + n) * 5 + 3) % a.decode_pages for n in range(t)]


def prefill_aux_slot(a, i):
    return i % a.aux_slots


def decode_aux_slot(a, w):
    return a.aux_slots - 1 - w


def kv_page_pattern(np, b, p, page_bytes):
    return ((7 * b + 13 * p + np.arange(page_bytes)) % 251).astype(np.uint8)


def aux_row_pattern(np, room, k, row_bytes):
    return ((room % 256 + 17 * k + np.arange(row_bytes)) % 256).astype(np.uint8)


def check_workload(a):
    t = pages_per_request(a)
    if a.prefill_pages % 7 == 0 or t > a.prefill_pages:
        raise SystemExit("--prefill-pages must not be a multiple of 7 and hold one request")
    if a.decode_pages % 5 == 0 or a.window * t > a.decode_pages:
        raise SystemExit("--decode-pages must not be a multiple of 5 and hold --window requests")
    if a.window >= a.aux_slots:
        raise SystemExit("--aux-slots must exceed --window")
    if room_of(a, a.requests) >= 2**63:
        raise SystemExit("rooms must stay below 2**63")


# ---------------------------------------------------------------- SGLang setup


def publish_server_args(role, host, bootstrap_port, http_port):
    """Builds and publishes the ServerArgs a scheduler process would (see the docstring)."""
    from sglang.srt import runtime_context as rc
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(
        model_path="dummy",
        device="cpu",
        host=host,
        port=http_port,
        disaggregation_mode=role,
        disaggregation_transfer_backend="nixl",
        disaggregation_bootstrap_port=bootstrap_port,
        load_balance_method="follow_bootstrap_room" if role == "prefill" else "round_robin",
    )
    rc.publish(sa, role="scheduler", ranks=rc.SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    rc.get_parallel().override_permanently(pp_group=None)
    return sa


def sglang_version():
    import sglang

    return sglang.__version__


IMPL = {"impl": "sglang"}


def classes():
    """The NIXL classes SGLang's `get_kv_class` table serves: SGLang's own, or with `--impl
    ours` nixl-rs's, installed the way SGLang 0.5.23 installs plugins (its plugin loader runs
    the `nixl_rs` entry point with NIXL_RS_SGLANG=1)."""
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    if IMPL["impl"] == "ours":
        os.environ["NIXL_RS_SGLANG"] = "1"
        from sglang.srt.plugins import load_plugins

        load_plugins()
    want = {"sglang": "sglang.", "ours": "nixl_rs."}[IMPL["impl"]]
    c = {t: get_kv_class(TransferBackend.NIXL, t) for t in KVClassType}
    for t in KVClassType:
        if t != KVClassType.KVARGS:
            assert c[t].__module__.startswith(want), f"{t} is {c[t].__module__}, want {want}*"
    return c


def agent_name(mgr):
    return getattr(mgr, "agent_name", None) or mgr.agent.name


def as_bytes(np, ptr, nbytes):
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


def make_pools(a, np, pages):
    """KV buffers (numpy, host memory) and SGLang's MetadataBuffers, as uint8 views."""
    import torch
    from sglang.srt.disaggregation.utils import MetadataBuffers

    kv = [np.zeros(pages * a.page_bytes, dtype=np.uint8) for _ in range(2 * a.layers)]
    meta = MetadataBuffers(a.aux_slots, a.hidden, torch.bfloat16, max_sampling_mask_tokens=0)
    ptrs, lens, items = meta.get_buf_infos()
    if len(ptrs) != AUX_BUFFERS:
        raise SystemExit(f"MetadataBuffers has {len(ptrs)} buffers, not {AUX_BUFFERS}")
    aux = [as_bytes(np, p, n).reshape(a.aux_slots, it) for p, n, it in zip(ptrs, lens, items)]
    return kv, meta, aux, (ptrs, lens, items)


def make_kv_args(c, a, kv, aux_infos):
    from sglang.srt.disaggregation.utils import KVClassType

    k = c[KVClassType.KVARGS]()
    k.engine_rank = 0
    k.pp_rank = 0
    k.system_dp_rank = 0
    k.kv_cache_dtype_str = "bfloat16"
    k.kv_layout = None
    k.kv_data_ptrs = [b.__array_interface__["data"][0] for b in kv]
    k.kv_data_lens = [b.nbytes for b in kv]
    k.kv_item_lens = [a.page_bytes] * len(kv)
    k.kv_data_mem_kinds = ["DRAM"] * len(kv)
    k.kv_layer_ids = []
    k.num_draft_entries = 0
    k.page_size = a.page_tokens
    k.kv_head_num = 1
    k.total_kv_head_num = 1
    k.aux_data_ptrs, k.aux_data_lens, k.aux_item_lens = (list(x) for x in aux_infos)
    k.ib_device = None
    k.gpu_id = 0
    k.rust_http_port = None
    k.prefill_start_layer = 0
    k.prefill_end_layer = a.layers
    k.mla_compression_ratios = None
    # What setup_state_kv_args leaves for a dense model: no state components.
    k.state_types = []
    k.state_data_ptrs = []
    k.state_data_lens = []
    k.state_item_lens = []
    k.state_dim_per_tensor = []
    k.state_slice_outer_counts = []
    k.state_layer_ids = []
    k.state_conv_shard_groups = []
    k.is_hybrid_mla_backend = False
    k.swa_kv_cache_layout = None
    return k


def wait_listening(host, port, timeout):
    start = time.monotonic()
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"bootstrap server {host}:{port} never listened")
            time.sleep(0.005)


def wait_registered(addr, timeout):
    """Polls the bootstrap server until the prefill rank is registered (GET /route -1 = 200)."""
    import requests

    url = (f"http://{addr}/route?prefill_dp_rank=-1&prefill_cp_rank=-1"
           "&target_tp_rank=-1&target_pp_rank=-1")
    start = time.monotonic()
    while True:
        try:
            r = requests.get(url, timeout=2)
            if r.status_code == 200:
                return r.json()
        except Exception:  # noqa: BLE001
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"prefill never registered at {addr}")
        time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_addr(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def ms(t0, t1):
    return None if t0 is None or t1 is None else round((t1 - t0) * 1e3, 3)


# ---------------------------------------------------------------- prefill


def run_prefill(a, out, t_import):
    import numpy as np
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    if a.bootstrap:
        host, port = split_addr(a.bootstrap)
    elif a.no_bootstrap_server:
        raise SystemExit("--no-bootstrap-server needs --bootstrap HOST:PORT")
    else:
        host, port = "127.0.0.1", free_port()
    addr = f"{host}:{port}"
    publish_server_args("prefill", host, port, a.http_port)
    c = classes()
    server = None
    if not a.no_bootstrap_server:
        server = c[KVClassType.BOOTSTRAP_SERVER](host=host, port=port)
    wait_listening(host, port, a.timeout)

    # `meta` owns the aux memory that the `aux` views point into: kept alive by this frame.
    kv, meta, aux, aux_infos = make_pools(a, np, a.prefill_pages)
    for b, buf in enumerate(kv):
        pages = buf.reshape(a.prefill_pages, a.page_bytes)
        for p in range(a.prefill_pages):
            pages[p] = kv_page_pattern(np, b, p, a.page_bytes)
    mgr = c[KVClassType.MANAGER](make_kv_args(c, a, kv, aux_infos), DisaggregationMode.PREFILL,
                                 None, False)
    wait_registered(addr, a.timeout)  # register_to_bootstrap only logs a failed PUT
    rooms = [room_of(a, i) for i in range(a.requests)]
    out("ready", bootstrap=addr, rank_port=mgr.rank_port, agent=agent_name(mgr), pid=os.getpid(),
        sglang=sglang_version(), impl=IMPL["impl"], manager_class=type(mgr).__module__,
        bootstrap_server=server is not None, import_s=round(t_import, 2), rooms=rooms)

    # As the scheduler does at request arrival: one sender per room. Then, per room, once
    # bootstrapped (WaitingForInput): init(), the aux row, one send() per chunk; poll to the end.
    # With --prefill-window K, senders are created as rooms conclude, K at most at once (as a
    # scheduler meets requests one by one); by default all at once.
    state = {}
    window = a.prefill_window or len(rooms)
    next_i = 0
    pending = set()
    n_ok = n_failed = 0
    deadline_fail = []
    while pending or next_i < len(rooms):
        while next_i < len(rooms) and len(pending) < window:
            tx = c[KVClassType.SENDER](mgr, addr, rooms[next_i])
            state[next_i] = {"tx": tx, "t0": time.monotonic(), "t_boot": None, "t_sent": None}
            pending.add(next_i)
            next_i += 1
        progressed = False
        for i in sorted(pending):
            st = state[i]
            tx = st["tx"]
            s = int(tx.poll())
            now = time.monotonic()
            if s == KVPoll.WaitingForInput and st["t_boot"] is None:
                st["t_boot"] = now
                slot = prefill_aux_slot(a, i)
                for k, rows in enumerate(aux):
                    rows[slot] = aux_row_pattern(np, rooms[i], k, rows.shape[1])
                src = np.asarray(src_pages(a, i), dtype=np.int32)
                if a.bad_src_page is not None and i == a.bad_src_page:
                    src[len(src) // 2] = a.prefill_pages + 1000  # past the prefill's own pool
                tx.init(len(src), slot)
                for ch in range(a.chunks):
                    tx.send(src[ch * a.pages_per_chunk:(ch + 1) * a.pages_per_chunk])
                st["t_sent"] = time.monotonic()
                out("sent", i=i, room=rooms[i], src_pages=src.tolist(), chunks=a.chunks,
                    aux_slot=slot)
                progressed = True
            elif s in (KVPoll.Success, KVPoll.Failed):
                reason = None
                metric = {}
                if s == KVPoll.Success:
                    tx.clear()
                    m = tx.get_transfer_metric()  # after clear(), as prefill.py reads it
                    metric = {"metric_bytes": m.transfer_total_bytes,
                              "metric_latency_s": m.transfer_latency_s}
                    n_ok += 1
                else:
                    try:
                        tx.failure_exception()  # pops the recorded reason, clears the room
                    except Exception as e:  # noqa: BLE001 - KVTransferError
                        reason = str(e)
                    n_failed += 1
                out("result", i=i, room=rooms[i], ok=s == KVPoll.Success, reason=reason, **metric,
                    wait_ms=ms(st["t0"], st["t_boot"]), send_ms=ms(st["t_boot"], st["t_sent"]),
                    done_ms=ms(st["t_sent"] or st["t0"], now))
                pending.discard(i)
                progressed = True
            elif now - st["t0"] > a.timeout:
                out("result", i=i, room=rooms[i], ok=False, reason=f"harness timeout in KVPoll {s}",
                    wait_ms=ms(st["t0"], st["t_boot"]), send_ms=None, done_ms=None)
                tx.abort()
                deadline_fail.append(i)
                pending.discard(i)
        if not progressed:
            time.sleep(a.nap)
    out("done", ok=n_ok, failed=n_failed, timed_out=len(deadline_fail),
        **{"pass": not deadline_fail})
    hold(a)
    return 0 if not deadline_fail else 1


def hold(a):
    if a.hold == "stdin":
        for line in sys.stdin:
            if line.strip() == "quit":
                break
    else:
        time.sleep(float(a.hold))


# ---------------------------------------------------------------- decode


def run_decode(a, out, t_import):
    import numpy as np
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode, KVClassType

    if not a.bootstrap:
        raise SystemExit("decode needs --bootstrap HOST:PORT")
    addr = a.bootstrap
    host, port = split_addr(addr)
    publish_server_args("decode", "127.0.0.1", port, a.http_port)
    c = classes()
    # `meta` owns the aux memory that the `aux` views point into: kept alive by this frame.
    kv, meta, aux, aux_infos = make_pools(a, np, a.decode_pages)
    mgr = c[KVClassType.MANAGER](make_kv_args(c, a, kv, aux_infos), DisaggregationMode.DECODE,
                                 None, False)
    out("ready", bootstrap=addr, rank_port=mgr.rank_port, agent=agent_name(mgr), pid=os.getpid(),
        sglang=sglang_version(), impl=IMPL["impl"], manager_class=type(mgr).__module__,
        import_s=round(t_import, 2))

    # Parallel info, as the decode's prealloc queue does before init() (retried until the
    # prefill rank is registered).
    start = time.monotonic()
    while not mgr.try_ensure_parallel_info(addr):
        if time.monotonic() - start > a.timeout:
            out("error", error=f"no parallel info from {addr} within {a.timeout}s")
            return 2
        time.sleep(0.02)

    kv_pages = [b.reshape(a.decode_pages, a.page_bytes) for b in kv]

    def case_of(i):
        if a.abort_room_after_metadata is not None and i == a.abort_room_after_metadata:
            return "abort"
        if a.bad_page is not None and i == a.bad_page:
            return "bad_page"
        return "normal"

    results = []
    active = {}
    free_w = set(range(a.window))
    next_i = 0
    while next_i < a.requests or active:
        progressed = False
        while next_i < a.requests and len(active) < a.window:
            i = next_i
            next_i += 1
            room = room_of(a, i)
            case = case_of(i)
            w = min(free_w)
            free_w.discard(w)
            dst = dst_pages(a, w)
            slot = decode_aux_slot(a, w)
            for pages in kv_pages:
                pages[dst] = 0
            for rows in aux:
                rows[slot] = 0
            wire_dst = list(dst)
            if case == "bad_page":
                wire_dst[len(wire_dst) // 2] = a.decode_pages + 1000  # past the decode pool
            rx = c[KVClassType.RECEIVER](mgr, addr, room)
            rx.init(0)
            st = {"i": i, "room": room, "case": case, "rx": rx, "dst": dst, "slot": slot, "w": w,
                  "t_meta": None, "t0": time.monotonic()}
            s = int(rx.poll())
            if s != KVPoll.WaitingForInput:
                st["early"] = s
            else:
                st["t_meta"] = time.monotonic()
                rx.send_metadata(np.asarray(wire_dst, dtype=np.int32), slot)
                if case == "abort":
                    rx.abort()
                    st["t_abort"] = time.monotonic()
            active[i] = st
            progressed = True
        for i in sorted(active):
            st = active[i]
            rx = st["rx"]
            now = time.monotonic()
            res = None
            if st["case"] == "abort" and "early" not in st and IMPL["impl"] == "ours":
                # No deferred release: the aborted room fails here at once, with the reason.
                if int(rx.poll()) == KVPoll.Failed:
                    res = {"ok": False, "abort_ack": None, "abort_ack_ms": None, "reason": None}
                    try:
                        rx.failure_exception()
                    except Exception as e:  # noqa: BLE001 - KVTransferError
                        res["reason"] = str(e)
                    res["pass"] = bool(res["reason"]) and "Abort" in res["reason"]
                elif now - st["t0"] > a.timeout:
                    res = {"ok": False, "pass": False, "reason": "aborted room never failed"}
            elif st["case"] == "abort" and "early" not in st:
                if mgr.is_abort_release_safe(st["room"], 1):
                    res = {"ok": False, "pass": True, "abort_ack": True,
                           "abort_ack_ms": ms(st["t_abort"], now), "reason": None}
                    try:
                        rx.failure_exception()
                    except Exception as e:  # noqa: BLE001
                        res["reason"] = str(e)
                elif now - st["t0"] > a.timeout:
                    res = {"ok": False, "pass": False, "abort_ack": False, "abort_ack_ms": None,
                           "reason": f"no ABORT_ACK within {a.timeout}s"}
                    rx.clear()
            else:
                s = int(rx.poll()) if "early" not in st else st["early"]
                if s == KVPoll.Success:
                    res = {"tts_ms": ms(st["t_meta"], time.monotonic())}
                    res.update(verify(np, a, st, kv_pages, aux))
                    rx.clear()
                elif s == KVPoll.Failed:
                    reason = None
                    try:
                        rx.failure_exception()
                    except Exception as e:  # noqa: BLE001 - KVTransferError
                        reason = str(e)
                    res = {"ok": False, "reason": reason, "tts_ms": None,
                           "pass": st["case"] == "bad_page" and bool(reason)
                           and "timed out" not in reason}
                elif now - st["t0"] > a.timeout:
                    res = {"ok": False, "pass": False, "tts_ms": None,
                           "reason": f"harness timeout in KVPoll {s}"}
                    rx.abort()
            if res is not None:
                full = {"i": st["i"], "room": st["room"], "case": st["case"], "ok": False,
                        "pass": False, "reason": None, "tts_ms": None, "kv_bytes_verified": 0,
                        "aux_rows_verified": 0, "bad": [], "abort_ack": None,
                        "abort_ack_ms": None}
                full.update(res)
                full.update(dst_pages=st["dst"], aux_slot=st["slot"])
                res = full
                out("result", **res)
                results.append(res)
                free_w.add(st["w"])
                del active[i]
                progressed = True
        if not progressed:
            time.sleep(a.nap)
    # Nothing outside the requests' destinations was written (pages and aux rows).
    used_pages = {p for w in range(a.window) for p in dst_pages(a, w)}
    used_slots = {decode_aux_slot(a, w) for w in range(a.window)}
    stray = [f"kv buffer {b} page {p}" for b, pages in enumerate(kv_pages)
             for p in range(a.decode_pages) if p not in used_pages and pages[p].any()]
    stray += [f"aux buffer {k} row {r}" for k, rows in enumerate(aux)
              for r in range(a.aux_slots) if r not in used_slots and rows[r].any()]
    n_ok = sum(1 for r in results if r["ok"])
    passed = all(r["pass"] for r in results) and not stray
    tts = sorted(r["tts_ms"] for r in results if r.get("tts_ms") is not None)
    out("done", ok=n_ok, failed=len(results) - n_ok, passed=sum(r["pass"] for r in results),
        requests=len(results),
        kv_bytes_verified=sum(r.get("kv_bytes_verified", 0) for r in results),
        aux_rows_verified=sum(r.get("aux_rows_verified", 0) for r in results),
        tts_ms_p50=tts[len(tts) // 2] if tts else None, tts_ms_max=tts[-1] if tts else None,
        stray_writes=stray[:20], **{"pass": passed})
    return 0 if passed else 1


def verify(np, a, st, kv_pages, aux):
    """Every byte of the request's pages in every KV buffer and of its 10 aux rows."""
    bad = []
    src = src_pages(a, st["i"])
    nbytes = 0
    for b, pages in enumerate(kv_pages):
        for n, (sp, dp) in enumerate(zip(src, st["dst"])):
            if not np.array_equal(pages[dp], expect_page(np, a, b, sp)):
                bad.append(f"kv buffer {b} dst page {dp} (src page {sp})")
            nbytes += a.page_bytes
    rows = 0
    for k, buf in enumerate(aux):
        row = buf[st["slot"]]
        if not np.array_equal(row, aux_row_pattern(np, st["room"], k, row.shape[0])):
            bad.append(f"aux buffer {k} row {st['slot']}")
        rows += 1
    return {"ok": not bad, "pass": not bad, "bad": bad[:20], "reason": None,
            "kv_bytes_verified": nbytes if not bad else 0, "aux_rows_verified": rows if not bad else 0}


_PAGE_CACHE = {}


def expect_page(np, a, b, p):
    key = (b, p)
    if key not in _PAGE_CACHE:
        _PAGE_CACHE[key] = kv_page_pattern(np, b, p, a.page_bytes)
    return _PAGE_CACHE[key]


# ---------------------------------------------------------------- bootstrap only


def run_bootstrap(a, out, t_import):
    """SGLang's bootstrap server alone (for a prefill started with --no-bootstrap-server)."""
    from sglang.srt.disaggregation.utils import KVClassType

    host, port = split_addr(a.bootstrap) if a.bootstrap else ("127.0.0.1", free_port())
    server = classes()[KVClassType.BOOTSTRAP_SERVER](host=host, port=port)
    wait_listening(host, port, a.timeout)
    out("ready", bootstrap=f"{host}:{port}", pid=os.getpid(), import_s=round(t_import, 2),
        server=type(server).__name__)
    hold(a)
    return 0


# ---------------------------------------------------------------- two-process driver

WORKLOAD = ("requests", "chunks", "pages_per_chunk", "room_base", "layers", "page_bytes",
            "page_tokens", "prefill_pages", "decode_pages", "aux_slots", "hidden", "window",
            "prefill_window",
            "timeout", "nap", "http_port")


class Child:
    """A role in a subprocess: JSON lines from its stdout through a queue (a reader thread),
    so every wait has a deadline and none is a fixed sleep."""

    def __init__(self, args, out):
        import queue
        import subprocess

        self.q = queue.Queue()
        self.out = out
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            try:
                self.q.put(json.loads(line))
            except ValueError:
                self.q.put({"event": "error", "error": f"not JSON: {line!r}"})
        self.q.put(None)

    def until(self, events, deadline):
        """Forwards the child's events; returns the first one named in `events`, or None at
        EOF or the deadline."""
        import queue

        while True:
            try:
                msg = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if msg is None:
                return None
            self.out.forward(msg)
            if msg.get("event") in events:
                return msg

    def finish(self, deadline):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            return self.p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001
            self.p.kill()
            return self.p.wait()


def run_pair(a, out):
    """Reference driver: an SGLang 0.5.23 prefill and decode in two processes, as a Rust test
    drives them: start the prefill, wait for its "ready", start the decode on its bootstrap
    address, wait for the decode's "done", close the prefill's stdin, collect its "done"."""
    t0 = time.monotonic()
    deadline = t0 + a.pair_timeout
    common = []
    for k in WORKLOAD:
        common += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    pre_args = ["prefill", "--hold", "stdin", "--impl", a.prefill_impl or a.impl] + common
    if a.bootstrap:
        pre_args += ["--bootstrap", a.bootstrap]
    pre = Child(pre_args, out)
    ready = pre.until({"ready", "error"}, deadline)
    if not ready or ready["event"] != "ready":
        out("done", **{"pass": False}, error="prefill never ready", prefill_rc=pre.finish(deadline))
        return 1
    dec_args = ["decode", "--bootstrap", ready["bootstrap"], "--impl", a.decode_impl or a.impl] + common
    if a.abort_room_after_metadata is not None:
        dec_args += ["--abort-room-after-metadata", str(a.abort_room_after_metadata)]
    if a.bad_page is not None:
        dec_args += ["--bad-page", str(a.bad_page)]
    dec = Child(dec_args, out)
    dec_done = dec.until({"done", "error"}, deadline)
    dec_rc = dec.finish(deadline)
    pre_done = pre.until({"done", "error"}, deadline) if dec_done else None
    pre_rc = pre.finish(deadline)
    pre.until({"__eof__"}, time.monotonic() + 2)  # forward anything left
    ok = bool(dec_done and dec_done.get("pass") and pre_done and pre_done.get("pass")
              and dec_rc == 0 and pre_rc == 0)
    out("done", decode_rc=dec_rc, prefill_rc=pre_rc, wall_s=round(time.monotonic() - t0, 2),
        **{"pass": ok})
    return 0 if ok else 1


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=("prefill", "decode", "bootstrap", "pair"))
    ap.add_argument("--bootstrap", help="HOST:PORT of the bootstrap server (prefill, bootstrap, "
                    "pair: where to start it, default 127.0.0.1:<free port>; decode: required)")
    ap.add_argument("--no-bootstrap-server", action="store_true",
                    help="prefill: register to an existing bootstrap server at --bootstrap")
    ap.add_argument("--http-port", type=int, default=30000,
                    help="prefill_http_port sent in PUT /route (SGLang's --port)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--pages-per-chunk", type=int, default=4)
    ap.add_argument("--room-base", type=int, default=DEFAULT_ROOM_BASE)
    ap.add_argument("--layers", type=int, default=2, help="KV buffers = 2 * layers")
    ap.add_argument("--page-bytes", type=int, default=4096, help="bytes per page per buffer")
    ap.add_argument("--page-tokens", type=int, default=16, help="page_size (tokens) on the wire")
    ap.add_argument("--prefill-pages", type=int, default=129)
    ap.add_argument("--decode-pages", type=int, default=256)
    ap.add_argument("--aux-slots", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64,
                    help="hidden size: aux buffer 8 holds 2*hidden bytes per slot (bf16)")
    ap.add_argument("--window", type=int, default=4, help="decode: requests in flight")
    ap.add_argument("--bad-src-page", type=int, nargs="?", const=1, default=None, metavar="I",
                    help="prefill: send request I with one source page past its own pool, so "
                         "that SGLang fails the room and tells the decode why")
    ap.add_argument("--prefill-window", type=int, default=0,
                    help="prefill: senders alive at once, created in room order (0: all)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per request / per wait, s")
    ap.add_argument("--nap", type=float, default=0.0002, help="poll-loop sleep, s")
    ap.add_argument("--abort-room-after-metadata", type=int, nargs="?", const=0, default=None,
                    metavar="I", help="decode: request I (default 0) sends metadata, then aborts")
    ap.add_argument("--bad-page", type=int, nargs="?", const=1, default=None, metavar="I",
                    help="decode: request I (default 1) sends a dst page past the pool")
    ap.add_argument("--impl", choices=("sglang", "ours"), default="sglang",
                    help="whose classes get_kv_class serves: SGLang's own, or nixl-rs's through "
                         "the plugin entry point (needs the nixl-rs wheel installed)")
    ap.add_argument("--prefill-impl", choices=("sglang", "ours"), default=None,
                    help="pair: the prefill's --impl (default --impl)")
    ap.add_argument("--decode-impl", choices=("sglang", "ours"), default=None,
                    help="pair: the decode's --impl (default --impl)")
    ap.add_argument("--hold", default="stdin",
                    help="prefill/bootstrap after done: 'stdin' (until EOF or 'quit') or seconds")
    ap.add_argument("--pair-timeout", type=float, default=600.0, help="pair: whole run, s")
    a = ap.parse_args()
    check_workload(a)
    if a.abort_room_after_metadata is not None and a.abort_room_after_metadata == a.bad_page:
        raise SystemExit("--abort-room-after-metadata and --bad-page need different requests")

    os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    IMPL["impl"] = a.impl
    out = Out(a.role)
    if a.role == "pair":
        os._exit(run_pair(a, out))
    code = 2
    try:
        t = time.monotonic()
        import sglang.srt.disaggregation.nixl.conn  # noqa: F401 - the import cost, reported
        t_import = time.monotonic() - t
        run = {"prefill": run_prefill, "decode": run_decode, "bootstrap": run_bootstrap}
        code = run[a.role](a, out, t_import)
    except BaseException as e:  # noqa: BLE001 - reported to the driver
        import traceback

        traceback.print_exc()
        out("error", error=f"{type(e).__name__}: {e}")
    sys.stderr.flush()
    os._exit(code)  # SGLang's prefill bootstrap thread is not a daemon


if __name__ == "__main__":
    main()
