"""SGLang integration: our engine behind SGLang's NIXL class names.

Two SGLang lines are served, each through the route it offers:

- **0.5.1.x**: ``install()`` (or ``NIXL_RS_SGLANG=1`` through the ``.pth`` start-up hook)
  replaces ``sglang.srt.disaggregation.nixl``'s ``NixlKVManager``, ``NixlKVSender``,
  ``NixlKVReceiver``, ``NixlKVBootstrapServer`` and ``sglang.srt.mem_cache.storage.nixl.
  hicache_nixl.HiCacheNixl`` with the classes of ``kv`` and ``hicache``.
- **0.5.23**: SGLang's plugin entry point ``nixl_rs`` (group ``sglang.srt.plugins``,
  ``nixl_rs.sglang.plugin:register``) replaces the four classes with those of ``kv0523`` and
  registers ``hicache0523.HiCacheNixl`` as the HiCache storage backend ``nixl``, when
  ``NIXL_RS_SGLANG=1`` or when ``SGLANG_PLUGINS`` names ``nixl_rs``.

Other releases are refused with a message naming these: each release line speaks its own
class contract, and a mismatched class would fail inside SGLang's scheduler rather than
cleanly.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Optional

logger = logging.getLogger("nixl_rs")

#: The SGLang releases whose NIXL classes this package provides.
SUPPORTED = "0.5.1 and its post releases (start-up hook) and 0.5.23 (plugin)"
TESTED = "0.5.1.post3 and 0.5.23"

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


def release_line(v: Optional[str]) -> Optional[str]:
    """``"0.5.1"`` or ``"0.5.23"`` for a version of a line this package serves, else ``None``."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?$", v or "")
    if not m:
        return None
    line = f"{m[1]}.{m[2]}.{m[3]}"
    return line if line in ("0.5.1", "0.5.23") else None


def check_version(v: Optional[str] = None, line: Optional[str] = None) -> str:
    """Returns the SGLang version if this package serves it (and it is of ``line`` when
    given); raises :class:`UnsupportedSGLang` otherwise."""
    v = v if v is not None else sglang_version()
    if v is None:
        raise UnsupportedSGLang("nixl-rs: SGLang is not installed")
    got = release_line(v)
    if got is None or (line is not None and got != line):
        raise UnsupportedSGLang(
            f"nixl-rs supports SGLang {SUPPORTED} (tested: {TESTED}), not {v}: each SGLang "
            "release line has its own NIXL wire format and class contract. Unset "
            "NIXL_RS_SGLANG (or set it to 0) to run SGLang's own NIXL connector, or install "
            "sglang==0.5.23 or sglang==0.5.1.post3."
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
    :class:`UnsupportedSGLang` for an SGLang this package does not serve."""
    global _installed
    v = check_version()
    if _installed:
        return
    if release_line(v) == "0.5.23":
        from . import plugin

        plugin.install()
        _installed = True
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


def announce(v: str, lib: Optional[str], profile: str = "sglang-0.5.1") -> None:
    """The start-up log line that names the engine, SGLang's version, the wire profile and the
    NIXL runtime."""
    from .. import ENGINE

    logger.info(
        "%s engine (Rust) serves SGLang %s's NixlKVManager/NixlKVSender/NixlKVReceiver/"
        "NixlKVBootstrapServer and HiCacheNixl; wire profile %s; NIXL runtime %s",
        ENGINE,
        v,
        profile,
        lib or "from the loader path",
    )


_announce_lock = threading.Lock()
_announced_profiles: set = set()


def announce_once(profile: str, lib: Optional[str]) -> None:
    """:func:`announce` once per process and profile (the first manager or backend built)."""
    with _announce_lock:
        if profile in _announced_profiles:
            return
        _announced_profiles.add(profile)
    announce(sglang_version() or "?", lib, profile)


def installed() -> bool:
    """Whether :func:`install` (or the start-up hook) put our classes in place."""
    return _installed


__all__ = [
    "install", "installed", "check_version", "release_line", "UnsupportedSGLang", "SUPPORTED",
    "TESTED",
]
