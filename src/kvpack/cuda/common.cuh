// Shared by kvpack's CUDA C kernels: element types, IEEE arithmetic, the int8 code of one value.
//
// No CUDA header is included, so the sources compile with NVRTC without any include path, and
// with nvcc. float16 and bfloat16 travel as their raw 16 bits (unsigned short); the conversions
// below are exact (to float) or round to nearest even (from float), as torch's.
//
// CuPy compiles with -ftz=true, which would flush subnormals in `/` and `*`. The two operations
// whose results must equal IEEE float32 (the reference's `x / scale` and `code * scale`) are
// therefore written as PTX instructions without .ftz: kernels give the same bits whatever the
// flush and fast-math flags are.

#ifndef KVPACK_COMMON_CUH
#define KVPACK_COMMON_CUH

typedef long long i64;

// Symmetric int8: codes in [-127, 127], scale = amax / 127.
#define KVPACK_QMAX 127

#ifndef KVPACK_HOST_EMULATION
// Correctly rounded float32 a / b, subnormals kept.
__device__ __forceinline__ float div_rn(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// Correctly rounded float32 a * b, subnormals kept, never contracted into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// Correctly rounded float32 a * b + c (one rounding), subnormals kept.
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}

// float16 bits -> float (exact).
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// float -> float16 bits, round to nearest even (overflow to infinity).
__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

__device__ __forceinline__ unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
__device__ __forceinline__ unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }

// An element type: how it is stored (raw), how it converts, and |x| as an ordered integer key.
// For non-negative floats the bit patterns order like the values, so amax is an integer max; NaN
// (every pattern above +Inf) is clamped to +Inf, so a NaN makes the scale infinite, never finite.
struct f32_t {
    typedef float raw;
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
    static __device__ __forceinline__ unsigned abs_key(float v) {
        return umin(__float_as_uint(v) & 0x7fffffffu, 0x7f800000u);
    }
    static __device__ __forceinline__ float key_to_float(unsigned k) { return __uint_as_float(k); }
};

struct f16_t {
    typedef unsigned short raw;
    static __device__ __forceinline__ float to_float(unsigned short v) { return half_bits_to_float(v); }
    static __device__ __forceinline__ unsigned short from_float(float v) { return float_to_half_bits(v); }
    static __device__ __forceinline__ unsigned abs_key(unsigned short v) { return umin(v & 0x7fffu, 0x7c00u); }
    static __device__ __forceinline__ float key_to_float(unsigned k) {
        return half_bits_to_float((unsigned short)k);
    }
};

struct bf16_t {
    typedef unsigned short raw;
    static __device__ __forceinline__ float to_float(unsigned short v) {
        return __uint_as_float((unsigned)v << 16);
    }
    // Round to nearest even on the bits; NaN becomes the canonical quiet NaN, as in torch.
    static __device__ __forceinline__ unsigned short from_float(float v) {
        const unsigned u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
        return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    static __device__ __forceinline__ unsigned abs_key(unsigned short v) { return umin(v & 0x7fffu, 0x7f80u); }
    static __device__ __forceinline__ float key_to_float(unsigned k) { return __uint_as_float(k << 16); }
};

// The int8 code of x: clamp(round_half_even(x / scale), -127, 127). cvt.rni saturates out-of-range
// quotients (and infinities) before the clamp; a NaN quotient gives a code, but its scale is
// non-finite and the caller reports the input as invalid.
__device__ __forceinline__ int int8_code(float x, float scale) {
    const int q = __float2int_rn(div_rn(x, scale));
    return q < -KVPACK_QMAX ? -KVPACK_QMAX : (q > KVPACK_QMAX ? KVPACK_QMAX : q);
}

// The scale of a channel from its amax: amax / 127, and 1 where that is 0 (all-zero channel), so
// that every code dequantizes to 0. Compared as bits: a subnormal scale is not zero.
__device__ __forceinline__ float int8_scale(float amax) {
    const float s = div_rn(amax, (float)KVPACK_QMAX);
    return __float_as_uint(s) == 0u ? 1.0f : s;
}

// 16 bytes of elements (N = 4 floats, or 8 float16/bfloat16) as floats, and back.
template <class TT>
__device__ __forceinline__ void load16(const float* p, float (&v)[4]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
}

template <class TT>
__device__ __forceinline__ void load16(const unsigned short* p, float (&v)[8]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = TT::to_float((unsigned short)(w[k] & 0xffffu));
        v[2 * k + 1] = TT::to_float((unsigned short)(w[k] >> 16));
    }
}

template <class TT>
__device__ __forceinline__ void store16(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

template <class TT>
__device__ __forceinline__ void store16(unsigned short* p, const float (&v)[8]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        w[k] = (unsigned)TT::from_float(v[2 * k]) | ((unsigned)TT::from_float(v[2 * k + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Four int8 codes in one 32-bit word, the first in the low byte (a char4 in memory): N codes are
// one word (N = 4) or two (N = 8), read and written whole.
__device__ __forceinline__ unsigned pack4(const int* q) {
    return (unsigned)(q[0] & 0xff) | ((unsigned)(q[1] & 0xff) << 8) | ((unsigned)(q[2] & 0xff) << 16) |
           ((unsigned)q[3] << 24);
}

__device__ __forceinline__ void unpack4(unsigned w, float* v) {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = (float)(signed char)(w >> (8 * k));
}

__device__ __forceinline__ void store_codes(signed char* p, const int (&q)[4]) {
    *reinterpret_cast<unsigned*>(p) = pack4(q);
}

__device__ __forceinline__ void store_codes(signed char* p, const int (&q)[8]) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack4(q), pack4(q + 4));
}

__device__ __forceinline__ void load_codes(const signed char* p, float (&v)[4]) {
    unpack4(*reinterpret_cast<const unsigned*>(p), v);
}

__device__ __forceinline__ void load_codes(const signed char* p, float (&v)[8]) {
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    unpack4(w.x, v);
    unpack4(w.y, v + 4);
}

// The two directions as element operations, so that each variant writes its walk over [B, T, D]
// once. An operation reads element i of its source as a float (load), and writes element i of its
// destination from that float and the channel's scale (store); `vec_load` / `vec_store` do the
// same for the N = 16 / sizeof(wide element) elements from i on, which must be aligned. "Wide" is
// the float32/16/bf16 side, "narrow" the int8 side.
template <class TT>
struct quantize_op {
    typedef typename TT::raw raw;
    enum { N = 16 / sizeof(raw) };
    const raw* __restrict__ x;
    signed char* __restrict__ codes;

    __device__ __forceinline__ float load(i64 i) const { return TT::to_float(x[i]); }
    __device__ __forceinline__ void store(i64 i, float v, float s) const { codes[i] = (signed char)int8_code(v, s); }
    __device__ __forceinline__ void vec_load(i64 i, float (&v)[N]) const { load16<TT>(x + i, v); }
    __device__ __forceinline__ void vec_store(i64 i, const float (&v)[N], const float (&s)[N]) const {
        int q[N];
#pragma unroll
        for (int k = 0; k < N; ++k) q[k] = int8_code(v[k], s[k]);
        store_codes(codes + i, q);
    }
    __device__ __forceinline__ const void* wide() const { return x; }
    __device__ __forceinline__ const void* narrow() const { return codes; }
};

template <class TT>
struct dequantize_op {
    typedef typename TT::raw raw;
    enum { N = 16 / sizeof(raw) };
    const signed char* __restrict__ codes;
    raw* __restrict__ out;

    __device__ __forceinline__ float load(i64 i) const { return (float)codes[i]; }
    __device__ __forceinline__ void store(i64 i, float v, float s) const { out[i] = TT::from_float(mul_rn(v, s)); }
    __device__ __forceinline__ void vec_load(i64 i, float (&v)[N]) const { load_codes(codes + i, v); }
    __device__ __forceinline__ void vec_store(i64 i, const float (&v)[N], const float (&s)[N]) const {
        float w[N];
#pragma unroll
        for (int k = 0; k < N; ++k) w[k] = mul_rn(v[k], s[k]);
        store16<TT>(out + i, w);
    }
    __device__ __forceinline__ const void* wide() const { return out; }
    __device__ __forceinline__ const void* narrow() const { return codes; }
};

// The six extern "C" kernels of a variant, whose walk is the template VARIANT_walk(op, scale, B,
// T, D): quantize_VARIANT_{f32,f16,bf16}(x, scale, codes, B, T, D) and
// dequantize_VARIANT_{f32,f16,bf16}(codes, scale, out, B, T, D), the dtype being the wide side's.
// Plain C names keep the launcher free of C++ name mangling.
#define KVPACK_KERNEL_PAIR(VARIANT, TAG, TT)                                                             \
    extern "C" __global__ void quantize_##VARIANT##_##TAG(const TT::raw* __restrict__ x,                  \
                                                          const float* __restrict__ scale,               \
                                                          signed char* __restrict__ codes, i64 B, i64 T, \
                                                          i64 D) {                                       \
        const quantize_op<TT> op = {x, codes};                                                           \
        VARIANT##_walk(op, scale, B, T, D);                                                              \
    }                                                                                                    \
    extern "C" __global__ void dequantize_##VARIANT##_##TAG(const signed char* __restrict__ codes,        \
                                                            const float* __restrict__ scale,             \
                                                            TT::raw* __restrict__ out, i64 B, i64 T,     \
                                                            i64 D) {                                     \
        const dequantize_op<TT> op = {codes, out};                                                       \
        VARIANT##_walk(op, scale, B, T, D);                                                              \
    }

#define KVPACK_KERNELS(VARIANT)                \
    KVPACK_KERNEL_PAIR(VARIANT, f32, f32_t)   \
    KVPACK_KERNEL_PAIR(VARIANT, f16, f16_t)   \
    KVPACK_KERNEL_PAIR(VARIANT, bf16, bf16_t)

#endif  // KVPACK_COMMON_CUH
