// Per-channel int8 scales on the GPU: scale[b, d] = max_t |x[b, t, d]| / 127 (1 where that is 0).
//
// Two passes, deterministic (a max is exact in any order):
//   absmax_partial: a 2-D block of threads (channels along x, tokens along y) reads one split of
//     the tokens for blockDim.x consecutive channels; a warp reads 32 consecutive channels of one
//     token (coalesced), each thread keeps a running max of |x| as an ordered integer key, the
//     block combines its rows in shared memory and writes partial[b, split, d].
//   finalize_scales: one thread per (b, d) takes the max over the splits and divides by 127.
// The launcher picks the number of splits so that the first pass fills the GPU several times over.

#include "common.cuh"

// Loads kept in flight per thread: 16 bytes, whatever the element size.
#define KVPACK_UNROLL(raw) (16 / (int)sizeof(raw))

template <class TT>
__device__ __forceinline__ void absmax_partial(const typename TT::raw* __restrict__ x,
                                               float* __restrict__ partial, i64 B, i64 T, i64 D,
                                               i64 split_tokens) {
    typedef typename TT::raw raw;
    const int U = KVPACK_UNROLL(raw);
    __shared__ unsigned rows[256];
    const i64 d = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 t0 = (i64)blockIdx.y * split_tokens;
    const i64 t1 = t0 + split_tokens < T ? t0 + split_tokens : T;
    const i64 step = blockDim.y;
    const unsigned me = threadIdx.y * blockDim.x + threadIdx.x;
    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        unsigned m = 0;
        if (d < D) {
            const raw* p = x + b * T * D + d;
            i64 t = t0 + threadIdx.y;
            for (; t + (U - 1) * step < t1; t += U * step) {
                raw v[U];
#pragma unroll
                for (int u = 0; u < U; ++u) v[u] = p[(t + u * step) * D];
#pragma unroll
                for (int u = 0; u < U; ++u) m = umax(m, TT::abs_key(v[u]));
            }
            for (; t < t1; t += step) m = umax(m, TT::abs_key(p[t * D]));
        }
        rows[me] = m;
        __syncthreads();
        if (threadIdx.y == 0 && d < D) {
            for (unsigned y = 1; y < blockDim.y; ++y) m = umax(m, rows[y * blockDim.x + threadIdx.x]);
            partial[(b * gridDim.y + blockIdx.y) * D + d] = TT::key_to_float(m);
        }
        __syncthreads();
    }
}

extern "C" __global__ void absmax_partial_f32(const float* __restrict__ x, float* __restrict__ partial,
                                              i64 B, i64 T, i64 D, i64 split_tokens) {
    absmax_partial<f32_t>(x, partial, B, T, D, split_tokens);
}

extern "C" __global__ void absmax_partial_f16(const unsigned short* __restrict__ x,
                                              float* __restrict__ partial, i64 B, i64 T, i64 D,
                                              i64 split_tokens) {
    absmax_partial<f16_t>(x, partial, B, T, D, split_tokens);
}

extern "C" __global__ void absmax_partial_bf16(const unsigned short* __restrict__ x,
                                               float* __restrict__ partial, i64 B, i64 T, i64 D,
                                               i64 split_tokens) {
    absmax_partial<bf16_t>(x, partial, B, T, D, split_tokens);
}

// partial [B, splits, D] (non-negative floats, +Inf for NaN) -> scale [B, D].
extern "C" __global__ void finalize_scales(const float* __restrict__ partial, float* __restrict__ scale,
                                           i64 B, i64 splits, i64 D) {
    const i64 n = B * D;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 b = i / D;
        const float* p = partial + b * splits * D + (i - b * D);
        unsigned m = 0;
#pragma unroll 8
        for (i64 s = 0; s < splits; ++s) m = umax(m, __float_as_uint(p[s * D]));
        scale[i] = int8_scale(__uint_as_float(m));
    }
}
