// The paper's coarsened variant: each thread converts 4 elements of one token, at channels
// d, d + 16, d + 32, d + 48 (a stride of the block width keeps each warp's accesses contiguous);
// it issues the 4 loads before the 4 stores. A 16 x 16 block covers 64 channels x 16 tokens; the
// grid is (D / 64, T / 16, B), with grid strides along the tokens and the batch, and 64-bit
// indices. Same operations as naive.cu.

#include "common.cuh"

#define KVPACK_COARSEN 4

template <class Op>
__device__ __forceinline__ void coarsened_walk(const Op& op, const float* __restrict__ scale, i64 B, i64 T,
                                               i64 D) {
    const i64 d0 = (i64)blockIdx.x * blockDim.x * KVPACK_COARSEN + threadIdx.x;
    if (d0 >= D) return;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const float* s = scale + b * D;
        for (i64 t = (i64)blockIdx.y * blockDim.y + threadIdx.y; t < T; t += (i64)gridDim.y * blockDim.y) {
            const i64 row = (b * T + t) * D;
            float v[KVPACK_COARSEN];
#pragma unroll
            for (int k = 0; k < KVPACK_COARSEN; ++k) {
                const i64 d = d0 + (i64)k * blockDim.x;
                if (d < D) v[k] = op.load(row + d);
            }
#pragma unroll
            for (int k = 0; k < KVPACK_COARSEN; ++k) {
                const i64 d = d0 + (i64)k * blockDim.x;
                if (d < D) op.store(row + d, v[k], s[d]);
            }
        }
    }
}

KVPACK_KERNELS(coarsened)
