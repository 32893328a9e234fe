"""QuantizedLayer against the plain-torch reference: what attention receives, when blocks are quantized,
how storage grows, batch operations, memory, and errors."""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from kvpack import reference
from kvpack.cache import CACHE_PRESETS, QuantizedLayer, cache_formats, quantized_length
from kvpack.schemes import Scheme, parse

POISON = 77


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the layer allocates starts full of garbage (NaN or 77), never zeros."""
    empty = torch.empty

    def poisoned_empty(*size, dtype=None, device=None, **kwargs):
        out = empty(*size, dtype=dtype, device=device, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else POISON)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def simulate(lengths: list[int], residual: int, group: int) -> list[tuple[int, int]]:
    """(num_quantized, num_window) after each append, by running the flush rule literally."""
    q = w = 0
    out = []
    for n in lengths:
        w += n
        while w > residual and w >= group:
            q, w = q + group, w - group
        out.append((q, w))
    return out


def blockwise(x: torch.Tensor, scheme: Scheme, group: int, tokens: int) -> list[tuple[torch.Tensor, ...]]:
    """Reference (codes, scale, zero, dequantized) of the first ``tokens`` tokens of ``x [B, H, T, D]``, one
    block of ``group`` tokens at a time."""
    b, h, _, d = x.shape
    out = []
    for start in range(0, tokens, group):
        blk = x[:, :, start : start + group].reshape(b * h, group, d)
        codes, scale, zero = reference.quantize(blk, scheme)
        deq = reference.dequantize(codes, scale, zero, scheme, d, x.dtype)
        parts = (codes, scale, zero, deq)
        out.append(tuple(None if t is None else t.reshape(b, h, *t.shape[1:]) for t in parts))
    return out


def expected(x: torch.Tensor, scheme: Scheme, group: int, nq: int) -> torch.Tensor:
    """What attention must receive: the blockwise reference round trip of the quantized part, then the
    rest."""
    parts = [blk[3] for blk in blockwise(x, scheme, group, nq)]
    return torch.cat([*parts, x[:, :, nq:]], dim=2)


def check_store(layer: QuantizedLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Codes, scales and zeros in the store are bit-exact with the blockwise reference."""
    nq = layer.num_quantized
    if not nq:
        return
    for role, scheme, x in (("key", layer.key_scheme, keys), ("value", layer.value_scheme, values)):
        ref = blockwise(x, scheme, layer.group, nq)
        rows = sum(blk[1].shape[2] for blk in ref)
        torch.testing.assert_close(getattr(layer, f"{role}_codes")[:, :, :nq].view(torch.uint8),
                                   torch.cat([blk[0] for blk in ref], 2).view(torch.uint8), rtol=0, atol=0)
        torch.testing.assert_close(getattr(layer, f"{role}_scale")[:, :, :rows],
                                   torch.cat([blk[1] for blk in ref], 2), rtol=0, atol=0)
        zero = getattr(layer, f"{role}_zero")
        assert (zero is None) == scheme.symmetric
        if zero is not None:
            ref_zero = torch.cat([blk[2] for blk in ref], 2)
            torch.testing.assert_close(zero[:, :, :rows], ref_zero, rtol=0, atol=0)


FORMATS = [*CACHE_PRESETS, "int4-channel-g64/int8-token-g8", "int8-token-g8/int4-token"]
PATTERNS = {
    "prefill-300-decode": [300, 1, 1, 1, 62, 1, 5, 70],
    "decode-only": [1] * 150,
    "short-prefill": [7, 1, 60, 1, 1],
    "exact-groups": [128, 64, 64, 1],
}


CASES = [(f, p, 16) for f in FORMATS for p in PATTERNS] + [("int4", p, r) for p in PATTERNS for r in (0, 128)]


@pytest.mark.parametrize(("fmt", "pattern", "residual"), CASES)
def test_layer_hands_attention_the_reference_round_trip(poisoned, fmt, pattern, residual):
    torch.manual_seed(hash((fmt, pattern, residual)) % 2**31)
    key, value = cache_formats(fmt)
    layer = QuantizedLayer(key, value, residual=residual, group=64)
    lengths = PATTERNS[pattern]
    keys = torch.randn(2, 3, sum(lengths), 32) * torch.linspace(0.5, 4.0, 32)
    values = torch.randn(2, 3, sum(lengths), 32)
    seen = 0
    for n, (nq, nw) in zip(lengths, simulate(lengths, residual, 64), strict=True):
        layer.append(keys[:, :, seen : seen + n], values[:, :, seen : seen + n])
        seen += n
        assert (layer.num_quantized, layer.num_window, layer.seq_length) == (nq, nw, seen)
        assert nq == quantized_length(seen, residual, 64)
        assert layer.num_window <= max(residual, 63)
        k, v = layer.dequantized()
        want_k = expected(keys[:, :, :seen], layer.key_scheme, 64, nq)
        want_v = expected(values[:, :, :seen], layer.value_scheme, 64, nq)
        torch.testing.assert_close(k, want_k, rtol=0, atol=0)
        torch.testing.assert_close(v, want_v, rtol=0, atol=0)
    check_store(layer, keys, values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_keeps_the_model_dtype_exactly(dtype):
    torch.manual_seed(1)
    layer = QuantizedLayer("int4-channel-g32", "int4-token", residual=40)
    x = torch.randn(1, 2, 100, 24, dtype=dtype)
    y = torch.randn(1, 2, 100, 24, dtype=dtype)
    layer.append(x, y)
    assert layer.num_quantized == 64 and layer.window_keys.dtype == dtype
    k, v = layer.dequantized()
    assert k.dtype == dtype and v.dtype == dtype
    assert torch.equal(k[:, :, 64:], x[:, :, 64:]) and torch.equal(v[:, :, 64:], y[:, :, 64:])
    check_store(layer, x, y)


def test_quantized_length_matches_the_flush_rule():
    for residual in (0, 1, 15, 16, 31, 32, 100):
        for group in (1, 16, 32):
            for length in range(0, 200, 7):
                assert quantized_length(length, residual, group) == simulate([length], residual, group)[0][0]


def test_append_cost_does_not_grow_with_context():
    """Decoding 2,000 tokens reallocates the store O(log n) times and the window never."""
    torch.manual_seed(2)
    layer = QuantizedLayer("int8-channel-g16", "int8-token", residual=16)
    layer.append(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
    ptrs, windows = set(), set()
    for _ in range(2000):
        layer.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        ptrs.add(layer.key_codes.data_ptr())
        windows.add(layer.window_keys.data_ptr())
    assert len(ptrs) <= 12
    assert len(windows) == 1 and layer.window_keys.shape[2] == 16
    assert layer.key_codes.shape[2] <= 1.5 * layer.num_quantized + 16


def test_reserve_sizes_the_store_exactly():
    torch.manual_seed(3)
    layer = QuantizedLayer("int8-channel-g64", "int8-token", residual=128)
    layer.reserve(1000)
    layer.append(torch.randn(1, 1, 200, 8), torch.randn(1, 1, 200, 8))
    ptr = layer.key_codes.data_ptr()
    for _ in range(800):
        layer.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    assert layer.key_codes.data_ptr() == ptr
    assert layer.key_codes.shape[2] == layer.num_quantized == quantized_length(1000, 128, 64) == 896


def _held_bytes(layer: QuantizedLayer) -> int:
    names = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero",
             "window_keys", "window_values")
    return sum(t.numel() * t.element_size() for t in (getattr(layer, n) for n in names) if t is not None)


@pytest.mark.parametrize(("preset", "target"), [("int8", 0.56), ("int4", 0.31)])
def test_memory_at_8192_tokens_smollm2_shapes(preset, target):
    """One layer of SmolLM2-135M (3 KV heads, head dim 64), float16, residual 128: prefill 8192 tokens,
    and prefill 4096 then decode to 8192 with the length reserved."""
    torch.manual_seed(4)
    key, value = CACHE_PRESETS[preset]
    x = torch.randn(1, 3, 8192, 64, dtype=torch.float16)
    prefill = QuantizedLayer(key, value, residual=128)
    prefill.append(x, x)
    decoded = QuantizedLayer(key, value, residual=128)
    decoded.reserve(8192)
    decoded.append(x[:, :, :4096], x[:, :, :4096])
    for t in range(4096, 8192, 64):
        for i in range(t, t + 64):
            decoded.append(x[:, :, i : i + 1], x[:, :, i : i + 1])
    fp16 = 2 * 3 * 8192 * 64 * 2
    for layer in (prefill, decoded):
        assert layer.seq_length == 8192 and layer.fp16_nbytes == fp16
        assert layer.nbytes == _held_bytes(layer)
        assert layer.nbytes / fp16 <= target, (preset, layer.nbytes / fp16)


def test_growth_without_reserve_reports_allocated_bytes():
    torch.manual_seed(5)
    layer = QuantizedLayer("int4-channel-g64", "int4-token", residual=128)
    layer.append(torch.randn(1, 3, 200, 64), torch.randn(1, 3, 200, 64))
    for _ in range(300):
        layer.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
    assert layer.key_codes.shape[2] > layer.num_quantized
    assert layer.nbytes == _held_bytes(layer)


def _filled(batch: int = 4, tokens: int = 150) -> tuple[QuantizedLayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(6)
    layer = QuantizedLayer("int4-channel-g32", "int8-token", residual=16)
    layer.append(torch.randn(batch, 2, tokens - 3, 8), torch.randn(batch, 2, tokens - 3, 8))
    for _ in range(3):
        layer.append(torch.randn(batch, 2, 1, 8), torch.randn(batch, 2, 1, 8))
    k, v = layer.dequantized()
    return layer, k.clone(), v.clone()


def test_index_select_and_repeat_interleave_follow_the_batch():
    layer, k, v = _filled()
    idx = torch.tensor([2, 0, 0, 3])
    layer.index_select(idx)
    k2, v2 = layer.dequantized()
    assert torch.equal(k2, k[idx]) and torch.equal(v2, v[idx])
    layer.repeat_interleave(2)
    k3, _ = layer.dequantized()
    assert torch.equal(k3, k[idx].repeat_interleave(2, dim=0))
    step = torch.randn(8, 2, 1, 8)
    layer.append(step, step)
    assert torch.equal(layer.dequantized()[0][:, :, -1:], step)


@pytest.mark.parametrize("length", [149, 140, 135, 128, 100, 96, 5, 0, -1, -30])
def test_crop_keeps_what_attention_saw(length):
    layer, k, v = _filled()
    keep = length if length >= 0 else 150 + length
    layer.crop(length)
    assert layer.seq_length == keep and layer.num_quantized % layer.group == 0
    if keep:
        k2, v2 = layer.dequantized()
        assert torch.equal(k2, k[:, :, :keep]) and torch.equal(v2, v[:, :, :keep])
    step = torch.randn(4, 2, 40, 8)
    layer.append(step, step)
    k3, _ = layer.dequantized()
    nw = layer.num_window
    assert layer.seq_length == keep + 40 and torch.equal(k3[:, :, keep + 40 - nw :], step[:, :, 40 - nw :])


def test_reset_empties_the_layer():
    layer, _, _ = _filled()
    layer.reset()
    assert layer.seq_length == 0 and layer.nbytes == 0 and layer.key_codes is None
    layer.append(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    assert layer.seq_length == 3


def test_quantized_views_round_trip():
    layer, k, _ = _filled(batch=1)
    qk, qv = layer.quantized()
    assert qk.shape[2] == layer.num_quantized and qk.scheme == layer.key_scheme and qv.zero is None
    deq = reference.dequantize(qk.codes[0], qk.scale[0], qk.zero[0], qk.scheme, 8, torch.float32)
    assert torch.equal(deq, k[0, :, : layer.num_quantized])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key_format": "int9-channel", "value_format": "int8-token"}, "unknown format"),
        ({"key_format": "int8-channel", "value_format": "int8-token"}, "no token group"),
        ({"key_format": "int8-channel-g32", "value_format": "int8-token", "group": 64}, "blocks of 64"),
        ({"key_format": "int8-token", "value_format": "int8-channel-g32"}, "blocks of 64"),
        ({"key_format": "int8-channel-g64", "value_format": "int8-token", "residual": -1}, "residual"),
        ({"key_format": "int8-token", "value_format": "int8-token", "group": 0}, "group"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedLayer(**kwargs)


def test_bad_appends():
    layer = QuantizedLayer("int8-channel-g64", "int4-token-g48")
    with pytest.raises(ValueError, match="does not divide the head dimension 64"):
        layer.append(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64))
    layer = QuantizedLayer("int8-channel-g64", "int8-token")
    with pytest.raises(ValueError, match=r"\[batch, kv_heads, tokens, head_dim\]"):
        layer.append(torch.randn(1, 4, 64), torch.randn(1, 4, 64))
    with pytest.raises(TypeError, match="dtype"):
        layer.append(torch.ones(1, 1, 4, 8, dtype=torch.int32), torch.ones(1, 1, 4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="agree"):
        layer.append(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8))
    layer.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="holds batch x heads"):
        layer.append(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    with pytest.raises(ValueError, match="holds batch x heads"):
        half = torch.randn(1, 2, 1, 8, dtype=torch.float16)
        layer.append(half, half)
    with pytest.raises(ValueError, match="NaN"):
        layer.append(torch.full((1, 2, 200, 8), float("nan")), torch.randn(1, 2, 200, 8))
    with pytest.raises(RuntimeError, match="empty"):
        QuantizedLayer("int8-token", "int8-token").dequantized()


def test_cache_formats():
    assert cache_formats("int4") == (parse("int4-channel-g64"), parse("int4-token"))
    assert cache_formats("fp8-e5m2") == (parse("fp8-e5m2"), parse("fp8-e5m2"))
    assert cache_formats("int8-channel-g32/int2-token-g16")[1] == parse("int2-token-g16")
    with pytest.raises(ValueError, match="preset"):
        cache_formats("int3")


@requires_cuda
def test_storage_on_the_inputs_device_and_nbytes_is_what_cuda_allocates():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 1000, 128, device="cuda", dtype=torch.float16)
    for _ in range(2):  # the first pass warms up whatever the kernels cache
        layer = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        layer = QuantizedLayer("int8-channel-g64", "int8-token", residual=128)
        layer.append(x[:, :, :900], x[:, :, :900])
        for i in range(900, 1000):
            layer.append(x[:, :, i : i + 1], x[:, :, i : i + 1])
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
    held = layer._held()
    assert all(t.device == x.device for t in held)
    assert abs(grown - layer.nbytes) <= 512 * len(held)
    k, _ = layer.dequantized()
    torch.testing.assert_close(k.cpu(), expected(x.cpu(), layer.key_scheme, 64, layer.num_quantized),
                               rtol=0, atol=0)
