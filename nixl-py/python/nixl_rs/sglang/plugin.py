"""SGLang 0.5.23's plugin entry point (``[project.entry-points."sglang.srt.plugins"]``,
name ``nixl_rs``).

SGLang calls :func:`register` in every process that builds its NIXL classes (launcher, engine,
each scheduler, the DP controller, the detokenizer). It acts when ``NIXL_RS_SGLANG=1``, or when
``SGLANG_PLUGINS`` (SGLang's allowlist of entry-point names) names ``nixl_rs`` and
``NIXL_RS_SGLANG`` is not ``0``; otherwise installing the wheel changes nothing. When it acts it:

- refuses an SGLang this package does not serve (:class:`~nixl_rs.sglang.UnsupportedSGLang`,
  naming the supported releases; SGLang logs it and keeps its own connector);
- replaces ``sglang.srt.disaggregation.nixl.conn.NixlKVManager``, ``NixlKVSender``,
  ``NixlKVReceiver`` and ``NixlKVBootstrapServer`` through SGLang's ``HookRegistry``
  (``REPLACE``; ``get_kv_class`` then returns ours; the transfer backend keeps its name
  ``nixl``);
- registers :class:`nixl_rs.sglang.hicache0523.HiCacheNixl` as the HiCache storage backend
  ``nixl``.

The start-up line naming engine, SGLang version, wire profile and NIXL runtime is logged when
the first manager or storage backend is built (the scheduler configures logging after plugins
load).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("nixl_rs")

#: The entry point's name: what ``SGLANG_PLUGINS`` must list when it is set.
ENTRY_POINT = "nixl_rs"
KV_TARGET = "sglang.srt.disaggregation.nixl.conn."
HICACHE = ("nixl", "nixl_rs.sglang.hicache0523", "HiCacheNixl")


def active() -> bool:
    """Whether the plugin acts in this process (see the module docs)."""
    flag = os.environ.get("NIXL_RS_SGLANG", "").strip()
    if flag in ("0", "off"):
        return False
    if flag == "1":
        return True
    listed = os.environ.get("SGLANG_PLUGINS", "")
    return ENTRY_POINT in {p.strip() for p in listed.split(",")}


def register() -> None:
    """The entry point: installs our classes when :func:`active` (idempotent per process)."""
    if not active():
        logger.debug("nixl-rs plugin inactive (NIXL_RS_SGLANG unset and SGLANG_PLUGINS does not name nixl_rs)")
        return
    install(apply=False)


_registered = False


def install(apply: bool = True) -> None:
    """Registers the hooks and the storage backend; with ``apply``, applies the hooks at once
    (for callers outside SGLang's plugin loader, such as ``nixl_rs.sglang.install()``)."""
    global _registered
    from . import check_version

    check_version(line="0.5.23")
    if not _registered:
        from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from .kv0523 import KV_CLASSES

        for name, cls in KV_CLASSES.items():
            HookRegistry.register(KV_TARGET + name, cls, HookType.REPLACE)
        StorageBackendFactory.register_backend(*HICACHE)
        _registered = True
        logger.info("nixl-rs plugin: SGLang's NIXL KV classes and HiCache backend 'nixl' are served by nixl-rs")
    if apply:
        from sglang.srt.plugins.hook_registry import HookRegistry

        HookRegistry.apply_hooks()
