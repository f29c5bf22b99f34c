"""SGLang 0.5.23's HiCache storage backend ``nixl`` on nixl-hicache, with its zero-copy
interface (``batch_get_v1``/``batch_set_v1``/``batch_exists``).

Registered by the plugin (``StorageBackendFactory.register_backend("nixl", ...)``); also
loadable as SGLang's ``dynamic`` backend (``module_path`` ``nixl_rs.sglang.hicache0523``,
``class_name`` ``HiCacheNixl``, ``interface_v1`` 1).

The files are those of SGLang 0.5.23's own ``HiCacheNixl`` (same directory, names and bytes,
so either class reads what the other wrote):

- ``<dir>/<bucket>/<key>_<model>_<tp_rank>_<tp_size><part>`` (MLA: ``<key>_<model><part>``,
  ``/`` in the model name written ``-``), the bucket being the low byte of the name's
  BLAKE2b-64 digest in hex;
- ``page_first`` and ``page_first_direct`` pools: one object per KV buffer and page, ``_k`` and
  (MHA) ``_v``, each the buffer's bytes of the page in the pool's order; other layouts
  (``layer_first``, ``page_head``), and ``page_first*`` pools whose page stride is not 4 KiB
  aligned while direct I/O is configured (SGLang's rule): one object per page, the K bytes of
  every layer, then the V bytes.

Pages move between the registered host pool and storage without a copy in any layout: a page
that a layout scatters over layers is one object gathered from (and scattered back into) its
ranges. What differs from SGLang's on purpose: writes are atomic (a failed batch publishes no
page, where SGLang leaves empty files that later pass ``batch_exists``); ``batch_get_v1``
answers per page (SGLang fails a whole batch when one page is missing); one storage directory
(SGLang's comma-separated list of several is refused with a message); reads and writes go
through the page cache (SGLang's default is direct I/O; ``use_direct_io`` decides only the
object layout here, as above, and ``NIXL_RS_HICACHE_DIRECT_IO=1`` makes writes of aligned pages
bypass the page cache).
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

import numpy as np
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

from .. import _native, load_runtime

logger = logging.getLogger("nixl_rs.hicache")

DIR_ENV = "SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"
PLUGIN_ENV = "SGLANG_HICACHE_NIXL_BACKEND_PLUGIN"
DIRECT_IO_ENV = "SGLANG_HICACHE_NIXL_USE_DIRECT_IO"
WRITE_ENV = "NIXL_RS_HICACHE_WRITE"
#: `1`: writes of 4 KiB-aligned pages open their files O_DIRECT (off by default: measured slower
#: than buffered writes here, BENCHMARKS.md).
DIRECT_WRITES_ENV = "NIXL_RS_HICACHE_DIRECT_IO"
DEFAULT_DIR = "/tmp/hicache_storage"
PROFILE = "sglang-0.5.23 (HiCache)"
SPLIT_LAYOUTS = ("page_first", "page_first_direct")


def _flag(v: Any, default: bool) -> bool:
    if v is None:
        return default
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _plugin(extra: dict) -> str:
    """SGLang's choice: the first active entry of ``extra_config["plugin"]``, else the
    environment's, else ``auto``."""
    spec = extra.get("plugin")
    if isinstance(spec, dict):
        for name, conf in spec.items():
            if isinstance(conf, dict) and conf.get("active"):
                return str(name).upper()
    if isinstance(spec, str) and spec:
        return spec
    return os.getenv(PLUGIN_ENV, "auto")


class _Pool:
    """Where each page of a host pool lies: per page, the objects it is stored as and their
    host ranges (computed from the pool's buffer and strides)."""

    def __init__(self, pool, split: bool, mla: bool):
        kv = pool.kv_buffer
        if not kv.is_contiguous():
            raise ValueError("nixl-rs HiCacheNixl needs a contiguous host KV buffer")
        isz = kv.element_size()
        self.base = int(kv.data_ptr())
        self.nbytes = int(kv.numel()) * isz
        self.st = [int(x) * isz for x in kv.stride()]
        self.shape = tuple(kv.shape)
        self.ps = int(pool.page_size)
        self.layout = pool.layout
        self.mla = mla
        self.split = split
        if self.mla:
            self.parts = ["_k"] if split else [""]
        else:
            self.parts = ["_k", "_v"] if split else [""]

    def ranges(self, starts: np.ndarray):
        """``(counts, addrs, lens)`` per object (pages in order, parts in order) for pages
        starting at host tokens ``starts``."""
        st, ps, n = self.st, self.ps, len(starts)
        s = starts.astype(np.int64)
        if self.layout == "layer_first":
            layers = self.shape[0] if self.mla else self.shape[1]
            ls = np.arange(layers, dtype=np.int64)
            if self.mla:  # (L, size, 1, C)
                addrs = self.base + ls[None, :] * st[0] + s[:, None] * st[1]
                run = ps * st[1]
            else:  # (2, L, size, H, D): K of every layer, then V
                kvs = np.arange(2, dtype=np.int64)
                addrs = (self.base + kvs[None, :, None] * st[0] + ls[None, None, :] * st[1]
                         + s[:, None, None] * st[2])
                run = ps * st[2]
            per = addrs.reshape(n, -1)
            counts = [per.shape[1]] * n
            return counts, per.ravel().tolist(), [run] * per.size
        if self.layout == "page_first":
            lead = 0 if self.mla else 1  # (size, L, 1, C) / (2, size, L, H, D)
            first, run = self.base + s * st[lead], ps * st[lead]
        elif self.layout in ("page_first_direct", "page_head"):
            lead = 0 if self.mla else 1  # (page_num, ...) / (2, page_num, ...)
            first, run = self.base + (s // ps) * st[lead], st[lead]
        else:
            raise ValueError(f"nixl-rs HiCacheNixl does not know the host layout {self.layout!r}")
        if self.mla:
            return [1] * n, first.tolist(), [run] * n
        addrs = np.stack([first, first + st[0]], axis=1).ravel().tolist()
        counts = [1] * (2 * n) if self.split else [2] * n
        return counts, addrs, [run] * (2 * n)


class HiCacheNixl(HiCacheStorage):
    """HiCacheNixl provides high-performance storage using NIXL plugins (nixl-rs engine)."""

    def __init__(self, storage_config, file_path: Any = DEFAULT_DIR, *_, **__):
        if not isinstance(file_path, str) or not file_path:
            file_path = DEFAULT_DIR  # SGLang's `dynamic` passes its kwargs dict here
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        dirs = [d.strip() for d in (os.getenv(DIR_ENV) or file_path).split(",") if d.strip()]
        if len(dirs) != 1:
            raise ValueError(
                f"nixl-rs HiCacheNixl stores in one directory, not {dirs} ({DIR_ENV}); "
                "set NIXL_RS_SGLANG=0 to use SGLang's own HiCacheNixl")
        self.storage_config = storage_config
        self.file_path = dirs[0]
        self.plugin = _plugin(extra)
        self.use_direct_io = _flag(extra.get("use_direct_io", os.getenv(DIRECT_IO_ENV)), True)
        self.is_mla_model = bool(getattr(storage_config, "is_mla_model", False))
        self.tp_rank = int(getattr(storage_config, "tp_rank", 0) or 0)
        self.tp_size = int(getattr(storage_config, "tp_size", 1) or 1)
        self.backup_skip = self.is_mla_model and self.tp_rank != 0
        name = getattr(storage_config, "model_name", None)
        self.model = "-".join(name.split("/")) if name else ""
        self.is_zero_copy = False
        self.mem_pool_host = None
        self._pool: Optional[_Pool] = None
        runtime = load_runtime()
        try:
            self._native = _native.HiCache(
                self.file_path, self.plugin, os.getenv(WRITE_ENV, "atomic"),
                model=self.model, tp_rank=self.tp_rank, tp_size=self.tp_size,
                mla=self.is_mla_model, naming="bucketed",
                direct_io=_flag(os.getenv(DIRECT_WRITES_ENV), False),
            )
        except RuntimeError as e:
            raise RuntimeError(f"Failed to create NIXL backend: {e}") from e
        from . import announce_once

        announce_once(PROFILE, runtime)

    # Host pool.

    def register_mem_pool_host(self, mem_pool_host):
        """Registers the host pool's KV buffer once; picks the object layout as SGLang does."""
        super().register_mem_pool_host(mem_pool_host)
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

        mla = isinstance(mem_pool_host, MLATokenToKVPoolHost)
        split = mem_pool_host.layout in SPLIT_LAYOUTS
        if split and self.use_direct_io:
            aligned = getattr(mem_pool_host, "is_stride_page_aligned", None)
            split = bool(aligned(4096)) if aligned is not None else False
        pool = _Pool(mem_pool_host, split, mla)
        self._native.register([pool.base], [pool.nbytes])
        self._pool = pool
        self.is_zero_copy = split

    def register_mem_host_pool_v2(self, host_pool, host_pool_name):
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    # The zero-copy interface.

    def _objects(self, keys: List[str], host_indices):
        pool = self._pool
        idx = np.asarray(host_indices.cpu() if hasattr(host_indices, "cpu") else host_indices)
        if len(idx) != len(keys) * pool.ps:
            raise ValueError(f"{len(keys)} keys but {len(idx)} host indices (page size {pool.ps})")
        counts, addrs, lens = pool.ranges(idx[:: pool.ps])
        names = [k for k in keys for _ in pool.parts]
        parts = pool.parts * len(keys)
        return names, parts, counts, addrs, lens

    def batch_set_v1(self, keys: List[str], host_indices, extra_info=None) -> List[bool]:
        if self.backup_skip:
            return [True] * len(keys)
        if not keys:
            return []
        if self._pool is None:
            logger.error("batch_set_v1 before register_mem_pool_host")
            return [False] * len(keys)
        try:
            self._native.batch_set_objects(*self._objects(list(keys), host_indices))
            return [True] * len(keys)
        except (ValueError, RuntimeError) as e:
            logger.error("nixl-rs HiCacheNixl: writing %d pages failed: %s", len(keys), e)
            return [False] * len(keys)

    def batch_get_v1(self, keys: List[str], host_indices, extra_info=None) -> List[bool]:
        if not keys:
            return []
        if self._pool is None:
            logger.error("batch_get_v1 before register_mem_pool_host")
            return [False] * len(keys)
        try:
            hits = self._native.batch_get_objects(*self._objects(list(keys), host_indices))
        except (ValueError, RuntimeError) as e:
            logger.error("nixl-rs HiCacheNixl: reading %d pages failed: %s", len(keys), e)
            return [False] * len(keys)
        per = len(self._pool.parts)
        return [all(hits[i * per:(i + 1) * per]) for i in range(len(keys))]

    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        parts = self._pool.parts if self._pool is not None else (["_k"] if self.is_mla_model else ["_k", "_v"])
        try:
            return self._native.batch_exists_parts(list(keys), list(parts))
        except (ValueError, RuntimeError) as e:
            logger.error("nixl-rs HiCacheNixl: batch_exists failed: %s", e)
            return 0

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) > 0

    # SGLang 0.5.23's HiCacheNixl serves only the zero-copy interface; so does this one.

    def get(self, key, target_location=None, target_sizes=None):
        raise NotImplementedError("HiCacheNixl (nixl-rs) serves batch_get_v1 (the zero-copy interface)")

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        raise NotImplementedError("HiCacheNixl (nixl-rs) serves batch_get_v1 (the zero-copy interface)")

    def set(self, key, value=None, target_location=None, target_sizes=None):
        raise NotImplementedError("HiCacheNixl (nixl-rs) serves batch_set_v1 (the zero-copy interface)")

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        raise NotImplementedError("HiCacheNixl (nixl-rs) serves batch_set_v1 (the zero-copy interface)")

    def clear(self) -> None:
        """Deletes this backend's pages (this model's and rank's files only)."""
        self._native.clear()

    def close(self) -> None:
        self._native.unregister_all()

    def get_stats(self):
        return None

    def object_path(self, key: str, part: str = "") -> Optional[str]:
        """The file of ``key``'s page part (``""``, ``"_k"``, ``"_v"``), for file plugins."""
        return self._native.part_path(key, part)


__all__ = ["HiCacheNixl"]
