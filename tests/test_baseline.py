"""The cpu-scalar baseline (numba loops) is bit-exact with the torch reference, in both walk orders."""

from __future__ import annotations

import math

import pytest
import torch

import kvpack
from conftest import near_ties, requires_numba
from kvpack import baseline, reference
from kvpack.schemes import parse

pytestmark = requires_numba

PAPER = parse("int8-channel")
SHAPES = [(1, 1, 1), (1, 1, 3), (2, 5, 3), (1, 3, 1), (3, 257, 65), (1, 2048, 128), (2, 100, 96)]


def data(shape: tuple[int, ...], dist: str, seed: int) -> torch.Tensor:
    """The paper's uniform [-1, 1] data, or Gaussian data with outlier channels and a spread of scales."""
    g = torch.Generator().manual_seed(seed)
    if dist == "uniform":
        return torch.rand(shape, generator=g) * 2 - 1
    return torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[-1], generator=g))


def assert_same_as_reference(x: torch.Tensor) -> None:
    codes, scale, zero = baseline.quantize(x, PAPER)
    want_codes, want_scale, _ = reference.quantize(x, PAPER)
    assert zero is None
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
    torch.testing.assert_close(codes, want_codes, rtol=0, atol=0)


@pytest.mark.parametrize("dist", ["uniform", "outliers"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_is_bit_exact(shape: tuple[int, int, int], dist: str) -> None:
    assert_same_as_reference(data(shape, dist, seed=sum(shape)))


@pytest.mark.parametrize("seed", range(4))
def test_near_ties_are_bit_exact(seed: int) -> None:
    """Inputs where float64 division or a reciprocal multiply would give other codes."""
    assert_same_as_reference(near_ties(rows=64, cols=48, seed=seed))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype: torch.dtype) -> None:
    x = data((2, 77, 40), "outliers", seed=3).to(dtype)
    assert_same_as_reference(x)
    codes, scale, _ = baseline.quantize(x, PAPER)
    got = baseline.dequantize(codes, scale, None, PAPER, 40, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got, reference.dequantize(codes, scale, None, PAPER, 40, dtype), rtol=0, atol=0
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantize_is_bit_exact(shape: tuple[int, int, int]) -> None:
    x = data(shape, "outliers", seed=5)
    codes, scale, _ = reference.quantize(x, PAPER)
    got = baseline.dequantize(codes, scale, None, PAPER, shape[-1], torch.float32)
    want = reference.dequantize(codes, scale, None, PAPER, shape[-1], torch.float32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (7, 3), (257, 65), (2048, 128)], ids=str)
def test_column_major_walk_gives_the_same_result(shape: tuple[int, int]) -> None:
    x = data(shape, "uniform", seed=shape[0])
    x[shape[0] // 2] = torch.where(torch.arange(shape[1]) % 2 == 0, 0.0, x[shape[0] // 2])
    codes, scale = baseline.quantize_column_major(x)
    want_codes, want_scale, _ = reference.quantize(x[None], PAPER)
    torch.testing.assert_close(scale, want_scale[0], rtol=0, atol=0)
    torch.testing.assert_close(codes, want_codes[0], rtol=0, atol=0)
    x_hat = baseline.dequantize_column_major(codes, scale)
    want = reference.dequantize(want_codes, want_scale, None, PAPER, shape[1], torch.float32)[0]
    torch.testing.assert_close(x_hat, want, rtol=0, atol=0)


def test_column_major_near_ties() -> None:
    x = near_ties(rows=40, cols=40, seed=9)[0]
    codes, scale = baseline.quantize_column_major(x)
    want_codes, want_scale, _ = reference.quantize(x[None], PAPER)
    assert torch.equal(codes, want_codes[0]) and torch.equal(scale, want_scale[0])


def test_every_output_element_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs are allocated uninitialized; poison those allocations (77) and compare with the reference."""
    real_torch_empty = torch.empty

    def poisoned_torch(*size, **kw):
        return real_torch_empty(*size, **kw).fill_(77)

    def poisoned_np(shape, dtype=float):
        return baseline.np.full(shape, 77, dtype=dtype)

    x = data((2, 33, 17), "uniform", seed=11) * 0.01
    want_codes, want_scale, _ = reference.quantize(x, PAPER)
    want = reference.dequantize(want_codes, want_scale, None, PAPER, 17, torch.float32)
    monkeypatch.setattr(torch, "empty", poisoned_torch)
    monkeypatch.setattr(baseline.np, "empty", poisoned_np)
    codes, scale, _ = baseline.quantize(x, PAPER)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    assert torch.equal(baseline.dequantize(codes, scale, None, PAPER, 17, torch.float32), want)
    codes2, scale2 = baseline.quantize_column_major(x[1])
    assert torch.equal(codes2, want_codes[1]) and torch.equal(scale2, want_scale[1])
    assert torch.equal(baseline.dequantize_column_major(codes2, scale2), want[1])


def test_public_api_with_cpu_scalar(monkeypatch: pytest.MonkeyPatch) -> None:
    x = data((2, 3, 50, 24), "outliers", seed=12)
    q = kvpack.quantize(x, "int8-channel", backend="cpu-scalar")
    want = kvpack.quantize(x, "int8-channel", backend="torch")
    assert torch.equal(q.codes, want.codes) and torch.equal(q.scale, want.scale)
    x_hat = kvpack.dequantize(q, backend="cpu-scalar")
    assert torch.equal(x_hat, kvpack.dequantize(want, backend="torch"))
    view = x[:, :, ::3].transpose(-1, -2)
    monkeypatch.setenv("KVPACK_BACKEND", "cpu-scalar")
    assert torch.equal(
        kvpack.roundtrip(view, "int8-channel"), kvpack.roundtrip(view, "int8-channel", "torch")
    )


def test_zero_channel_gets_scale_one() -> None:
    x = data((1, 20, 6), "uniform", seed=13)
    x[..., 2] = 0.0
    codes, scale, _ = baseline.quantize(x, PAPER)
    assert float(scale[0, 0, 2]) == 1.0 and not bool(codes[..., 2].any())
    assert bool((baseline.dequantize(codes, scale, None, PAPER, 6, torch.float32)[..., 2] == 0).all())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("row", [0, 9, 19])
def test_nonfinite_input_makes_the_scale_nonfinite(bad: float, row: int) -> None:
    """Wherever the NaN sits among larger values, the channel's scale is not finite, and ops reports it."""
    x = data((1, 20, 6), "uniform", seed=14)
    x[0, :, 3] = torch.linspace(-5, 5, 20)
    x[0, row, 3] = bad
    scale, _ = baseline.compute_scales(x, PAPER)
    assert not math.isfinite(float(scale[0, 0, 3]))
    assert bool(torch.isfinite(scale[0, 0, [0, 1, 2, 4, 5]]).all())
    _, col_scale = baseline.quantize_column_major(x[0])
    assert not math.isfinite(float(col_scale[0, 3]))
    assert bool(torch.isfinite(col_scale[0, [0, 1, 2, 4, 5]]).all())
    with pytest.raises(ValueError, match="NaN or Inf"):
        kvpack.quantize(x, "int8-channel", backend="cpu-scalar")


def test_rejects_what_it_does_not_implement() -> None:
    x = data((1, 4, 4), "uniform", seed=15)
    for fmt in ("int8-token", "int8-channel-g2", "int4-channel", "fp8-e4m3-channel"):
        with pytest.raises(ValueError, match="int8-channel only"):
            baseline.quantize(x, parse(fmt))
    with pytest.raises(ValueError, match="3-D CPU tensor"):
        baseline.quantize(x[0], PAPER)
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        baseline.quantize_column_major(x)
    with pytest.raises(TypeError, match="floating-point"):
        baseline.quantize(x.to(torch.int32), PAPER)
    with pytest.raises(ValueError, match="scale has shape"):
        baseline.encode(x, PAPER, torch.ones(1, 1, 3), None)
    with pytest.raises(ValueError, match="codes must be int8"):
        baseline.dequantize(
            torch.zeros(1, 4, 4, dtype=torch.uint8), torch.ones(1, 1, 4), None, PAPER, 4, torch.float32
        )


def test_loops_are_single_threaded() -> None:
    """The baseline is the paper's one-thread loop: nothing is compiled with numba's parallel mode."""
    loops = baseline._compiled()
    for name in ("absmax_rows", "absmax_columns", "scales", "encode_rows", "encode_columns"):
        assert not getattr(loops, name).targetoptions.get("parallel", False)
