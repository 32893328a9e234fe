// The paper's vectorized variant: 16-byte accesses to the wide side and packed int8 on the other.
// quantize reads 16 bytes of input per thread (a float4, or 8 float16/bfloat16 in a uint4) and
// writes the codes packed (a 4 x int8 word as char4 would, or two of them); dequantize mirrors it
// (packed int8 loads, 16-byte stores). Same formulas as naive.cu, bit for bit.
//
// A thread owns one vector slot j of a row (channels j*N .. j*N + N-1) and walks the tokens with
// a grid stride. In the common layout (D a multiple of N, 16-byte aligned pointers) it loads the
// N scales of its channels once per batch entry, keeps them in registers, and takes two tokens per
// step so that two 16-byte loads are in flight. Other layouts:
//  - D not a multiple of N (rows start at varying alignments), or a scale pointer that is not
//    16-byte aligned: per row, a scalar head up to the first 16-byte boundary of the wide side,
//    whole vectors, then a scalar tail; the head and tail are shorter than N and taken by the
//    first slots.
//  - wide and int8 sides misaligned relative to each other (views with odd offsets): no vector
//    can be aligned on both, so every element goes the scalar way.
// The launcher gives at least max(ceil(D / N), N) slots per row; indices are 64-bit.

#include "common.cuh"

typedef unsigned long long u64;

// Four int8 codes packed in one 32-bit word, the first in the low byte (a char4 in memory).
__device__ __forceinline__ unsigned pack4(int a, int b, int c, int d) {
    return (unsigned)(a & 0xff) | ((unsigned)(b & 0xff) << 8) | ((unsigned)(c & 0xff) << 16) |
           ((unsigned)d << 24);
}

__device__ __forceinline__ int byte_at(unsigned w, int k) { return (int)(signed char)(w >> (8 * k)); }

// 16 bytes of input as floats.
template <class TT>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[4]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
}

template <class TT>
__device__ __forceinline__ void load_vec(const unsigned short* p, float (&v)[8]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = TT::to_float((unsigned short)(w[k] & 0xffffu));
        v[2 * k + 1] = TT::to_float((unsigned short)(w[k] >> 16));
    }
}

// Floats to 16 bytes of output.
template <class TT>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

template <class TT>
__device__ __forceinline__ void store_vec(unsigned short* p, const float (&v)[8]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        w[k] = (unsigned)TT::from_float(v[2 * k]) | ((unsigned)TT::from_float(v[2 * k + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void store_codes(signed char* p, const int (&q)[4]) {
    *reinterpret_cast<unsigned*>(p) = pack4(q[0], q[1], q[2], q[3]);
}

__device__ __forceinline__ void store_codes(signed char* p, const int (&q)[8]) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack4(q[0], q[1], q[2], q[3]), pack4(q[4], q[5], q[6], q[7]));
}

__device__ __forceinline__ void load_codes(const signed char* p, int (&q)[4]) {
    const unsigned w = *reinterpret_cast<const unsigned*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) q[k] = byte_at(w, k);
}

__device__ __forceinline__ void load_codes(const signed char* p, int (&q)[8]) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        q[k] = byte_at(w.x, k);
        q[k + 4] = byte_at(w.y, k);
    }
}

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

// N inputs and their scales to N packed codes; N codes and their scales to N outputs.
template <int N>
__device__ __forceinline__ void encode_vec(const float (&v)[N], const float (&s)[N], signed char* p) {
    int q[N];
#pragma unroll
    for (int k = 0; k < N; ++k) q[k] = int8_code(v[k], s[k]);
    store_codes(p, q);
}

template <class TT, int N>
__device__ __forceinline__ void decode_vec(const int (&q)[N], const float (&s)[N], typename TT::raw* p) {
    float v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = mul_rn((float)q[k], s[k]);
    store_vec<TT>(p, v);
}

// Where a [B, T, D] walk with N-element vectors may start: the layout cases of the header.
struct vec_plan {
    u64 phase;   // the wide side's address in elements, modulo N
    bool scalar; // the two sides cannot be aligned together
    bool fast;   // every row is aligned, and so are the scales
};

template <int N>
__device__ __forceinline__ vec_plan plan_vectors(u64 wide_addr, unsigned wide_size, u64 int8_addr,
                                                 const float* scale, i64 D) {
    const u64 wide = wide_addr / wide_size;
    vec_plan p;
    p.phase = wide & (N - 1);
    p.scalar = ((int8_addr - wide) & (N - 1)) != 0;
    p.fast = !p.scalar && p.phase == 0 && D % N == 0 && ((u64)scale & 15) == 0;
    return p;
}

// The scalar head of a row that starts at element `row` of the wide side: elements before the first
// 16-byte boundary (at most N - 1, at most D).
template <int N>
__device__ __forceinline__ i64 row_head(u64 phase, i64 row, i64 D) {
    const i64 h = (i64)((N - ((phase + (u64)row) & (N - 1))) & (N - 1));
    return h < D ? h : D;
}

template <class TT>
__device__ __forceinline__ void quantize_vectorized(const typename TT::raw* __restrict__ x,
                                                    const float* __restrict__ scale,
                                                    signed char* __restrict__ codes, i64 B, i64 T, i64 D) {
    typedef typename TT::raw raw;
    const int N = 16 / sizeof(raw);
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 slots = (i64)gridDim.x * blockDim.x;
    const i64 t_first = (i64)blockIdx.y * blockDim.y + threadIdx.y;
    const i64 t_step = (i64)gridDim.y * blockDim.y;
    const vec_plan plan = plan_vectors<N>((u64)x, sizeof(raw), (u64)codes, scale, D);

    if (plan.fast) {
        if (j >= D / N) return;
        for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
            float s[N];
            load_scales<N>(scale + b * D + j * N, s);
            i64 t = t_first;
            for (; t + t_step < T; t += 2 * t_step) {
                const i64 at0 = (b * T + t) * D + j * N;
                const i64 at1 = at0 + t_step * D;
                float v0[N], v1[N];
                load_vec<TT>(x + at0, v0);
                load_vec<TT>(x + at1, v1);
                encode_vec(v0, s, codes + at0);
                encode_vec(v1, s, codes + at1);
            }
            if (t < T) {
                const i64 at = (b * T + t) * D + j * N;
                float v[N];
                load_vec<TT>(x + at, v);
                encode_vec(v, s, codes + at);
            }
        }
        return;
    }

    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const float* sb = scale + b * D;
        for (i64 t = t_first; t < T; t += t_step) {
            const i64 row = (b * T + t) * D;
            const raw* xr = x + row;
            signed char* cr = codes + row;
            if (plan.scalar) {
                for (i64 d = j; d < D; d += slots) cr[d] = (signed char)int8_code(TT::to_float(xr[d]), sb[d]);
                continue;
            }
            const i64 head = row_head<N>(plan.phase, row, D);
            const i64 body_end = head + (D - head) / N * N;
            if (head + j * N < body_end) {
                const i64 d = head + j * N;
                float v[N], s[N];
#pragma unroll
                for (int k = 0; k < N; ++k) s[k] = sb[d + k];
                load_vec<TT>(xr + d, v);
                encode_vec(v, s, cr + d);
            }
            if (j < head) cr[j] = (signed char)int8_code(TT::to_float(xr[j]), sb[j]);
            if (body_end + j < D) {
                const i64 d = body_end + j;
                cr[d] = (signed char)int8_code(TT::to_float(xr[d]), sb[d]);
            }
        }
    }
}

template <class TT>
__device__ __forceinline__ void dequantize_vectorized(const signed char* __restrict__ codes,
                                                      const float* __restrict__ scale,
                                                      typename TT::raw* __restrict__ out, i64 B, i64 T, i64 D) {
    typedef typename TT::raw raw;
    const int N = 16 / sizeof(raw);
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 slots = (i64)gridDim.x * blockDim.x;
    const i64 t_first = (i64)blockIdx.y * blockDim.y + threadIdx.y;
    const i64 t_step = (i64)gridDim.y * blockDim.y;
    const vec_plan plan = plan_vectors<N>((u64)out, sizeof(raw), (u64)codes, scale, D);

    if (plan.fast) {
        if (j >= D / N) return;
        for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
            float s[N];
            load_scales<N>(scale + b * D + j * N, s);
            i64 t = t_first;
            for (; t + t_step < T; t += 2 * t_step) {
                const i64 at0 = (b * T + t) * D + j * N;
                const i64 at1 = at0 + t_step * D;
                int q0[N], q1[N];
                load_codes(codes + at0, q0);
                load_codes(codes + at1, q1);
                decode_vec<TT>(q0, s, out + at0);
                decode_vec<TT>(q1, s, out + at1);
            }
            if (t < T) {
                const i64 at = (b * T + t) * D + j * N;
                int q[N];
                load_codes(codes + at, q);
                decode_vec<TT>(q, s, out + at);
            }
        }
        return;
    }

    for (i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const float* sb = scale + b * D;
        for (i64 t = t_first; t < T; t += t_step) {
            const i64 row = (b * T + t) * D;
            const signed char* cr = codes + row;
            raw* orow = out + row;
            if (plan.scalar) {
                for (i64 d = j; d < D; d += slots) orow[d] = TT::from_float(mul_rn((float)cr[d], sb[d]));
                continue;
            }
            const i64 head = row_head<N>(plan.phase, row, D);
            const i64 body_end = head + (D - head) / N * N;
            if (head + j * N < body_end) {
                const i64 d = head + j * N;
                int q[N];
                float s[N];
#pragma unroll
                for (int k = 0; k < N; ++k) s[k] = sb[d + k];
                load_codes(cr + d, q);
                decode_vec<TT>(q, s, orow + d);
            }
            if (j < head) orow[j] = TT::from_float(mul_rn((float)cr[j], sb[j]));
            if (body_end + j < D) {
                const i64 d = body_end + j;
                orow[d] = TT::from_float(mul_rn((float)cr[d], sb[d]));
            }
        }
    }
}

KVPACK_QUANTIZE_KERNELS(quantize_vectorized)
KVPACK_DEQUANTIZE_KERNELS(dequantize_vectorized)
