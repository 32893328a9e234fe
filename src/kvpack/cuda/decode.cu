// Decode attention over an int4 cache (KIVI layout), reading the packed codes straight into
// tensor-core fragments: the int4 path of kvpack.attention.decode on sm_80 and later.
//
// Layout served (kvpack.cache.QuantizedLayer with "int4-channel-gG" keys, G a multiple of 64, and
// "int4-token" values): per (batch row, KV head) the store holds codes [T, D/2] bytes (channel 2j in
// the low nibble of byte j), key scale and zero rows [T/G, D] (float16, k = c s + z), value scale and
// zero [T] (float16, v = c s_t + z_t); the window holds full-precision keys and values [W, D] in
// the query dtype (float16 or bfloat16). Query rows: the GQA heads of one KV head times the new
// tokens, at most 8. Head dim 64 or 128.
//
// One warp is one program: one of num_splits partial softmaxes of a (batch row, KV head)
// (flash-decoding split). The programs of a pair take its work from a counter: the window's tiles,
// then units of one key group (at most 4 tiles), so that programs on faster SMs take more (an H100's
// SMs stream at rates up to 20% apart; fixed chunks left the kernel waiting for the slowest). Each
// tile's bytes are copied into shared memory (cp.async) while the tile before computes. Both
// products are computed transposed, so that the eight query rows are the mma's N side and the codes
// its A operand, loaded as they lie in memory:
//
//   scores^T [16 tokens x 8 rows] = (K codes - 8) [16 x D] . (q s)^T      (mma m16n8k16, float16)
//   out^T    [16 channels x 8 rows] += V^T codes [16 x 16 tokens] . p'^T     (p' = p s_t / R)
//
// with the key scales folded into the query once per key group (k = s (c - 8) + (z + 8 s) gives
// q.k = (q s).(c - 8) + q.(z + 8 s)) and the value scales into the softmax weights (sum p v =
// sum (p s_t) c + sum p z_t). The codes go to the tensor cores exact, the keys' centred (the
// tensor cores' float32 sums lose low bits beside a large operand: codes left offset by 1024 gave
// relative errors of 0.2 at 32K tokens on an H100). Values stay uncentred, so that a constant token
// (stored as scale 1, codes 0) reads exactly its zero point. The A fragments' token and channel slots
// may be any permutation, provided the other operand follows it; so each lane reads contiguous bytes:
//   - keys: lane (g, t) reads the 16 bytes at 16t (D = 128; 8 bytes at 8t for D = 64) of tokens
//     8g .. 8g+7 of the tile; mma block j (0..3) takes tokens 8g+2j (fragment row g) and 8g+2j+1
//     (row g+8). A word w (8 nibbles) gives four float16 pairs (nibbles n, n+4), n = 0..3: k-step s
//     uses pairs 2(s&1) and 2(s&1)+1 of word s>>1 for its k slots (2t,2t+1) and (2t+8,2t+9);
//   - values: a score fragment becomes the B operand of the value product by one movmatrix.trans
//     per 8x8 half, so value slot k of block j is token 8k+2j (k < 8) or 8(k-8)+2j+1; lane (g, t)
//     reads the 8 bytes at 8g (4 at 4g for D = 64) of tokens 16t .. 16t+15 and pairs the same
//     channel of two tokens with one byte permute.
// The codes become float16 two nibbles per 2 instructions: (x & 0x000F000F) | 0x64006400 reads as
// (1024 + c0, 1024 + c1), less 1032 (one f16x2 subtract) gives c - 8 (keys; less 1024 for values);
// the high nibbles (x & 0x00F000F0) read 1024 + 16 c, less 1152: 16 (c - 8), met by a sixteenth of
// the query (keys; values: 16 c, divided out at the end). Every value is exact in float16.
//
// Numerics: float32 online softmax in base 2; the folded operands in float16: the query normalized
// by its row max |q| times the (float16) key scales, so at most the largest float16; the value
// scales divided by R, the largest value scale seen so far (R only grows; when it does, the
// accumulator is rescaled with the softmax's alpha). Each tile's value product starts from zero and
// joins the float32 accumulator with that rescale. The window's products run in the query dtype.
// Output: one split writes out (query dtype) directly, several write float32 partial outputs and
// lse = m + log2(l) for the combine kernel (kvpack.triton.attention).
//
// Offsets of a (batch row, head) slice are 64-bit; inside one slice 32-bit (the launcher checks).

#include "common.cuh"

typedef unsigned short u16;
typedef unsigned int u32;

#define TILE 64
// One-warp programs per SM the register allocation must allow: 12 (168 registers, a few words of
// spill in the loop) streams 10-15% faster on an H100 than 8 (255 registers).
#ifndef KVPACK_DECODE_MIN_BLOCKS
#define KVPACK_DECODE_MIN_BLOCKS 12
#endif
// Profiling builds only (benchmarks/decode_int4.py --timeline): each program's start, end of its
// prologue, end of its store's tiles and end (ns, %globaltimer) and its SM, in a module global.
#ifdef KVPACK_DECODE_TIMELINE
#define TIMELINE_PROGRAMS 16384
__device__ unsigned long long kvpack_timeline[5 * TIMELINE_PROGRAMS];
#define TIMELINE_MARK(i)                                                                         \
    do {                                                                                         \
        const unsigned p = blockIdx.y * gridDim.x + blockIdx.x;                                  \
        if (threadIdx.x == 0 && p < TIMELINE_PROGRAMS) {                                         \
            unsigned long long now;                                                              \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));                              \
            kvpack_timeline[5 * p + (i)] = now;                                                  \
            if ((i) == 0) {                                                                      \
                unsigned sm;                                                                     \
                asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));                                  \
                kvpack_timeline[5 * p + 4] = sm;                                                 \
            }                                                                                    \
        }                                                                                        \
    } while (0)
#else
#define TIMELINE_MARK(i)
#endif
#define NEG_INF __int_as_float(0xff800000u)
#define MAX_ROWS 8
#define EIGHTS 0x48004800u  // a pair of float16 8s

__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 mask, u32 bits) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
    return d;
}

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// Bits 0-3 and 16-19 of x as the float16 pair (c0 - C, c1 - C): under the exponent of 1024 the bits
// read as 1024 + c, less 1024 + C.
template <int C>
__device__ __forceinline__ u32 low_nibbles(u32 x) {
    constexpr u32 h = 0x6400u + C;
    return hsub2(lop3_and_or(x, 0x000F000Fu, 0x64006400u), h | h << 16);
}

// Bits 4-7 and 20-23 of x likewise, times 16: (16 (c0 - C), 16 (c1 - C)), from 1024 + 16 c.
template <int C>
__device__ __forceinline__ u32 high_nibbles(u32 x) {
    constexpr u32 h = 0x6400u + 16 * C;
    return hsub2(lop3_and_or(x, 0x00F000F0u, 0x64006400u), h | h << 16);
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// The L2 fetch size the copies ask for on a miss (0: the default; 64, 128 or 256 bytes).
#ifndef KVPACK_DECODE_L2_FETCH
#define KVPACK_DECODE_L2_FETCH 128
#endif
#if KVPACK_DECODE_L2_FETCH == 64
#define L2_FETCH ".L2::64B"
#elif KVPACK_DECODE_L2_FETCH == 128
#define L2_FETCH ".L2::128B"
#elif KVPACK_DECODE_L2_FETCH == 256
#define L2_FETCH ".L2::256B"
#else
#define L2_FETCH ""
#endif

// N bytes global -> shared without a register (sm_80): 16 through L2 only, 8 and 4 through L1.
template <int N>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
    const u32 a = (u32)__cvta_generic_to_shared(smem);
    if (N == 16) {
        asm volatile("cp.async.cg.shared.global" L2_FETCH " [%0], [%1], 16;" ::"r"(a), "l"(gmem));
    } else {
        asm volatile("cp.async.ca.shared.global" L2_FETCH " [%0], [%1], %2;" ::"r"(a), "l"(gmem), "n"(N));
    }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// The query dtype's conversions (common.cuh): float16 or bfloat16.
template <bool BF16>
struct QueryType {
    typedef f16_t type;
};
template <>
struct QueryType<true> {
    typedef bf16_t type;
};

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 transpose8x8(u32 x) {
    u32 y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

// d += a . b, m16n8k16, float32 accumulators; BF16 picks the operand type.
template <bool BF16>
__device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ float warp_max_g(float x) {  // over the 8 lanes of one t (lane bits 2-4)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float warp_sum_g(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    x += __shfl_xor_sync(0xffffffffu, x, 8);
    return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

template <int N>
struct Bytes;  // N bytes of one token row, loaded at once
template <>
struct Bytes<16> {
    typedef uint4 type;
    static __device__ __forceinline__ u32 word(const uint4& v, int i) {
        return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
    }
};
template <>
struct Bytes<8> {
    typedef uint2 type;
    static __device__ __forceinline__ u32 word(const uint2& v, int i) { return i == 0 ? v.x : v.y; }
};
template <>
struct Bytes<4> {
    typedef u32 type;
    static __device__ __forceinline__ u32 word(const u32& v, int) { return v; }
};

template <int D, bool BF16>
__device__ __forceinline__ void decode_int4(
    const u16* __restrict__ Q, u16* __restrict__ Out, float* __restrict__ MidO, float* __restrict__ MidL,
    const unsigned char* __restrict__ KC, const u16* __restrict__ KS, const u16* __restrict__ KZ,
    const unsigned char* __restrict__ VC, const u16* __restrict__ VS, const u16* __restrict__ VZ,
    const u16* __restrict__ WK, const u16* __restrict__ WV, const int* __restrict__ Start,
    const int* __restrict__ End, int* __restrict__ Units, float qk_scale, int n_quant, int n_window, int num_splits,
    int num_kv_heads, int rep, int lq, int group, i64 sqb, i64 sqh, i64 sqm, i64 sob, i64 soh, i64 som,
    i64 skcb, i64 skch, i64 sksb, i64 sksh, i64 svcb, i64 svch, i64 svsb, i64 svsh, i64 swkb, i64 swkh,
    i64 swkt, i64 swvb, i64 swvh, i64 swvt) {
    constexpr int NB = D / 2;        // bytes per token row
    constexpr int KB = D / 8;        // key bytes per lane per token
    constexpr int KW = KB / 4;       // key words per lane per token
    constexpr int KSTEPS = D / 16;   // k-steps of the key product
    constexpr int CPT = D / 4;       // key channels per lane (t)
    constexpr int VB = D / 16;       // value bytes per lane per token
    constexpr int VW = VB / 4 > 0 ? VB / 4 : 1;  // value words per lane per token
    constexpr int MT = D / 16;       // m-tiles of the value product (16 channels each)
    typedef typename Bytes<KB>::type KRow;
    typedef typename Bytes<VB>::type VRow;
    typedef typename QueryType<BF16>::type QT;

    // Two stages of one tile's bytes. Codes lane-major (lane l's 16-, 8- or 4-byte slots side by
    // side: conflict-free reads), each lane reading back only its own, copied there a run of
    // consecutive rows per instruction; then the tile's value scales and zeros (64 + 64 float16) and,
    // when the tile starts a key group, the group's key scale and zero rows (D + D float16), copied by
    // some lanes and read by all.
    constexpr int KSTAGE = 8 * 32 * KB, VSTAGE = 16 * 32 * VB, SSTAGE = KSTAGE + VSTAGE;
    constexpr int GSTAGE = SSTAGE + 4 * TILE, STAGE = GSTAGE + 4 * D;
    __shared__ __align__(16) unsigned char stages[2][STAGE];

    TIMELINE_MARK(0);
    const int lane = threadIdx.x;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, split = blockIdx.y;
    const i64 b = bh / num_kv_heads, h = bh % num_kv_heads;
    const int rows = rep * lq;

    int end = n_quant + n_window;
    if (End != nullptr) end = min(End[b], end);
    const int begin = Start != nullptr ? Start[b] : 0;

    // Work items of this (b, h), in order: the window's tiles (full precision, true units), then the
    // store's units of ut tiles (one key group, or 4 tiles of a longer one). Program `split` takes item
    // `split` first, then the next free one from the pair's counter in Units (zeroed for each call):
    // programs on the GPU's faster SMs take more items (SMs stream at rates up to 20% apart). Without
    // Units, every num_splits-th item.
    const int ut = group / TILE < 4 ? group / TILE : 4;
    const int unit_tokens = ut * TILE;
    const int q_end = min(end, n_quant);
    const int w_first = max(n_quant, begin / TILE * TILE);
    const int n_wtiles = w_first < end ? (end - w_first + TILE - 1) / TILE : 0;
    const int u_first = begin / unit_tokens;
    // (A row starting past the store has no units: with groups over 256 tokens a unit can cross the
    // store's end, and an empty one would read the tile past it.)
    const bool any = q_end > begin && q_end > u_first * unit_tokens;
    const int n_units = any ? (q_end - 1) / unit_tokens + 1 - u_first : 0;
    const int n_items = n_wtiles + n_units;
    auto unit_start = [&](int item) { return max((u_first + item - n_wtiles) * unit_tokens, begin / TILE * TILE); };
    auto unit_stop = [&](int item) { return min((u_first + item - n_wtiles + 1) * unit_tokens, q_end); };
    int ticket = 0;  // lane 0: the counter's answer for this program's next item, asked one step ahead
    auto request = [&]() {
        if (Units != nullptr && lane == 0) ticket = atomicAdd(Units + bh, 1);
    };
    auto resolve = [&](int item) {
        return Units != nullptr ? num_splits + __shfl_sync(0xffffffffu, ticket, 0) : item + num_splits;
    };

    const unsigned char* kc = KC + b * skcb + h * skch;
    const unsigned char* vc = VC + b * svcb + h * svch;
    const u16* ks = KS + b * sksb + h * sksh;
    const u16* kz = KZ + b * sksb + h * sksh;
    const u16* vs = VS + b * svsb + h * svsh;
    const u16* vz = VZ + b * svsb + h * svsh;
    int issued_group = -1;  // the key group whose rows this warp copied last

    auto issue_tile = [&](int t0, int st) {
        unsigned char* s = stages[st];
        // Each copy instruction reads consecutive rows (8 key rows, 4 value rows) into the slots of the
        // lanes that read them back.
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int row = 8 * u + (lane >> 2), c = lane & 3;  // owner: lane (u, c), slot lane >> 2
            cp_async<KB>(s + (lane >> 2) * 32 * KB + (4 * u + c) * KB, kc + (t0 + row) * NB + KB * c);
        }
#pragma unroll
        for (int u = 0; u < 16; ++u) {  // row 4u + r: owner lane (c, u / 4), slot 4 (u % 4) + r
            const int r = lane >> 3, c = lane & 7;
            cp_async<VB>(s + KSTAGE + (4 * (u % 4) + r) * 32 * VB + (4 * c + u / 4) * VB,
                         vc + (t0 + 4 * u + r) * NB + VB * c);
        }
        if (lane < 16) cp_async<16>(s + SSTAGE + 16 * lane, (lane < 8 ? vs : vz) + t0 + 8 * (lane & 7));
        if (t0 / group != issued_group) {  // a new key group for this warp: its scale and zero rows
            issued_group = t0 / group;
            if (lane < D / 4) {  // D / 8 chunks of 16 bytes per row
                const i64 row = (i64)issued_group * D;
                cp_async<16>(s + GSTAGE + 16 * lane, (lane < D / 8 ? ks : kz) + row + 8 * (lane % (D / 8)));
            }
        }
    };
    int item = split;
    request();
    if (item >= n_wtiles && item < n_items) issue_tile(unit_start(item), 0);  // copied during the prologue
    cp_async_commit();
    int stage = 0;

    // The query, as B fragments: lane (g, t) holds row g's channels CPT t .. CPT t + CPT - 1 (the key
    // slots' channels, see the header), read straight from global memory (16 bytes at a time where
    // aligned) and normalized by the row's max |q| (over the four lanes of the row).
    float xq[CPT];
    {
        u32 raw[CPT / 2];
#pragma unroll
        for (int i = 0; i < CPT / 2; ++i) raw[i] = 0u;
        if (g < rows) {
            const u16* qrow = Q + b * sqb + (h * rep + g / lq) * sqh + (i64)(g % lq) * sqm + CPT * t;
            if ((reinterpret_cast<unsigned long long>(qrow) & 15) == 0) {
#pragma unroll
                for (int i = 0; i < CPT / 8; ++i) {
                    const uint4 v = reinterpret_cast<const uint4*>(qrow)[i];
                    raw[4 * i] = v.x;
                    raw[4 * i + 1] = v.y;
                    raw[4 * i + 2] = v.z;
                    raw[4 * i + 3] = v.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < CPT / 2; ++i) raw[i] = (u32)qrow[2 * i] | (u32)qrow[2 * i + 1] << 16;
            }
        }
#pragma unroll
        for (int i = 0; i < CPT / 2; ++i) {
            xq[2 * i] = QT::to_float((u16)(raw[i] & 0xFFFFu));
            xq[2 * i + 1] = QT::to_float((u16)(raw[i] >> 16));
        }
    }
    float qmax = 0.0f;
#pragma unroll
    for (int i = 0; i < CPT; ++i) qmax = fmaxf(qmax, fabsf(xq[i]));
    qmax = fmaxf(qmax, __shfl_xor_sync(0xffffffffu, qmax, 1));
    qmax = fmaxf(qmax, __shfl_xor_sync(0xffffffffu, qmax, 2));
    qmax = qmax > 0.0f ? qmax : 1.0f;
    const float qinv = __frcp_rn(qmax);
    // qn[st][0] = channels (base, base + 4), qn[st][1] = (base + 1, base + 5), base = 8 (st >> 1) +
    // 2 (st & 1), of this lane's CPT.
    u32 qn[KSTEPS][2];
#pragma unroll
    for (int i = 0; i < CPT; i += 8) {
        qn[i / 4][0] = pack_f16(xq[i] * qinv, xq[i + 4] * qinv);
        qn[i / 4][1] = pack_f16(xq[i + 1] * qinv, xq[i + 5] * qinv);
        qn[i / 4 + 1][0] = pack_f16(xq[i + 2] * qinv, xq[i + 6] * qinv);
        qn[i / 4 + 1][1] = pack_f16(xq[i + 3] * qinv, xq[i + 7] * qinv);
    }

    // Rows 2t and 2t+1 are this lane's columns of every score and output fragment.
    const int r0 = 2 * t, r1 = 2 * t + 1;
    const float qmax0 = __shfl_sync(0xffffffffu, qmax, 4 * r0), qmax1 = __shfl_sync(0xffffffffu, qmax, 4 * r1);
    const int qpos0 = r0 < rows ? end - lq + r0 % lq : -1;
    const int qpos1 = r1 < rows ? end - lq + r1 % lq : -1;

    float m0 = -1.0e30f, m1 = -1.0e30f;  // running max (base 2) of rows r0, r1
    float l0 = 0.0f, l1 = 0.0f;          // this lane's share of the softmax sums
    float z0 = 0.0f, z1 = 0.0f;          // this lane's share of sum p z_t
    float R = 0.0f;                      // the accumulator's unit: acc = sum p v / R

    // Score fragment sc[j] holds tokens 8g+2j (entries 0, 1) and 8g+2j+1 (2, 3) of the tile at t0,
    // for rows r0 (entries 0, 2) and r1 (1, 3); tokens outside [begin, end) are masked.
    auto mask = [&](float (&sc)[4][4], int t0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = t0 + 8 * g + 2 * j + e;
                const bool ok = tok >= begin && tok < end;
                if (!(ok && tok <= qpos0)) sc[j][2 * e] = NEG_INF;
                if (!(ok && tok <= qpos1)) sc[j][2 * e + 1] = NEG_INF;
            }
        }
    };
    // The rows' running maxima over one more tile, and the factors that rescale what came before.
    auto advance_max = [&](const float (&sc)[4][4], float& alpha0, float& alpha1) {
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            mx0 = fmaxf(mx0, fmaxf(sc[j][0], sc[j][2]));
            mx1 = fmaxf(mx1, fmaxf(sc[j][1], sc[j][3]));
        }
        mx0 = warp_max_g(mx0);
        mx1 = warp_max_g(mx1);
        alpha0 = exp2_approx(m0 - mx0);
        alpha1 = exp2_approx(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
    };
    float acc[MT][4];  // out^T fragments
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
    // acc's units: true (sum p v) through the window's tiles; from the first store tile with a nonzero
    // value scale on, sum p (s_t / R) c, times 16 in m-tiles 4w+1 and 4w+3 (high nibbles), R the
    // largest value scale so far.
    bool store_units = false;

    const float a0 = qmax0 * qk_scale, a1 = qmax1 * qk_scale;  // score = mma a + c, rows r0, r1
    u32 qs[KSTEPS][2];  // qn times this key group's scales
    float c0 = 0.0f, c1 = 0.0f;
    int krow = -1;      // the key group folded into qs

    TIMELINE_MARK(1);
    if (item < n_wtiles) {
        // Raw query, B fragments in the key slots' channel order.
        u32 qb[KSTEPS][2];
        {
            const int n = g;
            const u16* qrow = Q + b * sqb + (h * rep + n / lq) * sqh + (i64)(n % lq) * sqm + CPT * t;
#pragma unroll
            for (int st = 0; st < KSTEPS; ++st) {
                const int base = 8 * (st >> 1) + 2 * (st & 1);
                u32 v[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int off = base + (k >> 1) + 4 * (k & 1);  // pairs (base, base+4), (base+1, base+5)
                    v[k] = n < rows ? qrow[off] : 0u;
                }
                qb[st][0] = v[0] | v[1] << 16;
                qb[st][1] = v[2] | v[3] << 16;
            }
        }
        const u16* wk = WK + b * swkb + h * swkh;
        const u16* wv = WV + b * swvb + h * swvh;
        do {  // window tiles
            const int t0 = w_first + item * TILE;
            float sc[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
                const int tk0 = t0 + 8 * g + 2 * j, tk1 = tk0 + 1;
                const u16* k0 = wk + (i64)(tk0 - n_quant) * swkt + CPT * t;
                const u16* k1 = wk + (i64)(tk1 - n_quant) * swkt + CPT * t;
                // This lane's CPT channels of both rows, 16 bytes at a time (why_not checks the
                // alignment); channel c is half c & 1 of word c / 2, paired with c + 4 (word + 2).
                u32 w0[CPT / 2], w1[CPT / 2];
#pragma unroll
                for (int i = 0; i < CPT / 8; ++i) {
                    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
                    const uint4 a = tk0 < end ? reinterpret_cast<const uint4*>(k0)[i] : z;
                    const uint4 c = tk1 < end ? reinterpret_cast<const uint4*>(k1)[i] : z;
                    w0[4 * i] = a.x, w0[4 * i + 1] = a.y, w0[4 * i + 2] = a.z, w0[4 * i + 3] = a.w;
                    w1[4 * i] = c.x, w1[4 * i + 1] = c.y, w1[4 * i + 2] = c.z, w1[4 * i + 3] = c.w;
                }
#pragma unroll
                for (int st = 0; st < KSTEPS; ++st) {
                    const int base = 8 * (st >> 1) + 2 * (st & 1);
                    u32 f[4];
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const int off = base + (k >> 1);
                        const u32* w = (k & 1) ? w1 : w0;
                        f[k] = __byte_perm(w[off / 2], w[off / 2 + 2], (off & 1) ? 0x7632 : 0x5410);
                    }
                    mma<BF16>(sc[j], f, qb[st][0], qb[st][1]);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[j][e] *= qk_scale;
            }
            mask(sc, t0);
            float alpha0, alpha1;
            advance_max(sc, alpha0, alpha1);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                acc[mt][0] *= alpha0;
                acc[mt][2] *= alpha0;
                acc[mt][1] *= alpha1;
                acc[mt][3] *= alpha1;
            }
            l0 *= alpha0;
            l1 *= alpha1;
            z0 *= alpha0;
            z1 *= alpha1;
            u32 pb[4][2];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float p00 = exp2_approx(sc[j][0] - m0), p01 = exp2_approx(sc[j][1] - m1);
                const float p10 = exp2_approx(sc[j][2] - m0), p11 = exp2_approx(sc[j][3] - m1);
                l0 += p00 + p10;
                l1 += p01 + p11;
                pb[j][0] = transpose8x8(BF16 ? pack_bf16(p00, p01) : pack_f16(p00, p01));
                pb[j][1] = transpose8x8(BF16 ? pack_bf16(p10, p11) : pack_f16(p10, p11));
            }
            // Value slots as in the store: lane (g, t) holds channel slots g, g+8 of m-tile 4w+n,
            // channels D/8 g + 8w + n and + 4, tokens 16t + {2j, 2j+8} and {2j+1, 2j+9}.
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int tk[4] = {t0 + 16 * t + 2 * j, t0 + 16 * t + 2 * j + 8, t0 + 16 * t + 2 * j + 1,
                                   t0 + 16 * t + 2 * j + 9};
                // This lane's D / 8 channels of the four tokens, 16 bytes at a time.
                u32 vv[4][D / 16];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const u16* vr = wv + (i64)(tk[k] - n_quant) * swvt + (D / 8) * g;
#pragma unroll
                    for (int i = 0; i < D / 64; ++i) {
                        const uint4 v =
                            tk[k] < end ? reinterpret_cast<const uint4*>(vr)[i] : make_uint4(0u, 0u, 0u, 0u);
                        vv[k][4 * i] = v.x, vv[k][4 * i + 1] = v.y, vv[k][4 * i + 2] = v.z, vv[k][4 * i + 3] = v.w;
                    }
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int c = 8 * (mt >> 2) + (mt & 3);  // channel c and c + 4 of this lane's
                    const int sel = (c & 1) ? 0x7632 : 0x5410;
                    const u32 f[4] = {__byte_perm(vv[0][c / 2], vv[1][c / 2], sel),
                                      __byte_perm(vv[0][c / 2 + 2], vv[1][c / 2 + 2], sel),
                                      __byte_perm(vv[2][c / 2], vv[3][c / 2], sel),
                                      __byte_perm(vv[2][c / 2 + 2], vv[3][c / 2 + 2], sel)};
                    mma<BF16>(acc[mt], f, pb[j][0], pb[j][1]);
                }
            }
            item = resolve(item);
            request();
            if (item >= n_wtiles && item < n_items) issue_tile(unit_start(item), 0);
            cp_async_commit();
        } while (item < n_wtiles);
    }

    // Store tiles: each tile's bytes copied one tile ahead, from the unit's next tile or the next unit.
    int t0 = item < n_items ? unit_start(item) : 0, stop = item < n_items ? unit_stop(item) : 0;
    while (item < n_items) {
        int next = t0 + TILE, next_stop = stop;
        if (next >= stop) {
            item = resolve(item);
            request();
            next = item < n_items ? unit_start(item) : -1;
            next_stop = item < n_items ? unit_stop(item) : 0;
        }
        KRow kw[8];
        VRow vw[16];
        __syncwarp();  // every lane done with the stage the next tile's copies overwrite
        if (next >= 0) issue_tile(next, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // this lane's copies of this tile have landed
        __syncwarp();        // and every other lane's
        const unsigned char* s = stages[stage];
        stage ^= 1;
#pragma unroll
        for (int u = 0; u < 8; ++u) kw[u] = *reinterpret_cast<const KRow*>(s + u * 32 * KB + lane * KB);
#pragma unroll
        for (int u = 0; u < 16; ++u)
            vw[u] = *reinterpret_cast<const VRow*>(s + KSTAGE + u * 32 * VB + lane * VB);
        const uint4 vsw = *reinterpret_cast<const uint4*>(s + SSTAGE + 16 * g);
        const uint4 vzw = *reinterpret_cast<const uint4*>(s + SSTAGE + 128 + 16 * g);
        const u16* sr = reinterpret_cast<const u16*>(s + GSTAGE) + CPT * t;
        const u16* zr = sr + D;

        if (t0 / group != krow) {  // a new key group: fold its scales into the query
            krow = t0 / group;
            // c: q.(z + 8 s) from the tensor cores (the centred zero points as an A operand whose
            // rows are alike), since k = s c + z = s (c - 8) + (z + 8 s).
            float kb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int i = 0; i < CPT; i += 8) {
                const uint4 sv = *reinterpret_cast<const uint4*>(sr + i);
                const uint4 zv = *reinterpret_cast<const uint4*>(zr + i);
#pragma unroll
                for (int o = 0; o < 2; ++o) {  // k-step i / 4 + o: channel pairs from words o and o + 2
                    const int st = i / 4 + o;
                    const u32 s_lo = o ? sv.y : sv.x, s_hi = o ? sv.w : sv.z;
                    const u32 z_lo = o ? zv.y : zv.x, z_hi = o ? zv.w : zv.z;
                    const u32 s0 = __byte_perm(s_lo, s_hi, 0x5410), s1 = __byte_perm(s_lo, s_hi, 0x7632);
                    qs[st][0] = hmul2(qn[st][0], s0);
                    // The second pair meets high nibbles, 16 (c - 8): a sixteenth of the query.
                    qs[st][1] = hmul2(hmul2(qn[st][1], s1), 0x2C002C00u);
                    const u32 zp0 = hfma2(s0, EIGHTS, __byte_perm(z_lo, z_hi, 0x5410));
                    const u32 zp1 = hfma2(s1, EIGHTS, __byte_perm(z_lo, z_hi, 0x7632));
                    const u32 za[4] = {zp0, zp0, zp1, zp1};
                    mma<false>(kb, za, qn[st][0], qn[st][1]);
                }
            }
            c0 = kb[0] * a0;
            c1 = kb[1] * a1;
        }

        // Scores: block j, fragment rows g (token 8g+2j) and g+8 (token 8g+2j+1), columns r0, r1.
        float sc[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
            for (int w = 0; w < KW; ++w) {
                const u32 x0 = Bytes<KB>::word(kw[2 * j], w), x1 = Bytes<KB>::word(kw[2 * j + 1], w);
                const u32 y0 = x0 >> 8, y1 = x1 >> 8;
                const u32 f0[4] = {low_nibbles<8>(x0), low_nibbles<8>(x1), high_nibbles<8>(x0),
                                   high_nibbles<8>(x1)};
                mma<false>(sc[j], f0, qs[2 * w][0], qs[2 * w][1]);
                const u32 f1[4] = {low_nibbles<8>(y0), low_nibbles<8>(y1), high_nibbles<8>(y0),
                                   high_nibbles<8>(y1)};
                mma<false>(sc[j], f1, qs[2 * w + 1][0], qs[2 * w + 1][1]);
            }
            sc[j][0] = fmaf(sc[j][0], a0, c0);
            sc[j][1] = fmaf(sc[j][1], a1, c1);
            sc[j][2] = fmaf(sc[j][2], a0, c0);
            sc[j][3] = fmaf(sc[j][3], a1, c1);
        }
        const bool full = t0 >= begin && t0 + TILE - 1 <= end - lq;
        if (!full) mask(sc, t0);

        // Online softmax, rows r0 and r1.
        float alpha0, alpha1;
        advance_max(sc, alpha0, alpha1);

        // Value scales of this lane's tokens 8g .. 8g+7 (the score rows), and the tile's largest.
        const u32 sw[4] = {vsw.x, vsw.y, vsw.z, vsw.w}, zw[4] = {vzw.x, vzw.y, vzw.z, vzw.w};
        float vsc[8], vzp[8];
        float top = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            vsc[2 * k] = half_bits_to_float((u16)(sw[k] & 0xFFFF));
            vsc[2 * k + 1] = half_bits_to_float((u16)(sw[k] >> 16));
            vzp[2 * k] = half_bits_to_float((u16)(zw[k] & 0xFFFF));
            vzp[2 * k + 1] = half_bits_to_float((u16)(zw[k] >> 16));
            top = fmaxf(top, fmaxf(vsc[2 * k], vsc[2 * k + 1]));
        }
        top = warp_max_g(top);
        // acc's rescale: alpha, times R_old / R when R grows (from true units at the first nonzero scale).
        float grow_e = 1.0f, grow_o = 1.0f;  // m-tiles of low and of high nibbles
        if (top > R) {
            if (store_units) {
                grow_e = grow_o = R / top;
            } else {
                grow_e = 1.0f / top;
                grow_o = 16.0f / top;
                store_units = true;
            }
            R = top;
        }
        const float inv_r = R > 0.0f ? 1.0f / R : 0.0f;  // all scales so far 0: so are the weights
        const float f0e = alpha0 * grow_e, f1e = alpha1 * grow_e, f0o = alpha0 * grow_o, f1o = alpha1 * grow_o;
        l0 *= alpha0;
        l1 *= alpha1;
        z0 *= alpha0;
        z1 *= alpha1;

        // Weights, into B fragments of the value product (movmatrix: score rows become columns).
        u32 pb[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float p00 = exp2_approx(sc[j][0] - m0), p01 = exp2_approx(sc[j][1] - m1);
            const float p10 = exp2_approx(sc[j][2] - m0), p11 = exp2_approx(sc[j][3] - m1);
            l0 += p00 + p10;
            l1 += p01 + p11;
            const float s0 = vsc[2 * j], s1 = vsc[2 * j + 1];
            z0 = fmaf(p00, vzp[2 * j], fmaf(p10, vzp[2 * j + 1], z0));
            z1 = fmaf(p01, vzp[2 * j], fmaf(p11, vzp[2 * j + 1], z1));
            pb[j][0] = transpose8x8(pack_f16(p00 * (s0 * inv_r), p01 * (s0 * inv_r)));
            pb[j][1] = transpose8x8(pack_f16(p10 * (s1 * inv_r), p11 * (s1 * inv_r)));
        }

        // out^T = out^T f + V^T p'^T: block j's value slots (2t, 2t+1) are tokens 16t+2j, 16t+2j+8
        // and (2t+8, 2t+9) tokens 16t+2j+1, 16t+2j+9; m-tile 4w+n takes channel pairs n (rows g) and
        // n+4 (rows g+8) of word w. Each m-tile's tile sum starts from zero and joins acc in float32:
        // the tensor cores' sums, which lose low bits beside a large operand, never hold the whole
        // context's (accumulating in place gave 2.4e-3 relative error at 128K tokens, this 8.2e-4).
#pragma unroll
        for (int w = 0; w < VW; ++w) {
            u32 xa[4], ya[4], xc[4], yc[4];  // the same channel of two tokens in each 16-bit half
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 a = Bytes<VB>::word(vw[2 * j], w), bb = Bytes<VB>::word(vw[2 * j + 8], w);
                const u32 c = Bytes<VB>::word(vw[2 * j + 1], w), d = Bytes<VB>::word(vw[2 * j + 9], w);
                xa[j] = __byte_perm(a, bb, 0x5410);
                ya[j] = __byte_perm(a, bb, 0x7632);
                xc[j] = __byte_perm(c, d, 0x5410);
                yc[j] = __byte_perm(c, d, 0x7632);
            }
#pragma unroll
            for (int n = 0; n < 4; ++n) {
                float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int sh = n < 2 ? 0 : 8;
                    const u32 x[4] = {xa[j] >> sh, ya[j] >> sh, xc[j] >> sh, yc[j] >> sh};
                    u32 fr[4];
#pragma unroll
                    for (int k = 0; k < 4; ++k) fr[k] = n & 1 ? high_nibbles<0>(x[k]) : low_nibbles<0>(x[k]);
                    mma<false>(sum, fr, pb[j][0], pb[j][1]);
                }
                float* o = acc[4 * w + n];
                const float f0 = n & 1 ? f0o : f0e, f1 = n & 1 ? f1o : f1e;
                o[0] = fmaf(o[0], f0, sum[0]);
                o[2] = fmaf(o[2], f0, sum[2]);
                o[1] = fmaf(o[1], f1, sum[1]);
                o[3] = fmaf(o[3], f1, sum[3]);
            }
        }
        t0 = next;
        stop = next_stop;
    }
    TIMELINE_MARK(2);

    // Finish: the softmax sums and zero-point terms over the lanes of each row, then the output.
    l0 = warp_sum_g(l0);
    l1 = warp_sum_g(l1);
    z0 = warp_sum_g(z0);
    z1 = warp_sum_g(z1);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    if (store_units) {  // acc in true units
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float f = (mt & 1) ? 0.0625f * R : R;
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[mt][k] *= f;
        }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int n = 2 * t + e;
        if (n >= rows) continue;
        const float inv = e ? inv1 : inv0, zz = e ? z1 : z0, mm = e ? m1 : m0, ll = e ? l1 : l0;
        const i64 head = h * rep + n / lq, qi = n % lq;
        const i64 r = ((b * (num_kv_heads * rep) + head) * lq + qi) * num_splits + split;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int ch = (D / 8) * g + 8 * (mt >> 2) + (mt & 3) + 4 * half;
                const float o = (acc[mt][2 * half + e] + zz) * inv;
                if (num_splits > 1) {
                    MidO[r * D + ch] = o;
                } else {
                    Out[b * sob + head * soh + qi * som + ch] = QT::from_float(o);
                }
            }
        }
        if (num_splits > 1 && g == 0) MidL[r] = ll > 0.0f ? mm + __log2f(ll) : NEG_INF;
    }
    TIMELINE_MARK(3);
}

#define KVPACK_DECODE_INT4(NAME, D, BF16)                                                        \
    extern "C" __global__ void __launch_bounds__(32, KVPACK_DECODE_MIN_BLOCKS) NAME(                   \
        const u16* __restrict__ Q, u16* __restrict__ Out, float* __restrict__ MidO,                  \
        float* __restrict__ MidL, const unsigned char* __restrict__ KC, const u16* __restrict__ KS,   \
        const u16* __restrict__ KZ, const unsigned char* __restrict__ VC, const u16* __restrict__ VS, \
        const u16* __restrict__ VZ, const u16* __restrict__ WK, const u16* __restrict__ WV,          \
        const int* __restrict__ Start, const int* __restrict__ End, int* __restrict__ Units,         \
        float qk_scale, int n_quant, int n_window, int num_splits, int num_kv_heads, int rep, int lq, \
        int group,                                                                                    \
        i64 sqb, i64 sqh, i64 sqm, i64 sob, i64 soh, i64 som, i64 skcb, i64 skch, i64 sksb,          \
        i64 sksh, i64 svcb, i64 svch, i64 svsb, i64 svsh, i64 swkb, i64 swkh, i64 swkt, i64 swvb,    \
        i64 swvh, i64 swvt) {                                                                         \
        decode_int4<D, BF16>(Q, Out, MidO, MidL, KC, KS, KZ, VC, VS, VZ, WK, WV, Start, End, Units,  \
                             qk_scale, n_quant, n_window, num_splits, num_kv_heads, rep, lq,          \
                             group, sqb, sqh, sqm, sob, soh, som, skcb, skch, sksb, sksh, svcb, svch, \
                             svsb, svsh, swkb, swkh, swkt, swvb, swvh, swvt);                         \
    }

KVPACK_DECODE_INT4(decode_int4_d128_f16, 128, false)
KVPACK_DECODE_INT4(decode_int4_d128_bf16, 128, true)
KVPACK_DECODE_INT4(decode_int4_d64_f16, 64, false)
KVPACK_DECODE_INT4(decode_int4_d64_bf16, 64, true)
