"""The start-up hook and the version check, each in fresh processes of the test venv (where the
wheel, and with it `nixl_rs_sglang.pth`, is installed):

1. `NIXL_RS_SGLANG=1`: SGLang's own `get_kv_class(TransferBackend.NIXL, ...)` and its HiCacheNixl
   import resolve to ours, in the process and in a child started with multiprocessing's `spawn`
   (how SGLang starts its schedulers), and the start-up log line names the engine;
2. without the variable nothing changes: SGLang's classes, and `nixl_rs` is never imported;
3. an SGLang of another wire format (0.5.2, 0.6.0; the installed version is monkeypatched in the
   child, before SGLang's NIXL modules are imported) is refused with the message saying why, by
   the hook's import and by `install()`; 0.5.1 and its post releases are accepted;
4. `NIXL_RS_STAGING`: refused when malformed, and with host-memory pools;
5. `NIXL_RS_BUSY_POLL_US`: refused when malformed; a busy-polling manager starts.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PROBE = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")

def probe():
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class
    from sglang.srt.mem_cache.storage.nixl import hicache_nixl
    kv = {t.name: get_kv_class(TransferBackend.NIXL, t).__module__ for t in
          (KVClassType.MANAGER, KVClassType.SENDER, KVClassType.RECEIVER, KVClassType.BOOTSTRAP_SERVER)}
    return {"kv": kv, "hicache": hicache_nixl.HiCacheNixl.__module__}

def spawned(q):
    q.put(probe())

if __name__ == "__main__":
    out = {"nixl_rs_at_start": "nixl_rs" in sys.modules,
           "heavy_at_start": [m for m in ("torch", "sglang", "nixl") if m in sys.modules]}
    out["self"] = probe()
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=spawned, args=(q,))
    p.start()
    out["spawned"] = q.get(timeout=120)
    p.join(60)
    out["nixl_rs_at_end"] = "nixl_rs" in sys.modules
    print("RESULT " + json.dumps(out), flush=True)
"""

REFUSE = r"""
import importlib, importlib.metadata as md, json, os, sys
real = md.version
out = {}
for fake in sys.argv[1:]:
    md.version = lambda name: fake if name == "sglang" else real(name)
    got = out[fake] = {}
    for mod in ("sglang.srt.disaggregation.nixl.conn", "sglang.srt.mem_cache.storage.nixl.hicache_nixl"):
        try:
            importlib.import_module(mod)
            got[mod] = "imported"
        except Exception as e:
            got[mod] = f"{type(e).__name__}: {e}"
    if os.environ.get("NIXL_RS_SGLANG") != "1":
        import nixl_rs.sglang
        try:
            nixl_rs.sglang.install()
            got["install"] = "installed"
        except Exception as e:
            got["install"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out), flush=True)
"""

REFUSED = ("0.5.2", "0.6.0", "0.5.10")
ACCEPTED = "0.5.1.post7"


_TMP = tempfile.mkdtemp(prefix="nixl-rs-activation-")


def start(code, env_on, *args):
    """Runs `code` as a script file (multiprocessing's spawn re-imports it in the child)."""
    env = dict(os.environ)
    env.pop("NIXL_RS_SGLANG", None)
    if env_on:
        env["NIXL_RS_SGLANG"] = "1"
    script = os.path.join(_TMP, f"child_{len(os.listdir(_TMP))}.py")
    with open(script, "w") as f:
        f.write(code)
    return subprocess.Popen([sys.executable, script, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(p):
    out, err = p.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"exit {p.returncode}\n{out}\n{err[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):]), err


def check_probe(res, want):
    for where in ("self", "spawned"):
        for name, mod in res[where]["kv"].items():
            assert mod.startswith(want), f"{where}: {name} is {mod}, want {want}"
        assert res[where]["hicache"].startswith(want), f"{where}: HiCacheNixl is {res[where]['hicache']}"


def test_hook_on(run):
    res, err = result(run)
    check_probe(res, "nixl_rs.sglang")
    assert res["nixl_rs_at_start"], "the hook did not run at start-up"
    assert not res["heavy_at_start"], f"the hook imported {res['heavy_at_start']} at start-up"
    assert "engine (Rust) serves SGLang 0.5.1.post3" in err, f"no start-up line in:\n{err[-3000:]}"
    print("  NIXL_RS_SGLANG=1: get_kv_class and HiCacheNixl are ours, in the process and in a "
          "spawned child; the start-up line names the engine")


def test_hook_off(run):
    res, err = result(run)
    check_probe(res, "sglang.srt.")
    assert not res["nixl_rs_at_start"] and not res["nixl_rs_at_end"], "nixl_rs imported"
    assert "nixl_rs" not in err and "nixl-rs" not in err, f"nixl_rs ran without the variable:\n{err[-3000:]}"
    print("  without the variable: SGLang's own classes in the process and in a spawned child; "
          "nixl_rs never imported")


def refused(got):
    return got.startswith("UnsupportedSGLang") and "wire format" in got


def test_version_refused(run_on, run_off):
    res, _ = result(run_on)
    for fake in REFUSED:
        for mod, got in res[fake].items():
            assert refused(got) and fake in got, f"hook, sglang {fake}, import {mod}: {got}"
    for mod, got in res[ACCEPTED].items():
        assert got == "imported", f"hook, sglang {ACCEPTED}, import {mod}: {got}"
    res, _ = result(run_off)
    for fake in REFUSED:
        got = res[fake]
        conn = got["sglang.srt.disaggregation.nixl.conn"]
        assert conn == "imported", f"without the variable, sglang {fake}: conn {conn}"
        assert refused(got["install"]) and fake in got["install"], f"install(), sglang {fake}: {got}"
    assert res[ACCEPTED]["install"] == "installed", res[ACCEPTED]
    print(f"  SGLang {', '.join(REFUSED)} (monkeypatched): refused by the hook's imports and by "
          f"install(), naming the wire format; {ACCEPTED} accepted by both")


def test_versions_accepted():
    from nixl_rs.sglang import UnsupportedSGLang, check_version

    for v in ("0.5.1", "0.5.1.post1", "0.5.1.post3", "0.5.1.post9"):
        assert check_version(v) == v
    for v in ("0.5.0", "0.5.2", "0.5.2rc0", "0.5.1.dev1", "1.0.0"):
        try:
            check_version(v)
        except UnsupportedSGLang:
            continue
        raise AssertionError(f"{v} accepted")
    print("  check_version: 0.5.1 and 0.5.1.postN accepted; 0.5.0, 0.5.2, 0.5.2rc0, dev, 1.0.0 refused")


def test_staging_env():
    """NIXL_RS_STAGING: a malformed value is refused naming the variable; with host-memory pools
    the GPU paths cannot run, and the manager refuses to start saying so."""
    import ctypes

    from nixl_rs import _native, load_runtime

    load_runtime()
    kv = (ctypes.c_uint8 * (4 * 4096))()
    aux = (ctypes.c_uint8 * (4 * 64))()
    args = ([(ctypes.addressof(kv), len(kv), 4096)], [(ctypes.addressof(aux), len(aux), 64)])
    cases = (("8:zero", ValueError, "NIXL_RS_STAGING"), ("1", RuntimeError, "GPU memory"))
    try:
        for value, error, says in cases:
            os.environ["NIXL_RS_STAGING"] = value
            try:
                _native.KvManager("decode", f"staging-{value}", *args, kv_mem="DRAM")
            except error as e:
                assert says in str(e), f"{value}: {e}"
                continue
            raise AssertionError(f"NIXL_RS_STAGING={value} with host pools accepted")
    finally:
        os.environ.pop("NIXL_RS_STAGING", None)
    # Unset, the same manager starts.
    _native.KvManager("decode", "staging-off", *args, kv_mem="DRAM")
    print("  NIXL_RS_STAGING: malformed refused; host pools refused with a reason; unset starts")


def test_busy_poll_env():
    """NIXL_RS_BUSY_POLL_US: not a number of microseconds (or over a second) is refused naming
    the variable; a window of 2 ms is taken."""
    import ctypes

    from nixl_rs import _native, load_runtime

    load_runtime()
    kv = (ctypes.c_uint8 * (4 * 4096))()
    aux = (ctypes.c_uint8 * (4 * 64))()
    args = ([(ctypes.addressof(kv), len(kv), 4096)], [(ctypes.addressof(aux), len(aux), 64)])
    try:
        for value in ("2ms", "-1", "5000000"):
            os.environ["NIXL_RS_BUSY_POLL_US"] = value
            try:
                _native.KvManager("decode", f"busy-{value}", *args, kv_mem="DRAM")
            except ValueError as e:
                assert "NIXL_RS_BUSY_POLL_US" in str(e), f"{value}: {e}"
                continue
            raise AssertionError(f"NIXL_RS_BUSY_POLL_US={value} accepted")
        os.environ["NIXL_RS_BUSY_POLL_US"] = "2000"
        _native.KvManager("decode", "busy-2000", *args, kv_mem="DRAM")
    finally:
        os.environ.pop("NIXL_RS_BUSY_POLL_US", None)
    print("  NIXL_RS_BUSY_POLL_US: malformed refused; 2000 starts")


if __name__ == "__main__":
    t0 = time.time()
    # The children import SGLang (torch): start them all at once, then check each.
    on, off = start(PROBE, True), start(PROBE, False)
    ref_on = start(REFUSE, True, *REFUSED, ACCEPTED)
    ref_off = start(REFUSE, False, *REFUSED, ACCEPTED)
    test_versions_accepted()
    test_staging_env()
    test_busy_poll_env()
    test_hook_on(on)
    test_hook_off(off)
    test_version_refused(ref_on, ref_off)
    shutil.rmtree(_TMP, ignore_errors=True)
    print(f"activation: 6 of 6 passed ({time.time() - t0:.1f}s)")
