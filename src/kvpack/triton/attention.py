"""Decode attention that reads the quantized KV cache directly: a flash-decoding Triton kernel.

For each (batch row, KV head) the context, quantized store then full-precision window
(:class:`kvpack.cache.QuantizedLayer`), is cut into ``num_splits`` chunks, one program each. A program
holds the query rows of its KV head (the GQA query heads times the ``Lq`` new tokens; ``BLOCK_M`` of
them, a power of two: by default all of them, in one warp when they are few, the compiler padding
``tl.dot``'s tensor-core tiles to 16 rows), streams ``BLOCK_N``-token tiles of codes and scales, and
keeps an online softmax in float32:

    m' = max(m, rowmax(s)),  l' = l * 2^(m - m') + sum 2^(s - m'),  acc' = acc * 2^(m - m') + 2^(s - m') v

with ``s = q k^T * scale * log2(e)``. Each split writes ``acc / l`` and ``lse = m + log2(l)``; a second
kernel combines the splits, weighting each by ``2^(lse - max lse)``. One split writes the output directly.

The codes never become dequantized keys and values. Every int8/int4/int2/fp8 code is exactly a float16,
so a tile's codes go to the tensor cores as float16 (converted four bytes at a time by a few PTX
instructions on the GPU), and the scales are folded into the small operands instead: a per-channel key
scale row into ``q``, a per-token value scale into the softmax weights, zero points as rank-one
corrections (see :func:`_key_scores`, :func:`_value_product`). Layouts this cannot fold (per-token
scales in channel groups, blocks no tile size divides) dequantize the tile in registers as
:func:`kvpack.reference.dequantize` does. Packed int4/int2 keys are scored one bit field at a time
(:func:`_packed_key_scores`): field ``k`` of byte column ``j`` is channel ``per_byte * j + k``, so the
query is split into the matching channels once, and the codes go to the dot as they come out of the
bytes, never interleaved back into channel order. The result equals attention over the dequantized
cache up to float16 rounding of the folded operands (the reference rounds the dequantized keys to the
model dtype).

Masking, per batch row ``b`` with valid tokens ``[start_b, end_b)`` (default ``[0, seq_length)``): query
``i`` of ``Lq`` sits at position ``end_b - Lq + i`` and sees keys ``start_b <= j <= end_b - Lq + i``. A
query that sees no key gets zeros.

Code layouts served (see :mod:`kvpack.schemes`): int8 (symmetric), fp8 e4m3/e5m2 (symmetric), int4 and
int2 (asymmetric, packed along the head dimension, first code in the low bits). Scales: per-channel
formats hold one row per block of ``group`` tokens (``row = token // group``), per-token formats one
row per token, over the whole head (one scale) or in channel groups (``column = channel // group``).
Offsets of a (batch row, head) slice are computed in 64 bits; offsets inside one slice in 32 bits (the
launcher checks that a slice holds fewer than 2^31 elements).

The launcher, :func:`decode_attention`, also serves the ``int4`` preset's large calls on a GPU with the
CUDA C kernel of :mod:`kvpack.cuda.decode` (``KernelConfig.kernel``, :data:`CUDA_MIN_WORK`), which
writes the same split partials for the same combine kernel.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvpack.backends import triton_interpreted
from kvpack.cuda import decode as cuda_decode
from kvpack.schemes import FP8_DTYPES, Scheme

#: Most splits of one (batch row, KV head); the combine kernel holds them all in one tile.
MAX_SPLITS = 128
#: Smallest tile of a GPU decode over packed (int4/int2) codes: 16-token tiles gave relative errors of
#: 2-3 on an H100 (Triton 3.6; every shape, split and padding tried), while the interpreter's were right.
MIN_PACKED_BLOCK_N = 32
#: Fewest tokens worth a split of their own.
MIN_SPLIT_TOKENS = 64
#: What starting and draining a wave of programs costs, in tokens one program could stream meanwhile
#: (H100, B=8, 32 query / 8 KV heads, int8: one wave of 16 splits of 1024 tokens 0.114 ms, two waves
#: of 32 splits of 512 tokens 0.120 ms; at 1K tokens 16 splits of 64 tokens 0.018 ms, 4 of 256 0.024).
WAVE_COST_TOKENS = 64
#: Programs that fit on one streaming multiprocessor at once (registers), by warps per program: the
#: sm_90 compile of the int8 cache at head dim 128 takes 255 registers a thread at 1 warp and 4 rows (8
#: programs of 32 threads), 248 at 2 warps and 16 rows (4 programs of 64 threads), 178 at 4 warps and
#: 128 at 8 (2 programs).
RESIDENT_PER_SM = {1: 8, 2: 4, 4: 2, 8: 2, 16: 1, 32: 1}
#: What ``KernelConfig.kernel`` may name.
KERNELS = ("auto", "triton", "cuda")
#: Fewest (batch row, KV head, token) triples for which ``kernel="auto"`` takes the CUDA int4 kernel.
#: Below it the Triton kernel is the faster (H100, 32 query / 8 KV heads, D=128, ms CUDA / Triton: batch
#: 1 at 4K 0.020 / 0.012, 16K 0.033 / 0.026, 32K 0.042 / 0.041, 128K 0.091 / 0.132; batch 8 at 4K 0.037 /
#: 0.041): the CUDA kernel's per-program start costs more when each program streams one or two tiles.
CUDA_MIN_WORK = 2**18
#: Most query rows (GQA heads x new tokens) one program holds; more rows use several row blocks.
MAX_BLOCK_M = 64
#: Fewest query rows a program holds by default (the tensor-core tile pads fewer rows itself).
MIN_BLOCK_M = 16

# How a tile finds its scales (and zero points): the SMODE constexpr.
_SCALE_TILE_ROW = 0  # per-channel, one row per block of tokens that holds the whole tile
_SCALE_TOKEN = 1  # per-token, one scale for the whole head dimension
_SCALE_TOKEN_GROUPS = 2  # per-token, channel groups that tile a power-of-two head dimension
_SCALE_GATHER = 3  # anything else: row = token // ROW_DIV, column = channel // COL_DIV

# What the codes are: the KIND constexpr.
_INT8 = 0
_E4M3 = 1  # fp8 codes are read as bytes and bitcast
_PACKED = 2  # int4 / int2, unsigned, asymmetric
_E5M2 = 3


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the decode kernel: tokens per tile, warps, software-pipeline stages and
    splits (``None``: chosen from the context length and the number of SMs), query rows per program
    (``block_m``, a power of two; ``None``: every row of a KV head, at least :data:`MIN_BLOCK_M`), and a
    cap on registers per thread (``maxnreg``, for tuning: more programs resident, at the risk of spills).
    ``kernel``: ``"triton"`` (a config's default: its fields are this kernel's) always runs this kernel;
    ``"auto"`` (:func:`default_config`'s) runs the CUDA C kernel of :mod:`kvpack.cuda.decode` where it
    applies (the ``int4`` cache preset on a GPU, which has its own tiles; only ``num_splits`` carries
    over) and this one elsewhere; ``"cuda"`` the CUDA kernel, or an error saying why it cannot.
    ``value_fields``: packed int4/int2 values with per-token or per-channel-row scales accumulate
    ``p v`` one bit field at a time (:func:`_value_fields`) instead of unpacking each tile into channel
    order. Off by default: on an H100 (B=8, 32K, int4) it changes the one-warp default by under 4%
    (0.253 against 0.254 ms with 32-token tiles; 0.245 with 64-token tiles, whose program without it
    takes 0.348)."""

    block_n: int = 64
    num_warps: int = 2
    num_stages: int = 2
    num_splits: int | None = None
    value_fields: bool = False
    block_m: int | None = None
    maxnreg: int | None = None
    kernel: str = "triton"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.block_m is not None and (self.block_m < 1 or self.block_m & (self.block_m - 1)):
            raise ValueError(f"block_m must be a power of two, got {self.block_m}")
        if self.maxnreg is not None and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"maxnreg must be between 24 and 255 registers, got {self.maxnreg}")


@triton.jit
def _exact_float(c, SIGNED: tl.constexpr):
    """int32 codes (|c| < 2^22) to float32 without a slow integer-to-float conversion: put the code in the
    mantissa of 2^23 (offset by 128 for signed codes) and subtract. Exact."""
    if SIGNED:
        return (c + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    return (c + 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _rounded(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even also in the interpreter, whose float32 -> bfloat16
    cast truncates."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _scales(ptr, tok, ok, offs_d, d_ok, tile_start, stride_t,
            SMODE: tl.constexpr, ROW_DIV: tl.constexpr, COL_DIV: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The float32 scales (or zero points) of a tile, shaped to broadcast against ``[BLOCK_N, BLOCK_D]``."""
    if SMODE == 0:
        s = tl.load(ptr + (tile_start // ROW_DIV) * stride_t + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        return s[None, :]
    elif SMODE == 1:
        s = tl.load(ptr + tok * stride_t, mask=ok, other=0.0).to(tl.float32)
        return s[:, None]
    elif SMODE == 2:
        NG: tl.constexpr = BLOCK_D // COL_DIV
        g = tl.arange(0, NG)
        s = tl.load(ptr + tok[:, None] * stride_t + g[None, :], mask=ok[:, None], other=0.0)
        s = tl.broadcast_to(s.to(tl.float32)[:, :, None], [BLOCK_N, NG, COL_DIV])
        return tl.reshape(s, [BLOCK_N, BLOCK_D])
    else:
        row = tok // ROW_DIV
        col = offs_d // COL_DIV
        s = tl.load(ptr + row[:, None] * stride_t + col[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        return s.to(tl.float32)


# Exact conversion of integer codes to float16 on the GPU, four bytes (one 32-bit register) at a time,
# with no slow integer-to-float instruction: a byte b placed under the float16 exponent 0x64 reads as
# 1024 + b (PRMT), and one packed subtraction (or fused multiply-add, for high bit fields) gives b.
_INT8_TO_F16 = tl.constexpr("""{
.reg .b32 t, bias;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
mov.b32 bias, 0x64806480;
sub.f16x2 $0, $0, bias;
sub.f16x2 $1, $1, bias;
}""")


def _half_pair(x: float) -> int:
    """Two float16 copies of ``x`` in one 32-bit word (a packed ``f16x2`` PTX operand)."""
    (h,) = struct.unpack("<H", struct.pack("<e", x))
    return h | h << 16


def _bit_fields_to_f16(bits: int) -> str:
    """PTX turning four bytes of packed ``bits``-bit codes into float16 codes: output pair ``k`` holds
    field ``k`` (bits ``k * bits`` and up) of the four bytes."""
    fields = 8 // bits
    lines = ["{", ".reg .b32 t0, t1, m, s, o;", f"prmt.b32 t0, ${2 * fields}, 0, 0x4140;",
             f"prmt.b32 t1, ${2 * fields}, 0, 0x4342;", "mov.b32 m, 0x64006400;"]
    for k in range(fields):
        mask = ((1 << bits) - 1) << (k * bits)
        lines += [f"lop3.b32 ${2 * k}, t0, {mask | mask << 16:#010x}, m, 0xea;",
                  f"lop3.b32 ${2 * k + 1}, t1, {mask | mask << 16:#010x}, m, 0xea;"]
        if k == 0:
            lines += [f"sub.f16x2 ${2 * k}, ${2 * k}, m;", f"sub.f16x2 ${2 * k + 1}, ${2 * k + 1}, m;"]
            continue
        # 1024 + f * 2^(k * bits)  ->  f: multiply by 2^-(k * bits), add -1024 * 2^-(k * bits).
        scale, offset = (_half_pair(x * 2.0 ** -(k * bits)) for x in (1.0, -1024.0))
        lines += [f"mov.b32 s, {scale:#010x};", f"mov.b32 o, {offset:#010x};"]
        lines += [f"fma.rn.f16x2 ${2 * k + i}, ${2 * k + i}, s, o;" for i in (0, 1)]
    return "\n".join(lines + ["}"])


_INT4_TO_F16 = tl.constexpr(_bit_fields_to_f16(4))
_INT2_TO_F16 = tl.constexpr(_bit_fields_to_f16(2))


def _word_to_f16(convert: str) -> str:
    """PTX turning one 32-bit word of four 8-bit codes into four float16 codes (16-bit outputs $0..$3,
    first code in the low byte), given the PTX that turns the word ``w`` into two f16x2 words ``a``
    (codes 0, 1) and ``b`` (codes 2, 3)."""
    return "\n".join(["{", ".reg .b32 w, a, b, t, bias;", ".reg .b16 lo, hi;", "mov.b32 w, $4;", convert,
                      "mov.b32 {$0, $1}, a;", "mov.b32 {$2, $3}, b;", "}"])


# Value tiles are transposed on their way to the tensor cores; converted first, they travel as float16
# (ldmatrix.trans) instead of byte by byte.
_WORD_INT8_TO_F16 = tl.constexpr(_word_to_f16(
    "xor.b32 t, w, 0x80808080;\nprmt.b32 a, t, 0x64646464, 0x4140;\nprmt.b32 b, t, 0x64646464, 0x4342;\n"
    "mov.b32 bias, 0x64806480;\nsub.f16x2 a, a, bias;\nsub.f16x2 b, b, bias;"))
_WORD_E4M3_TO_F16 = tl.constexpr(_word_to_f16(
    "mov.b32 {lo, hi}, w;\ncvt.rn.f16x2.e4m3x2 a, lo;\ncvt.rn.f16x2.e4m3x2 b, hi;"))
_WORD_E5M2_TO_F16 = tl.constexpr(_word_to_f16(
    "mov.b32 {lo, hi}, w;\ncvt.rn.f16x2.e5m2x2 a, lo;\ncvt.rn.f16x2.e5m2x2 b, hi;"))


@triton.jit
def _words_to_f16(words, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM, "=h,=h,=h,=h,r", [words],
                                               dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                               is_pure=True, pack=1)
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK_N, BLOCK_D])


@triton.jit
def _value_codes_f16(codes, tok, ok, offs_d, d_ok, stride_ct, D: tl.constexpr, KIND: tl.constexpr,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                     WORDS: tl.constexpr, INTERPRET: tl.constexpr):
    """:func:`_codes_f16` of a value tile. With ``WORDS`` (8-bit codes whose rows and slices are 4-byte
    aligned, on the GPU) the codes are read as 32-bit words and converted four at a time, so that the
    compiler transposes float16 (ldmatrix) rather than single bytes."""
    if not WORDS:
        raw = _raw_codes(codes, tok, ok, offs_d, d_ok, stride_ct, D, KIND, BITS, BLOCK_D, MASKED)
        return _codes_f16(raw, KIND, BITS, BLOCK_N, BLOCK_D, INTERPRET)
    else:
        cols = tl.arange(0, BLOCK_D // 4)
        ptrs = codes.to(tl.pointer_type(tl.int32)) + tok[:, None] * (stride_ct // 4) + cols[None, :]
        if MASKED:
            words = tl.load(ptrs, mask=ok[:, None] & (cols < D // 4)[None, :], other=0)
        elif D == BLOCK_D:
            words = tl.load(ptrs)
        else:
            words = tl.load(ptrs, mask=(cols < D // 4)[None, :], other=0)
        if KIND == 0:
            return _words_to_f16(words, _WORD_INT8_TO_F16, BLOCK_N, BLOCK_D)
        elif KIND == 1:
            return _words_to_f16(words, _WORD_E4M3_TO_F16, BLOCK_N, BLOCK_D)
        else:
            return _words_to_f16(words, _WORD_E5M2_TO_F16, BLOCK_N, BLOCK_D)


@triton.jit
def _raw_codes(codes, tok, ok, offs_d, d_ok, stride_ct, D: tl.constexpr, KIND: tl.constexpr,
               BITS: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """The stored bytes of tokens ``tok``: int8 codes, fp8 bit patterns (uint8) or packed bytes
    ``[BLOCK_N, BLOCK_D / per_byte]`` (see :func:`_byte_columns`). fp8 codes arrive as bytes (a masked
    fp8 load has no ``other`` in the interpreter)."""
    if KIND == 2:
        PER: tl.constexpr = 8 // BITS
        return _byte_columns(codes, tok, ok, stride_ct, (D + PER - 1) // PER, BLOCK_D // PER, MASKED)
    else:
        return _byte_columns(codes, tok, ok, stride_ct, D, BLOCK_D, MASKED)


@triton.jit
def _byte_columns(codes, tok, ok, stride_ct, NCOLS: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr):
    """Columns ``0 .. COLS - 1`` of the code rows of tokens ``tok`` ``[BLOCK_N, COLS]``, of which the
    first ``NCOLS`` are stored; the others and, if ``MASKED``, rows not ``ok`` read as 0. Unmasked rows
    must lie in the store (whole tiles of it): they hold finite codes, and the softmax gives the tokens
    that are not ``ok`` zero weight."""
    cols = tl.arange(0, COLS)
    ptrs = codes + tok[:, None] * stride_ct + cols[None, :]
    if MASKED:
        raw = tl.load(ptrs, mask=ok[:, None] & (cols < NCOLS)[None, :], other=0)
    elif NCOLS == COLS:
        raw = tl.load(ptrs)
    else:
        raw = tl.load(ptrs, mask=(cols < NCOLS)[None, :], other=0)
    return raw


@triton.jit
def _codes_f32(raw, KIND: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The code values ``[BLOCK_N, BLOCK_D]`` in float32, exactly. Packed bytes are unpacked along a new
    last axis and flattened: byte j holds channels PER*j .. PER*j + PER - 1, the first in the low bits."""
    if KIND == 2:
        byte = raw.to(tl.int32)
        if BITS == 4:
            c = tl.join(byte & 15, byte >> 4)
        else:
            c = tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6))
        return _exact_float(tl.reshape(c, [BLOCK_N, BLOCK_D]), False)
    elif KIND == 0:
        return _exact_float(raw.to(tl.int32), True)
    elif KIND == 1:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return raw.to(tl.float8e5, bitcast=True).to(tl.float32)


@triton.jit
def _codes_f16(raw, KIND: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               INTERPRET: tl.constexpr):
    """The code values ``[BLOCK_N, BLOCK_D]`` in float16, exactly (every int8/int4/int2/fp8 code is a
    float16): PTX byte tricks on the GPU, :func:`_codes_f32` in the interpreter."""
    if INTERPRET:
        return _codes_f32(raw, KIND, BITS, BLOCK_N, BLOCK_D).to(tl.float16)
    elif KIND == 0:
        return tl.inline_asm_elementwise(_INT8_TO_F16, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True,
                                         pack=4)
    elif KIND == 1:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif KIND == 3:
        return raw.to(tl.float8e5, bitcast=True).to(tl.float16)
    elif BITS == 4:
        lo, hi = tl.inline_asm_elementwise(_INT4_TO_F16, "=r,=r,=r,=r,r", [raw],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_D])
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(_INT2_TO_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [raw],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=4)
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK_N, BLOCK_D])


@triton.jit
def _fields_f16(raw, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """The bit fields of packed bytes ``raw`` as float16 codes ``(f0, f1, f2, f3)``, each shaped like
    ``raw``: field ``k`` holds bits ``k * BITS`` and up of every byte, the channels ``per_byte * j + k``
    of byte column ``j`` (int4 has two fields; f2 and f3 repeat f0 and f1). The fields are never
    interleaved back into channel order (no join or reshape): the key scores take one dot per field."""
    if INTERPRET:
        byte = raw.to(tl.int32)
        MASK: tl.constexpr = (1 << BITS) - 1
        f0 = _exact_float(byte & MASK, False).to(tl.float16)
        f1 = _exact_float((byte >> BITS) & MASK, False).to(tl.float16)
        if BITS == 2:
            return f0, f1, _exact_float((byte >> 4) & 3, False).to(tl.float16), \
                _exact_float(byte >> 6, False).to(tl.float16)
        return f0, f1, f0, f1
    elif BITS == 4:
        lo, hi = tl.inline_asm_elementwise(_INT4_TO_F16, "=r,=r,=r,=r,r", [raw],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        return lo, hi, lo, hi
    else:
        return tl.inline_asm_elementwise(_INT2_TO_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r", [raw],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                         is_pure=True, pack=4)


@triton.jit
def _query_fields(qrow, row_ok, q_max, D: tl.constexpr, BITS: tl.constexpr, FW: tl.constexpr,
                  NORMALIZED: tl.constexpr):
    """The query channels that meet each field of packed keys (:func:`_fields_f16`): field ``k`` is
    ``q[:, per_byte * j + k]`` ``[BLOCK_M, FW]`` for ``j < FW`` (0 past ``D``), in q's dtype, or in
    float32 divided by ``q_max`` if ``NORMALIZED``. ``qrow``: pointers to the query rows."""
    PER: tl.constexpr = 8 // BITS
    ch = PER * tl.arange(0, FW)
    f0 = _query_field(qrow, row_ok, ch, q_max, D, NORMALIZED)
    f1 = _query_field(qrow, row_ok, ch + 1, q_max, D, NORMALIZED)
    if BITS == 2:
        return f0, f1, _query_field(qrow, row_ok, ch + 2, q_max, D, NORMALIZED), \
            _query_field(qrow, row_ok, ch + 3, q_max, D, NORMALIZED)
    return f0, f1, f0, f1


@triton.jit
def _query_field(qrow, row_ok, ch, q_max, D: tl.constexpr, NORMALIZED: tl.constexpr):
    x = tl.load(qrow + ch[None, :], mask=row_ok[:, None] & (ch < D)[None, :], other=0.0)
    if NORMALIZED:
        x = x.to(tl.float32) / q_max[:, None]
    return x


@triton.jit
def _mm(a, b, INTERPRET: tl.constexpr):
    """``tl.dot`` with float32 accumulation; in float32 in the interpreter, whose bfloat16 dot is wrong."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _vector(ptrs, ok, MASKED: tl.constexpr):
    """float32 values at ``ptrs``; 0 where not ``ok`` if ``MASKED``."""
    if MASKED:
        x = tl.load(ptrs, mask=ok, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def _key_scores(q, qn, q_max, codes, scale, tok, ok, offs_d, d_ok, tile_start, stride_ct, stride_st,
                D: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, SMODE: tl.constexpr,
                ROW_DIV: tl.constexpr, COL_DIV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    """``q k^T`` ``[BLOCK_M, BLOCK_N]`` (float32) for a tile of 8-bit quantized keys (int8, fp8).

    The scales are folded in rather than applied to every key element. Per-channel scales (one row
    ``s`` per tile): ``q . (c s) = (q s) . c``, with ``q s`` formed in float16 from ``qn = q / max|q|``
    (per query row) and ``s / max(s)`` (both at most 1), the maxima multiplied back after the dot.
    Per-token scales: ``q . (c s_t) = s_t (q . c)``. Other layouts (channel groups of per-token scales,
    odd groups) dequantize the tile in registers.
    """
    raw = _raw_codes(codes, tok, ok, offs_d, d_ok, stride_ct, D, KIND, BITS, BLOCK_D, MASKED)
    if SMODE == 0:
        s = _vector(scale + (tile_start // ROW_DIV) * stride_st + offs_d, d_ok, D != BLOCK_D)
        top = tl.max(s, 0)
        top = tl.where(top > 0, top, 1.0)
        qs = (qn * (s * (1.0 / top))[None, :]).to(tl.float16)
        out = _mm(qs, tl.trans(_codes_f16(raw, KIND, BITS, BLOCK_N, BLOCK_D, INTERPRET)), INTERPRET)
        return out * (top * q_max)[:, None]
    elif SMODE == 1:
        c = _codes_f16(raw, KIND, BITS, BLOCK_N, BLOCK_D, INTERPRET)
        out = _mm(qn.to(tl.float16), tl.trans(c), INTERPRET)
        return out * q_max[:, None] * _vector(scale + tok * stride_st, ok, MASKED)[None, :]
    else:
        k = _codes_f32(raw, KIND, BITS, BLOCK_N, BLOCK_D) * _scales(
            scale, tok, ok, offs_d, d_ok, tile_start, stride_st, SMODE, ROW_DIV, COL_DIV, BLOCK_N, BLOCK_D)
        return _mm(q, tl.trans(_rounded(k, q.dtype, INTERPRET)), INTERPRET)


@triton.jit
def _packed_key_scores(q, q0, q1, q2, q3, q_max, q_sum, codes, scale, zero, tok, ok, offs_d, d_ok, tile_start,
                       stride_ct, stride_st, D: tl.constexpr, BITS: tl.constexpr, SMODE: tl.constexpr,
                       ROW_DIV: tl.constexpr, COL_DIV: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, FW: tl.constexpr, MASKED: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """:func:`_key_scores` for packed int4/int2 keys (asymmetric: ``k = c s + z``), one dot per bit
    field: ``q . k = sum_k q_k . c_k`` with ``q_k`` the channels of field ``k``
    (:func:`_query_fields`: normalized for per-channel and per-token scales, else in q's dtype), so
    the codes are never interleaved back into channel order. ``FW`` (at least 16, a dot's least depth):
    byte columns per tile row. Zero points: ``q . z`` for a per-channel row, ``sum(q) z_t`` per token.
    """
    PER: tl.constexpr = 8 // BITS
    raw = _byte_columns(codes, tok, ok, stride_ct, (D + PER - 1) // PER, FW, MASKED)
    f0, f1, f2, f3 = _fields_f16(raw, BITS, INTERPRET)
    ch = PER * tl.arange(0, FW)
    if SMODE == 0:
        row = (tile_start // ROW_DIV) * stride_st
        s0 = _vector(scale + row + ch, ch < D, True)
        s1 = _vector(scale + row + ch + 1, ch + 1 < D, True)
        top = tl.maximum(tl.max(s0, 0), tl.max(s1, 0))
        if BITS == 2:
            s2 = _vector(scale + row + ch + 2, ch + 2 < D, True)
            s3 = _vector(scale + row + ch + 3, ch + 3 < D, True)
            top = tl.maximum(top, tl.maximum(tl.max(s2, 0), tl.max(s3, 0)))
        top = tl.where(top > 0, top, 1.0)
        inv = 1.0 / top
        out = _mm((q0 * (s0 * inv)[None, :]).to(tl.float16), tl.trans(f0), INTERPRET)
        out += _mm((q1 * (s1 * inv)[None, :]).to(tl.float16), tl.trans(f1), INTERPRET)
        if BITS == 2:
            out += _mm((q2 * (s2 * inv)[None, :]).to(tl.float16), tl.trans(f2), INTERPRET)
            out += _mm((q3 * (s3 * inv)[None, :]).to(tl.float16), tl.trans(f3), INTERPRET)
        out = out * (top * q_max)[:, None]
        z = _vector(zero + row + offs_d, d_ok, D != BLOCK_D)
        return out + tl.sum(q.to(tl.float32) * z[None, :], 1)[:, None]
    elif SMODE == 1:
        out = _mm(q0.to(tl.float16), tl.trans(f0), INTERPRET)
        out += _mm(q1.to(tl.float16), tl.trans(f1), INTERPRET)
        if BITS == 2:
            out += _mm(q2.to(tl.float16), tl.trans(f2), INTERPRET)
            out += _mm(q3.to(tl.float16), tl.trans(f3), INTERPRET)
        at = tok * stride_st
        out = out * q_max[:, None] * _vector(scale + at, ok, MASKED)[None, :]
        return out + q_sum[:, None] * _vector(zero + at, ok, MASKED)[None, :]
    else:
        out = _dequantized_scores(q0, f0, scale, zero, tok, ok, ch, stride_st, D, ROW_DIV, COL_DIV, BLOCK_N,
                                  FW, INTERPRET)
        out += _dequantized_scores(q1, f1, scale, zero, tok, ok, ch + 1, stride_st, D, ROW_DIV, COL_DIV,
                                   BLOCK_N, FW, INTERPRET)
        if BITS == 2:
            out += _dequantized_scores(q2, f2, scale, zero, tok, ok, ch + 2, stride_st, D, ROW_DIV, COL_DIV,
                                       BLOCK_N, FW, INTERPRET)
            out += _dequantized_scores(q3, f3, scale, zero, tok, ok, ch + 3, stride_st, D, ROW_DIV, COL_DIV,
                                       BLOCK_N, FW, INTERPRET)
        return out


@triton.jit
def _dequantized_scores(qk, f, scale, zero, tok, ok, ch, stride_st, D: tl.constexpr, ROW_DIV: tl.constexpr,
                        COL_DIV: tl.constexpr, BLOCK_N: tl.constexpr, FW: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """``qk . (c s + z)`` for a field of packed codes ``f`` (channels ``ch``) and the matching query
    channels ``qk``, the keys dequantized in q's dtype with the scale and zero point of each element
    gathered at row ``token // ROW_DIV``, column ``channel // COL_DIV``."""
    s = _scales(scale, tok, ok, ch, ch < D, 0, stride_st, 3, ROW_DIV, COL_DIV, BLOCK_N, FW)
    z = _scales(zero, tok, ok, ch, ch < D, 0, stride_st, 3, ROW_DIV, COL_DIV, BLOCK_N, FW)
    return _mm(qk, tl.trans(_rounded(f.to(tl.float32) * s + z, qk.dtype, INTERPRET)), INTERPRET)


@triton.jit
def _value_product(p, codes, scale, zero, tok, ok, offs_d, d_ok, tile_start, stride_ct, stride_st,
                   dtype: tl.constexpr, D: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                   SMODE: tl.constexpr, ROW_DIV: tl.constexpr, COL_DIV: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, WORDS: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """``p v`` ``[BLOCK_M, BLOCK_D]`` (float32) for softmax weights ``p`` (float32, in [0, 1]) and a tile
    of quantized values, scales folded in as in :func:`_key_scores`: per-token scales into ``p``
    (``p s_t / max(s_t)`` in float16), per-channel scales onto the product's columns."""
    if SMODE == 1:
        at = tok * stride_st
        s = _vector(scale + at, ok, MASKED)
        top = tl.max(s, 0)
        ps = (p * (s * (1.0 / tl.where(top > 0, top, 1.0)))[None, :]).to(tl.float16)
        c = _value_codes_f16(codes, tok, ok, offs_d, d_ok, stride_ct, D, KIND, BITS, BLOCK_N, BLOCK_D, MASKED,
                             WORDS, INTERPRET)
        out = _mm(ps, c, INTERPRET) * tl.where(top > 0, top, 1.0)
        if KIND == 2:
            out += tl.sum(p * _vector(zero + at, ok, MASKED)[None, :], 1)[:, None]
        return out
    elif SMODE == 0:
        row = (tile_start // ROW_DIV) * stride_st + offs_d
        c = _value_codes_f16(codes, tok, ok, offs_d, d_ok, stride_ct, D, KIND, BITS, BLOCK_N, BLOCK_D, MASKED,
                             WORDS, INTERPRET)
        out = _mm(p.to(tl.float16), c, INTERPRET) * _vector(scale + row, d_ok, D != BLOCK_D)[None, :]
        if KIND == 2:
            out += tl.sum(p, 1)[:, None] * _vector(zero + row, d_ok, D != BLOCK_D)[None, :]
        return out
    else:
        raw = _raw_codes(codes, tok, ok, offs_d, d_ok, stride_ct, D, KIND, BITS, BLOCK_D, MASKED)
        v = _codes_f32(raw, KIND, BITS, BLOCK_N, BLOCK_D) * _scales(
            scale, tok, ok, offs_d, d_ok, tile_start, stride_st, SMODE, ROW_DIV, COL_DIV, BLOCK_N, BLOCK_D)
        if KIND == 2:
            v += _scales(zero, tok, ok, offs_d, d_ok, tile_start, stride_st, SMODE, ROW_DIV, COL_DIV,
                         BLOCK_N, BLOCK_D)
        return _mm(_rounded(p, dtype, INTERPRET), _rounded(v, dtype, INTERPRET), INTERPRET)


@triton.jit
def _value_fields(p, codes, scale, zero, tok, ok, tile_start, stride_ct, stride_st, D: tl.constexpr,
                  BITS: tl.constexpr, SMODE: tl.constexpr, ROW_DIV: tl.constexpr, FW: tl.constexpr,
                  MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    """``p v`` for a tile of packed int4/int2 values, one product per bit field: ``(o0, o1, o2, o3)``,
    each ``[BLOCK_M, FW]`` float32, ``o_k`` holding channels ``per_byte * j + k`` (int4: o2 and o3
    repeat o0 and o1). The codes go to the dots as :func:`_fields_f16` extracts them, never
    interleaved into channel order; the accumulators stay split by field until the output is stored.
    Scales fold as in :func:`_value_product`: per-token into ``p`` (``SMODE`` 1), a per-channel row
    onto each field's columns (``SMODE`` 0); zero points add ``sum(p z)``."""
    PER: tl.constexpr = 8 // BITS
    raw = _byte_columns(codes, tok, ok, stride_ct, (D + PER - 1) // PER, FW, MASKED)
    f0, f1, f2, f3 = _fields_f16(raw, BITS, INTERPRET)
    if SMODE == 1:
        at = tok * stride_st
        s = _vector(scale + at, ok, MASKED)
        top = tl.max(s, 0)
        top = tl.where(top > 0, top, 1.0)
        ps = (p * (s * (1.0 / top))[None, :]).to(tl.float16)
        zp = tl.sum(p * _vector(zero + at, ok, MASKED)[None, :], 1)[:, None]
        o0 = _mm(ps, f0, INTERPRET) * top + zp
        o1 = _mm(ps, f1, INTERPRET) * top + zp
        if BITS == 2:
            o2 = _mm(ps, f2, INTERPRET) * top + zp
            o3 = _mm(ps, f3, INTERPRET) * top + zp
        else:
            o2 = o0
            o3 = o1
    else:
        row = (tile_start // ROW_DIV) * stride_st
        ch = PER * tl.arange(0, FW)
        pf = p.to(tl.float16)
        psum = tl.sum(p, 1)[:, None]
        o0 = _channel_field(pf, f0, psum, scale + row, zero + row, ch, D, INTERPRET)
        o1 = _channel_field(pf, f1, psum, scale + row, zero + row, ch + 1, D, INTERPRET)
        if BITS == 2:
            o2 = _channel_field(pf, f2, psum, scale + row, zero + row, ch + 2, D, INTERPRET)
            o3 = _channel_field(pf, f3, psum, scale + row, zero + row, ch + 3, D, INTERPRET)
        else:
            o2 = o0
            o3 = o1
    return o0, o1, o2, o3


@triton.jit
def _channel_field(pf, f, psum, scale_row, zero_row, ch, D: tl.constexpr, INTERPRET: tl.constexpr):
    """``p v`` for one bit field ``f`` of packed values with a per-channel scale row: ``(p c) s + sum(p)
    z`` at the field's channels ``ch``; ``pf``: the weights in float16, ``psum``: their row sums."""
    s = _vector(scale_row + ch, ch < D, True)
    z = _vector(zero_row + ch, ch < D, True)
    return _mm(pf, f, INTERPRET) * s[None, :] + psum * z[None, :]


@triton.jit
def _window_field(pw, wv, w, ok, stride_wvt, ch, D: tl.constexpr, INTERPRET: tl.constexpr):
    """``p v`` over the channels ``ch`` of a window tile (full-precision values), ``pw`` already in the
    values' dtype."""
    v = tl.load(wv + w[:, None] * stride_wvt + ch[None, :], mask=ok[:, None] & (ch < D)[None, :], other=0.0)
    return _mm(pw, v, INTERPRET)


@triton.jit
def _store_columns(ptrs, o, ch, row_ok, D: tl.constexpr, INTERPRET: tl.constexpr):
    """Store ``o [BLOCK_M, FW]`` (float32) at the channels ``ch`` of the rows ``ptrs`` point to, in the
    element type behind ``ptrs``."""
    tl.store(ptrs + ch[None, :], _rounded(o, ptrs.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & (ch < D)[None, :])


@triton.jit
def _clock(dummy):
    """The GPU's global nanosecond timer (profiling only; ``dummy``: any scalar, for the shape)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _softmax_step(s, tok, ok, qpos, m_i, l_i):
    """Online softmax over a tile of scores ``s`` (already times ``scale * log2(e)``): masks the keys a
    query may not see, returns the new max and sum, the weights ``p`` and the rescale of the old
    accumulator."""
    s = tl.where(ok[None, :] & (tok[None, :] <= qpos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


# The token counts change every step: specializing on them (divisibility by 16, == 1) would compile
# new variants as decoding goes on.
@triton.jit(do_not_specialize=["n_quant", "n_window", "chunk", "num_splits", "rep", "lq"])
def _decode_kernel(
    Q, Out, MidO, MidL,
    KC, KS, KZ, VC, VS, VZ, WK, WV,
    Start, End, Timeline,
    qk_scale, n_quant, n_window, chunk, num_splits, num_kv_heads, rep, lq,
    stride_qb, stride_qh, stride_qm,
    stride_ob, stride_oh, stride_om,
    stride_kcb, stride_kch, stride_kct,
    stride_ksb, stride_ksh, stride_kst,
    stride_vcb, stride_vch, stride_vct,
    stride_vsb, stride_vsh, stride_vst,
    stride_wkb, stride_wkh, stride_wkt,
    stride_wvb, stride_wvh, stride_wvt,
    D: tl.constexpr,
    K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_SMODE: tl.constexpr,
    K_ROW_DIV: tl.constexpr, K_COL_DIV: tl.constexpr, K_FW: tl.constexpr,
    V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_SMODE: tl.constexpr,
    V_ROW_DIV: tl.constexpr, V_COL_DIV: tl.constexpr,
    HAS_START: tl.constexpr, HAS_END: tl.constexpr, SPLIT: tl.constexpr, MASKED: tl.constexpr,
    V_WORDS: tl.constexpr, V_FIELDS: tl.constexpr, V_FW: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TIMELINE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    if TIMELINE:
        started = _clock(pid_bh)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < rep * lq
    head = h * rep + rows // lq
    qi = rows % lq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    end = n_quant + n_window
    if HAS_END:
        end = tl.minimum(tl.load(End + b).to(tl.int32), end)
    begin = 0
    if HAS_START:
        begin = tl.load(Start + b).to(tl.int32)
    qpos = tl.where(row_ok, end - lq + qi, -1)

    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    dtype = Q.dtype.element_ty
    # Forms of q for the folded scales (see _key_scores): q / max|q| per row, and each row's sum.
    q32 = q.to(tl.float32)
    q_max = tl.max(tl.abs(q32), 1)
    q_max = tl.where(q_max > 0, q_max, 1.0)
    qn = q32 / q_max[:, None]
    q_sum = tl.sum(q32, 1)
    if K_KIND == 2:
        qrow = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm
        q0, q1, q2, q3 = _query_fields(qrow, row_ok, q_max, D, K_BITS, K_FW, K_SMODE <= 1)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if V_FIELDS:
        # The accumulator split by the values' bit fields, acc_k holding channels PER * j + k.
        V_PER: tl.constexpr = 8 // V_BITS
        ch = V_PER * tl.arange(0, V_FW)
        acc0 = tl.zeros([BLOCK_M, V_FW], tl.float32)
        acc1 = tl.zeros([BLOCK_M, V_FW], tl.float32)
        acc2 = tl.zeros([BLOCK_M, V_FW], tl.float32)
        acc3 = tl.zeros([BLOCK_M, V_FW], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # This split's tokens, less those before the row's first valid token (whole tiles only, so that a
    # tile never straddles two blocks of per-channel scales).
    lo = split * chunk
    hi = tl.minimum(lo + chunk, end)
    lo = tl.maximum(lo, begin // BLOCK_N * BLOCK_N)

    kc = KC + b * stride_kcb + h * stride_kch
    ks = KS + b * stride_ksb + h * stride_ksh
    kz = KZ + b * stride_ksb + h * stride_ksh
    vc = VC + b * stride_vcb + h * stride_vch
    vs = VS + b * stride_vsb + h * stride_vsh
    vz = VZ + b * stride_vsb + h * stride_vsh
    q_hi = tl.minimum(hi, n_quant)
    for t0 in range(lo, q_hi, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        ok = (tok < q_hi) & (tok >= begin)
        if K_KIND == 2:
            s = _packed_key_scores(q, q0, q1, q2, q3, q_max, q_sum, kc, ks, kz, tok, ok, offs_d, d_ok, t0,
                                   stride_kct, stride_kst, D, K_BITS, K_SMODE, K_ROW_DIV, K_COL_DIV, BLOCK_N,
                                   BLOCK_D, K_FW, MASKED, INTERPRET)
        else:
            s = _key_scores(q, qn, q_max, kc, ks, tok, ok, offs_d, d_ok, t0, stride_kct, stride_kst, D,
                            K_KIND, K_BITS, K_SMODE, K_ROW_DIV, K_COL_DIV, BLOCK_N, BLOCK_D, MASKED,
                            INTERPRET)
        m_i, l_i, p, alpha = _softmax_step(s * qk_scale, tok, ok, qpos, m_i, l_i)
        if V_FIELDS:
            o0, o1, o2, o3 = _value_fields(p, vc, vs, vz, tok, ok, t0, stride_vct, stride_vst, D, V_BITS,
                                           V_SMODE, V_ROW_DIV, V_FW, MASKED, INTERPRET)
            acc0 = acc0 * alpha[:, None] + o0
            acc1 = acc1 * alpha[:, None] + o1
            if V_BITS == 2:
                acc2 = acc2 * alpha[:, None] + o2
                acc3 = acc3 * alpha[:, None] + o3
        else:
            acc = acc * alpha[:, None] + _value_product(
                p, vc, vs, vz, tok, ok, offs_d, d_ok, t0, stride_vct, stride_vst, dtype, D,
                V_KIND, V_BITS, V_SMODE, V_ROW_DIV, V_COL_DIV, BLOCK_N, BLOCK_D, MASKED, V_WORDS, INTERPRET)

    wk = WK + b * stride_wkb + h * stride_wkh
    wv = WV + b * stride_wvb + h * stride_wvh
    for t0 in range(tl.maximum(lo, n_quant), hi, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        ok = (tok < hi) & (tok >= begin)
        w = tok - n_quant
        mask = ok[:, None] & d_ok[None, :]
        k = tl.load(wk + w[:, None] * stride_wkt + offs_d[None, :], mask=mask, other=0.0)
        m_i, l_i, p, alpha = _softmax_step(_mm(q, tl.trans(k), INTERPRET) * qk_scale, tok, ok, qpos, m_i, l_i)
        pw = _rounded(p, dtype, INTERPRET)
        if V_FIELDS:
            acc0 = acc0 * alpha[:, None] + _window_field(pw, wv, w, ok, stride_wvt, ch, D, INTERPRET)
            acc1 = acc1 * alpha[:, None] + _window_field(pw, wv, w, ok, stride_wvt, ch + 1, D, INTERPRET)
            if V_BITS == 2:
                acc2 = acc2 * alpha[:, None] + _window_field(pw, wv, w, ok, stride_wvt, ch + 2, D, INTERPRET)
                acc3 = acc3 * alpha[:, None] + _window_field(pw, wv, w, ok, stride_wvt, ch + 3, D, INTERPRET)
        else:
            v = tl.load(wv + w[:, None] * stride_wvt + offs_d[None, :], mask=mask, other=0.0)
            acc = acc * alpha[:, None] + _mm(pw, v, INTERPRET)

    seen = l_i > 0
    l_seen = tl.where(seen, l_i, 1.0)
    l_safe = l_seen[:, None]
    if SPLIT:
        r = ((b * (num_kv_heads * rep) + head) * lq + qi) * num_splits + split
        lse = tl.where(seen, m_i + tl.log2(l_seen), float("-inf"))
        tl.store(MidL + r, lse, mask=row_ok)
        rows_out = MidO + r[:, None] * D
    else:
        rows_out = Out + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_om
    if TIMELINE:
        # Profiling only: the program's start and end (ns, %globaltimer) and its SM.
        at = Timeline + ((pid_bh * num_splits + split) * tl.num_programs(2) + pid_m).to(tl.int64) * 3
        tl.store(at, started)
        tl.store(at + 1, _clock(pid_bh))
        tl.store(at + 2, tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid_bh], dtype=tl.int32,
                                                   is_pure=False, pack=1).to(tl.int64))
    if V_FIELDS:
        _store_columns(rows_out, acc0 / l_safe, ch, row_ok, D, INTERPRET)
        _store_columns(rows_out, acc1 / l_safe, ch + 1, row_ok, D, INTERPRET)
        if V_BITS == 2:
            _store_columns(rows_out, acc2 / l_safe, ch + 2, row_ok, D, INTERPRET)
            _store_columns(rows_out, acc3 / l_safe, ch + 3, row_ok, D, INTERPRET)
    else:
        _store_columns(rows_out, acc / l_safe, offs_d, row_ok, D, INTERPRET)


@triton.jit(do_not_specialize=["num_splits", "lq"])
def _combine_kernel(MidO, MidL, Out, num_splits, num_heads, lq, stride_ob, stride_oh, stride_om,
                    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)`` with ``M = max_s lse_s``; zeros if no split
    saw a key."""
    r = tl.program_id(0).to(tl.int64)
    qi = r % lq
    head = (r // lq) % num_heads
    b = r // (lq * num_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < D
    lse = tl.load(MidL + r * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    seen = lse > float("-inf")
    top = tl.max(tl.where(seen, lse, -1.0e30), 0)
    w = tl.where(seen, tl.exp2(lse - top), 0.0)
    o = tl.load(MidO + (r * num_splits + offs_s)[:, None] * D + offs_d[None, :],
                mask=seen[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + head * stride_oh + qi * stride_om + offs_d,
             _rounded(out, Out.dtype.element_ty, INTERPRET), mask=d_ok)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _format_args(scheme: Scheme, group: int, head_dim: int, block_d: int, block_n: int) -> dict[str, int]:
    """The constexprs that describe how one format's codes and scales are read."""
    kind = {"e4m3": _E4M3, "e5m2": _E5M2, None: _INT8 if scheme.bits == 8 else _PACKED}[scheme.fp8]
    if scheme.axis == "channel":
        row_div, col_div = group, 1
        smode = _SCALE_TILE_ROW if group % block_n == 0 else _SCALE_GATHER
    else:
        cg = min(scheme.group or head_dim, head_dim)
        row_div, col_div = 1, cg
        if cg == head_dim:
            smode = _SCALE_TOKEN
        elif head_dim == block_d and cg & (cg - 1) == 0:
            smode = _SCALE_TOKEN_GROUPS
        else:
            smode = _SCALE_GATHER
    return {"KIND": kind, "BITS": scheme.bits, "SMODE": smode, "ROW_DIV": row_div, "COL_DIV": col_div}


def default_config(head_dim: int, group: int, key_scheme: Scheme, value_scheme: Scheme,
                   rows: int) -> KernelConfig:
    """Launch parameters for a head dimension and ``rows`` query rows per KV head (GQA heads x new
    tokens). Up to head dim 128 and 16 rows: one warp per program holding exactly the rows (rounded up to
    a power of two) and 32-token tiles (on an H100, B=8, 32 query / 8 KV heads, 32K tokens: int8 0.212 ms
    against 0.254 with 16-row, 2-warp, 64-token programs; int4 0.249 against 0.388; the 4-row 2-warp
    program 0.235 / 0.303). More rows: 2 warps, 64-token tiles. Head dims over 128: 8 warps, whose
    tiles fewer warps cannot hold in registers. Tiles divide the group of per-channel scales where they
    can (each tile reads one scale row). ``kernel="auto"``: the CUDA kernel where it applies."""
    per_channel = key_scheme.axis == "channel" or value_scheme.axis == "channel"
    if head_dim > 128:
        block_n, num_warps, block_m = 64, 8, None
    elif rows <= 16:
        block_n, num_warps, block_m = 32, 1, triton.next_power_of_2(max(rows, 1))
    else:
        block_n, num_warps, block_m = 64, 2, None
    # 16-token tiles only for 8-bit codes: packed int4/int2 tiles of 16 tokens gave wrong scores on an
    # H100 (Triton 3.6); their groups of 16 or 48 tokens read scales per element in larger tiles.
    smallest = 16 if min(key_scheme.bits, value_scheme.bits) == 8 else 32
    if per_channel and group % block_n:
        block_n = next((n for n in (32, 16) if smallest <= n < block_n and group % n == 0), block_n)
    return KernelConfig(block_n=block_n, num_warps=num_warps, block_m=block_m, kernel="auto")


def choose_splits(tokens: int, programs: int, block_n: int, device: torch.device,
                  num_warps: int, per_sm: int | None = None) -> tuple[int, int]:
    """``(num_splits, chunk)`` for ``programs`` programs per split: the split count whose programs take
    the least time by the model ``waves * (chunk + WAVE_COST_TOKENS)``, where a wave is the
    :data:`RESIDENT_PER_SM` programs of ``num_warps`` warps per SM that run at once and ``chunk`` the
    tokens of each program. Within a number of waves the most splits are best, so only the largest count
    of each wave count is tried, and the search stops once no count can beat the best (the cost is at
    least ``programs * (tokens + splits * WAVE_COST_TOKENS) / slots``, which grows with the splits). No
    split shorter than :data:`MIN_SPLIT_TOKENS`, at most :data:`MAX_SPLITS`; ``chunk`` is a whole number
    of tiles. ``per_sm``: programs one SM holds, if not :data:`RESIDENT_PER_SM`'s for ``num_warps``."""
    slots = (per_sm or RESIDENT_PER_SM.get(num_warps, 1)) * _sm_count(device)
    programs = max(programs, 1)
    most = max(1, min(MAX_SPLITS, math.ceil(tokens / MIN_SPLIT_TOKENS)))
    best: tuple[int, int, int] | None = None
    want = max(1, min(most, slots // programs))
    while True:
        splits, chunk = _chunked(tokens, want, block_n)
        cost = math.ceil(programs * splits / slots) * (chunk + WAVE_COST_TOKENS)
        if best is None or cost < best[0]:
            best = (cost, splits, chunk)
        if want == most or programs * (tokens + splits * WAVE_COST_TOKENS) >= best[0] * slots:
            return best[1], best[2]
        # The largest count of the next wave count.
        want = min(most, max(want + 1, math.ceil((want + 1) * programs / slots) * slots // programs))


def _chunked(tokens: int, splits: int, block_n: int) -> tuple[int, int]:
    chunk = block_n * math.ceil(max(tokens, 1) / (splits * block_n))
    return math.ceil(max(tokens, 1) / chunk), chunk


def _placeholder_store(scheme: Scheme, group: int, head_dim: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales ``[1, 1, 16, width]`` standing for an empty store: never read, but of the dtypes
    and row widths the store will have, and strides that Triton specializes alike (none equal to 1 but
    the last), so that the kernel compiled for the first steps (window only) is the one that reads the
    store once it holds blocks, rather than a second compile in the middle of generation."""
    _, code_width = scheme.code_shape(group, head_dim)
    _, scale_width = scheme.scale_shape(group, head_dim)
    return (torch.empty(1, 1, 16, code_width, dtype=scheme.code_dtype, device=device),
            torch.empty(1, 1, 16, scale_width, dtype=scheme.scale_dtype, device=device))


def _check_layout(*tensors: torch.Tensor | None) -> None:
    """The kernel indexes the last axis with stride 1, and one (batch row, head) slice in 32 bits."""
    for t in tensors:
        if t is None:
            continue
        if t.stride(-1) != 1:
            raise ValueError(f"decode attention needs a contiguous last axis; got strides {t.stride()}")
        if t.dim() == 4 and t.shape[2] * t.stride(2) >= 2**31:
            raise ValueError(f"a {tuple(t.shape)} cache buffer holds 2^31 or more elements per sequence and "
                             "head, more than the decode kernel indexes")


def decode_attention(
    q: torch.Tensor,
    key_codes: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    key_zero: torch.Tensor | None,
    value_codes: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    value_zero: torch.Tensor | None,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    num_quantized: int,
    num_window: int,
    key_scheme: Scheme,
    value_scheme: Scheme,
    group: int,
    scale: float,
    start: torch.Tensor | None = None,
    end: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    timeline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, Lq, D]`` over a quantized store plus a full-precision window.

    Args:
        q: float16/bfloat16 queries, last dim contiguous; ``Hq`` a multiple of the KV heads ``H``.
        key_codes, value_codes: ``[B, H, capT, ceil(D / per_byte)]``, valid ``[:, :, :num_quantized]``.
        key_scale, key_zero, value_scale, value_zero: ``[B, H, rows, sD]`` as
            :class:`kvpack.cache.QuantizedLayer` stores them (zero None for int8/fp8); all None while the
            store is empty (``num_quantized == 0``).
        window_keys, window_values: ``[B, H, capW, D]`` in q's dtype, valid ``[:, :, :num_window]``.
        num_quantized, num_window: tokens in the store (a multiple of ``group``) and in the window.
        key_scheme, value_scheme: the block formats; ``group``: tokens per quantized block.
        scale: softmax scale.
        start, end: optional int tensors ``[B]``: row ``b`` attends to tokens ``[start_b, end_b)``; its
            queries are its last ``Lq`` valid tokens (causal among themselves).
        config: tile sizes and splits (default: :func:`default_config`, :func:`choose_splits`).
        out: optional ``[B, Hq, Lq, D]`` tensor in q's dtype to write into.
        timeline: profiling on a GPU: an int64 tensor of at least ``3 * programs`` elements that receives
            each program's start and end time (ns) and SM, program ``(bh, split, m)`` at
            ``((bh * splits + split) * row_blocks + m) * 3`` (see ``benchmarks/decode_overhead.py``).

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype.
    """
    bsz, hq, lq, d = q.shape
    hkv = window_keys.shape[1]
    block_d = max(16, triton.next_power_of_2(d))
    rows = hq // hkv * lq
    config = config or default_config(d, group, key_scheme, value_scheme, rows)
    if (config.block_n < MIN_PACKED_BLOCK_N and min(key_scheme.bits, value_scheme.bits) < 8
            and not triton_interpreted()):
        raise ValueError(f"block_n={config.block_n}: packed int4/int2 codes need tiles of at least "
                         f"{MIN_PACKED_BLOCK_N} tokens on a GPU (16-token tiles give wrong scores there)")
    store = (key_codes, key_scale, key_zero, value_codes, value_scale, value_zero)
    tokens = num_quantized + num_window
    cuda = takes_cuda_kernel(q, store, window_keys, tokens, key_scheme, value_scheme, group, config, timeline,
                             window_values)
    block_m = config.block_m or max(MIN_BLOCK_M, min(MAX_BLOCK_M, triton.next_power_of_2(rows)))
    row_blocks = 1 if cuda else triton.cdiv(rows, block_m)
    block_n = cuda_decode.TILE if cuda else config.block_n
    if config.num_splits is None:
        per_sm = cuda_decode.resident_per_sm(d, q.dtype, cuda_decode.device_index(q)) if cuda else None
        splits, chunk = choose_splits(tokens, bsz * hkv * row_blocks, block_n, q.device, config.num_warps,
                                      per_sm)
    else:
        splits, chunk = _chunked(tokens, config.num_splits, block_n)
    stamps = 3 * bsz * hkv * splits * row_blocks
    if timeline is not None and (triton_interpreted() or timeline.dtype != torch.int64
                                 or timeline.numel() < stamps):
        raise ValueError(f"timeline needs a GPU and an int64 tensor of {stamps} or more elements")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if splits > 1:
        mid_o = torch.empty(bsz, hq, lq, splits, d, dtype=torch.float32, device=q.device)
        mid_l = torch.empty(bsz, hq, lq, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_l = out
    if cuda:
        _check_layout(q, *store, window_keys, window_values)
        cuda_decode.launch(q, out, mid_o, mid_l, store, window_keys, window_values, start, end,
                           scale * math.log2(math.e), num_quantized, num_window, splits, group)
    else:
        _launch_triton(q, out, mid_o, mid_l, store, window_keys, window_values, num_quantized, num_window,
                       key_scheme, value_scheme, group, scale, start, end, config, timeline, splits, chunk,
                       row_blocks, block_m, block_d)
    if splits > 1:
        _combine_kernel[(bsz * hq * lq,)](
            mid_o, mid_l, out, splits, hq, lq, *out.stride()[:3],
            D=d, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
            INTERPRET=triton_interpreted(), num_warps=4 if block_d <= 128 else 8,
        )
    return out


def takes_cuda_kernel(q: torch.Tensor, store: tuple[torch.Tensor | None, ...], window_keys: torch.Tensor,
                      tokens: int, key_scheme: Scheme, value_scheme: Scheme, group: int,
                      config: KernelConfig, timeline: torch.Tensor | None = None,
                      window_values: torch.Tensor | None = None) -> bool:
    """Whether :func:`decode_attention` runs the CUDA C kernel (:mod:`kvpack.cuda.decode`) for this call,
    per ``config.kernel`` (``auto``: where it applies and the call streams at least
    :data:`CUDA_MIN_WORK` token-heads; ``cuda`` where it cannot: a ValueError). ``store``: the key
    codes, scale, zero, value codes, scale, zero; ``tokens``: quantized plus window tokens;
    ``window_values`` (with ``window_keys``): checked for the 16-byte rows the CUDA kernel reads."""
    bsz, hq, lq, _ = q.shape
    hkv = window_keys.shape[1]
    if config.kernel == "triton" or (config.kernel == "auto" and bsz * hkv * tokens < CUDA_MIN_WORK):
        return False
    rows = hq // hkv * lq
    if timeline is not None:
        reason = "the timeline records the Triton kernel's programs"
    elif triton_interpreted():
        reason = "Triton's interpreter is on (TRITON_INTERPRET=1)"
    else:
        window = (window_keys,) if window_values is None else (window_keys, window_values)
        reason = cuda_decode.why_not(q, key_scheme, value_scheme, group, rows, store, window)
    if reason is not None and config.kernel == "cuda":
        raise ValueError(f"the CUDA decode kernel cannot take this call: {reason}")
    return reason is None


def _launch_triton(q: torch.Tensor, out: torch.Tensor, mid_o: torch.Tensor, mid_l: torch.Tensor,
                   store: tuple[torch.Tensor | None, ...], window_keys: torch.Tensor,
                   window_values: torch.Tensor, num_quantized: int, num_window: int, key_scheme: Scheme,
                   value_scheme: Scheme, group: int, scale: float, start: torch.Tensor | None,
                   end: torch.Tensor | None, config: KernelConfig, timeline: torch.Tensor | None, splits: int,
                   chunk: int, row_blocks: int, block_m: int, block_d: int) -> None:
    bsz, hq, lq, d = q.shape
    hkv = window_keys.shape[1]
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = store
    if key_codes is None or value_codes is None:
        # An empty store (nothing flushed yet) is never read, but its pointers' element types still pick
        # the code paths that are compiled (an fp16 placeholder for int8 codes is no valid kernel).
        key_codes, key_scale = _placeholder_store(key_scheme, group, d, q.device)
        value_codes, value_scale = _placeholder_store(value_scheme, group, d, q.device)
        key_zero = value_zero = None
    _check_layout(q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, window_keys,
                  window_values)
    # fp8 codes travel as bytes (see _raw_codes).
    key_codes, value_codes = (c.view(torch.uint8) if c.dtype in FP8_DTYPES.values() else c
                              for c in (key_codes, value_codes))
    words = (value_codes.element_size() == 1 and value_scheme.bits == 8 and d % 4 == 0
             and value_codes.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in value_codes.stride()[:3]))
    kfmt = _format_args(key_scheme, group, d, block_d, config.block_n)
    vfmt = _format_args(value_scheme, group, d, block_d, config.block_n)
    fields = (config.value_fields and vfmt["KIND"] == _PACKED
              and vfmt["SMODE"] in (_SCALE_TILE_ROW, _SCALE_TOKEN))
    _decode_kernel[(bsz * hkv, splits, row_blocks)](
        q, out, mid_o, mid_l,
        key_codes, key_scale, key_scale if key_zero is None else key_zero,
        value_codes, value_scale, value_scale if value_zero is None else value_zero,
        window_keys, window_values,
        q if start is None else start, q if end is None else end,  # q: a placeholder, never read
        q if timeline is None else timeline,
        scale * math.log2(math.e), num_quantized, num_window, chunk, splits, hkv, hq // hkv, lq,
        *q.stride()[:3], *out.stride()[:3],
        *key_codes.stride()[:3], *key_scale.stride()[:3],
        *value_codes.stride()[:3], *value_scale.stride()[:3],
        *window_keys.stride()[:3], *window_values.stride()[:3],
        D=d,
        **{f"K_{k}": v for k, v in kfmt.items()}, **{f"V_{k}": v for k, v in vfmt.items()},
        K_FW=max(16, block_d // key_scheme.per_byte),
        HAS_START=start is not None, HAS_END=end is not None, SPLIT=splits > 1,
        MASKED=group % config.block_n != 0, V_WORDS=words and not triton_interpreted(),
        V_FIELDS=fields,
        V_FW=max(16, block_d // value_scheme.per_byte),
        INTERPRET=triton_interpreted(),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, TIMELINE=timeline is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({} if config.maxnreg is None else {"maxnreg": config.maxnreg}),
    )
