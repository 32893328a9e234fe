"""The ``kvpack::quantize`` / ``kvpack::dequantize`` custom ops: fake shapes, opcheck, torch.compile
and CUDA-graph capture of :func:`kvpack.quantize` / :func:`kvpack.dequantize`."""

from __future__ import annotations

import pytest
import torch

import kvpack
from conftest import requires_cuda
from kvpack.ops import _dequantize_fake, _dequantize_op, _quantize_fake, _quantize_op
from kvpack.schemes import FP8_DTYPES, parse

FORMATS = (*kvpack.PRESETS, "int8-channel-g5", "int4-token-g3", "fp8-e5m2-channel-g4")


def _random(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(shape, generator=g) * 2).to(dtype).to(device)


def _bits(t: torch.Tensor | None) -> torch.Tensor | None:
    """Comparable form: FP8 codes as their bytes (torch compares no float8 tensors on the CPU)."""
    if t is not None and t.dtype in FP8_DTYPES.values():
        return t.view(torch.uint8)
    return t


def assert_same_quantized(got: kvpack.QuantizedTensor, want: kvpack.QuantizedTensor) -> None:
    assert got.scheme == want.scheme and got.shape == want.shape and got.dtype == want.dtype
    for a, b in ((got.codes, want.codes), (got.scale, want.scale), (got.zero, want.zero)):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ((2, 13, 65), (1, 1, 3), (3, 64, 32)), ids=str)
def test_fake_shapes_match_real_outputs(fmt: str, shape: tuple[int, ...]) -> None:
    x = _random(shape)
    real = _quantize_op(x, fmt, "torch")
    fake = _quantize_fake(x, fmt, "torch")
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.dtype, r.device) == (f.shape, f.dtype, f.device)
    for dtype in (torch.float32, torch.bfloat16):
        back = _dequantize_op(*real, fmt, shape[-1], dtype, "torch")
        fake_back = _dequantize_fake(*real, fmt, shape[-1], dtype, "torch")
        assert (back.shape, back.dtype) == (fake_back.shape, fake_back.dtype) == (torch.Size(shape), dtype)


@pytest.mark.parametrize("fmt", ("int8-channel", "int4-token-g32", "int2-channel-g64", "fp8-e4m3"))
def test_opcheck(fmt: str) -> None:
    x = _random((2, 64, 48))
    torch.library.opcheck(_quantize_op, (x, fmt, "torch"))
    codes, scale, zero = _quantize_op(x, fmt, "torch")
    # opcheck's schema test compares outputs with allclose, which torch lacks for float8 on the CPU.
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if parse(fmt).fp8 is None:
        tests = ("test_schema", *tests)
    args = (codes, scale, zero, fmt, 48, torch.float16, "torch")
    torch.library.opcheck(_dequantize_op, args, test_utils=tests)


def _quantize_roundtrip(
    x: torch.Tensor, fmt: str, backend: str
) -> tuple[kvpack.QuantizedTensor, torch.Tensor]:
    q = kvpack.quantize(x, fmt, backend=backend)
    return q, kvpack.dequantize(q, backend=backend)


@pytest.mark.parametrize("dynamic", (False, True))
@pytest.mark.parametrize("fmt", ("int8-channel", "int4-token-g32", "fp8-e4m3-channel", "int2-channel-g16"))
def test_compile_fullgraph_on_cpu(fmt: str, dynamic: bool) -> None:
    """Traced without a graph break; the same bits as eager, for two input shapes."""
    torch.compiler.reset()
    compiled = torch.compile(_quantize_roundtrip, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for shape in ((2, 4, 32, 64), (3, 2, 40, 64)):
        x = _random(shape, torch.bfloat16)
        q, y = compiled(x, fmt, "torch")
        want_q, want_y = _quantize_roundtrip(x, fmt, "torch")
        assert_same_quantized(q, want_q)
        assert torch.equal(y, want_y)


# ---- GPU ------------------------------------------------------------------------------------------

GPU_FORMATS = ("int8-channel", "int8-channel-g128", "int4-token-g32", "int2-channel-g64", "fp8-e4m3")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "auto"))
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_compile_fullgraph(fmt: str, backend: str) -> None:
    torch.compiler.reset()
    compiled = torch.compile(_quantize_roundtrip, fullgraph=True)
    x = _random((4, 8, 1024, 128), torch.float16, "cuda")
    q, y = compiled(x, fmt, backend)
    want_q, want_y = _quantize_roundtrip(x, fmt, backend)
    assert q.device.type == "cuda"
    assert_same_quantized(q, want_q)
    assert torch.equal(y, want_y)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_cuda_graph_capture_and_replay(fmt: str) -> None:
    """Capture quantize + dequantize once, replay on new data: the bits of eager on that data."""
    static_x = _random((8, 2048, 128), torch.bfloat16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
        _quantize_roundtrip(static_x, fmt, "triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_q, static_y = _quantize_roundtrip(static_x, fmt, "triton")
    for seed in (1, 2):
        fresh = _random((8, 2048, 128 + seed), torch.bfloat16, "cuda")[..., :128]
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        want_q, want_y = _quantize_roundtrip(fresh.contiguous(), fmt, "triton")
        assert_same_quantized(static_q, want_q)
        assert torch.equal(static_y, want_y)


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_reduce_overhead() -> None:
    """torch.compile's CUDA-graph mode around the ops: same bits as eager, call after call."""
    torch.compiler.reset()
    compiled = torch.compile(_quantize_roundtrip, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):
        x = _random((2, 8, 512 + seed, 128), torch.float16, "cuda")
        q, y = compiled(x, "int8-channel", "triton")
        want_q, want_y = _quantize_roundtrip(x, "int8-channel", "triton")
        assert_same_quantized(q, want_q)
        assert torch.equal(y.clone(), want_y)
