"""Helpers shared by the KV interop test and the Python benchmark: SGLang 0.5.1.post3's KV
classes (SGLang's own or ours, through SGLang's `get_kv_class`), its `KVArgs`, and the one
runtime adaptation SGLang's classes need on a machine without a GPU.

The KV pool is host memory there. SGLang's classes register it as "VRAM" and pass `is_sorted=`,
which NIXL 1.5.1's Python API no longer takes, so in SGLang's processes `adapt_sglang_nixl()`
wraps `nixl_agent.register_memory`/`get_xfer_descs` to say "DRAM" and drop `is_sorted` (the only
adaptation); ours run with `NIXL_RS_KV_MEMORY=DRAM`.
"""

import os
import socket
import time
import types

#: SGLang 0.5.1's six-buffer `MetadataBuffers` layout, bytes per row (its prefill writes only the
#: first buffer's row).
AUX_ROWS = [64, 64, 64, 512, 512, 8192]


def adapt_sglang_nixl():
    """SGLang 0.5.1.post3 on host memory with NIXL 1.5.1: VRAM -> DRAM, no is_sorted."""
    import nixl._api as api

    agent = api.nixl_agent
    if getattr(agent, "_nixl_rs_adapted", False):
        return
    reg, xfer = agent.register_memory, agent.get_xfer_descs

    def fix(mem_type):
        return "DRAM" if mem_type == "VRAM" else mem_type

    def register_memory(self, reg_list, mem_type=None, is_sorted=None, **kw):
        return reg(self, reg_list, fix(mem_type), **kw)

    def get_xfer_descs(self, descs, mem_type=None, is_sorted=None, **kw):
        return xfer(self, descs, fix(mem_type), **kw)

    agent.register_memory = register_memory
    agent.get_xfer_descs = get_xfer_descs
    agent._nixl_rs_adapted = True


def classes(impl):
    """SGLang's `get_kv_class` table for `impl` ("sglang" or "ours"), checked to be that one's."""
    if impl == "ours":
        os.environ["NIXL_RS_KV_MEMORY"] = "DRAM"
        import nixl_rs.sglang

        nixl_rs.sglang.install()
    else:
        adapt_sglang_nixl()
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    c = {t: get_kv_class(TransferBackend.NIXL, t) for t in KVClassType}
    want = "nixl_rs" if impl == "ours" else "sglang"
    for t in (KVClassType.MANAGER, KVClassType.SENDER, KVClassType.RECEIVER):
        assert c[t].__module__.startswith(want), f"{impl}: {t} is {c[t].__module__}"
    return c


def make_args(kv_args_class, kv, aux, page, aux_rows=AUX_ROWS):
    """SGLang's `KVArgs` for numpy KV buffers of `page`-byte pages and aux buffers."""
    a = kv_args_class()
    a.engine_rank = 0
    a.kv_data_ptrs = [b.__array_interface__["data"][0] for b in kv]
    a.kv_data_lens = [b.nbytes for b in kv]
    a.kv_item_lens = [page] * len(kv)
    a.aux_data_ptrs = [b.__array_interface__["data"][0] for b in aux]
    a.aux_data_lens = [b.nbytes for b in aux]
    a.aux_item_lens = list(aux_rows)
    a.ib_device = None
    a.gpu_id = 0
    a.pp_rank = 0
    a.system_dp_rank = 0
    a.decode_tp_size = 1
    a.prefill_pp_size = 1
    a.prefill_start_layer = 0
    a.page_size = 1
    a.kv_head_num = 1
    return a


def server_args(port):
    """The `ServerArgs` fields the managers read."""
    return types.SimpleNamespace(
        disaggregation_bootstrap_port=port, dist_init_addr=f"127.0.0.1:{port}",
        tp_size=1, dp_size=1, enable_dp_attention=False,
    )


def wait_listening(port, timeout=60.0):
    """SGLang's bootstrap server starts listening on its own thread."""
    start = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() - start > timeout:
                raise SystemExit("bootstrap server never listened")
            time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_poll(poll_fn, want, what, timeout=60.0, nap=0.0001):
    """Polls until `want` (SGLang's KVPoll values); exits on Failed or after `timeout`. Returns
    the `time.monotonic()` at which `want` was seen."""
    failed = 0
    start = time.monotonic()
    while True:
        s = int(poll_fn())
        now = time.monotonic()
        if s == want:
            return now
        if s == failed:
            raise SystemExit(f"{what}: Failed")
        if now - start > timeout:
            raise SystemExit(f"{what}: stuck at {s}")
        time.sleep(nap)
