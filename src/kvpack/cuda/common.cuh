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

// The extern "C" kernels for each input dtype: NAME_f32, NAME_f16, NAME_bf16, each calling the
// template NAME<type>. Plain C names keep the launcher free of C++ name mangling.
#define KVPACK_QUANTIZE_KERNELS(NAME)                                                           \
    extern "C" __global__ void NAME##_f32(const float* __restrict__ x, const float* __restrict__ scale, \
                                          signed char* __restrict__ codes, i64 B, i64 T, i64 D) {     \
        NAME<f32_t>(x, scale, codes, B, T, D);                                                        \
    }                                                                                                 \
    extern "C" __global__ void NAME##_f16(const unsigned short* __restrict__ x,                       \
                                          const float* __restrict__ scale,                            \
                                          signed char* __restrict__ codes, i64 B, i64 T, i64 D) {     \
        NAME<f16_t>(x, scale, codes, B, T, D);                                                        \
    }                                                                                                 \
    extern "C" __global__ void NAME##_bf16(const unsigned short* __restrict__ x,                      \
                                           const float* __restrict__ scale,                           \
                                           signed char* __restrict__ codes, i64 B, i64 T, i64 D) {    \
        NAME<bf16_t>(x, scale, codes, B, T, D);                                                       \
    }

#define KVPACK_DEQUANTIZE_KERNELS(NAME)                                                         \
    extern "C" __global__ void NAME##_f32(const signed char* __restrict__ codes,                      \
                                          const float* __restrict__ scale, float* __restrict__ out,   \
                                          i64 B, i64 T, i64 D) {                                      \
        NAME<f32_t>(codes, scale, out, B, T, D);                                                      \
    }                                                                                                 \
    extern "C" __global__ void NAME##_f16(const signed char* __restrict__ codes,                      \
                                          const float* __restrict__ scale,                            \
                                          unsigned short* __restrict__ out, i64 B, i64 T, i64 D) {    \
        NAME<f16_t>(codes, scale, out, B, T, D);                                                      \
    }                                                                                                 \
    extern "C" __global__ void NAME##_bf16(const signed char* __restrict__ codes,                     \
                                           const float* __restrict__ scale,                           \
                                           unsigned short* __restrict__ out, i64 B, i64 T, i64 D) {   \
        NAME<bf16_t>(codes, scale, out, B, T, D);                                                     \
    }

#endif  // KVPACK_COMMON_CUH
