"""SGLang integration: our engine behind SGLang 0.5.1's NIXL class names.

``install()`` replaces, in the current process, the classes that SGLang looks up at each use:

- ``sglang.srt.disaggregation.nixl`` (and ``.conn``): ``NixlKVManager``, ``NixlKVSender``,
  ``NixlKVReceiver``, ``NixlKVBootstrapServer`` (``get_kv_class`` imports them at every call);
- ``sglang.srt.mem_cache.storage.nixl.hicache_nixl``: ``HiCacheNixl`` (``cache_controller``
  imports it when HiCache's storage backend is ``nixl``).

Only SGLang 0.5.1.x is accepted: 0.5.2 changed the connector's wire format (more frames, other
notifications), and a mismatched peer would corrupt transfers rather than fail cleanly.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Optional

logger = logging.getLogger("nixl_rs")

#: The SGLang releases whose NIXL wire format this engine speaks (0.5.1 and its post releases).
SUPPORTED = "0.5.1, 0.5.1.post1 .. 0.5.1.postN"
TESTED = "0.5.1.post3"

KV_MODULES = ("sglang.srt.disaggregation.nixl.conn", "sglang.srt.disaggregation.nixl")
HICACHE_MODULE = "sglang.srt.mem_cache.storage.nixl.hicache_nixl"
KV_NAMES = ("NixlKVManager", "NixlKVSender", "NixlKVReceiver", "NixlKVBootstrapServer")


class UnsupportedSGLang(RuntimeError):
    """The installed SGLang speaks another wire format than this engine."""


def sglang_version() -> Optional[str]:
    """The installed SGLang's version, read from its metadata (SGLang is not imported)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_version(v: Optional[str] = None) -> str:
    """Returns the SGLang version if supported; raises :class:`UnsupportedSGLang` otherwise."""
    v = v if v is not None else sglang_version()
    if v is None:
        raise UnsupportedSGLang("nixl-rs: SGLang is not installed")
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?$", v)
    if not m or (int(m[1]), int(m[2]), int(m[3])) != (0, 5, 1):
        raise UnsupportedSGLang(
            f"nixl-rs supports SGLang {SUPPORTED} (tested: {TESTED}), not {v}: SGLang 0.5.2 "
            "and later changed the NIXL connector's wire format. Unset NIXL_RS_SGLANG or "
            "install sglang==0.5.1.post3."
        )
    return v


_installed = False


def patch_kv_module(mod) -> None:
    """Puts our KV classes into an imported SGLang module."""
    from . import kv

    for name in KV_NAMES:
        setattr(mod, name, getattr(kv, name))


def install() -> None:
    """Replaces SGLang's NIXL classes in this process (idempotent). Raises
    :class:`UnsupportedSGLang` for an SGLang other than 0.5.1.x."""
    global _installed
    v = check_version()
    if _installed:
        return
    from .. import ENGINE, load_runtime
    from . import hicache

    lib = load_runtime()
    existing = sys.modules.get(HICACHE_MODULE)
    if existing is not None:
        existing.HiCacheNixl = hicache.HiCacheNixl
    else:
        sys.modules[HICACHE_MODULE] = hicache.module_alias(HICACHE_MODULE)
    import importlib

    for name in KV_MODULES:
        patch_kv_module(importlib.import_module(name))
    _installed = True
    announce(v, lib)


def announce(v: str, lib: Optional[str]) -> None:
    """The start-up log line that names the engine."""
    from .. import ENGINE

    logger.info(
        "%s engine (Rust) serves SGLang %s's NixlKVManager/NixlKVSender/NixlKVReceiver/"
        "NixlKVBootstrapServer and HiCacheNixl; NIXL runtime %s",
        ENGINE,
        v,
        lib or "from the loader path",
    )


def installed() -> bool:
    """Whether :func:`install` (or the start-up hook) put our classes in place."""
    return _installed


__all__ = ["install", "installed", "check_version", "UnsupportedSGLang", "SUPPORTED", "TESTED"]
