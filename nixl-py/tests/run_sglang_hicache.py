"""Runs SGLang 0.5.1.post3's own HiCacheNixl suite (from its wheel, unchanged) against
nixl-rs: the start-up hook (NIXL_RS_SGLANG=1) must have put our class behind SGLang's name, and
all 9 cases must pass."""

import os
import sys
import unittest

assert os.environ.get("NIXL_RS_SGLANG") == "1", "run with NIXL_RS_SGLANG=1"
import sglang.srt.mem_cache.storage.nixl.test_hicache_nixl_storage as suite  # noqa: E402

import nixl_rs.sglang  # noqa: E402

module = suite.HiCacheNixl.__module__
assert module == "nixl_rs.sglang.hicache", f"SGLang's HiCacheNixl is {module}, not ours"
assert nixl_rs.sglang.installed()
result = unittest.TextTestRunner(verbosity=2).run(
    unittest.defaultTestLoader.loadTestsFromModule(suite)
)
print(f"SGLang HiCacheNixl suite on nixl-rs: {result.testsRun - len(result.failures) - len(result.errors)}/{result.testsRun} passed")
sys.exit(0 if result.wasSuccessful() and result.testsRun == 9 else 1)
