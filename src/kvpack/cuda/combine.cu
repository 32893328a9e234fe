// The combine of flash-decoding splits (kvpack.triton.attention's partials), for both decode kernels:
//
//   out[r] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s,
//
// where a split that saw no key has lse = -inf and weight 0, and a row that no split saw gives 0.
// MidO [R, S, D] and MidL [R, S] float32, row r = (b Hq + head) Lq + qi. One block of four warps per
// row: every lane loads the row's lse (split lane + 32 i) and then, without waiting for them, its
// warp's partial outputs (splits w, w + 4, ..., four channels a lane), so that a row costs one L2
// round trip, not two; the warps' sums meet in shared memory. D a multiple of 4, at most 128 (the
// _d128 kernels) or 256 (_d256); S at most 128. The kernel that wrote the partials ran before it on
// the same stream.

#include "common.cuh"

typedef unsigned short u16;

#define WARPS 4
#define MAX_D 256
#define MAX_S 128
#define NEG_INF __int_as_float(0xff800000u)

__device__ __forceinline__ float lane_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float lane_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <typename T, int NC>  // NC: groups of 128 channels a lane covers (D <= 128 NC)
__device__ __forceinline__ void combine(const float* __restrict__ MidO, const float* __restrict__ MidL,
                                        u16* __restrict__ Out, int S, int D, int num_heads, int lq, i64 sob,
                                        i64 soh, i64 som) {
    __shared__ float part[WARPS][MAX_D];
    const i64 r = blockIdx.x;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* lrow = MidL + r * S;
    const float* orow = MidO + r * S * D;

    // Loads from clamped indices (always valid addresses, no branch between them: all in flight at
    // once); what lies past S or D is masked after.
    float ls[MAX_S / 32];
#pragma unroll
    for (int i = 0; i < MAX_S / 32; ++i) {
        const float x = lrow[min(lane + 32 * i, S - 1)];
        ls[i] = lane + 32 * i < S ? x : NEG_INF;
    }

    // This warp's splits w + 4 j of each group of 32, channels 4 lane + 128 c.
    float4 acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float top = -1.0e30f, total = 0.0f, wt[MAX_S / 32];
#pragma unroll
    for (int i = 0; i < MAX_S / 32; ++i) {
        if (32 * i >= S) break;
        float4 o[8][NC];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int s = min(32 * i + 4 * j + w, S - 1);  // splits past S get weight 0
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int ch = min(4 * lane + 128 * c, D - 4);  // channels past D are not stored
                o[j][c] = *reinterpret_cast<const float4*>(orow + (i64)s * D + ch);
            }
        }
        if (i == 0) {  // the weights of every split, once the lse have landed
#pragma unroll
            for (int k = 0; k < MAX_S / 32; ++k) top = fmaxf(top, ls[k]);  // -inf never wins
            top = lane_max(top);
#pragma unroll
            for (int k = 0; k < MAX_S / 32; ++k) {
                wt[k] = ls[k] > NEG_INF ? exp2f(ls[k] - top) : 0.0f;
                total += wt[k];
            }
            total = lane_sum(total);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float ws = __shfl_sync(0xffffffffu, wt[i], 4 * j + w);  // split 32 i + 4 j + w
            if (ws > 0.0f && 32 * i + 4 * j + w < S) {
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    acc[c].x = fmaf(ws, o[j][c].x, acc[c].x);
                    acc[c].y = fmaf(ws, o[j][c].y, acc[c].y);
                    acc[c].z = fmaf(ws, o[j][c].z, acc[c].z);
                    acc[c].w = fmaf(ws, o[j][c].w, acc[c].w);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int ch = 4 * lane + 128 * c;
        if (ch < D) *reinterpret_cast<float4*>(&part[w][ch]) = acc[c];
    }
    __syncthreads();
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    const i64 qi = r % lq, head = (r / lq) % num_heads, b = r / ((i64)lq * num_heads);
    u16* out = Out + b * sob + head * soh + qi * som;
    for (int ch = threadIdx.x; ch < D; ch += 32 * WARPS)
        out[ch] = T::from_float((part[0][ch] + part[1][ch] + part[2][ch] + part[3][ch]) * inv);
}

#define KVPACK_COMBINE(NAME, T, NC)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) NAME(                                   \
        const float* __restrict__ MidO, const float* __restrict__ MidL, u16* __restrict__ Out, int S, \
        int D, int num_heads, int lq, i64 sob, i64 soh, i64 som) {                                    \
        combine<T, NC>(MidO, MidL, Out, S, D, num_heads, lq, sob, soh, som);                          \
    }

KVPACK_COMBINE(combine_splits_f16_d128, f16_t, 1)
KVPACK_COMBINE(combine_splits_bf16_d128, bf16_t, 1)
KVPACK_COMBINE(combine_splits_f16_d256, f16_t, 2)
KVPACK_COMBINE(combine_splits_bf16_d256, bf16_t, 2)
