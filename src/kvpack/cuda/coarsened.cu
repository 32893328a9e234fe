// The paper's coarsened variant: each thread converts 4 elements of one token, at channels
// d, d + 16, d + 32, d + 48 (a stride of the block width keeps each warp's accesses contiguous).
// A 16 x 16 block covers 64 channels x 16 tokens; the grid is (D / 64, T / 16, B), with grid
// strides along the tokens and the batch, and 64-bit indices. Same formulas as naive.cu.

#include "common.cuh"

#define KVPACK_COARSEN 4

template <class TT>
__device__ __forceinline__ void quantize_coarsened(const typename TT::raw* __restrict__ x,
                                                   const float* __restrict__ scale,
                                                   signed char* __restrict__ codes, i64 B, i64 T, i64 D) {
    const i64 d0 = (i64)blockIdx.x * blockDim.x * KVPACK_COARSEN + threadIdx.x;
    if (d0 >= D) return;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const float* s = scale + b * D;
        for (i64 t = (i64)blockIdx.y * blockDim.y + threadIdx.y; t < T; t += (i64)gridDim.y * blockDim.y) {
            const i64 row = (b * T + t) * D;
#pragma unroll
            for (int k = 0; k < KVPACK_COARSEN; ++k) {
                const i64 d = d0 + (i64)k * blockDim.x;
                if (d < D) codes[row + d] = (signed char)int8_code(TT::to_float(x[row + d]), s[d]);
            }
        }
    }
}

template <class TT>
__device__ __forceinline__ void dequantize_coarsened(const signed char* __restrict__ codes,
                                                     const float* __restrict__ scale,
                                                     typename TT::raw* __restrict__ out, i64 B, i64 T, i64 D) {
    const i64 d0 = (i64)blockIdx.x * blockDim.x * KVPACK_COARSEN + threadIdx.x;
    if (d0 >= D) return;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const float* s = scale + b * D;
        for (i64 t = (i64)blockIdx.y * blockDim.y + threadIdx.y; t < T; t += (i64)gridDim.y * blockDim.y) {
            const i64 row = (b * T + t) * D;
#pragma unroll
            for (int k = 0; k < KVPACK_COARSEN; ++k) {
                const i64 d = d0 + (i64)k * blockDim.x;
                if (d < D) out[row + d] = TT::from_float(mul_rn((float)codes[row + d], s[d]));
            }
        }
    }
}

KVPACK_QUANTIZE_KERNELS(quantize_coarsened)
KVPACK_DEQUANTIZE_KERNELS(dequantize_coarsened)
