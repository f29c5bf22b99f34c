"""SGLang 0.5.23's NIXL KV classes on nixl-kv, installed by the plugin (``nixl_rs.sglang.plugin``)
in place of ``sglang.srt.disaggregation.nixl.conn.NixlKV*``.

They subclass SGLang's own base classes and carry every method and attribute that 0.5.23's
``disaggregation/prefill.py``, ``decode.py`` and the scheduler use (``tests/test_sglang0523.py``
lists them and fails when one is missing). The wire format is 0.5.23's (registration of 25
frames, ``KV_STATUS`` completion, ``ABORT``/``ABORT_ACK``), spoken by the Rust engine, so either
side may be SGLang's own class; the engine also answers 0.5.1 and 0.5.20-0.5.22 peers in
theirs.

Configuration comes from where SGLang 0.5.23 keeps it (its runtime context), KV memory kinds
from ``kv_args.kv_data_mem_kinds`` (``VRAM`` by default, ``NIXL_RS_KV_MEMORY`` overrides).

What a request gets instead of a transfer, with SGLang's ``KVTransferError`` and a reason
(``failure_exception``): hybrid models' state buffers, pipeline, context or decode-context
parallelism, KV-cache sharding, a decode-side radix prefix, host destinations, and data
parallelism without DP attention. Deferred decode KV release is off (pages are released when
a request fails, as SGLang 0.5.1 did).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import List, Optional

from sglang.srt.disaggregation.base.conn import (
    BaseKVBootstrapServer,
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVPoll,
    KVTransferDestination,
    KVTransferMetric,
)

from .. import _native, load_runtime
from .kv import KV_MEMORY_ENV, _is_prefill, _local_ip, _pages

logger = logging.getLogger("nixl_rs.kv")

PROFILE = "sglang-0.5.23"
ABORTED = "Aborted by AbortReq."


def _transfer_error(room, reason: str):
    from sglang.srt.disaggregation.common.conn import KVTransferError

    return KVTransferError(room, reason)


class _Topology:
    """What the managers read from SGLang 0.5.23's runtime context."""

    def __init__(self, server_args):
        try:
            from sglang.srt.runtime_context import get_disagg, get_parallel, get_serving

            par, dis, srv = get_parallel(), get_disagg(), get_serving()
        except Exception:  # noqa: BLE001 - no published context: the ServerArgs given
            par = dis = srv = server_args

        def get(obj, name, default):
            v = getattr(obj, name, default)
            return default if v is None else v

        self.host = get(srv, "host", "127.0.0.1")
        self.bootstrap_port = int(get(dis, "disaggregation_bootstrap_port", 8998))
        self.dist_init_addr = get(par, "dist_init_addr", None)
        self.attn_tp_size = int(get(par, "attn_tp_size", get(par, "tp_size", 1)))
        self.attn_dp_size = int(get(par, "attn_dp_size", 1))
        self.attn_cp_size = int(get(par, "attn_cp_size", 1))
        self.dcp_size = int(get(par, "attn_dcp_size", 1))
        self.dp_size = int(get(par, "dp_size", 1))
        self.pp_size = int(get(par, "pp_size", 1))
        self.sharding = bool(get(par, "enable_kv_cache_sharding", False))

    def refusal(self, args) -> Optional[str]:
        """Why no request of this manager can be served, if so."""
        why = []
        if self.pp_size > 1:
            why.append(f"pipeline parallelism (pp_size {self.pp_size})")
        if self.attn_cp_size > 1:
            why.append(f"context parallelism (attn_cp_size {self.attn_cp_size})")
        if self.dcp_size > 1:
            why.append(f"decode context parallelism (dcp_size {self.dcp_size})")
        if self.sharding:
            why.append("KV-cache sharding")
        if self.dp_size > 1 and self.attn_dp_size == 1:
            why.append(f"data parallelism without DP attention (dp_size {self.dp_size})")
        states = list(getattr(args, "state_types", None) or [])
        if states:
            names = ", ".join(str(getattr(s, "value", s)) for s in states)
            why.append(f"state buffers of a hybrid model ({names})")
        if getattr(args, "kv_layout", None):
            why.append(f"KV layout {args.kv_layout!r}")
        if not why:
            return None
        return "nixl-rs does not transfer " + "; ".join(why) + " (set NIXL_RS_SGLANG=0 to use SGLang's own NIXL connector)"


def _bootstrap_host(topo: _Topology) -> str:
    """SGLang 0.5.23's registration host: the dist-init host, else the serving host (a
    wildcard becomes the loopback of its family)."""
    if topo.dist_init_addr:
        addr = topo.dist_init_addr
        if addr.startswith("["):
            return addr[: addr.index("]") + 1]
        import socket

        return socket.gethostbyname(addr.rsplit(":", 1)[0])
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(topo.host, topo.host)


def _kv_memory(args) -> str:
    if os.environ.get(KV_MEMORY_ENV):
        return os.environ[KV_MEMORY_ENV]
    kinds = {str(k).upper() for k in (getattr(args, "kv_data_mem_kinds", None) or [])}
    if len(kinds) > 1:
        raise ValueError(f"nixl-rs registers one memory kind for the KV pool, not {sorted(kinds)}")
    return kinds.pop() if kinds else "VRAM"


def _has_state(state_indices) -> bool:
    return any(s is not None for s in (state_indices or []))


class NixlKVManager(BaseKVManager):
    """One scheduler rank's transfer manager (prefill or decode)."""

    supports_role_switch = False
    supports_host_destination = False
    supports_deferred_decode_kv_release = False
    enable_deferred_decode_kv_release = False

    def __init__(self, args, disaggregation_mode, server_args=None, is_mla_backend: Optional[bool] = False, **_):
        self.kv_args = args
        self.is_mla_backend = bool(is_mla_backend)
        self.disaggregation_mode = disaggregation_mode
        self.server_args = server_args
        topo = _Topology(server_args)
        self.bootstrap_host = topo.host
        self.bootstrap_port = topo.bootstrap_port
        self.dist_init_addr = topo.dist_init_addr
        self.attn_tp_size, self.attn_dp_size = topo.attn_tp_size, topo.attn_dp_size
        self.attn_cp_size, self.dcp_size, self.pp_size = topo.attn_cp_size, topo.dcp_size, topo.pp_size
        self.kv_cache_dtype_str = getattr(args, "kv_cache_dtype_str", None) or "auto"
        self.kv_layout = getattr(args, "kv_layout", None)
        self.refusal = topo.refusal(args)
        # SGLang's tables that its scheduler reads (ours live in Rust).
        self.prefill_info_table = {}
        self.connection_pool = {}
        self.transfer_infos = {}
        self.request_status = {}
        self.failure_records = {}
        self._executor = None
        prefill = _is_prefill(disaggregation_mode)
        self.runtime = load_runtime()
        self.local_ip = _local_ip()
        kv = list(zip(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens))
        aux = list(zip(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens))
        self._native = _native.KvManager(
            "prefill" if prefill else "decode",
            str(uuid.uuid4()),
            [(int(a), int(n), int(i)) for a, n, i in kv],
            [(int(a), int(n), int(i)) for a, n, i in aux],
            kv_mem=_kv_memory(args),
            gpu_id=int(getattr(args, "gpu_id", 0) or 0),
            engine_rank=int(args.engine_rank),
            tp_size=topo.attn_tp_size * topo.attn_dp_size,
            dp_size=topo.attn_dp_size,
            is_mla=self.is_mla_backend,
            bootstrap=f"{_bootstrap_host(topo)}:{topo.bootstrap_port}" if prefill else None,
            local_ip=self.local_ip,
            kv_head_num=int(getattr(args, "kv_head_num", 0) or 0),
            page_size=int(getattr(args, "page_size", 0) or 0),
            profile=PROFILE,
            kv_cache_dtype=self.kv_cache_dtype_str,
        )
        self.rank_port = self._native.rank_port
        self.agent_name = self._native.agent_name
        if self.refusal:
            logger.error("nixl-rs: every request of this %s manager fails: %s",
                         "prefill" if prefill else "decode", self.refusal)
        from . import announce_once

        announce_once(PROFILE, self.runtime)

    def register_to_bootstrap(self):
        """Done by the engine when the manager starts (and again whenever the bootstrap server
        answers that it lost the rank)."""

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """Fetches a prefill's parallel info once (``GET /route`` with every rank -1), as SGLang
        0.5.23's decode does before its first request to that prefill. A mismatch of page size
        or dtype is left to the request, which fails with the reason."""
        if bootstrap_addr in self.prefill_info_table:
            return True
        url = (f"http://{bootstrap_addr}/route?prefill_dp_rank=-1&prefill_cp_rank=-1"
               "&target_tp_rank=-1&target_pp_rank=-1")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                data = json.loads(r.read())
            from sglang.srt.disaggregation.common.conn import PrefillServerInfo

            known = {f.name for f in dataclasses.fields(PrefillServerInfo)}
            info = PrefillServerInfo(**{k: v for k, v in data.items() if k in known})
        except (urllib.error.URLError, OSError, ValueError, TypeError) as e:
            logger.warning("nixl-rs: no parallel info from %s yet: %s", bootstrap_addr, e)
            return False
        self.prefill_info_table[bootstrap_addr] = info
        return True

    def _ensure_prefill_recompute_executor(self):
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nixl-rs-dp")
        return self._executor

    def submit_prefill_recompute(self, receiver, payload: dict):
        logger.warning("nixl-rs: a prefill recompute (rebootstrap) is not supported; room %s "
                       "fails instead", getattr(receiver, "bootstrap_room", None))
        receiver.abort()

    def table_sizes(self) -> dict:
        """Entries the engine holds (rooms, peers, pools), for leak checks."""
        return self._native.table_sizes()


class NixlKVSender(BaseKVSender):
    """A prefill request's sender."""

    def __init__(self, mgr: NixlKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False, **_):
        self.kv_mgr = mgr
        self.bootstrap_server_url = bootstrap_addr
        self.bootstrap_room = int(bootstrap_room)
        self.aux_index = None
        self.num_kv_indices = None
        self.curr_idx = 0
        self.chunk_id = 0
        self.has_sent = False
        self.conclude_state = None
        self.init_time = time.time()
        self._t_first = None
        self._latency = None
        self._bytes = None
        self._reason = mgr.refusal
        self._tx = _native.KvSender(mgr._native, self.bootstrap_room)
        if self._reason:
            self._tx.abort(self._reason)

    def init(self, num_kv_indices: int, aux_index: Optional[int] = None):
        self.num_kv_indices = int(num_kv_indices)
        self.aux_index = aux_index
        self._tx.init(self.num_kv_indices, None if aux_index is None else int(aux_index))

    def send(self, kv_indices, state_indices: Optional[List] = None, num_kv_tokens: Optional[int] = None,
             indices_event=None, **_):
        if _has_state(state_indices):
            self._fail("nixl-rs does not transfer state buffers (hybrid models)")
            return
        try:
            pages = _pages(kv_indices)
        except ValueError as e:
            self._fail(f"bad page indices: {e}")
            return
        if self._t_first is None:
            self._t_first = time.perf_counter()
        n = len(pages) // 4
        self._tx.send(pages)
        self.curr_idx += n
        self.chunk_id += 1
        if self.num_kv_indices is not None and self.curr_idx >= self.num_kv_indices:
            self.has_sent = True

    def _fail(self, reason: str):
        self._reason = self._reason or reason
        self._tx.abort(reason)

    def poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        s = int(self._tx.poll())
        if s == KVPoll.Success and self._latency is None:
            if self._t_first is not None:
                self._latency = time.perf_counter() - self._t_first
            lens = self.kv_mgr.kv_args.kv_item_lens
            aux = self.kv_mgr.kv_args.aux_item_lens if self.aux_index is not None else []
            self._bytes = self.curr_idx * sum(lens) + sum(aux)
        return s

    def failure_exception(self):
        reason = self._tx.failure() or self._reason or "unknown reason"
        self.conclude_state = KVPoll.Failed
        self.clear()
        raise _transfer_error(self.bootstrap_room, reason)

    def get_transfer_metric(self) -> KVTransferMetric:
        return KVTransferMetric(transfer_latency_s=self._latency, transfer_total_bytes=self._bytes)

    def pop_decode_prefix_len(self) -> int:
        return 0

    def get_max_transfer_tokens(self) -> Optional[int]:
        return None

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk

    def mark_prefill_complete(self) -> None:
        raise NotImplementedError("nixl-rs serves the 'early' decode allocation policy")

    def clear(self):
        self._tx.clear()

    def abort(self):
        self._fail(ABORTED)


class NixlKVReceiver(BaseKVReceiver):
    """A decode request's receiver."""

    def __init__(self, mgr: NixlKVManager, bootstrap_addr: str, bootstrap_room: Optional[int] = None, **_):
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = bootstrap_room
        self.conclude_state = None
        self.require_staging = False
        self.abort_notified = False
        self.bootstrap_infos = []
        self.prefill_info = None
        self.prefill_dp_rank = None
        self.init_time = None
        self._reason = mgr.refusal
        self._rx = None

    def init(self, prefill_dp_rank: int):
        if self._rx is not None or self._reason:
            return
        self.prefill_dp_rank = prefill_dp_rank
        self.prefill_info = self.kv_mgr.prefill_info_table.get(self.bootstrap_addr)
        try:
            self._rx = _native.KvReceiver(
                self.kv_mgr._native, self.bootstrap_addr, int(self.bootstrap_room or 0),
                None if prefill_dp_rank is None else int(prefill_dp_rank),
            )
        except (RuntimeError, ValueError) as e:
            self._reason = f"bootstrap from {self.bootstrap_addr} failed: {e}"
            return
        self.bootstrap_infos = [self.bootstrap_addr]

    def send_metadata(self, kv_indices, aux_index: Optional[int] = None, state_indices: Optional[List] = None,
                      decode_prefix_len: Optional[int] = None,
                      destination=KVTransferDestination.DEVICE, device_kv_indices=None, **_):
        if self._rx is None:
            return
        why = None
        if destination not in (None, KVTransferDestination.DEVICE):
            why = "nixl-rs receives into the device KV pool only, not host destinations"
        elif _has_state(state_indices):
            why = "nixl-rs does not transfer state buffers (hybrid models)"
        elif decode_prefix_len:
            why = f"nixl-rs does not take a decode-side radix prefix (decode_prefix_len {decode_prefix_len})"
        if why:
            self._fail(why)
            return
        try:
            pages = _pages(kv_indices)
        except ValueError as e:
            self._fail(f"bad page indices: {e}")
            return
        self._rx.init(pages, None if aux_index is None else int(aux_index))
        self.init_time = time.time()

    def _fail(self, reason: str):
        self._reason = self._reason or reason
        if self._rx is not None:
            self._rx.abort(reason)

    def poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        if self._rx is None:
            return KVPoll.Failed if self._reason else KVPoll.Bootstrapping
        s = int(self._rx.poll())
        if s in (KVPoll.Success, KVPoll.Failed):
            self.conclude_state = s
        return s

    def failure_exception(self):
        reason = (self._rx.failure() if self._rx is not None else None) or self._reason or "unknown reason"
        self.conclude_state = KVPoll.Failed
        self.clear()
        raise _transfer_error(self.bootstrap_room, reason)

    @property
    def supports_host_destination(self) -> bool:
        return False

    def is_abort_release_safe(self) -> bool:
        return True

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        """The engine tells a 0.5.23 prefill of a started room's failure by itself."""
        self.abort_notified = True

    def clear(self):
        if self._rx is not None:
            self._rx.clear()

    def abort(self):
        self._fail(ABORTED)
        if self._rx is None:
            self.conclude_state = KVPoll.Failed


class NixlKVBootstrapServer(BaseKVBootstrapServer):
    """The bootstrap HTTP server (``/route`` for every SGLang release's form, ``/health``),
    serving from the moment it is built."""

    def __init__(self, host: str = "0.0.0.0", port: int = 8998, **_):
        self.host = host or "0.0.0.0"
        self.port = int(port)
        self._native = _native.BootstrapServer(self.port, self.host)

    def run(self):
        """Already running."""

    def close(self):
        self._native.close()

    def poll(self) -> int:
        return KVPoll.Success


KV_CLASSES = {
    "NixlKVManager": NixlKVManager,
    "NixlKVSender": NixlKVSender,
    "NixlKVReceiver": NixlKVReceiver,
    "NixlKVBootstrapServer": NixlKVBootstrapServer,
}

__all__ = ["KV_CLASSES", "NixlKVManager", "NixlKVSender", "NixlKVReceiver", "NixlKVBootstrapServer"]
