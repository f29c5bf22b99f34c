"""``HiCacheNixl`` with SGLang 0.5.1.post3's constructor, methods and return values, on
nixl-hicache.

What is the same: the directory (``file_path``, overridden by
``SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR``), plugin names and ``auto`` order, the files
(``<dir>/<key>``, raw bytes, readable by SGLang's own class), ``get``/``batch_get`` returning the
targets on success and ``None``s otherwise (``None``s always in address mode), ``set``/
``batch_set`` returning ``bool``, ``exists``, ``batch_exists``, the ``register_*`` methods, and
errors logged rather than raised.

What differs on purpose: writes are atomic (a failed ``set`` leaves no key;
``NIXL_RS_HICACHE_WRITE=in-place`` writes in place as SGLang does), memory registered for one
call is deregistered when it returns (SGLang's fallback registers on every call and
never deregisters), files are opened through a bounded cache instead of one descriptor per page
per call, and the GIL is released during IO. Tensors must be contiguous CPU tensors (or numpy
arrays, or ``(address, length)`` pairs of host memory).
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any, List, Optional

from .. import _native, load_runtime

logger = logging.getLogger("nixl_rs.hicache")

DIR_ENV = "SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"
#: How pages are written to files: "atomic" or "in-place" (see the module docs).
WRITE_ENV = "NIXL_RS_HICACHE_WRITE"
WRITE_DEFAULT = "atomic"
FILE_PLUGINS = ["3FS", "POSIX", "GDS_MT", "GDS"]
OBJ_PLUGINS = ["OBJ"]

try:  # SGLang's abstract base, when SGLang is installed.
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base
except Exception:  # noqa: BLE001 - any import problem means: no SGLang base class
    _Base = object


def addr_len(obj: Any) -> tuple[int, int]:
    """``(address, bytes)`` of a contiguous CPU tensor, a numpy array or an ``(addr, len)``
    pair. Raises ``ValueError`` for anything else."""
    if isinstance(obj, tuple) and len(obj) >= 2:
        return int(obj[0]), int(obj[1])
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):
        dev = getattr(getattr(obj, "device", None), "type", "cpu")
        if dev != "cpu":
            raise ValueError(f"HiCacheNixl (nixl-rs) moves host tensors only, not {dev}")
        if not obj.is_contiguous():
            raise ValueError("HiCacheNixl (nixl-rs) needs contiguous tensors")
        return int(obj.data_ptr()), int(obj.numel()) * int(obj.element_size())
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        if ai.get("strides") is not None and not obj.flags["C_CONTIGUOUS"]:
            raise ValueError("HiCacheNixl (nixl-rs) needs C-contiguous arrays")
        return int(ai["data"][0]), int(obj.nbytes)
    raise ValueError(f"cannot read an address from {type(obj).__name__}")


class _Selection:
    """SGLang's ``NixlBackendSelection`` fields, for code that reads them."""

    FILE_PLUGINS = FILE_PLUGINS
    OBJ_PLUGINS = OBJ_PLUGINS

    def __init__(self, plugin: str, backend_name: str, mem_type: str):
        self.plugin = plugin
        self.backend_name = backend_name
        self.mem_type = mem_type


class HiCacheNixl(_Base):
    """HiCacheNixl provides high-performance storage using NIXL plugins (nixl-rs engine)."""

    def __init__(self, file_path: str = "/tmp/hicache_storage", plugin: str = "auto"):
        file_path = os.getenv(DIR_ENV, file_path)
        load_runtime()
        try:
            self._native = _native.HiCache(file_path, plugin, os.getenv(WRITE_ENV, WRITE_DEFAULT))
        except RuntimeError as e:
            raise RuntimeError(f"Failed to create NIXL backend: {e}") from e
        self.file_path = file_path
        self.agent_name = f"hicache_nixl_rs_{os.getpid()}_{id(self):x}"
        self.backend_selector = _Selection(plugin, self._native.backend, self._native.mem_type)
        self.file_manager = None
        if plugin not in OBJ_PLUGINS:
            try:
                from sglang.srt.mem_cache.storage.nixl.nixl_utils import NixlFileManager

                self.file_manager = NixlFileManager(file_path)
            except Exception:  # noqa: BLE001 - SGLang's helper is optional here
                os.makedirs(file_path, exist_ok=True)

    # Registration (SGLang: register_buffers/register_files/register_objects).

    def register_buffers(self, buffers) -> Optional[Any]:
        """Registers a tensor, a list of tensors or ``(addr, len)`` pairs until this object
        ends; returns the number of registered regions (``None`` on failure)."""
        items = [buffers] if hasattr(buffers, "data_ptr") else list(buffers)
        if not items:
            return None
        try:
            pairs = [addr_len(b) for b in items]
            return self._native.register([a for a, _ in pairs], [n for _, n in pairs])
        except (ValueError, RuntimeError) as e:
            logger.error(f"Failed to register buffers with NIXL: {e}")
            return None

    def register_files(self, file_paths: List, open_file: Optional[bool] = True) -> Optional[Any]:
        """Checks the files (paths, or SGLang's ``(0, 0, fd, path)`` tuples); returns their
        paths, or ``None`` if one is missing. Files are opened per transfer through a bounded
        cache, so nothing stays registered."""
        paths = [p[3] if isinstance(p, tuple) else p for p in file_paths or []]
        if not paths or not all(isinstance(p, str) and os.path.isfile(p) for p in paths):
            return None
        return paths

    def register_objects(self, keys: List[str], sizes: Optional[List[int]] = None) -> Optional[Any]:
        """Objects need no registration here; returns the keys (``None`` for none)."""
        if not keys:
            return None
        return list(keys)

    # Transfers.

    def _transfer(self, write: bool, keys: List[str], dest) -> Optional[List[bool]]:
        if len(dest) != len(keys):
            logger.error("Mismatch between number of tensors/buffers and files/objects")
            return None
        try:
            pairs = [addr_len(d) for d in dest]
            addrs = [a for a, _ in pairs]
            lens = [n for _, n in pairs]
            if write:
                self._native.batch_set(list(keys), addrs, lens)
                return [True] * len(keys)
            return self._native.batch_get(list(keys), addrs, lens)
        except (ValueError, RuntimeError) as e:
            logger.error(f"Failed to execute transfer: {e}")
            return None

    def get(self, key: str, target_location=None, target_sizes: Optional[int] = None):
        if target_location is None:
            return None
        if target_sizes:
            result = self.batch_get([key], [target_location], [target_sizes])
        else:
            result = self.batch_get([key], [target_location])
        return result[0] if result else None

    def batch_get(self, keys: List[str], target_locations=None, target_sizes=None):
        if not keys:
            return []
        if not target_locations:
            return [None] * len(keys)
        if target_sizes and (len(target_sizes) != len(target_locations)):
            logger.error("Mismatch between number of target_locations and target_sizes")
            return [None] * len(keys)
        dest = list(zip(target_locations, target_sizes)) if target_sizes else target_locations
        hits = self._transfer(False, keys, dest)
        success = hits is not None and all(hits)
        return target_locations if success and not target_sizes else [None] * len(keys)

    def set(self, key: str, value=None, target_location=None, target_sizes=None) -> bool:
        if target_location and target_sizes:
            return self.batch_set([key], None, [target_location], [target_sizes])
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values=None, target_locations=None, target_sizes=None) -> bool:
        if not keys or (not values and (not target_locations or not target_sizes)):
            logger.error("Keys or values were not passed")
            return False
        if not values:
            values = list(zip(target_locations, target_sizes))
        return self._transfer(True, keys, values) is not None

    def exists(self, key: str) -> bool:
        try:
            return self._native.exists(key)
        except (ValueError, RuntimeError) as e:
            logger.error(f"exists({key!r}) failed: {e}")
            return False

    def batch_exists(self, keys: List[str]) -> int:
        try:
            return self._native.batch_exists(list(keys))
        except (ValueError, RuntimeError) as e:
            logger.error(f"batch_exists failed: {e}")
            return 0

    # nixl-rs extras (not in SGLang 0.5.1's HiCacheNixl).

    def delete(self, key: str) -> bool:
        return self._native.delete(key)

    def clear(self) -> int:
        return self._native.clear()


def fill(module: types.ModuleType) -> None:
    """Makes ``module`` (SGLang's ``hicache_nixl`` name) serve our class."""
    module.HiCacheNixl = HiCacheNixl
    module.__doc__ = "SGLang's HiCacheNixl served by the nixl-rs engine."
    module.logger = logging.getLogger(module.__name__)
    try:  # SGLang's helpers, for code that imports them from this module.
        from sglang.srt.mem_cache.storage.nixl import nixl_utils

        for name in ("NixlBackendSelection", "NixlFileManager", "NixlRegistration"):
            setattr(module, name, getattr(nixl_utils, name))
    except Exception:  # noqa: BLE001 - optional
        pass


def module_alias(name: str) -> types.ModuleType:
    """A module named ``name`` that serves our class."""
    mod = types.ModuleType(name)
    fill(mod)
    return mod
