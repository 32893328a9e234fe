// The paper's tiled variant: each 16 x 16 block stages its tile (as floats) in shared memory,
// synchronizes, then converts from shared memory. Every element is read once and used once, so
// the staging buys no reuse: the paper keeps it to show that tiling does not help a memory-bound map.
//
// Same operations, grid and 64-bit indexing as naive.cu. Tiles step along the tokens with a grid
// stride; the loops are uniform across a block, so every thread reaches each __syncthreads.

#include "common.cuh"

#define KVPACK_TILE 16

template <class Op>
__device__ __forceinline__ void tiled_walk(const Op& op, const float* __restrict__ scale, i64 B, i64 T, i64 D) {
    __shared__ float tile[KVPACK_TILE][KVPACK_TILE];
    const i64 d = (i64)blockIdx.x * KVPACK_TILE + threadIdx.x;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        for (i64 t0 = (i64)blockIdx.y * KVPACK_TILE; t0 < T; t0 += (i64)gridDim.y * KVPACK_TILE) {
            const i64 t = t0 + threadIdx.y;
            const bool inside = d < D && t < T;
            const i64 i = (b * T + t) * D + d;
            if (inside) tile[threadIdx.y][threadIdx.x] = op.load(i);
            __syncthreads();
            if (inside) op.store(i, tile[threadIdx.y][threadIdx.x], scale[b * D + d]);
            __syncthreads();
        }
    }
}

KVPACK_KERNELS(tiled)
