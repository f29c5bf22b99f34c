"""nixl-rs: SGLang's NIXL components on a native Rust engine.

- ``nixl_rs.sglang.install()`` puts the engine behind SGLang's own class names
  (``NixlKVManager``, ``NixlKVSender``, ``NixlKVReceiver``, ``NixlKVBootstrapServer``,
  ``HiCacheNixl``) in the current process; ``NIXL_RS_SGLANG=1`` does it in every process
  (SGLang 0.5.23: its plugin loader runs ``nixl_rs.sglang.plugin``; 0.5.1.x: the
  ``nixl_rs_sglang.pth`` start-up hook).
- ``nixl_rs.load_runtime()`` loads the NIXL runtime (``libnixl_capi.so``) that the environment
  already has: ``NIXL_RUNTIME_DIR`` when set, else the pip-installed ``nixl-cu12``/``nixl-cu13``
  wheel (the same libraries SGLang's own ``nixl`` package uses), else nixl-rs's own search.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterator, Optional

from . import _native

__version__: str = _native.__version__
ENGINE = f"nixl-rs {__version__}"

_WHEELS = ("nixl_cu12", "nixl_cu13")


def _wheel_order() -> list:
    """The wheel an imported NIXL Python package already uses first, then the one NIXL's meta
    package would pick (by the CUDA major of torch), then the rest."""
    import sys

    order = [n for n in _WHEELS if n in sys.modules]
    try:
        from nixl_meta_utils import detect_cuda_major

        major = detect_cuda_major()
        if major is not None:
            order.append(f"nixl_cu{major}")
    except Exception:  # noqa: BLE001 - the meta package is optional
        pass
    order.extend(_WHEELS)
    return list(dict.fromkeys(n for n in order if n in _WHEELS))


def wheel_lib_dirs() -> Iterator[Path]:
    """Library directories of pip-installed NIXL wheels (``.nixl_cuXX.mesonpy.libs``)."""
    for name in _wheel_order():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            d = Path(loc).parent / f".{name}.mesonpy.libs"
            if (d / "libnixl_capi.so").is_file():
                yield d


def load_runtime() -> Optional[str]:
    """Loads the NIXL runtime once per process; returns the ``libnixl_capi.so`` loaded."""
    if os.environ.get("NIXL_RUNTIME_DIR"):
        return _native.load_runtime(None)
    for d in wheel_lib_dirs():
        try:
            return _native.load_runtime(str(d))
        except RuntimeError:
            continue
    return _native.load_runtime(None)


__all__ = ["ENGINE", "load_runtime", "wheel_lib_dirs", "__version__"]
