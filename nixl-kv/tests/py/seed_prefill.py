"""A prefill rank that behaves like SGLang 0.5.1's NixlKVManager/NixlKVSender (one TP rank).

pyzmq PULL socket, PUT /route registration, the seed's frame parsing (by index, extra trailing
frames ignored), NIXL's Python API with its default config, one WRITE per chunk with the
`{room}_kv_{chunk}_{last}` notification, then aux buffer 0 only with `{room}_aux` (the seed
sends only that buffer). Usage:

    seed_prefill.py BOOTSTRAP_HOST:PORT BUFFERS PAGE_BYTES POOL_PAGES

Serves one room, then exits 0. Its pool holds byte (7b + 13q + j) mod 251 at byte j of page q
of buffer b; aux buffer 0's slot 0 holds (room + j) mod 256.
"""

import json
import struct
import sys
import time
import urllib.request
import uuid

import numpy as np
import zmq
from nixl_cu12._api import nixl_agent

GUARD = b"NixlMsgGuard"
# Row bytes of MetadataBuffers: output ids, logprob values, logprob indices (16 each),
# top-logprob values and indices (128 each), hidden states (4096 x bf16).
AUX_ITEMS = [64, 64, 64, 512, 512, 8192]


def main():
    bootstrap, buffers, page, pool = sys.argv[1:5]
    buffers, page, pool = int(buffers), int(page), int(pool)

    agent = nixl_agent(str(uuid.uuid4()))
    j = np.arange(page, dtype=np.int64)
    kv = []
    for b in range(buffers):
        buf = np.empty(pool * page, dtype=np.uint8)
        for q in range(pool):
            buf[q * page:(q + 1) * page] = ((7 * b + 13 * q + j) % 251).astype(np.uint8)
        kv.append(buf)
    # SGLang 0.5.1's MetadataBuffers: six buffers, one row per request.
    aux = [np.zeros(16 * item, dtype=np.uint8) for item in AUX_ITEMS]
    agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in kv], "DRAM")
    agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in aux], "DRAM")

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    body = json.dumps({"role": "Prefill", "tp_size": 1, "dp_size": 1, "rank_ip": "127.0.0.1",
                       "rank_port": port, "engine_rank": 0}).encode()
    req = urllib.request.Request(f"http://{bootstrap}/route", data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(req, timeout=10).status == 200
    print(json.dumps({"ready": True}), flush=True)

    decode = {}
    info = None
    while info is None:
        msg = pull.recv_multipart()
        print(f"seed_prefill: {len(msg)} frames, room frame {msg[1][:24]!r}", file=sys.stderr, flush=True)
        assert msg[0] == GUARD
        msg = msg[1:]
        if msg[0] == b"None":
            name = msg[3].decode("ascii")
            decode[name] = {
                "kv": list(struct.unpack(f"{len(msg[5]) // 8}Q", msg[5])),
                "aux": list(struct.unpack(f"{len(msg[6]) // 8}Q", msg[6])),
                "gpu": int(msg[7].decode("ascii")),
            }
            agent.add_remote_agent(msg[4])
        else:
            info = {
                "room": int(msg[0].decode("ascii")),
                "agent": msg[3].decode("ascii"),
                "pages": np.frombuffer(msg[4], dtype=np.int32).tolist(),
                "aux_index": int(msg[5].decode("ascii")),
                "required": int(msg[6].decode("ascii")),
            }

    room, peer = info["room"], decode[info["agent"]]
    aux[0][0:64] = ((room + np.arange(64)) % 256).astype(np.uint8)
    src_pages = [(room + 97 * i) % pool for i in range(len(info["pages"]))]
    src, dst = [], []
    for b in range(buffers):
        for s, d in zip(src_pages, info["pages"]):
            src.append((kv[b].ctypes.data + s * page, page, 0))
            dst.append((peer["kv"][b] + d * page, page, peer["gpu"]))

    def write(local, remote, notif):
        h = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local, "DRAM"),
                                  agent.get_xfer_descs(remote, "DRAM"), info["agent"], notif)
        assert agent.transfer(h) != "ERR"
        deadline = time.time() + 60
        while (state := agent.check_xfer_state(h)) != "DONE":
            assert state != "ERR" and time.time() < deadline, state
            time.sleep(0.0005)
        agent.release_xfer_handle(h)

    write(src, dst, f"{room}_kv_0_1".encode())
    write([(aux[0].ctypes.data, 64, 0)], [(peer["aux"][0] + info["aux_index"] * 64, 64, 0)], f"{room}_aux".encode())
    print(json.dumps({"ok": True, "room": room, "pages": len(src_pages)}), flush=True)
    # Let the notifications leave before the agent goes away.
    time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
