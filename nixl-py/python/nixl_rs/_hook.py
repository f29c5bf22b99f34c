"""The start-up hook behind ``nixl_rs_sglang.pth``: imported only when ``NIXL_RS_SGLANG=1``.

It imports nothing heavy at start-up. It adds an import finder that, when SGLang's NIXL modules
are first imported, checks SGLang's version and serves our classes under SGLang's names:

- ``sglang.srt.mem_cache.storage.nixl.hicache_nixl`` becomes our module (SGLang's own needs
  NIXL's Python package, which this engine does not);
- ``sglang.srt.disaggregation.nixl.conn`` runs as SGLang wrote it, then its four KV classes are
  replaced (and so are those re-exported by ``sglang.srt.disaggregation.nixl``).

Spawned scheduler processes inherit the variable and run this hook too. On SGLang 0.5.23 the
hook stands aside: SGLang's plugin loader runs ``nixl_rs.sglang.plugin`` (the wheel's entry
point), which serves that release's classes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

from .sglang import HICACHE_MODULE, KV_MODULES

_TARGETS = (HICACHE_MODULE,) + KV_MODULES


class _Patching(importlib.abc.Loader):
    def __init__(self, name, inner):
        self.name = name
        self.inner = inner

    def create_module(self, spec):
        if self.name == HICACHE_MODULE:
            return None
        return self.inner.create_module(spec)

    def exec_module(self, module):
        from . import load_runtime
        from . import sglang as integ

        v = integ.check_version(line="0.5.1")  # raises a clear error for other releases
        if self.name == HICACHE_MODULE:
            from .sglang import hicache

            hicache.fill(module)
        else:
            self.inner.exec_module(module)
            integ.patch_kv_module(module)
        if not integ._installed:
            integ._installed = True
            integ.announce(v, load_runtime())


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _TARGETS:
            return None
        from .sglang import release_line, sglang_version

        if release_line(sglang_version()) == "0.5.23":
            return None  # the plugin entry point serves 0.5.23
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            if name != HICACHE_MODULE:
                return None
            spec = importlib.machinery.ModuleSpec(name, None)
        spec.loader = _Patching(name, spec.loader)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
