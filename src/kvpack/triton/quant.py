"""Triton quantize / dequantize for every kvpack format, bit-exact with :mod:`kvpack.reference`.

Tensors are 3-D and contiguous: ``x [B, T, D]`` (float32, float16 or bfloat16), codes
``[B, T, ceil(D / per_byte)]``, scales and zero points ``[B, sT, sD]`` (see :mod:`kvpack.schemes`).

How each format is computed:

- channel-axis scales (reduced over tokens) in groups of at most 512 tokens (``int8-channel-g128``,
  or a short sequence): ``_channel_kernel``, one program per (group, block of channels), reduces and
  encodes in one pass over ``x``; a group that fits one tile is encoded from registers, a larger one
  from the L1/L2 copy the reduction just brought in.
- channel-axis scales over more tokens (``int8-channel`` on a long sequence): nothing can be encoded
  before its channel's last token is seen. The reduction of each group is split over ``splits``
  programs that write partial max/min rows, ``_finalize_kernel`` folds them into scales, and
  ``_encode_kernel`` reads ``x`` again. ``Tiles(pipelined=True)`` opts into
  ``_channel_pipeline_kernel`` instead, which reduces a slab of a few channels over all tokens, then
  encodes it while it is still in L2 and the next slab streams in (``x`` comes from DRAM once); on an
  H100 (2026-11-23) it took 4.8-5.1 ms at 131072 x 8192 float32 against 3.2-3.4 ms for the split
  reduction (its 128-byte column slabs stride 32 KB between rows), so it is not a default.
- token-axis scales (reduced over channels): ``_token_kernel``, one tile row per (token, group) pair,
  one pass. When int4/int2 groups end inside a byte (a group size that ``per_byte`` does not divide),
  ``_encode_kernel`` writes the codes from the stored scales instead.
- ``_encode_kernel`` / ``_dequantize_kernel``: codes from given scales and back, either axis, each
  element's scale looked up by its indices; ``_token_dequantize_kernel`` dequantizes token-axis
  formats in the tiles of ``_token_kernel``, one scale load per group.

Numerics are the reference's: float32 arithmetic, the correctly rounded quotient of an IEEE division
(``tl.div_rn``, or from the scale's reciprocal with an exact correction: ``_divide``), round half to even
(``_rint``), FP8 rounding to nearest even on the FP8 grid done in float32 (``_fp8_round``) so that the
final cast is exact on the GPU and in Triton's CPU interpreter alike, and bfloat16 outputs rounded to
nearest even in float32 before their cast for the same reason. A NaN counts as an infinite maximum
(and minimum), so it always yields a non-finite scale, which :func:`kvpack.ops.check_scales` reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvpack.backends import triton_interpreted
from kvpack.schemes import INPUT_DTYPES, Scheme

#: Mantissa bits and smallest normal exponent of each FP8 format.
_FP8_GRID = {"e4m3": (3, -6), "e5m2": (2, -14)}
#: Elements per tile in the default tile shapes: 32 KB of float32, 32 per thread at 8 warps.
_TILE = 8192
#: Channel-axis groups of up to this many tokens are reduced and encoded by one program.
_ONE_PASS_TOKENS = 512
#: Kernels run in Triton's CPU interpreter (fixed when the module loads, as triton.jit decides).
_INTERPRET = tl.constexpr(triton_interpreted())


@dataclass(frozen=True)
class Tiles:
    """The tile shape of a launch (the defaults come from the tensor's shape; benchmarks tune them).

    Attributes:
        block_t: rows of a tile: tokens, or (token, group) pairs for token-axis scales.
        block_d: columns of a tile: channels, or a group's channels for token-axis scales; at
            least 8 so that packed codes fill whole bytes.
        splits: channel-axis scales only: programs that share the reduction of one group. Above 1
            they write partial results that a second kernel folds, and the codes need a second
            read of ``x``, in tiles of their own (the ``encode`` entry of :data:`TUNED`, else the
            default grid tiles): these tiles shape the reduction.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the kernels' loops over tokens or channels (None:
            Triton's default).
        pipelined: channel-axis quantize only: one launch that reduces a slab of ``block_d``
            channels and encodes it from L2 while the next slab streams in (see
            ``_channel_pipeline_kernel``), instead of ``splits``.
        maxnreg: a cap on registers per thread (more programs resident, at the risk of spills).
    """

    block_t: int
    block_d: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int | None = None
    pipelined: bool = False
    maxnreg: int | None = None

    @property
    def launch(self) -> dict:
        """The launch options of these tiles."""
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        regs = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        return {"num_warps": self.num_warps, **stages, **regs}

    def __post_init__(self) -> None:
        for name, low in (("block_t", 1), ("block_d", 8)):
            v = getattr(self, name)
            if v < low or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {low}, got {v}")
        if self.splits < 1 or (self.pipelined and self.splits != 1):
            raise ValueError(f"splits must be >= 1 (and 1 when pipelined), got {self.splits}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two up to 32, got {self.num_warps}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.maxnreg is not None and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"maxnreg must be between 24 and 255 registers, got {self.maxnreg}")


#: Inputs of at least this many elements use the tiles of :data:`TUNED` when it has their kernel.
TUNED_MIN_ELEMENTS = 1 << 24

#: Tiles measured best on large inputs, by ``(operation, format, dtype)``; ``operation`` is
#: ``quantize``, ``compute_scales``, ``encode`` or ``dequantize`` (whose dtype is the output's). Only
#: the speed depends on them; ``benchmarks/tune_quant.py`` prints a replacement for this table.
#: H100 (2026-11-23), 131072 x 8192: the split reduction in 512-channel blocks, 3.20 ms against 3.37;
#: int8-channel-g128 from float16 in 64-token x 128-channel tiles of 2 warps, 1.43 ms against 1.61 with 4
#: warps (benchmarks/results/h100/round4/tune.log, with the reciprocal quotients of ``_divide``).
TUNED: dict[tuple[str, str, str], Tiles] = {
    ("quantize", "int8-channel", "float32"): Tiles(16, 512, splits=33, num_warps=8),
    ("encode", "int8-channel", "float32"): Tiles(1, 2048, num_warps=2),
    ("quantize", "int8-channel-g128", "float16"): Tiles(64, 128, num_warps=2),
}


def _tuned(operation: str, scheme: Scheme, dtype: torch.dtype, elements: int) -> Tiles | None:
    """The :data:`TUNED` tiles of a large input's kernel, if any."""
    if elements < TUNED_MIN_ELEMENTS:
        return None
    return TUNED.get((operation, scheme.name, str(dtype).removeprefix("torch.")))


# ----------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _rint(y):
    """Round half to even, for |y| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, so the add
    itself rounds (to nearest even); subtracting it again is exact. Works for negative y too."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_int(y):
    """:func:`_rint` as an int32, read from the bits of ``y + 1.5 * 2^23`` (whose significand then
    holds the integer): no float-to-int conversion instruction."""
    return (y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _fp8_round(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """``y`` (|y| <= the FP8 max) rounded to nearest even on the FP8 grid with MANT mantissa bits and
    smallest normal exponent EMIN, as float32: the step is 2^(e - MANT), e the exponent of |y| taken
    from its bits (at least EMIN: subnormals share the smallest normal step). Scaling by powers of
    two is exact. The sign bit is copied back (Triton negates as ``0 - x``, which loses -0), so -0.0
    and negatives that round to 0 give -0 as in torch."""
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)
    up = ((127 + MANT - e) << 23).to(tl.float32, bitcast=True)
    down = ((127 - MANT + e) << 23).to(tl.float32, bitcast=True)
    r = _rint(a * up) * down
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_round(y):
    """float32 rounded to nearest even at bfloat16 precision (kept as float32): the cast after it is
    exact, where the interpreter's own cast truncates."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _stats(x, mask, AXIS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Max and min of the masked ``x`` along AXIS; for symmetric formats the max of |x|, twice, which
    needs the masked elements loaded as 0. NaN counts as +inf for the max and -inf for the min
    (Triton's float max would drop it). |x| is maxed as integers: the bits of non-negative floats
    order like their values, and every NaN's lie above +inf's."""
    if SYMMETRIC:
        bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=AXIS)
        hi = tl.minimum(bits, 0x7F800000).to(tl.float32, bitcast=True)
        lo = hi
    else:
        nan = x != x
        hi = tl.max(tl.where(mask, tl.where(nan, float("inf"), x), float("-inf")), axis=AXIS)
        lo = tl.min(tl.where(mask, tl.where(nan, float("-inf"), x), float("inf")), axis=AXIS)
    return hi, lo


@triton.jit
def _stats_init(N: tl.constexpr, SYMMETRIC: tl.constexpr):
    """The identity of :func:`_stats`'s reductions, for N groups."""
    lo = tl.full([N], float("inf"), tl.float32)
    if SYMMETRIC:
        hi = tl.zeros([N], tl.float32)
    else:
        hi = tl.full([N], float("-inf"), tl.float32)
    return hi, lo


@triton.jit
def _scale_zero(hi, lo, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Scale and zero point (as float32) of groups with max ``hi`` and min ``lo`` (reference.py):
    ``amax / qmax`` for symmetric formats; else ``fp16((max - min) / qmax)`` and ``fp16(min)``.
    A zero scale becomes 1. The zero point of a symmetric format is unused (returned as the scale)."""
    if SYMMETRIC:
        s = tl.div_rn(hi, QMAX)
        z = s
    else:
        s = tl.div_rn(hi - lo, QMAX).to(tl.float16).to(tl.float32)
        z = lo.to(tl.float16).to(tl.float32)
    return tl.where(s == 0.0, 1.0, s), z


@triton.jit
def _store_scales(scale_ptr, zero_ptr, offs, mask, s, z, SYMMETRIC: tl.constexpr):
    tl.store(scale_ptr + offs, s.to(scale_ptr.dtype.element_ty), mask=mask)
    if not SYMMETRIC:
        tl.store(zero_ptr + offs, z.to(zero_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fma(a, b, c):
    """``a * b + c`` rounded once. The interpreter's fma rounds the product first; there the product
    is taken in float64 (exact for float32 operands) and the sum rounded to float64, then float32."""
    if _INTERPRET:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    return tl.fma(a, b, c)


@triton.jit
def _divide(a, s, SIGNED_ZERO: tl.constexpr):
    """``tl.div_rn(a, s)``, the correctly rounded quotient, for ``s > 0``.

    When ``s`` holds fewer elements than ``a`` (a row or column of scales shared by the tile) the
    quotient comes from the reciprocal ``r = RN(1 / s)``, taken once per scale: ``q = RN(a r)`` is within
    about an ulp of ``a / s``, the remainder ``a - s q`` is exact in one FMA, and ``RN(q + r (a - s q))``
    is the correctly rounded quotient (Markstein's correction, the last step of IA-64's division;
    checked bit for bit against ``tl.div_rn`` by ``test_divide_is_the_correctly_rounded_quotient``, 33.5
    million quotients on an H100, ties and their neighbours included). Three multiply-adds an element
    against the dozen of an IEEE division. Scales below 2^-96 (whose remainders could underflow) or not
    finite send the whole tile to the division. With SIGNED_ZERO a zero quotient takes ``a``'s sign, as
    the division's does (FP8 codes keep -0; integer codes need not)."""
    if s.numel < a.numel:
        ok = (s >= 2.0**-96) & (s <= 3.4028234663852886e38)
        if tl.min(ok.to(tl.int32)) == 1:
            r = tl.div_rn(1.0, s)
            q0 = a * r
            q = _fma(_fma(-q0, s, a), r, q0)
            if SIGNED_ZERO:
                sign = a.to(tl.int32, bitcast=True) & -2147483648
                q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        else:
            q = tl.div_rn(a, s)
    else:
        q = tl.div_rn(a, s)
    return q


@triton.jit
def _codes(
    x, s, z, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FP8_MANT: tl.constexpr, FP8_EMIN: tl.constexpr
):
    """Codes of ``x``: int32 for the integer formats, float32 FP8 grid values for FP8. Clamping before
    rounding gives the reference's ``clamp(round(y))`` (the bounds are integers) and keeps |y| small
    for the rounding trick."""
    if FP8_MANT > 0:
        y = tl.minimum(tl.maximum(_divide(x, s, True), -QMAX), QMAX)
        q = _fp8_round(y, FP8_MANT, FP8_EMIN)
    elif SYMMETRIC:
        q = _round_to_int(tl.minimum(tl.maximum(_divide(x, s, False), -QMAX), QMAX))
    else:
        q = _round_to_int(tl.minimum(tl.maximum(_divide(x - z, s, False), 0.0), QMAX))
    return q


@triton.jit
def _store_codes(
    codes_ptr, q, base, limit, row_ok, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Store the codes ``q [BLOCK_R, BLOCK_C]`` (as :func:`_codes`, zero where there is no element). Tile row
    ``r`` goes to the bytes ``codes_ptr + base[r] + j`` for ``j < limit``; int4/int2 codes are packed
    along the columns, the first in the low bits."""
    PER: tl.constexpr = 8 // BITS
    j = tl.arange(0, BLOCK_C // PER)
    ptrs = codes_ptr + base[:, None] + j[None, :]
    mask = row_ok[:, None] & (j[None, :] < limit)
    if PER == 1:
        tl.store(ptrs, q.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        q3 = tl.reshape(q, (BLOCK_R, BLOCK_C // PER, PER))
        shifts = tl.arange(0, PER) * BITS
        tl.store(ptrs, tl.sum(q3 << shifts[None, None, :], axis=2).to(tl.uint8), mask=mask)


@triton.jit
def _load_codes(
    codes_ptr, base, limit, row_ok, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """The inverse of :func:`_store_codes`: codes ``[BLOCK_R, BLOCK_C]`` as float32 from the bytes
    ``codes_ptr + base[r] + j`` (``j < limit``), unpacked low bits first; undefined where masked."""
    PER: tl.constexpr = 8 // BITS
    j = tl.arange(0, BLOCK_C // PER)
    byte = tl.load(codes_ptr + base[:, None] + j[None, :], mask=row_ok[:, None] & (j[None, :] < limit))
    if PER == 1:
        q = byte.to(tl.float32)
    else:
        shifts = tl.arange(0, PER) * BITS
        q3 = (byte.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        q = tl.reshape(q3, (BLOCK_R, BLOCK_C)).to(tl.float32)
    return q


@triton.jit
def _dequantize_values(q, s, z, SYMMETRIC: tl.constexpr, OUT_BF16: tl.constexpr):
    """``q * s (+ z)`` in float32 (the launch disables FMA contraction: two roundings, as torch),
    bfloat16 outputs rounded to nearest even before their cast."""
    y = q * s
    if not SYMMETRIC:
        y = y + z
    if OUT_BF16:
        y = _bf16_round(y)
    return y


@triton.jit
def _encode_tile(
    codes_ptr, x, mask, s, z, base, limit, row_ok,
    BITS: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    q = _codes(x, s, z, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN)
    q = tl.where(mask, q, tl.zeros_like(q))
    _store_codes(codes_ptr, q, base, limit, row_ok, BITS, BLOCK_R, BLOCK_C)


@triton.jit
def _load_scales(scale_ptr, zero_ptr, offs, mask, SYMMETRIC: tl.constexpr):
    """Scales and zero points at ``offs`` as float32 (the zero point of a symmetric format is unused,
    returned as the scale)."""
    s = tl.load(scale_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    z = s
    if not SYMMETRIC:
        z = tl.load(zero_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _grid_tile(n_rows, D, n_cols, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of program ``p`` over ``[n_rows, D]`` cut in ``n_cols`` column blocks, column blocks
    fastest (consecutive programs read consecutive bytes): its first flat row (int64), its rows as
    offsets from it (int32: the launcher keeps ``BLOCK_T * D`` below 2^31), which rows exist, its first
    channel, its channels, and which elements exist. Addresses are a 64-bit scalar base plus 32-bit
    offsets, rather than 64-bit arithmetic for every element."""
    pid = tl.program_id(0)
    i = pid // n_cols
    row0 = i.to(tl.int64) * BLOCK_T
    t = tl.arange(0, BLOCK_T)
    row_ok = t < tl.minimum(n_rows - row0, BLOCK_T).to(tl.int32)
    col0 = (pid - i * n_cols) * BLOCK_D
    d = col0 + tl.arange(0, BLOCK_D)
    return row0, t, row_ok, col0, d, row_ok[:, None] & (d < D)[None, :]


@triton.jit
def _tile_scales(scale_ptr, zero_ptr, row0, t, d, mask, T, G, sT, sD,
                 CHANNEL: tl.constexpr, ROW_SCALES: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Scales and zero points of a tile's elements (flat rows ``row0 + t``, channels ``d``), shaped to
    broadcast against it: one scale row for the whole tile when ``ROW_SCALES`` (channel axis, a tile
    inside one block of ``G`` tokens of one batch row), else looked up element by element at
    ``[b, t // G, d]`` (channel axis) or ``[b, t, d // G]`` (token axis)."""
    if ROW_SCALES:
        srow = ((row0 // T) * sT + (row0 % T) // G) * sD
        s, z = _load_scales(scale_ptr + srow, zero_ptr + srow, d, d < sD, SYMMETRIC)
        s, z = s[None, :], z[None, :]
    else:
        rows = row0 + t
        if CHANNEL:
            offs = ((rows // T) * sT + (rows % T) // G)[:, None] * sD + d[None, :]
        else:
            offs = (rows * sD)[:, None] + (d // G)[None, :]
        s, z = _load_scales(scale_ptr, zero_ptr, offs, mask, SYMMETRIC)
    return s, z


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _channel_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,
    T, D, DB, G, n_groups, span, splits,
    BITS: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr, PARTIAL: tl.constexpr, ENCODE: tl.constexpr,
):
    """Channel-axis scales: program ``(i, j)`` with ``i = (b * n_groups + group) * splits + split``
    reduces tokens ``[split * span, (split + 1) * span)`` of the group (G tokens) over channels
    ``[j * BLOCK_D, (j + 1) * BLOCK_D)``.

    PARTIAL: stores the raw max (of |x| for symmetric formats) and min as float32 rows ``[i, D]``
    through ``scale_ptr`` and ``zero_ptr``. Otherwise (``splits == 1``): stores the scales and zero
    points ``[b, group, :]`` and, with ENCODE, the codes: from the registers when the span fits one
    tile (ONE_CHUNK), else by a second loop over the tokens, served from cache.
    """
    pid = tl.program_id(0).to(tl.int64)
    split = pid % splits
    bg = pid // splits
    group_lo = (bg % n_groups) * G
    t_lo = group_lo + split * span
    t_hi = tl.minimum(tl.minimum(group_lo + G, T), t_lo + span)
    row0 = (bg // n_groups) * T
    col0 = tl.program_id(1) * BLOCK_D
    d = col0 + tl.arange(0, BLOCK_D)
    d_ok = d < D
    t = tl.arange(0, BLOCK_T)
    # Addresses: a 64-bit base at the span's first row, 32-bit offsets inside it (the launcher keeps
    # span * D below 2^31).
    x_span = x_ptr + (row0 + t_lo) * D
    n = (t_hi - t_lo).to(tl.int32)
    if ONE_CHUNK:
        row_ok = t < n
        mask = row_ok[:, None] & d_ok[None, :]
        x = tl.load(x_span + (t[:, None] * D + d[None, :]), mask=mask, other=0.0).to(tl.float32)
        hi, lo = _stats(x, mask, 0, SYMMETRIC)
    else:
        hi, lo = _stats_init(BLOCK_D, SYMMETRIC)
        for t0 in range(0, n, BLOCK_T):
            mask = (t0 + t < n)[:, None] & d_ok[None, :]
            x = tl.load(x_span + ((t0 + t)[:, None] * D + d[None, :]), mask=mask, other=0.0).to(tl.float32)
            h, low = _stats(x, mask, 0, SYMMETRIC)
            hi = tl.maximum(hi, h)
            lo = tl.minimum(lo, low)
    if PARTIAL:
        tl.store(scale_ptr + pid * D + d, hi, mask=d_ok)
        if not SYMMETRIC:
            tl.store(zero_ptr + pid * D + d, lo, mask=d_ok)
    else:
        s, z = _scale_zero(hi, lo, QMAX, SYMMETRIC)
        _store_scales(scale_ptr, zero_ptr, bg * D + d, d_ok, s, z, SYMMETRIC)
        if ENCODE:
            PER: tl.constexpr = 8 // BITS
            limit = DB - col0 // PER
            c_span = codes_ptr + (row0 + t_lo) * DB
            if ONE_CHUNK:
                _encode_tile(
                    c_span, x, mask, s[None, :], z[None, :], t * DB + col0 // PER, limit, row_ok,
                    BITS, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN, BLOCK_T, BLOCK_D,
                )
            else:
                for t0 in range(0, n, BLOCK_T):
                    row_ok = t0 + t < n
                    mask = row_ok[:, None] & d_ok[None, :]
                    x = tl.load(x_span + ((t0 + t)[:, None] * D + d[None, :]), mask=mask, other=0.0)
                    _encode_tile(
                        c_span, x.to(tl.float32), mask, s[None, :], z[None, :], (t0 + t) * DB + col0 // PER,
                        limit, row_ok, BITS, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN, BLOCK_T, BLOCK_D,
                    )


@triton.jit
def _finalize_kernel(
    hi_ptr, lo_ptr, scale_ptr, zero_ptr, n, D, splits,
    QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Fold the ``splits`` partial rows of :func:`_channel_kernel` (``[bg * splits + i, D]``) into the
    scales and zero points ``[bg, D]`` (n = B * sT * D of them), ``BLOCK_S`` partial rows loaded at once
    rather than one after another. Max and min are exact in any order."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    first = ((idx // D) * splits * D + idx % D)[None, :]
    hi = tl.full([BLOCK], -float("inf"), tl.float32)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    for i0 in range(0, splits, BLOCK_S):
        i = i0 + tl.arange(0, BLOCK_S)
        part = first + (i * D)[:, None]
        mask = (i < splits)[:, None] & ok[None, :]
        hi = tl.maximum(hi, tl.max(tl.load(hi_ptr + part, mask=mask, other=-float("inf")), 0))
        if not SYMMETRIC:
            lo = tl.minimum(lo, tl.min(tl.load(lo_ptr + part, mask=mask, other=float("inf")), 0))
    if SYMMETRIC:
        lo = hi
    s, z = _scale_zero(hi, lo, QMAX, SYMMETRIC)
    _store_scales(scale_ptr, zero_ptr, idx, ok, s, z, SYMMETRIC)


@triton.jit
def _channel_pipeline_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, hi_ptr, lo_ptr, count_ptr,
    T, D, DB, G, n_groups, n_dblocks, n_tasks, chunks, lag,
    BITS: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Channel-axis quantize of long groups in one launch, re-reading ``x`` from L2 rather than DRAM.

    A slab is one group (G tokens) of one batch row times BLOCK_D channels, split in ``chunks``
    tiles of BLOCK_T tokens; slab ``i`` is ``(b * n_groups + group) * n_dblocks + channel block``,
    task ``i * chunks + chunk`` its tile. Each program draws a ticket (the order programs start in):
    even tickets ``2k`` reduce tile ``k`` (max into ``hi``/``lo [slab, BLOCK_D]``, then one count in
    ``count_ptr[1 + slab]``); odd tickets ``2k + 1`` encode tile ``k - lag``, once its slab's count
    reaches ``chunks``, while the tile is still in L2 (``lag`` tiles back). With ``lag >= chunks`` a
    task waits only for tasks with smaller tickets, which have started and never wait: no deadlock,
    whatever the number of programs resident.
    """
    ticket = tl.atomic_add(count_ptr, 1).to(tl.int64)
    is_encode = ticket % 2
    task = ticket // 2 - is_encode * lag
    if (task >= 0) & (task < n_tasks):
        slab = task // chunks
        chunk = task % chunks
        bg = slab // n_dblocks
        col0 = (slab % n_dblocks) * BLOCK_D
        group_lo = (bg % n_groups) * G
        t = group_lo + chunk * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = (bg // n_groups) * T + t
        row_ok = t < tl.minimum(group_lo + G, T)
        d = col0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        mask = row_ok[:, None] & d_ok[None, :]
        j = slab * BLOCK_D + tl.arange(0, BLOCK_D)
        if is_encode == 0:
            x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
            hi, lo = _stats(x, mask, 0, SYMMETRIC)
            tl.atomic_max(hi_ptr + j, hi, sem="relaxed")
            if not SYMMETRIC:
                tl.atomic_min(lo_ptr + j, lo, sem="relaxed")
            tl.debug_barrier()  # every thread's max is in before the count says so
            tl.atomic_add(count_ptr + 1 + slab, 1, sem="release")
        else:
            done = tl.atomic_add(count_ptr + 1 + slab, 0, sem="acquire")
            while done < chunks:
                done = tl.atomic_add(count_ptr + 1 + slab, 0, sem="acquire")
            hi = tl.load(hi_ptr + j, cache_modifier=".cg")
            lo = hi
            if not SYMMETRIC:
                lo = tl.load(lo_ptr + j, cache_modifier=".cg")
            s, z = _scale_zero(hi, lo, QMAX, SYMMETRIC)
            _store_scales(scale_ptr, zero_ptr, bg * D + d, d_ok & (chunk == 0), s, z, SYMMETRIC)
            x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
            PER: tl.constexpr = 8 // BITS
            _encode_tile(
                codes_ptr, x, mask, s[None, :], z[None, :], rows * DB + col0 // PER, DB - col0 // PER, row_ok,
                BITS, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN, BLOCK_T, BLOCK_D,
            )


@triton.jit
def _pairs(
    n_pairs, D, DB, G, GB, n_groups,
    BITS: tl.constexpr, BLOCK_R: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
):
    """The (token, group) pairs ``p`` of a token-axis program, which exist, where each starts in ``x``
    and in the codes, its channels and its code bytes (as ``[BLOCK_R, 1]``). EVEN (groups tile every
    row and fill whole bytes, ``GB = G / per_byte`` code bytes each, a multiple of ALIGN): pair ``p``
    is simply the ``p``-th run of G elements, with no division, and the compiler is told the runs'
    alignment, so that it can use 16-byte accesses."""
    PER: tl.constexpr = 8 // BITS
    p = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    if EVEN:
        base = tl.multiple_of(p * G, ALIGN * PER)
        cbase = tl.multiple_of(p * GB, ALIGN)
        length = tl.multiple_of(tl.full([BLOCK_R], G, tl.int32), ALIGN * PER)[:, None]
        bytes_ = tl.multiple_of(tl.full([BLOCK_R], GB, tl.int32), ALIGN)[:, None]
    else:
        row = p // n_groups
        start = (p % n_groups) * G
        base = row * D + start
        cbase = row * DB + start // PER
        length = tl.minimum(G, D - start)[:, None]
        bytes_ = (length + PER - 1) // PER
    return p, p < n_pairs, base, cbase, length, bytes_


@triton.jit
def _token_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,
    n_pairs, D, DB, G, GB, n_groups,
    BITS: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr, ENCODE: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
):
    """Token-axis scales: tile row ``r`` holds the pair ``p = row * n_groups + group`` (the flat index
    of its scale), i.e. channels ``[group * G, group * G + G)`` of one token row, BLOCK_G at a time.
    With ENCODE the codes follow in the same pass (``G`` must be a multiple of ``per_byte``, or the row
    a single group, so that no byte holds two groups)."""
    p, p_ok, base, cbase, length, n_bytes = _pairs(
        n_pairs, D, DB, G, GB, n_groups, BITS, BLOCK_R, EVEN, ALIGN
    )
    k = tl.arange(0, BLOCK_G)
    if ONE_CHUNK:
        mask = p_ok[:, None] & (k[None, :] < length)
        x = tl.load(x_ptr + base[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        hi, lo = _stats(x, mask, 1, SYMMETRIC)
    else:
        hi, lo = _stats_init(BLOCK_R, SYMMETRIC)
        for k0 in range(0, G, BLOCK_G):
            mask = p_ok[:, None] & (k0 + k[None, :] < length)
            x = tl.load(x_ptr + base[:, None] + k0 + k[None, :], mask=mask, other=0.0).to(tl.float32)
            h, low = _stats(x, mask, 1, SYMMETRIC)
            hi = tl.maximum(hi, h)
            lo = tl.minimum(lo, low)
    s, z = _scale_zero(hi, lo, QMAX, SYMMETRIC)
    _store_scales(scale_ptr, zero_ptr, p, p_ok, s, z, SYMMETRIC)
    if ENCODE:
        PER: tl.constexpr = 8 // BITS
        if ONE_CHUNK:
            _encode_tile(
                codes_ptr, x, mask, s[:, None], z[:, None], cbase, n_bytes, p_ok,
                BITS, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN, BLOCK_R, BLOCK_G,
            )
        else:
            for k0 in range(0, G, BLOCK_G):
                mask = p_ok[:, None] & (k0 + k[None, :] < length)
                x = tl.load(x_ptr + base[:, None] + k0 + k[None, :], mask=mask, other=0.0).to(tl.float32)
                _encode_tile(
                    codes_ptr, x, mask, s[:, None], z[:, None], cbase + k0 // PER, n_bytes - k0 // PER, p_ok,
                    BITS, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN, BLOCK_R, BLOCK_G,
                )


@triton.jit
def _encode_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,
    n_rows, T, D, DB, G, sT, sD, n_cols,
    BITS: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr, CHANNEL: tl.constexpr, ROW_SCALES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Codes of the tile (flat rows ``b * T + t``, channels) from the stored scales and zero points,
    either axis (``reference.encode``)."""
    row0, t, row_ok, col0, d, mask = _grid_tile(n_rows, D, n_cols, BLOCK_T, BLOCK_D)
    x = tl.load(x_ptr + row0 * D + (t[:, None] * D + d[None, :]), mask=mask, other=0.0).to(tl.float32)
    s, z = _tile_scales(scale_ptr, zero_ptr, row0, t, d, mask, T, G, sT, sD, CHANNEL, ROW_SCALES, SYMMETRIC)
    PER: tl.constexpr = 8 // BITS
    _encode_tile(
        codes_ptr + row0 * DB, x, mask, s, z, t * DB + col0 // PER, DB - col0 // PER, row_ok,
        BITS, QMAX, SYMMETRIC, FP8_MANT, FP8_EMIN, BLOCK_T, BLOCK_D,
    )


@triton.jit
def _dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_ptr,
    n_rows, T, D, DB, G, sT, sD, n_cols,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, CHANNEL: tl.constexpr, ROW_SCALES: tl.constexpr,
    OUT_BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``x_hat = q * scale (+ zero)`` of the tile (flat rows, channels), either axis
    (``reference.dequantize``)."""
    row0, t, row_ok, col0, d, mask = _grid_tile(n_rows, D, n_cols, BLOCK_T, BLOCK_D)
    PER: tl.constexpr = 8 // BITS
    q = _load_codes(codes_ptr + row0 * DB, t * DB + col0 // PER, DB - col0 // PER, row_ok, BITS, BLOCK_T,
                    BLOCK_D)
    s, z = _tile_scales(scale_ptr, zero_ptr, row0, t, d, mask, T, G, sT, sD, CHANNEL, ROW_SCALES, SYMMETRIC)
    y = _dequantize_values(q, s, z, SYMMETRIC, OUT_BF16)
    tl.store(out_ptr + row0 * D + (t[:, None] * D + d[None, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_ptr,
    n_pairs, D, DB, G, GB, n_groups,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
):
    """Token-axis dequantize in the tiles of :func:`_token_kernel`: one (token, group) pair per tile
    row, so that its scale and zero point are one load each (no byte may hold two groups)."""
    p, p_ok, base, cbase, length, n_bytes = _pairs(
        n_pairs, D, DB, G, GB, n_groups, BITS, BLOCK_R, EVEN, ALIGN
    )
    s, z = _load_scales(scale_ptr, zero_ptr, p, p_ok, SYMMETRIC)
    s, z = s[:, None], z[:, None]
    PER: tl.constexpr = 8 // BITS
    k = tl.arange(0, BLOCK_G)
    for k0 in range(0, G, BLOCK_G):
        q = _load_codes(codes_ptr, cbase + k0 // PER, n_bytes - k0 // PER, p_ok, BITS, BLOCK_R, BLOCK_G)
        y = _dequantize_values(q, s, z, SYMMETRIC, OUT_BF16)
        mask = p_ok[:, None] & (k0 + k[None, :] < length)
        tl.store(out_ptr + base[:, None] + k0 + k[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output is allocated here, uninitialised: the kernels write each element."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _warps(elements: int) -> int:
    return 8 if elements >= _TILE else 4


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid_tiles(rows: int, channels: int) -> Tiles:
    """Default tiles of the encode and dequantize kernels: up to 512 channels (2 KB of float32) wide."""
    block_d = min(max(_pow2(channels), 8), 512)
    block_t = min(_pow2(rows), max(_TILE // block_d, 1))
    while block_t > 1 and block_t * channels >= 2**31:  # tiles index in 32 bits
        block_t //= 2
    return Tiles(block_t, block_d, num_warps=_warps(block_t * block_d))


def _channel_tiles(x: torch.Tensor, group: int, n_groups: int) -> Tiles:
    """Default tiles of channel-axis scales: one program per group up to ``_ONE_PASS_TOKENS`` tokens;
    beyond, the group is split, in 1 KB-wide column blocks, over about 8 programs per SM."""
    b, _, d = x.shape
    if group <= _ONE_PASS_TOKENS:
        block_t = min(_pow2(group), 256)
        block_d = min(max(_TILE // block_t, 8), max(_pow2(d), 8))
        return Tiles(block_t, block_d, num_warps=_warps(block_t * block_d))
    block_d = min(max(_pow2(d), 8), 1024 // x.element_size())
    block_t = _TILE // block_d
    programs = b * n_groups * triton.cdiv(d, block_d)
    splits = max(1, min(triton.cdiv(8 * _num_sms(x.device), programs), triton.cdiv(group, block_t)))
    return Tiles(block_t, block_d, splits=splits, num_warps=_warps(block_t * block_d))


def _token_tiles(n_pairs: int, group: int) -> Tiles:
    """Default tiles of token-axis scales: whole groups up to ``_TILE`` channels, rows to fill a tile."""
    block_d = min(max(_pow2(group), 8), _TILE)
    block_t = min(_pow2(n_pairs), max(_TILE // block_d, 1))
    return Tiles(block_t, block_d, num_warps=_warps(block_t * block_d))


def _meta(scheme: Scheme) -> dict:
    """The compile-time constants of a format."""
    mant, emin = _FP8_GRID[scheme.fp8] if scheme.fp8 else (0, 0)
    return {
        "BITS": scheme.bits,
        "QMAX": scheme.qmax,
        "SYMMETRIC": scheme.symmetric,
        "FP8_MANT": mant,
        "FP8_EMIN": emin,
    }


def _check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpreted()):
        return
    raise ValueError(
        f"{what} is on {t.device}: the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
    )


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the triton kernels take float32, float16 or bfloat16")
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [B, T, D] tensor, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    _check_device(x, "x")


def _check_part(
    t: torch.Tensor | None, what: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """A codes, scale or zero-point tensor must have exactly the layout the kernels index."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"{what} must be {dtype} of shape {shape}, got {t.dtype} of shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, the data on {device}")


def _check_scales(
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: Scheme,
    data_shape: tuple[int, int, int],
    device: torch.device,
) -> None:
    """Scales (and zero points) of data of shape ``[B, T, D]`` in ``scheme``."""
    b, t, d = data_shape
    shape = (b, *scheme.scale_shape(t, d))
    _check_part(scale, "scale", shape, scheme.scale_dtype, device)
    if not scheme.symmetric:
        _check_part(zero, f"zero (required by {scheme.name})", shape, scheme.scale_dtype, device)


def _launch_channel(
    x: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor | None,
    scheme: Scheme, tiles: Tiles,
) -> None:
    b, t, d = x.shape
    g, n_groups = scheme.group_size(t, d), scale.shape[1]
    db = scheme.code_shape(t, d)[1]
    n_dblocks = triton.cdiv(d, tiles.block_d)
    consts = dict(BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, **tiles.launch, **_meta(scheme))
    if tiles.pipelined and codes is not None:
        n_slabs, chunks = b * n_groups * n_dblocks, triton.cdiv(g, tiles.block_t)
        # Encode a tile a slab plus one tile per SM after its reduction: its slab is then complete,
        # and the tiles in between (what L2 must hold) stay few.
        lag = chunks + _num_sms(x.device)
        hi = torch.full((n_slabs, tiles.block_d), 0.0 if scheme.symmetric else -math.inf, device=x.device)
        lo = hi if scheme.symmetric else torch.full_like(hi, math.inf)
        count = torch.zeros(1 + n_slabs, dtype=torch.int32, device=x.device)
        _channel_pipeline_kernel[(2 * (n_slabs * chunks + lag),)](
            x, codes, scale, scale if zero is None else zero, hi, lo, count,
            t, d, db, g, n_groups, n_dblocks, n_slabs * chunks, chunks, lag, **consts,
        )
        return
    grid = (b * n_groups * tiles.splits, n_dblocks)
    span = triton.cdiv(triton.cdiv(g, tiles.splits), tiles.block_t) * tiles.block_t
    if min(span, g) * d >= 2**31:  # the kernel indexes one program's rows in 32 bits
        raise ValueError(f"a group of {g} tokens x {d} channels split {tiles.splits} ways leaves 2^31 or "
                         "more elements to one program; use more splits")
    if tiles.splits == 1:
        _channel_kernel[grid](
            x, scale if codes is None else codes, scale, scale if zero is None else zero,
            t, d, db, g, n_groups, g, 1,
            ONE_CHUNK=g <= tiles.block_t, PARTIAL=False, ENCODE=codes is not None, **consts,
        )
        return
    hi = torch.empty((grid[0], d), dtype=torch.float32, device=x.device)
    lo = hi if scheme.symmetric else torch.empty_like(hi)
    _channel_kernel[grid](
        x, hi, hi, lo, t, d, db, g, n_groups, span, tiles.splits,
        ONE_CHUNK=span <= tiles.block_t, PARTIAL=True, ENCODE=False, **consts,
    )
    n = scale.numel()
    block_s = min(_pow2(tiles.splits), 64)
    block = min(1024, 4096 // block_s)
    _finalize_kernel[(triton.cdiv(n, block),)](
        hi, lo, scale, scale if zero is None else zero, n, d, tiles.splits,
        QMAX=scheme.qmax, SYMMETRIC=scheme.symmetric, BLOCK=block, BLOCK_S=block_s,
    )
    if codes is not None:
        _launch_encode(x, codes, scale, zero, scheme, None)


def _even(scheme: Scheme, group: int, channels: int) -> dict:
    """The EVEN and ALIGN constants of the token kernels: whether the groups tile every row exactly and
    fill whole bytes of codes, and the power of two (up to 16) that divides a group's code bytes."""
    even = channels % group == 0 and group % scheme.per_byte == 0
    return {"EVEN": even, "ALIGN": math.gcd(group // scheme.per_byte, 16) if even else 1}


def _straddles(scheme: Scheme, group: int, n_groups: int) -> bool:
    """Whether some byte of packed codes holds two token-axis groups."""
    return n_groups > 1 and group % scheme.per_byte != 0


def _launch_token(
    x: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor | None,
    scheme: Scheme, tiles: Tiles,
) -> None:
    b, t, d = x.shape
    g, n_groups = scheme.group_size(t, d), scale.shape[2]
    n_pairs = b * t * n_groups
    straddle = _straddles(scheme, g, n_groups)
    _token_kernel[(triton.cdiv(n_pairs, tiles.block_t),)](
        x, scale if codes is None else codes, scale, scale if zero is None else zero,
        n_pairs, d, scheme.code_shape(t, d)[1], g, g // scheme.per_byte, n_groups,
        BLOCK_R=tiles.block_t, BLOCK_G=tiles.block_d, ONE_CHUNK=g <= tiles.block_d,
        ENCODE=codes is not None and not straddle, **_even(scheme, g, d), **tiles.launch, **_meta(scheme),
    )
    if codes is not None and straddle:
        _launch_encode(x, codes, scale, zero, scheme, None)


def _launch_encode(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    scheme: Scheme, tiles: Tiles | None,
) -> None:
    """Codes of ``x`` from its scales, in ``tiles`` (None: the ``encode`` entry of :data:`TUNED`, else
    the default grid tiles)."""
    b, t, d = x.shape
    tiles = tiles or _tuned("encode", scheme, x.dtype, x.numel()) or _grid_tiles(b * t, d)
    g = scheme.group_size(t, d)
    _check_tile_offsets(tiles, d)
    n_cols = triton.cdiv(d, tiles.block_d)
    _encode_kernel[(triton.cdiv(b * t, tiles.block_t) * n_cols,)](
        x, codes, scale, scale if zero is None else zero,
        b * t, t, d, codes.shape[2], g, scale.shape[1], scale.shape[2], n_cols,
        CHANNEL=scheme.axis == "channel", ROW_SCALES=_row_scales(scheme, t, g, tiles),
        BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, **tiles.launch, **_meta(scheme),
    )


def _row_scales(scheme: Scheme, tokens: int, group: int, tiles: Tiles) -> bool:
    """Whether every tile of the encode/dequantize grid lies in one row of channel-axis scales: its
    ``block_t`` rows inside one block of ``group`` tokens of one batch row."""
    return scheme.axis == "channel" and tokens % tiles.block_t == 0 and group % tiles.block_t == 0


def _check_tile_offsets(tiles: Tiles, width: int) -> None:
    """The grid kernels index inside a tile in 32 bits."""
    if tiles.block_t > 1 and tiles.block_t * width >= 2**31:
        raise ValueError(f"rows of {width} elements are too wide for tiles of {tiles.block_t} rows (2^31 "
                         "elements per tile); use tiles with fewer rows")


def _scales_and_codes(
    x: torch.Tensor, scheme: Scheme, with_codes: bool, tiles: Tiles | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    _check_x(x)
    b, t, d = x.shape
    shape = (b, *scheme.scale_shape(t, d))
    scale = _empty(shape, scheme.scale_dtype, x.device)
    zero = None if scheme.symmetric else _empty(shape, scheme.scale_dtype, x.device)
    codes = _empty((b, *scheme.code_shape(t, d)), scheme.code_dtype, x.device) if with_codes else None
    tiles = tiles or _tuned("quantize" if with_codes else "compute_scales", scheme, x.dtype, x.numel())
    if scheme.axis == "channel":
        tiles = tiles or _channel_tiles(x, scheme.group_size(t, d), shape[1])
        _launch_channel(x, codes, scale, zero, scheme, tiles)
    else:
        tiles = tiles or _token_tiles(b * t * shape[2], scheme.group_size(t, d))
        _launch_token(x, codes, scale, zero, scheme, tiles)
    return codes, scale, zero


# ----------------------------------------------------------------------------------------------
# Public functions (the signatures of kvpack.reference)


def compute_scales(
    x: torch.Tensor, scheme: Scheme, tiles: Tiles | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points for int4/int2) of ``x [B, T, D]``, shape ``[B, sT, sD]``.

    float32 scales for int8/fp8, float16 scale and zero point for int4/int2; ``zero`` is None for the
    symmetric formats. ``tiles`` overrides the default tile shape.

    >>> scale, zero = compute_scales(torch.randn(2, 256, 64, device="cuda"), parse("int4-token-g32"))
    >>> scale.shape, scale.dtype
    (torch.Size([2, 256, 2]), torch.float16)
    """
    _, scale, zero = _scales_and_codes(x, scheme, False, tiles)
    return scale, zero


def encode(
    x: torch.Tensor,
    scheme: Scheme,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """Codes of ``x [B, T, D]`` given its scales (``[B, sT, sD]``, as :func:`compute_scales` returns):
    int8 ``[B, T, D]``, uint8 ``[B, T, ceil(D / per_byte)]`` (int4/int2, first code in the low bits), or
    float8 ``[B, T, D]``.
    """
    _check_x(x)
    b, t, d = x.shape
    _check_scales(scale, zero, scheme, (b, t, d), x.device)
    codes = _empty((b, *scheme.code_shape(t, d)), scheme.code_dtype, x.device)
    _launch_encode(x, codes, scale, zero, scheme, tiles)
    return codes


def quantize(
    x: torch.Tensor, scheme: Scheme, tiles: Tiles | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x [B, T, D]`` (float32/float16/bfloat16, CUDA): returns ``(codes, scale, zero)``,
    bit-exact with ``reference.quantize``; ``zero`` is None for the symmetric formats.

    >>> codes, scale, _ = quantize(torch.randn(1, 4096, 128, device="cuda"), parse("int8-channel-g128"))
    >>> codes.dtype, scale.shape
    (torch.int8, torch.Size([1, 32, 128]))
    """
    codes, scale, zero = _scales_and_codes(x, scheme, True, tiles)
    return codes, scale, zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: Scheme,
    channels: int,
    dtype: torch.dtype,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """Rebuild ``[B, T, channels]`` in ``dtype`` from codes ``[B, T, ceil(channels / per_byte)]`` and
    scales ``[B, sT, sD]``: ``q * scale (+ zero)`` in float32, rounded once to ``dtype``.

    >>> x_hat = dequantize(codes, scale, None, parse("int8-channel"), 128, torch.float16)
    """
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported: the kernels write float32, float16 or bfloat16")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.numel() == 0:
        raise ValueError("codes must be a non-empty [B, T, ceil(D / per_byte)] tensor")
    _check_device(codes, "codes")
    b, t, _ = codes.shape
    _check_part(codes, "codes", (b, *scheme.code_shape(t, channels)), scheme.code_dtype, codes.device)
    _check_scales(scale, zero, scheme, (b, t, channels), codes.device)
    out = _empty((b, t, channels), dtype, codes.device)
    tiles = tiles or _tuned("dequantize", scheme, dtype, out.numel())
    g, (st, sd) = scheme.group_size(t, channels), scale.shape[1:]
    consts = dict(BITS=scheme.bits, SYMMETRIC=scheme.symmetric, OUT_BF16=dtype == torch.bfloat16)
    if scheme.axis == "token" and not _straddles(scheme, g, sd):
        tiles = tiles or _token_tiles(b * t * sd, g)
        _token_dequantize_kernel[(triton.cdiv(b * t * sd, tiles.block_t),)](
            codes, scale, scale if zero is None else zero, out,
            b * t * sd, channels, codes.shape[2], g, g // scheme.per_byte, sd,
            BLOCK_R=tiles.block_t, BLOCK_G=tiles.block_d, **_even(scheme, g, channels),
            enable_fp_fusion=False, **tiles.launch, **consts,
        )
        return out
    tiles = tiles or _grid_tiles(b * t, channels)
    _check_tile_offsets(tiles, channels)
    n_cols = triton.cdiv(channels, tiles.block_d)
    _dequantize_kernel[(triton.cdiv(b * t, tiles.block_t) * n_cols,)](
        codes, scale, scale if zero is None else zero, out, b * t, t, channels, codes.shape[2], g, st, sd,
        n_cols,
        CHANNEL=scheme.axis == "channel", ROW_SCALES=_row_scales(scheme, t, g, tiles),
        BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, enable_fp_fusion=False, **tiles.launch, **consts,
    )
    return out
