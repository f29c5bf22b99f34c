// Gather and scatter kernels of nixl-core's staged KV path (nixl-core/src/staging.rs builds the
// table, nixl-core/src/cuda.rs launches them). Compiled to PTX by `cargo xtask ptx` into
// staging.ptx beside this file; the PTX is committed and loaded at run time by the CUDA driver.
//
// The table, in device memory, is an array of 64-bit words (nb buffers, np pages):
//   words[0 .. nb)        base address of buffer b (one KV pool buffer: a layer's K or V)
//   words[nb .. 2nb)      item length of buffer b in bytes (one page of that buffer)
//   words[2nb .. 3nb)     offset in the staging area of buffer b's first item
//   words[3nb ..)         np page indices, 32 bits each, two per word (low half first)
// Segment s (0 <= s < nb * np) is item i = s % np of buffer b = s / np:
//   pool address    = base[b] + page[i] * len[b]
//   staging address = staging + off[b] + i * len[b]
// One block copies one slice of SLICE bytes of one segment (blockIdx.x: segment, blockIdx.y:
// slice), so one launch moves every buffer (all layers, K and V) of one chunk of pages.
// Copies are 16 bytes wide where source and destination share their alignment modulo 16 (the
// unaligned head and tail bytes are copied one by one); otherwise byte by byte. Any length is
// copied exactly.

#define SLICE 65536ull
#define UNROLL 4

struct __attribute__((aligned(16))) v16 {
    unsigned long long a, b;
};

__device__ __forceinline__ void copy_range(unsigned char *dst, const unsigned char *src,
                                           unsigned long long n) {
    const unsigned int t = threadIdx.x;
    const unsigned int nt = blockDim.x;
    const unsigned long long s = (unsigned long long)src;
    const unsigned long long d = (unsigned long long)dst;
    if (((s ^ d) & 15ull) != 0) {
        for (unsigned long long k = t; k < n; k += nt) {
            dst[k] = src[k];
        }
        return;
    }
    unsigned long long head = (16ull - (s & 15ull)) & 15ull;
    if (head > n) {
        head = n;
    }
    if (t < head) {
        dst[t] = src[t];
    }
    const unsigned long long body = (n - head) >> 4;
    const v16 *vs = (const v16 *)(src + head);
    v16 *vd = (v16 *)(dst + head);
    unsigned long long k = t;
    for (; k + (UNROLL - 1) * nt < body; k += UNROLL * nt) {
        v16 r[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            r[u] = vs[k + u * nt];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            vd[k + u * nt] = r[u];
        }
    }
    for (; k < body; k += nt) {
        vd[k] = vs[k];
    }
    const unsigned long long done = head + (body << 4);
    const unsigned long long tail = n - done;
    if (t < tail) {
        dst[done + t] = src[done + t];
    }
}

__device__ __forceinline__ void staged_copy(const unsigned long long *table,
                                            unsigned long long staging, unsigned int nb,
                                            unsigned int np, int to_staging) {
    const unsigned long long seg = blockIdx.x;
    const unsigned int b = (unsigned int)(seg / np);
    const unsigned int i = (unsigned int)(seg % np);
    if (b >= nb) {
        return;
    }
    const unsigned long long len = table[nb + b];
    const unsigned long long from = (unsigned long long)blockIdx.y * SLICE;
    if (from >= len) {
        return;
    }
    unsigned long long n = len - from;
    if (n > SLICE) {
        n = SLICE;
    }
    const unsigned int *pages = (const unsigned int *)(table + 3ull * nb);
    const unsigned long long pool = table[b] + (unsigned long long)pages[i] * len + from;
    const unsigned long long stage = staging + table[2ull * nb + b] + (unsigned long long)i * len + from;
    if (to_staging) {
        copy_range((unsigned char *)stage, (const unsigned char *)pool, n);
    } else {
        copy_range((unsigned char *)pool, (const unsigned char *)stage, n);
    }
}

// Pool pages -> staging area.
extern "C" __global__ void nixl_stage_gather(const unsigned long long *table,
                                             unsigned long long staging, unsigned int nb,
                                             unsigned int np) {
    staged_copy(table, staging, nb, np, 1);
}

// Staging area -> pool pages.
extern "C" __global__ void nixl_stage_scatter(const unsigned long long *table,
                                              unsigned long long staging, unsigned int nb,
                                              unsigned int np) {
    staged_copy(table, staging, nb, np, 0);
}

// Pool pages -> a peer's pool pages, mapped into this process (CUDA IPC, same node), with no
// staging area. The table: words[0 .. nb) source bases, words[nb .. 2nb) item lengths (the
// same on both sides), words[2nb .. 3nb) destination bases, then np source pages and np
// destination pages, 32 bits each, two per word (each list starts on a word).
extern "C" __global__ void nixl_copy_direct(const unsigned long long *table, unsigned int nb,
                                            unsigned int np) {
    const unsigned long long seg = blockIdx.x;
    const unsigned int b = (unsigned int)(seg / np);
    const unsigned int i = (unsigned int)(seg % np);
    if (b >= nb) {
        return;
    }
    const unsigned long long len = table[nb + b];
    const unsigned long long from = (unsigned long long)blockIdx.y * SLICE;
    if (from >= len) {
        return;
    }
    unsigned long long n = len - from;
    if (n > SLICE) {
        n = SLICE;
    }
    const unsigned int *src_pages = (const unsigned int *)(table + 3ull * nb);
    const unsigned int *dst_pages = (const unsigned int *)(table + 3ull * nb + (np + 1) / 2);
    const unsigned long long src = table[b] + (unsigned long long)src_pages[i] * len + from;
    const unsigned long long dst = table[2ull * nb + b] + (unsigned long long)dst_pages[i] * len + from;
    copy_range((unsigned char *)dst, (const unsigned char *)src, n);
}

// Head slices of pool pages -> a peer's mapped pool pages (heterogeneous TP on the direct path).
// The table: words[0 .. nb) source bases, [nb .. 2nb) source item lengths, [2nb .. 3nb)
// destination bases, [3nb .. 4nb) destination item lengths, then np source pages and np
// destination pages, two per word. For every token t < tokens of page pair i of buffer b,
// len bytes go from src page + src_off + t * src_token to dst page + dst_off + t * dst_token.
// Block (b * np + i, y) copies part of that page pair's slices: 16-byte words spread over all
// threads of the gridDim.y blocks when every address and stride is 16-byte aligned, else one
// token at a time with copy_range.
extern "C" __global__ void nixl_copy_sliced(const unsigned long long *table, unsigned int nb,
                                            unsigned int np, unsigned int tokens,
                                            unsigned long long src_token,
                                            unsigned long long dst_token,
                                            unsigned long long src_off,
                                            unsigned long long dst_off,
                                            unsigned long long len) {
    const unsigned long long seg = blockIdx.x;
    const unsigned int b = (unsigned int)(seg / np);
    const unsigned int i = (unsigned int)(seg % np);
    if (b >= nb) {
        return;
    }
    const unsigned int *src_pages = (const unsigned int *)(table + 4ull * nb);
    const unsigned int *dst_pages = (const unsigned int *)(table + 4ull * nb + (np + 1) / 2);
    const unsigned long long src =
        table[b] + (unsigned long long)src_pages[i] * table[nb + b] + src_off;
    const unsigned long long dst =
        table[2ull * nb + b] + (unsigned long long)dst_pages[i] * table[3ull * nb + b] + dst_off;
    if (((src | dst | src_token | dst_token | len) & 15ull) == 0) {
        const unsigned long long words = len >> 4;
        const unsigned long long total = words * tokens;
        const unsigned long long step = (unsigned long long)blockDim.x * gridDim.y;
        for (unsigned long long k = threadIdx.x + (unsigned long long)blockIdx.y * blockDim.x;
             k < total; k += step) {
            const unsigned long long t = k / words;
            const unsigned long long w = k % words;
            ((v16 *)(dst + t * dst_token))[w] = ((const v16 *)(src + t * src_token))[w];
        }
        return;
    }
    for (unsigned long long t = blockIdx.y; t < tokens; t += gridDim.y) {
        copy_range((unsigned char *)(dst + t * dst_token), (const unsigned char *)(src + t * src_token),
                   len);
    }
}
