"""kvpack.reference against an independent computation: explicit loops over the groups in numpy float32.

The oracle below shares no code with reference.py: it walks every group of elements that shares a
scale, one at a time, and applies the format's formula with numpy float32 scalars (IEEE division,
``np.rint`` for round half to even). FP8 codes are rounded onto the FP8 grid in float64 arithmetic,
independently of torch's float8 conversion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import near_ties
from kvpack import reference
from kvpack.schemes import FP8_MAX, PRESETS, Scheme, parse

ODD_GROUPS = (
    "int8-channel-g5",
    "int8-token-g7",
    "int8-token-g1000",
    "int4-channel-g3",
    "int4-token-g5",
    "int4-token-g1",
    "int2-channel-g7",
    "int2-token-g3",
    "fp8-e4m3-token-g6",
    "fp8-e5m2-channel-g5",
)
FORMATS = PRESETS + ODD_GROUPS
SHAPES = ((2, 37, 65), (1, 1, 3), (3, 70, 1), (1, 130, 40))

# (mantissa bits, exponent of the smallest normal) of each FP8 format.
FP8_GRID = {"e4m3": (3, -6), "e5m2": (2, -14)}


def fp8_round(y: np.ndarray, fmt: str) -> np.ndarray:
    """Round float32 values (|y| <= the format max) to the nearest FP8 value, ties to even mantissa."""
    mant, emin = FP8_GRID[fmt]
    a = np.abs(y).astype(np.float64)
    _, e = np.frexp(a)  # a = m * 2^e, m in [0.5, 1): the leading bit has exponent e - 1
    quantum = np.ldexp(1.0, np.maximum(e - 1, emin) - mant)  # subnormals share the smallest exponent
    return (np.sign(y) * np.rint(a / quantum) * quantum).astype(np.float32)


def group_slices(scheme: Scheme, t: int, d: int):
    """Yield ``(scale index, element index)`` pairs, one per group, for a ``[t, d]`` matrix."""
    if scheme.axis == "channel":
        g = min(scheme.group or t, t)
        for i, t0 in enumerate(range(0, t, g)):
            for c in range(d):
                yield (i, c), (slice(t0, t0 + g), c)
    else:
        g = min(scheme.group or d, d)
        for tok in range(t):
            for j, c0 in enumerate(range(0, d, g)):
                yield (tok, j), (tok, slice(c0, c0 + g))


def oracle(x: torch.Tensor, scheme: Scheme):
    """Quantize ``x [B, T, D]`` group by group. Returns (unpacked codes as float32, scale, zero, x_hat)."""
    xs = x.float().numpy()
    b, t, d = xs.shape
    st, sd = scheme.scale_shape(t, d)
    codes = np.zeros(xs.shape, np.float32)
    x_hat = np.zeros(xs.shape, np.float32)
    scale = np.zeros((b, st, sd), np.float32)
    zero = np.zeros((b, st, sd), np.float32)
    qmax = np.float32(scheme.qmax)
    for i in range(b):
        for sidx, eidx in group_slices(scheme, t, d):
            v = xs[i][eidx]
            if scheme.symmetric:
                s = np.float32(np.abs(v).max()) / qmax
                s = np.float32(1.0) if s == 0 else s
                y = v / s
                q = (
                    fp8_round(np.clip(y, -qmax, qmax), scheme.fp8)
                    if scheme.fp8
                    else np.clip(np.rint(y), -qmax, qmax)
                )
                z = np.float32(0.0)
                x_hat[i][eidx] = q * s
            else:
                lo, hi = np.float32(v.min()), np.float32(v.max())
                s16 = np.float16(np.float32(hi - lo) / qmax)
                s = np.float32(1.0) if s16 == 0 else np.float32(s16)
                z = np.float32(np.float16(lo))
                q = np.clip(np.rint((v - z) / s), 0, qmax)
                x_hat[i][eidx] = q * s + z
            codes[i][eidx] = q
            scale[i][sidx] = s
            zero[i][sidx] = z
    return codes, scale, zero, x_hat


def unpack_bytes(p: torch.Tensor, bits: int, d: int) -> np.ndarray:
    """Codes from packed bytes, one shift at a time (the k-th code of a byte sits at bit k * bits)."""
    pb = p.numpy().astype(np.int64)
    per = 8 // bits
    out = np.zeros((*pb.shape[:-1], pb.shape[-1] * per), np.float32)
    for k in range(per):
        out[..., k::per] = (pb >> (k * bits)) & (2**bits - 1)
    return out[..., :d]


def sample(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian data with a few outlier channels and a spread of magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., :: max(shape[-1] // 4, 1)] *= 30.0
    return x * torch.exp(torch.randn(shape[0], 1, 1, generator=g))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_oracle(fmt: str, shape: tuple[int, int, int]) -> None:
    scheme = parse(fmt)
    x = sample(shape, seed=sum(shape) + len(fmt))
    codes, scale, zero = reference.quantize(x, scheme)
    want_codes, want_scale, want_zero, want_hat = oracle(x, scheme)

    assert codes.dtype == scheme.code_dtype
    assert codes.shape == (shape[0], *scheme.code_shape(*shape[1:]))
    assert scale.dtype == scheme.scale_dtype
    np.testing.assert_array_equal(scale.float().numpy(), want_scale)
    if scheme.symmetric:
        assert zero is None
    else:
        assert zero.dtype == scheme.scale_dtype
        np.testing.assert_array_equal(zero.float().numpy(), want_zero)
    got = codes.float().numpy() if scheme.per_byte == 1 else unpack_bytes(codes, scheme.bits, shape[-1])
    np.testing.assert_array_equal(got, want_codes)

    x_hat = reference.dequantize(codes, scale, zero, scheme, shape[-1], torch.float32)
    np.testing.assert_array_equal(x_hat.numpy(), want_hat)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.startswith("int8")])
def test_int8_error_bound(fmt: str) -> None:
    """|x - x_hat| <= scale / 2 per element, up to the float32 rounding of x / s and q * s (2^-24 each)."""
    scheme = parse(fmt)
    x = sample((2, 200, 96), seed=7)
    codes, scale, _ = reference.quantize(x, scheme)
    x_hat = reference.dequantize(codes, scale, None, scheme, 96, torch.float32)
    g = scheme.group_size(200, 96)
    axis = 1 if scheme.axis == "channel" else 2
    s = scale.double().repeat_interleave(g, dim=axis)[:, :200, :96]
    err = (x.double() - x_hat.double()).abs()
    assert bool((err <= s * (0.5 + 128 * 2.0**-24)).all())
    assert float((err / s).max()) > 0.49  # the bound is nearly reached: the data really is rounded
    assert int(codes.abs().max()) == 127


@pytest.mark.parametrize("fmt", ["int8-channel", "int8-token"])
def test_int8_near_ties(fmt: str) -> None:
    """Values a few ulps from code midpoints: only float32 division then rint gets every code."""
    scheme = parse(fmt)
    x = near_ties(seed=1)
    codes, scale, _ = reference.quantize(x, scheme)
    want_codes, want_scale, _, _ = oracle(x, scheme)
    np.testing.assert_array_equal(scale.numpy(), want_scale)
    np.testing.assert_array_equal(codes.float().numpy(), want_codes)
    wide = torch.round(x.double() / scale.double()).float()
    assert not torch.equal(codes.float(), wide)  # the data does separate float32 from float64


@pytest.mark.parametrize(
    "fmt", ["int8-channel", "int8-token", "int4-channel", "int4-token", "int2-channel", "int2-token"]
)
def test_integer_ties_round_half_to_even(fmt: str) -> None:
    """With scale 1 and zero 0 every x + 1/2 is a tie; codes go to the even neighbour."""
    scheme = parse(fmt)
    qmax = int(scheme.qmax)
    lo = 0 if not scheme.symmetric else -qmax
    ties = torch.arange(lo, qmax, dtype=torch.float32) + 0.5
    n = ties.numel()
    x = torch.zeros(n + 2, n + 2)
    x[1:-1, 1:-1] = torch.diag(ties)  # one tie per row and per column
    x[0, :], x[:, 0], x[-1, :], x[:, -1] = float(qmax), float(qmax), float(lo), float(lo)
    codes, scale, zero = reference.quantize(x[None], scheme)
    assert bool((scale == 1).all()) and (zero is None or bool((zero == lo).all()))
    got = codes if scheme.per_byte == 1 else reference.unpack(codes, scheme.bits, n + 2)
    want = torch.from_numpy(np.rint(ties.numpy()))
    assert torch.equal(torch.diagonal(got[0, 1:-1, 1:-1]).float(), want)


@pytest.mark.parametrize("fmt", ["int8-token", "int4-channel", "int2-token-g4"])
def test_encode_clamps_to_the_code_range(fmt: str) -> None:
    """Given scales too small for the data, codes saturate at the ends of the range (int8: +-127)."""
    scheme = parse(fmt)
    x = sample((1, 6, 8), seed=2)
    scale, zero = reference.compute_scales(x, scheme)
    codes = reference.encode(x, scheme, (scale.float() / 8).to(scale.dtype), zero)
    got = codes if scheme.per_byte == 1 else reference.unpack(codes, scheme.bits, 8)
    lo = -scheme.qmax if scheme.symmetric else 0.0
    assert float(got.min()) == lo and float(got.max()) == scheme.qmax


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("d", [1, 3, 5, 8, 65])
def test_pack_unpack_roundtrip(bits: int, d: int) -> None:
    g = torch.Generator().manual_seed(d + bits)
    q = torch.randint(0, 2**bits, (3, 4, d), generator=g, dtype=torch.uint8)
    p = reference.pack(q, bits)
    per = 8 // bits
    assert p.dtype == torch.uint8 and p.shape == (3, 4, math.ceil(d / per))
    want = np.zeros(p.shape, np.int64)
    for i in range(d):
        want[..., i // per] |= q[..., i].numpy().astype(np.int64) << ((i % per) * bits)
    np.testing.assert_array_equal(p.numpy(), want)
    assert torch.equal(reference.unpack(p, bits, d), q)


def test_pack_is_identity_for_8_bits() -> None:
    q = torch.arange(-5, 5, dtype=torch.int8).reshape(2, 5)
    assert torch.equal(reference.pack(q, 8), q)
    assert torch.equal(reference.unpack(q, 8, 5), q)


@pytest.mark.parametrize("fmt", PRESETS)
def test_zero_and_constant_groups(fmt: str) -> None:
    """An all-zero channel (or token) gets scale 1 and comes back as exact zeros; a constant one comes
    back exactly when the constant is exact in the scale arithmetic (c = qmax / 2^k)."""
    scheme = parse(fmt)
    c = scheme.qmax / 2 ** math.ceil(math.log2(scheme.qmax))
    x = sample((2, 40, 24), seed=3)
    if scheme.axis == "channel":
        x[:, :, 5], x[:, :, 9] = 0.0, -c
        zero_part, const_part = (lambda y: y[:, :, 5]), (lambda y: y[:, :, 9])
    else:
        x[:, 11, :], x[:, 17, :] = 0.0, c
        zero_part, const_part = (lambda y: y[:, 11, :]), (lambda y: y[:, 17, :])
    codes, scale, zero = reference.quantize(x, scheme)
    assert bool(torch.isfinite(scale).all())
    x_hat = reference.dequantize(codes, scale, zero, scheme, 24, torch.float32)
    assert bool(torch.isfinite(x_hat).all())
    assert torch.equal(zero_part(x_hat), torch.zeros_like(zero_part(x)))
    assert torch.equal(const_part(x_hat), const_part(x))

    zeros = torch.zeros(1, 8, 6)
    c0, s0, z0 = reference.quantize(zeros, scheme)
    assert bool((s0 == 1).all())
    assert torch.equal(reference.dequantize(c0, s0, z0, scheme, 6, torch.float32), zeros)


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_saturation_and_ties(fmt: str) -> None:
    """With scale 1 (row max = format max) codes are the values rounded to FP8, ties to even; a smaller
    scale saturates at the format max instead of overflowing to NaN or Inf."""
    scheme = parse(fmt)
    fmax = FP8_MAX[scheme.fp8]
    mant, emin = FP8_GRID[scheme.fp8]
    ulp1 = 2.0**-mant  # spacing of the FP8 values in [1, 2)
    sub = 2.0 ** (emin - mant)  # spacing of the subnormals
    row = [fmax, 1 + ulp1 / 2, 1 + 3 * ulp1 / 2, -(1 + ulp1 / 2), 2 - ulp1 / 2, 1 + ulp1 / 4]
    want = [fmax, 1.0, 1 + 2 * ulp1, -1.0, 2.0, 1.0]
    row += [sub / 2, 1.5 * sub, 2.5 * sub, -1.5 * sub]
    want += [0.0, 2 * sub, 2 * sub, -2 * sub]
    x = torch.tensor([[row]])
    codes, scale, _ = reference.quantize(x, scheme)
    assert float(scale) == 1.0
    assert codes.float()[0, 0].tolist() == want
    big = torch.tensor([[[3 * fmax, -3 * fmax, fmax / 2]]])
    sat = reference.encode(big, scheme, torch.ones(1, 1, 1), None)
    assert sat.float()[0, 0].tolist() == [fmax, -fmax, fmax / 2]


def test_fp8_round_helper_is_a_real_oracle() -> None:
    """The test's own FP8 rounding agrees with torch's float8 dtypes on a dense sweep of values."""
    y = np.concatenate([np.linspace(-448, 448, 20001), np.geomspace(1e-9, 448, 20001)]).astype(np.float32)
    np.testing.assert_array_equal(fp8_round(y, "e4m3"), torch.from_numpy(y).to(torch.float8_e4m3fn).float())
    y = np.concatenate([y, np.linspace(-57344, 57344, 20001, dtype=np.float32)])
    np.testing.assert_array_equal(fp8_round(y, "e5m2"), torch.from_numpy(y).to(torch.float8_e5m2).float())


@pytest.mark.parametrize("fmt", ["int8-channel", "int4-token-g32", "fp8-e4m3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_quantized_as_float32(fmt: str, dtype: torch.dtype) -> None:
    scheme = parse(fmt)
    x = sample((2, 33, 40), seed=11).to(dtype)
    codes, scale, zero = reference.quantize(x, scheme)
    codes32, scale32, zero32 = reference.quantize(x.float(), scheme)
    assert torch.equal(codes.view(torch.uint8), codes32.view(torch.uint8))
    assert torch.equal(scale, scale32)
    x_hat = reference.dequantize(codes, scale, zero, scheme, 40, dtype)
    assert x_hat.dtype == dtype
    assert torch.equal(x_hat, reference.dequantize(codes, scale, zero, scheme, 40, torch.float32).to(dtype))


def test_nonfinite_input_gives_nonfinite_scale() -> None:
    for fmt in ("int8-channel", "int4-token", "fp8-e5m2"):
        scheme = parse(fmt)
        for bad in (math.nan, math.inf, -math.inf):
            x = sample((1, 8, 8), seed=1)
            x[0, 3, 4] = bad
            scale, zero = reference.compute_scales(x, scheme)
            meta = scale.float() if zero is None else torch.stack([scale.float(), zero.float()])
            assert not bool(torch.isfinite(meta).all()), (fmt, bad)


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per (batch, query head), in float64, with explicit loops."""
    b, hq, lq, d = q.shape
    rep = hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            for r in range(lq):
                lk = k.shape[2] if causal_offset is None else causal_offset + r + 1
                kk, vv = k[i, h // rep, :lk].double(), v[i, h // rep, :lk].double()
                w = torch.softmax(kk @ q[i, h, r].double() / math.sqrt(d), dim=0)
                out[i, h, r] = w @ vv
    return out


@pytest.mark.parametrize("causal_offset", [None, 3])
def test_attention_matches_naive(causal_offset: int | None) -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g)
    got = reference.attention(q, k, v, causal_offset=causal_offset)
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, causal_offset), rtol=1e-5, atol=1e-6)


def test_attention_rejects_bad_head_ratio() -> None:
    with pytest.raises(ValueError, match="multiple"):
        reference.attention(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
