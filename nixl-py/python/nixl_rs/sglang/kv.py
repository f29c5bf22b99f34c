"""SGLang 0.5.1.post3's NIXL KV classes on nixl-kv: same constructors, methods, attributes
that the schedulers read, ``KVPoll`` values and exceptions; the wire format is SGLang's, so
either side may be SGLang's own Python class.

Memory: SGLang registers the KV pool as ``VRAM`` on ``kv_args.gpu_id`` (and aux buffers as
``DRAM``). We do the same; ``NIXL_RS_KV_MEMORY=DRAM`` registers a host-memory KV pool instead
(for CPU-only machines and tests).

Differences on purpose: failures are states with reasons (``failure_exception`` raises an
``Exception`` naming the reason instead of SGLang's ``"Fake KVSender Exception"``), rooms are
freed by ``clear()`` or when the object is collected, and the decode manager heart-beats its
prefills' bootstrap servers (``/health``) as SGLang 0.5.2 does.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import List, Optional

import numpy as np

from .. import _native, load_runtime

logger = logging.getLogger("nixl_rs.kv")

try:
    from sglang.srt.disaggregation.base.conn import (
        BaseKVManager,
        BaseKVReceiver,
        BaseKVSender,
        BaseKVBootstrapServer,
        KVPoll,
    )
except Exception:  # noqa: BLE001 - usable without SGLang (benchmarks, tests)

    class KVPoll:  # SGLang's values
        Failed = 0
        Bootstrapping = 1
        WaitingForInput = 2
        Transferring = 3
        Success = 4

    BaseKVManager = BaseKVSender = BaseKVReceiver = BaseKVBootstrapServer = object

KV_MEMORY_ENV = "NIXL_RS_KV_MEMORY"


def _is_prefill(mode) -> bool:
    name = getattr(mode, "name", None) or getattr(mode, "value", None) or str(mode)
    name = str(name).lower()
    if "prefill" in name:
        return True
    if "decode" in name:
        return False
    raise ValueError(f"Unsupported DisaggregationMode: {mode}")


def _local_ip() -> str:
    ip = os.environ.get("NIXL_RS_LOCAL_IP")
    if ip:
        return ip
    try:
        try:
            from sglang.srt.utils.network import get_local_ip_auto  # 0.5.23
        except ImportError:
            from sglang.srt.utils import get_local_ip_auto  # 0.5.1

        return get_local_ip_auto()
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def _bootstrap_host(dist_init_addr: Optional[str]) -> str:
    """SGLang's ``CommonKVManager._register_to_bootstrap`` host rule."""
    if dist_init_addr:
        if dist_init_addr.startswith("["):
            return dist_init_addr if dist_init_addr.endswith("]") else dist_init_addr.rsplit(":", 1)[0]
        return socket.gethostbyname(dist_init_addr.rsplit(":", 1)[0])
    try:
        from sglang.srt.utils import get_ip, maybe_wrap_ipv6_address

        return maybe_wrap_ipv6_address(get_ip())
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def _pages(indices) -> bytes:
    """Page indices as little-endian int32 bytes (SGLang may hand int64 arrays); one outside
    the int32 range is a ValueError, not a silent wrap."""
    a = np.asarray(indices)
    if a.dtype != np.int32:
        if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
            raise ValueError("page index out of the int32 range")
        a = a.astype(np.int32)
    return np.ascontiguousarray(a, dtype="<i4").tobytes()


class NixlKVManager(BaseKVManager):
    def __init__(self, args, disaggregation_mode, server_args, is_mla_backend: Optional[bool] = False):
        self.kv_args = args
        self.is_mla_backend = is_mla_backend
        self.disaggregation_mode = disaggregation_mode
        self.bootstrap_port = server_args.disaggregation_bootstrap_port
        self.dist_init_addr = server_args.dist_init_addr
        self.tp_size = server_args.tp_size
        self.dp_size = server_args.dp_size
        self.enable_dp_attention = server_args.enable_dp_attention
        if not server_args.enable_dp_attention and server_args.dp_size != 1:
            raise ValueError(
                "If dp_attention is not enabled, dp size must be 1 in disaggregation mode."
            )
        prefill = _is_prefill(disaggregation_mode)
        load_runtime()
        self.local_ip = _local_ip()
        bootstrap = f"{_bootstrap_host(self.dist_init_addr)}:{self.bootstrap_port}" if prefill else None
        kv = list(zip(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens))
        aux = list(zip(args.aux_data_ptrs, args.aux_data_lens, args.aux_item_lens))
        self._native = _native.KvManager(
            "prefill" if prefill else "decode",
            str(uuid.uuid4()),
            [(int(a), int(n), int(i)) for a, n, i in kv],
            [(int(a), int(n), int(i)) for a, n, i in aux],
            kv_mem=os.environ.get(KV_MEMORY_ENV, "VRAM"),
            gpu_id=int(getattr(args, "gpu_id", 0) or 0),
            engine_rank=int(args.engine_rank),
            tp_size=int(self.tp_size),
            dp_size=int(self.dp_size),
            is_mla=bool(is_mla_backend),
            bootstrap=bootstrap,
            local_ip=self.local_ip,
            # Later SGLang versions set these; with them a prefill slices heads for decodes of
            # another TP size.
            kv_head_num=int(getattr(args, "kv_head_num", 0) or 0),
            page_size=int(getattr(args, "page_size", 0) or 0),
        )
        self.rank_port = self._native.rank_port
        self.agent_name = self._native.agent_name
        if not prefill:
            # SGLang's decode-side tables, kept for code that reads them (ours live in Rust).
            self.connection_pool = {}
            self.prefill_tp_size_table = {}
            self.prefill_dp_size_table = {}


class NixlKVSender(BaseKVSender):
    def __init__(self, mgr: NixlKVManager, bootstrap_addr: str, bootstrap_room: int,
                 dest_tp_ranks: List[int], pp_rank: int):
        self.kv_mgr = mgr
        self.bootstrap_room = bootstrap_room
        self.aux_index = None
        self.bootstrap_server_url = bootstrap_addr
        self.has_sent = False
        self.chunk_id = 0
        self.curr_idx = 0
        self.num_kv_indices = None
        self._tx = _native.KvSender(mgr._native, int(bootstrap_room))

    def init(self, num_kv_indices: int, aux_index: Optional[int] = None):
        self.num_kv_indices = num_kv_indices
        self.aux_index = aux_index
        self._tx.init(int(num_kv_indices), None if aux_index is None else int(aux_index))

    def send(self, kv_indices):
        self._tx.send(_pages(kv_indices))
        self.curr_idx += len(kv_indices)
        self.chunk_id += 1
        if self.curr_idx == self.num_kv_indices:
            self.has_sent = True

    def poll(self) -> int:
        return self._tx.poll()

    def failure_exception(self):
        raise Exception(f"KVSender failed: {self._tx.failure() or 'unknown reason'}")

    def clear(self):
        self._tx.clear()


class NixlKVReceiver(BaseKVReceiver):
    def __init__(self, mgr: NixlKVManager, bootstrap_addr: str, bootstrap_room: Optional[int] = None,
                 data_parallel_rank: Optional[int] = None):
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.bootstrap_room = bootstrap_room
        self.data_parallel_rank = data_parallel_rank
        self.started_transfer = False
        self.conclude_state = None
        self._rx = _native.KvReceiver(
            mgr._native, bootstrap_addr, int(bootstrap_room or 0),
            None if data_parallel_rank is None else int(data_parallel_rank),
        )

    def init(self, kv_indices, aux_index: Optional[int] = None):
        self._rx.init(_pages(kv_indices), None if aux_index is None else int(aux_index))
        self.started_transfer = True

    def poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        state = self._rx.poll()
        if state in (KVPoll.Success, KVPoll.Failed):
            self.conclude_state = state
        return state

    def failure_exception(self):
        raise Exception(f"KVReceiver failed: {self._rx.failure() or 'unknown reason'}")

    def clear(self):
        self._rx.clear()


class NixlKVBootstrapServer(BaseKVBootstrapServer):
    def __init__(self, port: int):
        self.port = port
        self._native = _native.BootstrapServer(int(port))

    def run(self):
        """Already running (SGLang's starts its thread in ``__init__`` too)."""

    def close(self):
        self._native.close()

    def poll(self) -> int:
        return KVPoll.Success


__all__ = ["KVPoll", "NixlKVManager", "NixlKVSender", "NixlKVReceiver", "NixlKVBootstrapServer"]
