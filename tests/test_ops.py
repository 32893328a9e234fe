"""The public quantize / dequantize: input validation, backend choice, shapes, views and dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kvpack
from kvpack import backends, metrics, reference
from kvpack.backends import Backend, resolve
from kvpack.schemes import PRESETS, parse

CPU = torch.device("cpu")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def same(a: kvpack.QuantizedTensor, b: kvpack.QuantizedTensor) -> bool:
    """Bit-identical codes, scales and zero points (fp8 codes compared as bytes)."""
    parts = [(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), (a.scale, b.scale)]
    if a.zero is not None or b.zero is not None:
        parts.append((a.zero, b.zero))
    return all(x is not None and y is not None and torch.equal(x, y) for x, y in parts)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", PRESETS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "+inf", "-inf"])
def test_nonfinite_input_raises(fmt: str, bad: float) -> None:
    x = randn(2, 40, 16)
    x[1, 33, 7] = bad
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        kvpack.quantize(x, fmt)


@pytest.mark.parametrize("fmt", ["int4-token", "int2-channel-g64"])
@pytest.mark.parametrize("offset", [0.0, 7e4], ids=["wide", "offset"])
def test_range_beyond_fp16_scales_raises(fmt: str, offset: float) -> None:
    """A range too wide for a float16 scale, or a minimum beyond float16 (the zero point), is an error."""
    x = offset + randn(1, 64, 8) * (1e6 if offset == 0 else 1.0)
    with pytest.raises(ValueError, match="overflows the float16 scales"):
        kvpack.quantize(x, fmt)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_wrong_dtype_raises_type_error(dtype: torch.dtype) -> None:
    x = (randn(4, 8) * 10).to(dtype)
    with pytest.raises(TypeError, match=r"dtype .*accepted: float32, float16, bfloat16"):
        kvpack.quantize(x, "int8-channel")


def test_non_tensor_raises_type_error() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        kvpack.quantize(np.ones((4, 8), np.float32), "int8-channel")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(), (8,)], ids=["0-D", "1-D"])
def test_too_few_dimensions_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        kvpack.quantize(torch.ones(shape), "int8-channel")


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (2, 0, 8), (0, 3, 8)])
def test_empty_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="empty"):
        kvpack.quantize(torch.ones(shape), "int8-token")


@pytest.mark.parametrize(
    ("fmt", "match"),
    [
        ("int8", "needs an axis"),
        ("int8-channel-g0", "positive"),
        ("int7-token", "unknown format"),
        ("q8_0", "unknown"),
    ],
)
def test_bad_format_names_raise(fmt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kvpack.quantize(randn(4, 8), fmt)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'.*torch, cpu-scalar"):
        kvpack.quantize(randn(4, 8), "int8-channel", backend="gpu")


@pytest.mark.parametrize(
    ("backend", "fmt", "match"),
    [
        ("cuda-naive", "int8-channel", "needs CUDA tensors"),
        ("cuda-vectorized", "int8-channel", "needs CUDA tensors"),
        ("cuda-grouped", "int8-channel-g64", "needs CUDA tensors"),
        ("cpu-scalar", "int4-token", "int8-channel only"),
        ("cpu-scalar", "int8-channel-g64", "int8-channel only"),
    ],
)
def test_backend_that_cannot_run_here(backend: str, fmt: str, match: str) -> None:
    with pytest.raises(RuntimeError, match=f"backend {backend} cannot run here: .*{match}"):
        kvpack.quantize(randn(4, 8), fmt, backend=backend)


def test_auto_on_a_gpu_picks_by_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8-channel-gN quantizes with the CUDA C kernel where CuPy is installed and dequantizes with
    Triton; other formats, or no CuPy, take Triton both ways (no GPU needed: only names are resolved)."""
    gpu = torch.device("cuda")
    monkeypatch.setattr(backends, "_has", lambda module: True)
    g128 = parse("int8-channel-g128")
    assert resolve("auto", g128, gpu) == Backend.CUDA_GROUPED
    assert resolve("auto", g128, gpu, "dequantize") == Backend.TRITON
    assert resolve("auto", parse("int8-channel"), gpu) == Backend.TRITON
    assert resolve("auto", parse("int4-channel-g64"), gpu) == Backend.TRITON
    with pytest.raises(ValueError, match="unknown operation"):
        resolve("auto", g128, gpu, "encode")
    monkeypatch.setattr(backends, "_has", lambda module: module != "cupy")
    assert resolve("auto", g128, gpu) == Backend.TRITON


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        kvpack.quantize(randn(4, 8), "int8-channel", backend="triton")


def test_missing_numba_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_has", lambda module: module != "numba")
    with pytest.raises(RuntimeError, match=r"pip install 'kvpack\[cpu\]'"):
        kvpack.quantize(randn(4, 8), "int8-channel", backend="cpu-scalar")
    assert resolve("auto", parse("int8-channel"), CPU) == Backend.TORCH


def test_dequantize_rejects_bad_arguments() -> None:
    q = kvpack.quantize(randn(4, 8), "int8-channel")
    with pytest.raises(TypeError, match="QuantizedTensor"):
        kvpack.dequantize(randn(4, 8))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float64"):
        kvpack.dequantize(q, dtype=torch.float64)


# -- backend choice -------------------------------------------------------------------------------


def test_auto_is_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVPACK_BACKEND", raising=False)
    for fmt in PRESETS:
        assert resolve("auto", parse(fmt), CPU) == Backend.TORCH
    assert Backend.TORCH in backends.available(parse("int4-token"), CPU)


def test_env_override_replaces_auto_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPACK_BACKEND", "cpu-scalar")
    scheme = parse("int8-channel")
    if backends.why_not(Backend.CPU_SCALAR, scheme, CPU) is None:
        assert resolve("auto", scheme, CPU) == Backend.CPU_SCALAR
    assert resolve("torch", scheme, CPU) == Backend.TORCH
    monkeypatch.setenv("KVPACK_BACKEND", "cuda-tiled")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve("auto", scheme, CPU)


# -- shapes, views, dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", PRESETS)
def test_four_d_input_has_scales_per_leading_index(fmt: str) -> None:
    x = randn(2, 3, 37, 65, seed=4) * torch.linspace(0.1, 10, 6).reshape(2, 3, 1, 1)
    q = kvpack.quantize(x, fmt)
    scheme = parse(fmt)
    assert q.shape == x.shape and q.scale.shape == (2, 3, *scheme.scale_shape(37, 65))
    for b in range(2):
        for h in range(3):
            alone = kvpack.quantize(x[b, h], fmt)
            assert torch.equal(q.codes[b, h].view(torch.uint8), alone.codes.view(torch.uint8))
            assert torch.equal(q.scale[b, h], alone.scale)
            assert q.zero is None or torch.equal(q.zero[b, h], alone.zero)
    x_hat = kvpack.dequantize(q)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert torch.equal(x_hat[1, 2], kvpack.dequantize(kvpack.quantize(x[1, 2], fmt)))


@pytest.mark.parametrize(
    "fmt", ["int8-channel", "int8-token-g32", "int4-channel-g64", "int2-token-g32", "fp8-e4m3"]
)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (5, 1), (1, 65), (3, 65), (200, 3)], ids=str)
def test_odd_shapes_match_the_reference(fmt: str, shape: tuple[int, int]) -> None:
    x = randn(*shape, seed=sum(shape))
    q = kvpack.quantize(x, fmt)
    codes, scale, zero = reference.quantize(x[None], parse(fmt))
    assert torch.equal(q.codes.view(torch.uint8), codes[0].view(torch.uint8))
    assert torch.equal(q.scale, scale[0])
    x_hat = kvpack.dequantize(q)
    assert x_hat.shape == x.shape
    assert torch.equal(x_hat, reference.dequantize(codes, scale, zero, parse(fmt), shape[1], x.dtype)[0])


VIEWS = {
    "transposed": lambda base: base.transpose(-1, -2),
    "sliced": lambda base: base[:, 1:-1:2, 3:],
    "expanded": lambda base: base[:1].expand(3, -1, -1),
    "permuted-4d": lambda base: base.reshape(3, 2, 20, 25).permute(1, 0, 3, 2),
}


@pytest.mark.parametrize("fmt", PRESETS)
@pytest.mark.parametrize("view", VIEWS)
def test_non_contiguous_views_match_their_copy(fmt: str, view: str) -> None:
    x = VIEWS[view](randn(3, 40, 25, seed=9))
    assert not x.is_contiguous()
    q, qc = kvpack.quantize(x, fmt), kvpack.quantize(x.contiguous(), fmt)
    assert same(q, qc)
    assert torch.equal(kvpack.dequantize(q), kvpack.dequantize(qc))


@pytest.mark.parametrize(
    "fmt", ["int8-channel", "int8-token-g32", "int4-token", "int2-channel-g64", "fp8-e5m2"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(fmt: str, dtype: torch.dtype) -> None:
    x = randn(2, 70, 48, seed=6).to(dtype)
    q = kvpack.quantize(x, fmt)
    assert q.dtype == dtype and same(q, kvpack.quantize(x.float(), fmt))
    x_hat = kvpack.dequantize(q)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    as32 = kvpack.dequantize(q, dtype=torch.float32)
    assert as32.dtype == torch.float32 and torch.equal(x_hat, as32.to(dtype))
    assert metrics.relative_l2_error(x, x_hat) < 0.5


@pytest.mark.parametrize("fmt", PRESETS)
def test_all_zero_input_is_exact(fmt: str) -> None:
    x = torch.zeros(2, 9, 70)
    q = kvpack.quantize(x, fmt)
    assert bool((q.scale == 1).all())
    assert torch.equal(kvpack.dequantize(q), x)


@pytest.mark.parametrize("fmt", PRESETS)
def test_roundtrip_is_dequantize_of_quantize(fmt: str) -> None:
    x = randn(3, 50, 32, seed=8)
    assert torch.equal(kvpack.roundtrip(x, fmt), kvpack.dequantize(kvpack.quantize(x, fmt)))


# -- per-channel keys, per-token values -----------------------------------------------------------


def outliers(axis: str, seed: int) -> torch.Tensor:
    """Gaussian [4, 512, 128] with 4 outlier channels (axis='channel') or 8 outlier tokens, 20-100x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 512, 128, generator=g)
    n, dim = (4, 2) if axis == "channel" else (8, 1)
    idx = torch.randperm(x.shape[dim], generator=g)[:n]
    gain = 20 + 80 * torch.rand(n, generator=g)
    if axis == "channel":
        x[:, :, idx] *= gain
    else:
        x[:, idx, :] *= gain[:, None]
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channel_scales_win_for_keys_and_token_scales_for_values(bits: int, seed: int) -> None:
    """The claim ``kvpack accuracy`` shows: keys have outlier channels, so per-channel scales keep the
    other channels precise; values have outlier tokens, so per-token scales do."""
    keys, values = outliers("channel", seed), outliers("token", seed)

    def err(x: torch.Tensor, axis: str) -> float:
        return metrics.relative_l2_error(x, kvpack.roundtrip(x, f"int{bits}-{axis}"))

    assert err(keys, "channel") * 1.5 < err(keys, "token")  # about 2x (int4) to 3x (int8) on this data
    assert err(values, "token") * 3 < err(values, "channel")  # about 4-5x


def test_submodules_load_on_first_use() -> None:
    import kvpack

    assert kvpack.cache.QuantizedLayer.__module__ == "kvpack.cache"
    assert callable(kvpack.attention.decode)
    with pytest.raises(AttributeError, match="no attribute"):
        kvpack.not_a_module  # noqa: B018
