"""A decode rank that speaks exactly what SGLang 0.5.1's NixlKVReceiver sends.

It uses the same libraries as SGLang (pyzmq, NIXL's Python API with its default config:
progress thread on, UCX) and the same frames (docs/protocol.md §3), but no torch: the KV pool is
numpy host memory. Usage:

    seed_decode.py BOOTSTRAP_HOST:PORT BUFFERS PAGE_BYTES POOL_PAGES ROOM AUX_INDEX PAGE[,PAGE...]

Exits 0 after the room completed (all chunks and aux notified, as SGLang's check_transfer_done)
and every byte matched the pattern the Rust prefill test fills its pool with.
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
# SGLang 0.5.1's MetadataBuffers row bytes: output ids, logprob values, logprob indices (16
# each), top-logprob values and indices (128 each), hidden states (4096 x bf16).
AUX_ITEMS = [64, 64, 64, 512, 512, 8192]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def main():
    bootstrap, buffers, page, pool, room, aux_index, pages = sys.argv[1:8]
    buffers, page, pool, room, aux_index = int(buffers), int(page), int(pool), int(room), int(aux_index)
    pages = [int(p) for p in pages.split(",")]

    info = get(f"http://{bootstrap}/route?engine_rank=-1&target_dp_group=-1")
    dp_group = room % info["prefill_dp_size"]
    rank = get(f"http://{bootstrap}/route?engine_rank=0&target_dp_group={dp_group}")

    agent = nixl_agent(str(uuid.uuid4()))
    kv = [np.zeros(pool * page, dtype=np.uint8) for _ in range(buffers)]
    aux = [np.zeros(16 * item, dtype=np.uint8) for item in AUX_ITEMS]
    agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in kv], "DRAM")
    agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in aux], "DRAM")

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(f"tcp://{rank['rank_ip']}:{rank['rank_port']}")
    # KVArgsRegisterInfo, 9 frames (the seed sends no trailing TP frames).
    sock.send_multipart([
        GUARD,
        b"None",
        b"127.0.0.1",
        b"45678",
        agent.name.encode("ascii"),
        agent.get_agent_metadata(),
        b"".join(struct.pack("Q", b.ctypes.data) for b in kv),
        b"".join(struct.pack("Q", b.ctypes.data) for b in aux),
        b"0",
    ])
    # TransferInfo, 8 frames.
    sock.send_multipart([
        GUARD,
        str(room).encode("ascii"),
        b"127.0.0.1",
        b"45678",
        agent.name.encode("ascii"),
        np.array(pages, dtype=np.int32).tobytes(),
        str(aux_index).encode("ascii"),
        b"1",
    ])

    # SGLang's update_transfer_status / check_transfer_done.
    received, expected, got_aux = set(), None, False
    deadline = time.time() + 60
    while not (expected is not None and len(received) == expected and got_aux):
        if time.time() > deadline:
            print(json.dumps({"ok": False, "error": "timeout", "received": sorted(received)}))
            return 1
        for _peer, msgs in agent.get_new_notifs().items():
            for msg in msgs:
                parts = msg.decode("ascii").split("_")
                if int(parts[0]) != room:
                    continue
                if parts[1] == "kv":
                    received.add(int(parts[2]))
                    if int(parts[3]) != 0:
                        expected = int(parts[2]) + 1
                elif parts[1] == "aux":
                    got_aux = True
        time.sleep(0.0005)

    # Verify: page i came from prefill page (room + 97 i) mod pool; aux row from slot 0.
    j = np.arange(page, dtype=np.int64)
    for b in range(buffers):
        for i, d in enumerate(pages):
            src = (room + 97 * i) % pool
            want = ((7 * b + 13 * src + j) % 251).astype(np.uint8)
            got = kv[b][d * page:(d + 1) * page]
            if not np.array_equal(got, want):
                print(json.dumps({"ok": False, "error": f"buffer {b} page {d} differs"}))
                return 1
    for k, item in enumerate(AUX_ITEMS):
        want = ((room + 17 * k + np.arange(item)) % 256).astype(np.uint8)
        if not np.array_equal(aux[k][aux_index * item:(aux_index + 1) * item], want):
            print(json.dumps({"ok": False, "error": f"aux {k} differs"}))
            return 1
    print(json.dumps({"ok": True, "chunks": expected}))
    sock.close(linger=0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
