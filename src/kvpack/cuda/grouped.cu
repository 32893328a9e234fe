// Channel-axis int8 in groups of G tokens (int8-channel-gN), in one pass: each group's codes are
// written from the registers that read it, so x is read from DRAM once.
//
// scale[b, g, d] = max |x[b, t, d]| / 127 over the group's tokens t in [gG, gG + G) (1 where that is 0)
// codes[b, t, d] = clamp(round_half_even(x[b, t, d] / scale[b, t / G, d]), -127, 127)
// out[b, t, d]   = codes[b, t, d] * scale[b, t / G, d]
// (kvpack.reference for int8-channel-gN; a last group of fewer than G tokens is reduced over what it has).
//
// A block is W warps and takes one group of one batch row times 32 * N channels (N = 16 / element
// size, so 256 float16 or 128 float32 channels): lane l owns channels l*N .. l*N + N-1, and warp w the
// group's rows w, w + W, w + 2W, ...; a warp's load of one row is 512 contiguous bytes. A thread keeps
// its R rows (16 bytes each) in registers, reduces their |x| per channel in-thread, the block combines
// its warps in shared memory, and the same registers are then encoded. Groups longer than R * W rows
// are reduced first and read a second time to encode (served from L2 where it holds them).
//
// The division is Markstein's: r = RN(1 / s) once per channel, q0 = RN(x r), then
// RN(q0 + r (x - s q0)) with two fused multiply-adds, the correctly rounded x / s for scales in
// [2^-96, 2^126] (the Triton kernels use the same three steps, checked against div.rn); a channel
// whose scale is outside that range (tiny, huge, or infinite from a NaN/Inf input) takes div.rn.
//
// The fast path needs D a multiple of N, x 16-byte aligned and the codes N-byte aligned; otherwise each
// element is loaded and stored alone (same arithmetic). Indices are 64-bit; grid x walks the (batch,
// group) pairs and grid y the column blocks, both with a grid stride.

#include "common.cuh"

#ifndef KVPACK_GROUPED_ROWS
#define KVPACK_GROUPED_ROWS 16  // R: rows a thread holds in registers
#endif
#ifndef KVPACK_GROUPED_MIN_BLOCKS
#define KVPACK_GROUPED_MIN_BLOCKS 1  // resident blocks of KVPACK_GROUPED_THREADS asked of the compiler
#endif
#ifndef KVPACK_GROUPED_MAX_WARPS
#define KVPACK_GROUPED_MAX_WARPS 16  // W: warps of a block at most (ceil(G / R) for short groups)
#endif
#define KVPACK_GROUPED_THREADS (32 * KVPACK_GROUPED_MAX_WARPS)
#define KVPACK_GROUPED_COLUMNS 256  // 32 * N at most (N = 8 for 2-byte elements)

enum { SCALES_AND_CODES = 0, SCALES_ONLY = 1, CODES_ONLY = 2 };

// Word i of a 16-byte vector (i known at compile time once unrolled).
__device__ __forceinline__ unsigned word(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ void set_word(uint4& v, int i, unsigned u) {
    if (i == 0) v.x = u;
    else if (i == 1) v.y = u;
    else if (i == 2) v.z = u;
    else v.w = u;
}

// Element k of a vector of N raw elements, and element k set.
__device__ __forceinline__ float element_bits(const uint4& v, int k, float) { return __uint_as_float(word(v, k)); }
__device__ __forceinline__ unsigned short element_bits(const uint4& v, int k, unsigned short) {
    return (unsigned short)(word(v, k >> 1) >> (16 * (k & 1)));
}

__device__ __forceinline__ void set_element(uint4& v, int k, float e) { set_word(v, k, __float_as_uint(e)); }
__device__ __forceinline__ void set_element(uint4& v, int k, unsigned short e) {
    const unsigned w = word(v, k >> 1);
    set_word(v, k >> 1, (k & 1) ? ((w & 0xffffu) | ((unsigned)e << 16)) : ((w & 0xffff0000u) | e));
}

// The N elements of a row from channel c on: one 16-byte load (VEC), or one load per channel < D.
template <class TT, bool VEC>
__device__ __forceinline__ uint4 load_row(const typename TT::raw* p, i64 c, i64 D) {
    typedef typename TT::raw raw;
    const int N = 16 / sizeof(raw);
    if (VEC) return *reinterpret_cast<const uint4*>(p + c);
    uint4 v = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int k = 0; k < N; ++k) {
        if (c + k < D) set_element(v, k, p[c + k]);
    }
    return v;
}

// Codes of the N elements of v given their scales s and reciprocals r (MARKSTEIN) or by division.
template <class TT, bool MARKSTEIN>
__device__ __forceinline__ void row_codes(const uint4& v, const float* s, const float* r, int* q) {
    typedef typename TT::raw raw;
    const int N = 16 / sizeof(raw);
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const float a = TT::to_float(element_bits(v, k, raw()));
        float y;
        if (MARKSTEIN) {
            const float q0 = mul_rn(a, r[k]);
            y = fma_rn(fma_rn(-q0, s[k], a), r[k], q0);
        } else {
            y = div_rn(a, s[k]);
        }
        const int c = __float2int_rn(y);
        q[k] = c < -KVPACK_QMAX ? -KVPACK_QMAX : (c > KVPACK_QMAX ? KVPACK_QMAX : c);
    }
}

template <bool VEC, int N>
__device__ __forceinline__ void store_row(signed char* p, i64 c, i64 D, const int (&q)[N]) {
    if (VEC) {
        store_codes(p + c, q);
    } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
            if (c + k < D) p[c + k] = (signed char)q[k];
        }
    }
}

// The block's shared memory: each warp's per-channel |x| keys, then the channels' scales and reciprocals.
struct grouped_shared {
    unsigned keys[KVPACK_GROUPED_MAX_WARPS * KVPACK_GROUPED_COLUMNS];
    float scale[KVPACK_GROUPED_COLUMNS];
    float recip[KVPACK_GROUPED_COLUMNS];
};

template <class TT, int R, int MODE, bool VEC>
__device__ __forceinline__ void grouped_quantize(grouped_shared& sh, const typename TT::raw* __restrict__ x,
                                                 float* __restrict__ scale, signed char* __restrict__ codes, i64 B,
                                                 i64 T, i64 D, i64 G) {
    typedef typename TT::raw raw;
    const int N = 16 / sizeof(raw);
    const int C = 32 * N;  // channels of a block
    unsigned* keys = sh.keys;
    float* block_scale = sh.scale;
    float* block_recip = sh.recip;
    const int lane = threadIdx.x, warp = threadIdx.y, W = blockDim.y;
    const int me = warp * 32 + lane;
    const i64 n_groups = (T + G - 1) / G;
    for (i64 c0 = (i64)blockIdx.y * C; c0 < D; c0 += (i64)gridDim.y * C) {
        const i64 c = c0 + lane * N;
        for (i64 bg = blockIdx.x; bg < B * n_groups; bg += gridDim.x) {
            const i64 b = bg / n_groups;
            const i64 t_lo = (bg - b * n_groups) * G;
            const int rows = (int)(T - t_lo < G ? T - t_lo : G);
            const bool fits = rows <= R * W;
            const raw* xg = x + (b * T + t_lo) * D;  // the group's first row
            signed char* cg = codes + (b * T + t_lo) * D;
            uint4 v[R];
            if (MODE != CODES_ONLY) {
                unsigned m[N];
#pragma unroll
                for (int k = 0; k < N; ++k) m[k] = 0;
                if (fits) {
#pragma unroll
                    for (int i = 0; i < R; ++i) {
                        const int t = warp + i * W;
                        v[i] = (t < rows && c < D) ? load_row<TT, VEC>(xg + t * D, c, D) : make_uint4(0, 0, 0, 0);
                    }
#pragma unroll
                    for (int i = 0; i < R; ++i) {
#pragma unroll
                        for (int k = 0; k < N; ++k) m[k] = umax(m[k], TT::abs_key(element_bits(v[i], k, raw())));
                    }
                } else if (c < D) {
                    for (int t = warp; t < rows; t += W) {
                        const uint4 u = load_row<TT, VEC>(xg + t * D, c, D);
#pragma unroll
                        for (int k = 0; k < N; ++k) m[k] = umax(m[k], TT::abs_key(element_bits(u, k, raw())));
                    }
                }
#pragma unroll
                for (int k = 0; k < N; ++k) keys[warp * C + lane * N + k] = m[k];
                __syncthreads();
                for (int i = me; i < C; i += 32 * W) {
                    unsigned mm = 0;
                    for (int w = 0; w < W; ++w) mm = umax(mm, keys[w * C + i]);
                    const float s = int8_scale(TT::key_to_float(mm));
                    block_scale[i] = s;
                    if (c0 + i < D) scale[bg * D + c0 + i] = s;
                }
            } else {
                for (int i = me; i < C; i += 32 * W) block_scale[i] = c0 + i < D ? scale[bg * D + c0 + i] : 1.0f;
            }
            if (MODE != SCALES_ONLY) {
                for (int i = me; i < C; i += 32 * W) {
                    // A reciprocal of 0 marks a channel that takes the division: scales outside
                    // [2^-96, 2^126] (compared as bits, so that no flush-to-zero comparison decides;
                    // 2^126 keeps the reciprocal normal), and the non-finite ones.
                    const float s = block_scale[i];
                    const unsigned bits = __float_as_uint(s);
                    const bool markstein = bits >= (31u << 23) && bits <= (253u << 23);
                    block_recip[i] = markstein ? div_rn(1.0f, s) : 0.0f;
                }
                __syncthreads();
                float s[N], r[N];
                bool markstein = true;
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    s[k] = block_scale[lane * N + k];
                    r[k] = block_recip[lane * N + k];
                    markstein = markstein && __float_as_uint(r[k]) != 0u;
                }
                if (c < D) {
                    if (MODE == SCALES_AND_CODES && fits) {
#pragma unroll
                        for (int i = 0; i < R; ++i) {
                            const int t = warp + i * W;
                            if (t < rows) {
                                int q[N];
                                if (markstein) row_codes<TT, true>(v[i], s, r, q);
                                else row_codes<TT, false>(v[i], s, r, q);
                                store_row<VEC>(cg + t * D, c, D, q);
                            }
                        }
                    } else {
                        for (int t = warp; t < rows; t += W) {
                            const uint4 u = load_row<TT, VEC>(xg + t * D, c, D);
                            int q[N];
                            if (markstein) row_codes<TT, true>(u, s, r, q);
                            else row_codes<TT, false>(u, s, r, q);
                            store_row<VEC>(cg + t * D, c, D, q);
                        }
                    }
                }
            }
            __syncthreads();  // the shared arrays are reused by the next group
        }
    }
}

// The codes of a row (one word for N = 4, two for N = 8) as floats.
__device__ __forceinline__ void unpack_row(const uint2& v, float (&w)[4]) { unpack4(v.x, w); }
__device__ __forceinline__ void unpack_row(const uint2& v, float (&w)[8]) {
    unpack4(v.x, w);
    unpack4(v.y, w + 4);
}

template <class TT, bool VEC>
__device__ __forceinline__ void grouped_dequantize(const signed char* __restrict__ codes, const float* __restrict__ scale,
                                                   typename TT::raw* __restrict__ out, i64 B, i64 T, i64 D, i64 G) {
    typedef typename TT::raw raw;
    const int N = 16 / sizeof(raw);
    const int C = 32 * N;
    const int R = KVPACK_GROUPED_ROWS;
    const int lane = threadIdx.x, warp = threadIdx.y, W = blockDim.y;
    const i64 n_groups = (T + G - 1) / G;
    for (i64 c0 = (i64)blockIdx.y * C; c0 < D; c0 += (i64)gridDim.y * C) {
        const i64 c = c0 + lane * N;
        if (c >= D) continue;
        for (i64 bg = blockIdx.x; bg < B * n_groups; bg += gridDim.x) {
            const i64 b = bg / n_groups;
            const i64 t_lo = (bg - b * n_groups) * G;
            const int rows = (int)(T - t_lo < G ? T - t_lo : G);
            float s[N];
#pragma unroll
            for (int k = 0; k < N; ++k) s[k] = c + k < D ? scale[bg * D + c + k] : 1.0f;
            const signed char* cg = codes + (b * T + t_lo) * D;
            raw* og = out + (b * T + t_lo) * D;
            for (int t0 = warp; t0 < rows; t0 += R * W) {
                uint2 v[R];  // the N codes of a row, as they lie in memory (N = 4: the first word)
#pragma unroll
                for (int i = 0; i < R; ++i) {
                    const int t = t0 + i * W;
                    v[i] = make_uint2(0, 0);
                    if (t >= rows) continue;
                    if (VEC && N == 8) {
                        v[i] = *reinterpret_cast<const uint2*>(cg + t * D + c);
                    } else if (VEC) {
                        v[i].x = *reinterpret_cast<const unsigned*>(cg + t * D + c);
                    } else {
#pragma unroll
                        for (int k = 0; k < N; ++k) {
                            const unsigned byte = c + k < D ? (unsigned char)cg[t * D + c + k] : 0u;
                            if (k < 4) v[i].x |= byte << (8 * k);
                            else v[i].y |= byte << (8 * (k - 4));
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < R; ++i) {
                    const int t = t0 + i * W;
                    if (t >= rows) continue;
                    float w[N];
                    unpack_row(v[i], w);
#pragma unroll
                    for (int k = 0; k < N; ++k) w[k] = mul_rn(w[k], s[k]);
                    if (VEC) {
                        store16<TT>(og + t * D + c, w);
                    } else {
#pragma unroll
                        for (int k = 0; k < N; ++k) {
                            if (c + k < D) og[t * D + c + k] = TT::from_float(w[k]);
                        }
                    }
                }
            }
        }
    }
}

// The vector path's conditions (see the header); the scale pointer is read element by element.
__device__ __forceinline__ bool grouped_vec(const void* wide, const void* narrow, i64 D, int N) {
    return D % N == 0 && ((unsigned long long)wide & 15) == 0 && ((unsigned long long)narrow & (N - 1)) == 0;
}

#define KVPACK_GROUPED_QUANTIZE(NAME, MODE, TAG, TT)                                                        \
    extern "C" __global__ void __launch_bounds__(KVPACK_GROUPED_THREADS, KVPACK_GROUPED_MIN_BLOCKS)         \
        NAME##_grouped_##TAG(const TT::raw* __restrict__ x, float* __restrict__ scale,                       \
                             signed char* __restrict__ codes, i64 B, i64 T, i64 D, i64 G) {                  \
        __shared__ grouped_shared sh;                                                                         \
        if (grouped_vec(x, codes, D, 16 / sizeof(TT::raw)))                                                  \
            grouped_quantize<TT, KVPACK_GROUPED_ROWS, MODE, true>(sh, x, scale, codes, B, T, D, G);          \
        else                                                                                                  \
            grouped_quantize<TT, KVPACK_GROUPED_ROWS, MODE, false>(sh, x, scale, codes, B, T, D, G);         \
    }

#define KVPACK_GROUPED_KERNELS(TAG, TT)                                                                      \
    KVPACK_GROUPED_QUANTIZE(quantize, SCALES_AND_CODES, TAG, TT)                                             \
    KVPACK_GROUPED_QUANTIZE(scales, SCALES_ONLY, TAG, TT)                                                    \
    KVPACK_GROUPED_QUANTIZE(encode, CODES_ONLY, TAG, TT)                                                     \
    extern "C" __global__ void __launch_bounds__(KVPACK_GROUPED_THREADS) dequantize_grouped_##TAG(          \
        const signed char* __restrict__ codes, const float* __restrict__ scale, TT::raw* __restrict__ out,  \
        i64 B, i64 T, i64 D, i64 G) {                                                                         \
        if (grouped_vec(out, codes, D, 16 / sizeof(TT::raw)))                                                \
            grouped_dequantize<TT, true>(codes, scale, out, B, T, D, G);                                     \
        else                                                                                                  \
            grouped_dequantize<TT, false>(codes, scale, out, B, T, D, G);                                    \
    }

KVPACK_GROUPED_KERNELS(f32, f32_t)
KVPACK_GROUPED_KERNELS(f16, f16_t)
KVPACK_GROUPED_KERNELS(bf16, bf16_t)
