// The paper's tiled variant: each 16 x 16 block stages its tile in shared memory, synchronizes,
// then converts from shared memory. Every element is read once and used once, so the staging
// buys no reuse: the paper keeps it to show that tiling does not help a memory-bound map.
//
// Same formulas, grid and 64-bit indexing as naive.cu. Tiles step along the tokens with a grid
// stride; the loops are uniform across a block, so every thread reaches each __syncthreads.

#include "common.cuh"

#define KVPACK_TILE 16

template <class TT>
__device__ __forceinline__ void quantize_tiled(const typename TT::raw* __restrict__ x,
                                               const float* __restrict__ scale,
                                               signed char* __restrict__ codes, i64 B, i64 T, i64 D) {
    __shared__ typename TT::raw tile[KVPACK_TILE][KVPACK_TILE];
    const i64 d = (i64)blockIdx.x * KVPACK_TILE + threadIdx.x;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        for (i64 t0 = (i64)blockIdx.y * KVPACK_TILE; t0 < T; t0 += (i64)gridDim.y * KVPACK_TILE) {
            const i64 t = t0 + threadIdx.y;
            const bool inside = d < D && t < T;
            const i64 i = (b * T + t) * D + d;
            if (inside) tile[threadIdx.y][threadIdx.x] = x[i];
            __syncthreads();
            if (inside) codes[i] = (signed char)int8_code(TT::to_float(tile[threadIdx.y][threadIdx.x]), scale[b * D + d]);
            __syncthreads();
        }
    }
}

template <class TT>
__device__ __forceinline__ void dequantize_tiled(const signed char* __restrict__ codes,
                                                 const float* __restrict__ scale,
                                                 typename TT::raw* __restrict__ out, i64 B, i64 T, i64 D) {
    __shared__ signed char tile[KVPACK_TILE][KVPACK_TILE];
    const i64 d = (i64)blockIdx.x * KVPACK_TILE + threadIdx.x;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        for (i64 t0 = (i64)blockIdx.y * KVPACK_TILE; t0 < T; t0 += (i64)gridDim.y * KVPACK_TILE) {
            const i64 t = t0 + threadIdx.y;
            const bool inside = d < D && t < T;
            const i64 i = (b * T + t) * D + d;
            if (inside) tile[threadIdx.y][threadIdx.x] = codes[i];
            __syncthreads();
            if (inside) out[i] = TT::from_float(mul_rn((float)tile[threadIdx.y][threadIdx.x], scale[b * D + d]));
            __syncthreads();
        }
    }
}

KVPACK_QUANTIZE_KERNELS(quantize_tiled)
KVPACK_DEQUANTIZE_KERNELS(dequantize_tiled)
