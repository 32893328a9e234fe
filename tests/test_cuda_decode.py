"""The int4 decode-attention kernel in CUDA C (kvpack.cuda.decode, decode.cu).

Without a GPU: the source compiles with nvcc for sm_80 and sm_90 without a warning, for sm_90 in at
most 168 registers (12 programs per SM), into the instructions it was written for; which calls it takes.
On a GPU: every case against float32 attention over the layer's dequantized cache (relative L2 error
< 1e-2, as the Triton kernel's tests), and against the Triton kernel on the same layer.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import assert_rows_match, rel_error, requires_nvcc
from kvpack import reference
from kvpack.attention import decode
from kvpack.cache import CACHE_PRESETS, QuantizedLayer
from kvpack.cuda import decode as cuda_decode
from kvpack.cuda import pasted
from kvpack.schemes import parse

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_cuda_kernel = pytest.mark.skipif(
    not HAS_CUDA or cuda_decode._cupy_missing(), reason="needs a CUDA GPU and CuPy"
)
TOLERANCE = 1e-2
SOURCE = Path(cuda_decode.__file__).with_name("decode.cu")
KERNELS = sorted(cuda_decode._NAMES.values())


def _nvcc(tmp_path: Path, *opts: str) -> subprocess.CompletedProcess:
    """nvcc on the text NVRTC compiles (common.cuh pasted in: no include path)."""
    text = pasted(SOURCE)
    assert "#include" not in text
    (tmp_path / "decode.cu").write_text(text)
    command = ["nvcc", "-std=c++17", *opts, "-o", str(tmp_path / "out"), str(tmp_path / "decode.cu")]
    return subprocess.run(command, capture_output=True, text=True)


@requires_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_source_compiles_without_warnings(arch: str, tmp_path: Path) -> None:
    r = _nvcc(tmp_path, "--ptx", f"-arch={arch}", "-Werror", "all-warnings")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    ptx = (tmp_path / "out").read_text()
    entries = set(re.findall(r"\.visible \.entry (\w+)\(", ptx))
    assert entries == set(KERNELS)
    # Codes into fragments: tensor-core products, in-register transposes, byte permutes, each tile
    # copied into shared memory a tile ahead (16-byte asynchronous copies).
    for wanted in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                   "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                   "movmatrix.sync.aligned.m8n8.trans.b16", "prmt.b32", "lop3.b32",
                   "cp.async.cg.shared.global", "cp.async.wait_group 1"):
        assert wanted in ptx, wanted


@requires_nvcc
def test_sm90_build_fits_12_programs_per_sm(tmp_path: Path) -> None:
    # At most 168 registers a thread and 12 x (shared + the 1 KB reserved per block) within an H100
    # SM's 228 KB (12 one-warp programs per SM), spilling at most a few words.
    r = _nvcc(tmp_path, "--cubin", "-arch=sm_90", "-Xptxas", "-v")
    assert r.returncode == 0, r.stderr
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)]
    shared = [int(n) for n in re.findall(r"(\d+) bytes smem", r.stderr)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert len(registers) == len(shared) == len(spills) == len(KERNELS), r.stderr
    assert max(registers) <= 168 and all(int(a) <= 128 and int(b) <= 128 for a, b in spills), r.stderr
    assert 12 * (max(shared) + 1024) <= 228 * 1024, r.stderr


def _schemes(preset: str) -> tuple:
    layer = QuantizedLayer(*CACHE_PRESETS[preset], residual=0)
    return layer.key_scheme, layer.value_scheme, layer.group


def test_applies_to_the_int4_preset_only() -> None:
    q = torch.empty(1, 8, 1, 128, device="meta")
    store = (None,) * 6
    for preset in CACHE_PRESETS:
        assert cuda_decode.why_not(q, *_schemes(preset), 4, store) == "it runs on CUDA devices"
    if HAS_CUDA and not cuda_decode._cupy_missing():
        q = torch.empty(1, 8, 1, 128, device="cuda", dtype=torch.float16)
        ok = {p for p in CACHE_PRESETS if cuda_decode.why_not(q, *_schemes(p), 4, store) is None}
        assert ok == {"int4"}
        ks, vs, _ = _schemes("int4")
        assert "multiple of 64" in cuda_decode.why_not(q, ks, vs, 32, 4, store)
        assert "9 query rows" in cuda_decode.why_not(q, ks, vs, 64, 9, store)
        assert "head dim 96" in cuda_decode.why_not(q[..., :96], ks, vs, 64, 4, store)
        assert "int4-token" in cuda_decode.why_not(q, ks, parse("int4-token-g32"), 64, 4, store)


# --------------------------------------------------------------------------------------------- GPU


def make_layer(*, batch: int = 2, kv_heads: int = 2, tokens: int = 1000, head_dim: int = 128,
               residual: int = 128, key_format: str = "int4-channel-g64", dtype: torch.dtype = torch.float16,
               seed: int = 0, values_scale: float = 1.0) -> QuantizedLayer:
    """Random keys with a few outlier channels (as real keys have) and values, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, kv_heads, tokens, head_dim)
    keys = torch.randn(shape, generator=g) * (1 + 4 * (torch.rand(head_dim, generator=g) > 0.9))
    values = torch.randn(shape, generator=g) * values_scale
    layer = QuantizedLayer(key_format, "int4-token", residual=residual)
    layer.append(keys.to("cuda", dtype), values.to("cuda", dtype))
    return layer


def queries(layer: QuantizedLayer, q_heads: int, q_len: int, seed: int = 1) -> torch.Tensor:
    b, _, _, d = layer.window_keys.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, q_heads, q_len, d, generator=g).to("cuda", layer.dtype)


def run(q: torch.Tensor, layer: QuantizedLayer, kernel: str, **kw: object) -> torch.Tensor:
    """decode with the CUDA kernel (an error if it does not take the call) or the Triton one."""
    from kvpack.triton.attention import default_config

    rows = q.shape[1] // layer.window_keys.shape[1] * q.shape[2]
    config = default_config(q.shape[-1], layer.group, layer.key_scheme, layer.value_scheme, rows)
    splits = kw.pop("splits", None)
    config = type(config)(**{**config.__dict__, "kernel": kernel, "num_splits": splits})
    return decode(q, layer, config=config, **kw)


def check(q: torch.Tensor, layer: QuantizedLayer, **kw: object) -> None:
    keys, values = layer.dequantized()
    ref = reference.attention(q, keys, values, kw.get("scale"), causal_offset=layer.seq_length - q.shape[2])
    out = run(q, layer, "cuda", **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < TOLERANCE
    triton = run(q, layer, "triton", **kw)
    assert rel_error(out, triton) < TOLERANCE


# (tokens, residual, q_heads, kv_heads, q_len, head_dim)
SHAPES = [
    (1000, 128, 32, 8, 1, 128),  # GQA 4, as Llama-3-8B
    (4133, 128, 8, 1, 1, 128),  # GQA 8, several splits
    (777, 64, 9, 3, 1, 64),  # GQA 3, head dim 64 (SmolLM2)
    (640, 0, 2, 2, 1, 128),  # GQA 1, window empty
    (700, 128, 8, 2, 2, 64),  # two causal queries, 8 rows
    (50, 128, 4, 2, 1, 128),  # window only (store empty)
    (64, 0, 6, 2, 2, 128),  # one block, 6 rows
    (2000, 300, 4, 4, 1, 128),  # window longer than a tile
]


@requires_cuda_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("tokens,residual,q_heads,kv_heads,q_len,head_dim", SHAPES)
def test_matches_reference(tokens: int, residual: int, q_heads: int, kv_heads: int, q_len: int, head_dim: int,
                           dtype: torch.dtype) -> None:
    layer = make_layer(tokens=tokens, residual=residual, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    check(queries(layer, q_heads, q_len), layer)


@requires_cuda_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_forced_splits(splits: int) -> None:
    layer = make_layer(tokens=5000 + 17, kv_heads=2)
    check(queries(layer, 8, 1), layer, splits=splits)


@requires_cuda_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("key_format", ["int4-channel-g256", "int4-channel-g320", "int4-channel-g1024"])
def test_long_key_groups_and_both_schedules(key_format: str, share: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Units of 4 tiles: a key group of 4, one that a unit crosses (320 tokens), one of 16 tiles; the
    # programs taking units from the shared counter or every splits-th one.
    monkeypatch.setattr(cuda_decode, "SHARE_TILES", share)
    layer = make_layer(batch=2, kv_heads=2, tokens=6000 + 33, key_format=key_format)
    for splits in (None, 3):
        check(queries(layer, 8, 1), layer, splits=splits)


@requires_cuda_kernel
@pytest.mark.gpu
def test_groups_of_128_tokens_and_softmax_scale() -> None:
    layer = make_layer(tokens=3000, key_format="int4-channel-g128")
    check(queries(layer, 8, 1), layer, scale=0.3)


@requires_cuda_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("key_format", ["int4-channel-g64", "int4-channel-g128"])
@pytest.mark.parametrize("q_len", [1, 2])
def test_padded_batch(q_len: int, key_format: str) -> None:
    # Row starts inside a tile and inside a 2-tile unit (g128), ends before the window and inside it.
    layer = make_layer(batch=4, tokens=3000, dtype=torch.bfloat16, key_format=key_format)
    n = layer.seq_length
    start = torch.tensor([0, 1000, 17, 2900], device="cuda")
    lengths = torch.tensor([n, n - 40, n - 1500, n - 1], device="cuda")
    q = queries(layer, 8, q_len)
    out = run(q, layer, "cuda", start=start, lengths=lengths)
    assert_rows_match(out, q, *layer.dequantized(), start, lengths, TOLERANCE)


@requires_cuda_kernel
@pytest.mark.gpu
def test_rows_starting_past_the_store_with_units_crossing_its_end() -> None:
    # g320 keys: units of 4 tiles (256 tokens), and a store of 13 groups (4160 tokens) ends inside one;
    # rows that start in the window past it read nothing of the store, nor the tile after it.
    layer = make_layer(batch=3, kv_heads=2, tokens=4160 + 200, key_format="int4-channel-g320")
    assert layer.num_quantized == 4160
    n = layer.seq_length
    start = torch.tensor([4160 + 10, 4160, 0], device="cuda")
    lengths = torch.tensor([n, n - 3, n], device="cuda")
    q = queries(layer, 8, 1)
    out = run(q, layer, "cuda", start=start, lengths=lengths, splits=8)
    assert torch.isfinite(out).all()
    assert_rows_match(out, q, *layer.dequantized(), start, lengths, TOLERANCE)


@requires_cuda_kernel
@pytest.mark.gpu
def test_zero_values_and_huge_scales() -> None:
    # All-zero values: every value scale is 0 (no NaN from the accumulator's 1 / R). Then values near
    # float16's largest: the folded weights stay in range.
    zero = make_layer(tokens=900, values_scale=0.0)
    q = queries(zero, 8, 1)
    out = run(q, zero, "cuda")
    assert torch.isfinite(out).all() and out.abs().max() == 0
    big = make_layer(tokens=900, values_scale=8000.0)
    check(queries(big, 8, 1), big)


@requires_cuda_kernel
@pytest.mark.gpu
def test_long_context_batch_8() -> None:
    layer = make_layer(batch=8, kv_heads=8, tokens=32768 + 100)
    check(queries(layer, 32, 1), layer)


@requires_cuda_kernel
@pytest.mark.gpu
def test_default_path_takes_the_cuda_kernel_for_large_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvpack.triton.attention import CUDA_MIN_WORK

    calls = []
    launch = cuda_decode.launch
    monkeypatch.setattr(cuda_decode, "launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    small = make_layer(batch=1, kv_heads=2, tokens=1000)
    decode(queries(small, 8, 1), small)
    assert not calls  # 2,000 token-heads: the Triton kernel is the faster there
    big = make_layer(batch=2, kv_heads=8, tokens=CUDA_MIN_WORK // 16 + 64)
    q = queries(big, 32, 1)
    out = decode(q, big)
    assert calls
    keys, values = big.dequantized()
    ref = reference.attention(q, keys, values, causal_offset=big.seq_length - 1)
    assert rel_error(out, ref) < TOLERANCE


@requires_cuda_kernel
@pytest.mark.gpu
def test_torch_compile_reduce_overhead() -> None:
    layer = make_layer(kv_heads=8, tokens=17000)  # 272,000 token-heads: the CUDA kernel by default
    step = torch.compile(lambda x: decode(x, layer) + 1, mode="reduce-overhead", fullgraph=True)
    keys, values = layer.dequantized()
    for seed in range(3):
        q = queries(layer, 32, 1, seed=seed)
        ref = reference.attention(q, keys, values, causal_offset=layer.seq_length - 1)
        assert rel_error(step(q) - 1, ref) < TOLERANCE


@requires_cuda_kernel
@pytest.mark.gpu
def test_window_rows_not_16_byte_aligned_go_to_the_triton_kernel() -> None:
    layer = make_layer(tokens=1000, kv_heads=8)
    for name in ("window_keys", "window_values"):
        buf = getattr(layer, name)
        odd = torch.zeros(*buf.shape[:-1], buf.shape[-1] + 1, dtype=buf.dtype, device=buf.device)[..., 1:]
        odd.copy_(buf)
        setattr(layer, name, odd)
    q = queries(layer, 32, 1)
    with pytest.raises(ValueError, match="16-byte aligned"):
        run(q, layer, "cuda")
    keys, values = layer.dequantized()
    ref = reference.attention(q, keys, values, causal_offset=layer.seq_length - 1)
    assert rel_error(run(q, layer, "auto"), ref) < TOLERANCE


@requires_cuda_kernel
@pytest.mark.gpu
def test_cuda_kernel_refuses_what_it_cannot_take() -> None:
    layer = make_layer(tokens=1000)
    with pytest.raises(ValueError, match="query rows"):
        run(queries(layer, 18, 1), layer, "cuda")
