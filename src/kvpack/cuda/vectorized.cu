// The paper's vectorized variant: 16-byte accesses on the wide side, packed int8 on the other.
// quantize reads 16 bytes of input per thread (a float4, or 8 float16/bfloat16 in a uint4) and
// writes its codes packed (4 x int8 in one word, as a char4; or two words); dequantize mirrors it
// (packed int8 loads, 16-byte stores). Same operations as naive.cu, bit for bit.
//
// A thread owns one vector slot j of a row (channels j*N .. j*N + N-1, N = 16 / element size)
// and walks the tokens with a grid stride. In the common layout (D a multiple of N, 16-byte
// aligned pointers) it loads the N scales of its channels once per batch entry, keeps them in
// registers, and takes two tokens per step so that two 16-byte loads are in flight. Other layouts:
//  - D not a multiple of N (rows start at varying alignments), or a scale pointer that is not
//    16-byte aligned: per row, a scalar head up to the first 16-byte boundary of the wide side,
//    whole vectors, then a scalar tail; the head and tail are shorter than N and taken by the
//    first slots.
//  - wide and int8 sides misaligned relative to each other (views with odd offsets): no vector
//    can be aligned on both, so every element goes the scalar way.
// The launcher gives at least max(ceil(D / N), N) slots per row; indices are 64-bit.

#include "common.cuh"

typedef unsigned long long u64;

// N scales from a 16-byte aligned address.
template <int N>
__device__ __forceinline__ void load_scales(const float* p, float (&s)[N]) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
        const float4 a = *reinterpret_cast<const float4*>(p + k);
        s[k] = a.x;
        s[k + 1] = a.y;
        s[k + 2] = a.z;
        s[k + 3] = a.w;
    }
}

// The scalar head of a row that starts at element `row` of the wide side, whose address modulo N
// (in elements) is `phase`: the elements before its first 16-byte boundary, at most N - 1 and D.
template <int N>
__device__ __forceinline__ i64 row_head(u64 phase, i64 row, i64 D) {
    const i64 h = (i64)((N - ((phase + (u64)row) & (N - 1))) & (N - 1));
    return h < D ? h : D;
}

template <class Op>
__device__ __forceinline__ void vectorized_walk(const Op& op, const float* __restrict__ scale, i64 B, i64 T,
                                                i64 D) {
    const int N = Op::N;
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 slots = (i64)gridDim.x * blockDim.x;
    const i64 t_first = (i64)blockIdx.y * blockDim.y + threadIdx.y;
    const i64 t_step = (i64)gridDim.y * blockDim.y;
    const u64 wide = (u64)op.wide() / sizeof(typename Op::raw);  // the wide side's address in elements
    const u64 phase = wide & (N - 1);
    const bool scalar = (((u64)op.narrow() - wide) & (N - 1)) != 0;

    if (!scalar && phase == 0 && D % N == 0 && ((u64)scale & 15) == 0) {
        if (j >= D / N) return;
        for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
            float s[N];
            load_scales<N>(scale + b * D + j * N, s);
            i64 t = t_first;
            for (; t + t_step < T; t += 2 * t_step) {
                const i64 at0 = (b * T + t) * D + j * N;
                const i64 at1 = at0 + t_step * D;
                float v0[N], v1[N];
                op.vec_load(at0, v0);
                op.vec_load(at1, v1);
                op.vec_store(at0, v0, s);
                op.vec_store(at1, v1, s);
            }
            if (t < T) {
                const i64 at = (b * T + t) * D + j * N;
                float v[N];
                op.vec_load(at, v);
                op.vec_store(at, v, s);
            }
        }
        return;
    }

    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const float* sb = scale + b * D;
        for (i64 t = t_first; t < T; t += t_step) {
            const i64 row = (b * T + t) * D;
            if (scalar) {
                for (i64 d = j; d < D; d += slots) op.store(row + d, op.load(row + d), sb[d]);
                continue;
            }
            const i64 head = row_head<N>(phase, row, D);
            const i64 body_end = head + (D - head) / N * N;
            if (head + j * N < body_end) {
                const i64 d = head + j * N;
                float v[N], s[N];
#pragma unroll
                for (int k = 0; k < N; ++k) s[k] = sb[d + k];
                op.vec_load(row + d, v);
                op.vec_store(row + d, v, s);
            }
            if (j < head) op.store(row + j, op.load(row + j), sb[j]);
            if (body_end + j < D) op.store(row + body_end + j, op.load(row + body_end + j), sb[body_end + j]);
        }
    }
}

KVPACK_KERNELS(vectorized)
