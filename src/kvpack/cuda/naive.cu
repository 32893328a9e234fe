// The paper's naive variant: one element per thread, 16 x 16 blocks (16 channels x 16 tokens).
//
// quantize:   codes[b, t, d] = clamp(round_half_even(x[b, t, d] / scale[b, d]), -127, 127)
// dequantize: out[b, t, d]   = codes[b, t, d] * scale[b, d]
// (kvpack.reference.encode / dequantize for int8-channel; common.cuh has the two operations). The
// grid is (D / 16, T / 16, B); the token and batch axes loop with a grid stride so that any size
// fits the grid limits, and every index is 64-bit.

#include "common.cuh"

template <class Op>
__device__ __forceinline__ void naive_walk(const Op& op, const float* __restrict__ scale, i64 B, i64 T, i64 D) {
    const i64 d = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        for (i64 t = (i64)blockIdx.y * blockDim.y + threadIdx.y; t < T; t += (i64)gridDim.y * blockDim.y) {
            const i64 i = (b * T + t) * D + d;
            op.store(i, op.load(i), scale[b * D + d]);
        }
    }
}

KVPACK_KERNELS(naive)
