"""The triton backend against the plain-torch reference: codes and scales bit for bit.

Without a GPU the kernels run on the CPU through Triton's interpreter. Triton picks interpreter or
compiler when a kernel is decorated, i.e. when ``kvpack.triton.quant`` is imported, so the
environment variable is set here before that import (and the module is reloaded if an earlier test
imported it already); the interpreted cases are small, since the interpreter is slow.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "kvpack.triton.quant" in sys.modules:
        importlib.reload(sys.modules["kvpack.triton.quant"])

import kvpack  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from kvpack import reference  # noqa: E402
from kvpack.backends import Backend, why_not  # noqa: E402
from kvpack.schemes import FP8_DTYPES, parse  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = why_not(Backend.TRITON, parse("int8-channel"), DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

if _REASON is None:
    from kvpack.triton import quant
    from kvpack.triton.quant import Tiles

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Every kind of format: both axes, whole-axis and grouped scales (partial last groups included),
# int4/int2 groups that end inside a byte (g3, g6), both FP8 types.
FORMATS = (
    "int8-channel",
    "int8-token",
    "int8-channel-g4",
    "int8-token-g8",
    "int4-channel",
    "int4-token",
    "int4-channel-g5",
    "int4-token-g6",
    "int4-token-g3",
    "int2-channel-g3",
    "int2-token-g8",
    "int2-token-g6",
    "fp8-e4m3",
    "fp8-e5m2",
    "fp8-e4m3-channel",
    "fp8-e5m2-channel-g3",
)
SHAPES = ((2, 13, 65), (1, 1, 3), (3, 17, 8))
_POISON = {torch.int8: -128, torch.uint8: 0xA5}


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output no kernel result can equal where it is left unwritten: NaN floats and FP8 codes, -128
    int8 codes (outside [-127, 127]), 0xA5 bytes of packed codes."""
    if dtype in FP8_DTYPES.values():
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(dtype)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, _POISON[dtype], dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "_empty", _poisoned)


def assert_same(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    if want is None:
        assert got is None, what
        return
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{what}: {got.dtype} {got.shape}"
    if got.dtype in FP8_DTYPES.values():
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    got, want = got.cpu(), want.cpu()
    bad = got != want
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ, the first at {first}")


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + torch.rand(shape[-1], generator=g)
    return x.to(dtype).to(DEVICE)


def check_format(x: torch.Tensor, fmt: str, tiles: Tiles | None = None) -> None:
    """quantize, compute_scales, encode and dequantize of ``x`` all equal the reference (on the CPU)."""
    scheme = parse(fmt)
    xc = x.cpu()
    codes, scale, zero = reference.quantize(xc, scheme)
    got = quant.quantize(x, scheme, tiles)
    for name, g, w in zip(("codes", "scale", "zero"), got, (codes, scale, zero), strict=True):
        assert_same(g, w, f"quantize {name}")
    s, z = quant.compute_scales(x, scheme, tiles)
    assert_same(s, scale, "compute_scales scale")
    assert_same(z, zero, "compute_scales zero")

    def dev(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(DEVICE)

    assert_same(quant.encode(x, scheme, dev(scale), dev(zero), tiles), codes, "encode")
    d = x.shape[-1]
    out = quant.dequantize(dev(codes), dev(scale), dev(zero), scheme, d, x.dtype, tiles)
    assert_same(out, reference.dequantize(codes, scale, zero, scheme, d, x.dtype), "dequantize")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_reference(fmt: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    check_format(_random(shape, dtype, seed=len(fmt) + shape[2]), fmt)


# Small tiles that force each launch path on small inputs: channel-axis groups reduced in several
# chunks (with the encode re-reading them), split over programs (partials + finalize + encode) or
# pipelined (the interpreter runs programs one by one, in ticket order: this checks the task
# schedule, not the waiting); token-axis groups wider than a tile.
@pytest.mark.parametrize(
    ("fmt", "tiles", "dtype"),
    [
        ("int8-channel", Tiles(4, 16), torch.float32),
        ("int8-channel", Tiles(4, 16, splits=3), torch.bfloat16),
        ("int4-channel", Tiles(8, 8, splits=5), torch.float16),
        ("fp8-e4m3-channel", Tiles(8, 16, splits=2), torch.float32),
        ("int4-channel-g9", Tiles(4, 16, splits=2), torch.bfloat16),
        ("int2-channel-g7", Tiles(4, 16), torch.float32),
        ("int8-channel", Tiles(8, 16, pipelined=True), torch.float16),
        ("int4-channel", Tiles(4, 16, pipelined=True), torch.bfloat16),
        ("fp8-e5m2-channel-g9", Tiles(4, 8, pipelined=True), torch.float32),
        ("int8-token", Tiles(4, 16), torch.float16),
        ("int4-token", Tiles(4, 16), torch.float32),
        ("int2-token-g12", Tiles(4, 8), torch.bfloat16),
        ("fp8-e5m2", Tiles(4, 16), torch.float32),
    ]
    if _REASON is None
    else [],
    ids=str,
)
def test_launch_paths(fmt: str, tiles: Tiles, dtype: torch.dtype) -> None:
    check_format(_random((2, 19, 37), dtype, seed=7), fmt, tiles)


@pytest.mark.parametrize("fmt", ["int8-channel", "int4-channel"])
def test_fold_of_more_partials_than_one_load(fmt: str) -> None:
    """The fold of partial maxima takes 64 partial rows at a time: 150 splits of one token each."""
    check_format(_random((2, 150, 24), torch.float32, seed=8), fmt, Tiles(1, 8, splits=150))


@pytest.mark.parametrize(
    ("fmt", "shape", "tiles", "row_scales"),
    [
        ("int8-channel-g32", (3, 64, 40), Tiles(16, 16), True),  # tiles inside one scale row
        ("int4-channel-g16", (2, 48, 24), Tiles(8, 32), True),
        ("fp8-e4m3-channel-g16", (2, 40, 24), Tiles(8, 8), True),
        ("int2-channel-g32", (2, 40, 20), Tiles(16, 8), False),  # 40 % 16: a tile spans two batch rows
        ("int8-channel", (3, 19, 40), Tiles(4, 16), False),
    ]
    if _REASON is None
    else [],
    ids=str,
)
def test_encode_and_dequantize_tiles(fmt: str, shape: tuple[int, ...], tiles: Tiles,
                                     row_scales: bool) -> None:
    """The grid kernels with one scale row per tile and with scales looked up per element, against the
    reference, from the reference's scales."""
    scheme = parse(fmt)
    assert quant._row_scales(scheme, shape[1], scheme.group_size(shape[1], shape[2]), tiles) is row_scales
    x = _random(shape, torch.float32, seed=11)
    codes, scale, zero = reference.quantize(x, scheme)
    assert_same(quant.encode(x, scheme, scale, zero, tiles), codes, "codes")
    want = reference.dequantize(codes, scale, zero, scheme, shape[2], torch.float32)
    got = quant.dequantize(codes, scale, zero, scheme, shape[2], torch.float32, tiles)
    assert_same(got, want, "dequantized")


def test_grid_tiles_index_in_32_bits() -> None:
    """Default grid tiles shrink so that a tile holds fewer than 2^31 elements; explicit tiles that do not
    get a clear error instead of wrapping offsets."""
    wide = 2**28
    tiles = quant._grid_tiles(1024, wide)
    assert tiles.block_t * wide < 2**31
    quant._check_tile_offsets(tiles, wide)
    with pytest.raises(ValueError, match="too wide"):
        quant._check_tile_offsets(Tiles(16, 512), wide)


@pytest.mark.parametrize("fp8", ("e4m3", "e5m2"))
def test_fp8_rounding_ties_and_subnormals(fp8: str) -> None:
    """Every FP8 value, the midpoints between neighbours (ties to even), one float32 ulp either side of
    each midpoint, values past the max (saturated), tiny ones and signed zeros, at scale 1."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fp8]).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    inf = torch.tensor(float("inf"))
    extra = torch.tensor([-0.0, 0.0, 1e-30, -1e-30, 1e6, -1e6, grid.max().item() * 1.06])
    x = torch.cat([grid, mids, mids.nextafter(inf), mids.nextafter(-inf), extra]).reshape(1, 1, -1)
    scheme = parse(f"fp8-{fp8}")
    scale = torch.ones(1, 1, 1)
    want = reference.encode(x, scheme, scale, None)
    assert_same(quant.encode(x.to(DEVICE), scheme, scale.to(DEVICE), None), want, "fp8 codes")


@pytest.mark.parametrize("fmt", ("int8-token", "int4-token", "int2-token"))
def test_integer_rounding_ties_and_clamping(fmt: str) -> None:
    """Halves round to even, on both sides of zero; values beyond the range clamp."""
    scheme = parse(fmt)
    x = (torch.arange(-300, 301, dtype=torch.float32) / 2).reshape(1, 1, -1)
    scale = torch.ones(1, 1, 1, dtype=scheme.scale_dtype)
    zero = None if scheme.symmetric else torch.full((1, 1, 1), -1.0, dtype=scheme.scale_dtype)
    want = reference.encode(x, scheme, scale, zero)
    dev = None if zero is None else zero.to(DEVICE)
    assert_same(quant.encode(x.to(DEVICE), scheme, scale.to(DEVICE), dev), want, "codes")


# Exact ties of x / s inside quantize (the one-pass channel and token kernels, and the split channel
# path), where a quotient through the reciprocal would misround: with s = 7 / 64, 126.5 s * RN(1 / s)
# reads as 126.5000076 (and 14.5 s likewise); round half to even must give 126 and 14. A subnormal
# channel (whose scale's reciprocal overflows) rides along.
@pytest.mark.parametrize("fmt,shape,tiles", [
    ("int8-token", (2, 40, 300), None),
    ("int4-token-g32", (2, 40, 96), None),
    ("int8-channel-g128", (1, 256, 96), None),
    ("int4-channel-g64", (2, 128, 96), None),
    ("int8-channel", (2, 700, 48), None),
    ("int4-channel", (1, 700, 48), Tiles(16, 16, splits=3)),
])
def test_reciprocal_codes_at_exact_ties(fmt: str, shape: tuple[int, int, int], tiles: Tiles | None) -> None:
    scheme = parse(fmt)
    s = 7 / 64
    x = _random(shape, torch.float32, seed=11) * s
    k = torch.arange(-scheme.qmax + 1, scheme.qmax) if scheme.symmetric else torch.arange(scheme.qmax)
    ties = (k + 0.5) * s  # x / s = k + 0.5, exactly representable
    top = scheme.qmax * s  # the largest element of a group: its scale is s (min 0 for int4)
    n = ties.numel()
    if scheme.axis == "token":
        g = scheme.group_size(shape[1], shape[2])
        for c0 in range(0, shape[2] - g + 1, g):
            m = min(n, g - 2)
            x[:, ::3, c0:c0 + g] = 0.0
            x[:, ::3, c0:c0 + m] = ties[-m:]
            x[:, ::3, c0 + m] = top
    else:
        x[:, :, ::5] = ties.repeat(-(-shape[1] // n))[: shape[1], None]
        x[:, 0, ::5] = top
        x[:, 1, ::5] = 0.0
    x[:, :, 1] = torch.linspace(-1e-39, 1e-39, shape[1])  # a subnormal channel scale
    check_format(x.to(DEVICE), fmt, tiles)


# Signed zeros and tiny scales through the reciprocal quotient (quant._divide): -0.0 must stay -0 in
# FP8 codes; channels whose scales lie just above and below 2^-96 (where _divide falls back to the
# division, tile by tile), and huge ones.
@pytest.mark.parametrize("fmt,shape,tiles", [
    ("fp8-e4m3-channel-g128", (2, 256, 40), None),
    ("fp8-e5m2-token", (2, 24, 40), None),
    ("fp8-e4m3-channel", (2, 300, 40), Tiles(16, 16, splits=3)),
    ("int8-channel-g128", (2, 256, 40), None),
    ("int4-token-g8", (2, 24, 40), None),
])
def test_signed_zeros_and_tiny_scales(fmt: str, shape: tuple[int, int, int], tiles: Tiles | None) -> None:
    x = _random(shape, torch.float32, seed=21)
    x[:, ::4, :] = -0.0
    x[:, 1::4, :8] *= 1e-6  # quotients that round to (negative) zero
    t = torch.linspace(-1.0, 1.0, shape[1])
    largest = 3e38 if parse(fmt).symmetric else 6e5  # asymmetric scales are float16
    for c, magnitude in zip(range(8, 14), (1e-26, 2e-27, 1.3e-29, 1e-30, 1e-36, largest), strict=True):
        x[0, :, c] = t * magnitude  # batch row 1: tiles with no tiny scale
    check_format(x.to(DEVICE), fmt, tiles)


@pytest.fixture(scope="module")
def divide_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, s_ptr, got_ptr, want_ptr, R: tl.constexpr, C: tl.constexpr):
        offs = tl.program_id(0) * R * C + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        a = tl.load(a_ptr + offs)
        s = tl.load(s_ptr + tl.program_id(0) * C + tl.arange(0, C))[None, :]
        tl.store(got_ptr + offs, quant._divide(a, s, True))
        tl.store(want_ptr + offs, tl.div_rn(a, s + tl.zeros_like(a)))

    return kernel


def test_divide_is_the_correctly_rounded_quotient(divide_kernel) -> None:
    """quant._divide (reciprocal, then one exact correction) equals IEEE division bit for bit: scales of
    every binade from 2^-100 to 2^100, numerators uniform in [-130 s, 130 s], at half-integer multiples
    of s and a few ulps either side of them (where a misrounded quotient changes the code)."""
    tiles = 64 if DEVICE.type == "cpu" else 1 << 14
    rows, cols = 64, 32
    g = torch.Generator().manual_seed(5)
    exponents = torch.randint(-100, 101, (tiles, cols), generator=g)
    s = torch.ldexp(1 + torch.rand(tiles, cols, generator=g), exponents)
    u = (torch.rand(tiles, rows, cols, generator=g) - 0.5) * 260
    a = u * s[:, None, :]
    half = (torch.randint(-130, 130, (tiles, rows, cols), generator=g) + 0.5) * s[:, None, :]
    ulps = torch.randint(-3, 4, (tiles, rows, cols), generator=g, dtype=torch.int32)
    near = (half.view(torch.int32) + ulps).view(torch.float32)
    a = torch.where(torch.rand(tiles, rows, cols, generator=g) < 0.5, a, near)
    a[:, 0, :] = -0.0
    a, s = a.to(DEVICE), s.to(DEVICE)
    got, want = torch.empty_like(a), torch.empty_like(a)
    divide_kernel[(tiles,)](a, s, got, want, R=rows, C=cols)
    assert torch.equal(want, a / s[:, None, :]), "tl.div_rn is not torch's division"
    same = got.view(torch.int32) == want.view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} quotients differ"


@pytest.mark.parametrize("fmt", ("int8-channel-g4", "int4-channel-g4", "int2-token-g4", "fp8-e4m3-token-g4"))
def test_zero_and_constant_groups(fmt: str) -> None:
    """All-zero and constant groups get scale 1 and dequantize exactly; mixed with ordinary groups."""
    x = _random((2, 8, 16), torch.float32, seed=3)
    x[0, :4] = 0.0
    x[0, 4:, :] = -2.5
    x[1, :, :4] = 1.25
    check_format(x, fmt)


@pytest.mark.parametrize("fmt", ("int8-channel", "int8-channel-g4", "int4-token", "fp8-e5m2", "int2-channel"))
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_nan_and_inf_raise(fmt: str, bad: float) -> None:
    x = _random((2, 9, 24), torch.float16, seed=5)
    x[1, 4, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        kvpack.quantize(x, fmt, backend="triton")


def test_public_api_matches_torch_backend() -> None:
    """kvpack.quantize / dequantize with backend="triton" on a 4-D tensor: leading axes flattened."""
    x = _random((2, 3, 20, 24), torch.bfloat16, seed=11)
    for fmt in ("int8-channel", "int4-token-g8", "fp8-e4m3"):
        q = kvpack.quantize(x, fmt, backend="triton")
        want = kvpack.quantize(x.cpu(), fmt, backend="torch")
        assert_same(q.codes, want.codes, "codes")
        assert_same(q.scale, want.scale, "scale")
        assert_same(q.zero, want.zero, "zero")
        assert_same(kvpack.dequantize(q, backend="triton"), kvpack.dequantize(want, backend="torch"), "x_hat")


def test_bad_input_is_refused() -> None:
    scheme = parse("int4-token-g8")
    x = _random((2, 8, 16), torch.float32, seed=1)
    scale, zero = quant.compute_scales(x, scheme)
    with pytest.raises(TypeError, match="dtype"):
        quant.quantize(x.to(torch.int32), scheme)
    with pytest.raises(ValueError, match="contiguous"):
        quant.quantize(x.transpose(1, 2), scheme)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        quant.quantize(x[0], scheme)
    with pytest.raises(ValueError, match="shape"):
        quant.encode(x, scheme, scale[:, :4], zero)
    with pytest.raises(ValueError, match="float16"):
        quant.encode(x, scheme, scale.float(), zero)
    with pytest.raises(TypeError, match="zero"):
        quant.encode(x, scheme, scale, None)
    codes = quant.encode(x, scheme, scale, zero)
    with pytest.raises(ValueError, match="codes"):
        quant.dequantize(codes, scale, zero, scheme, 24, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        quant.dequantize(codes, scale, zero, scheme, 16, torch.int8)
    with pytest.raises(ValueError, match="power of two"):
        Tiles(3, 8)


# The interpreter runs the kernels as Python, not through Triton's compiler: compile every kernel
# variant the launchers ask for, for an H100 (sm_90), in a fresh process where the kernels are compiled
# ones (the interpreter variable is set only after the import, so that the launchers take CPU tensors).
_COMPILE_FOR_SM90 = """
import os
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from kvpack.schemes import parse
from kvpack.triton import quant

os.environ["TRITON_INTERPRET"] = "1"
launches = {}
for name in [n for n in vars(quant) if n.endswith("_kernel")]:
    fn = getattr(quant, name)
    record = lambda *args, fn=fn, **kwargs: launches.setdefault(
        (fn.__name__, tuple(map(mangle_type, args)), tuple(sorted(kwargs.items()))), (fn, args, kwargs))
    setattr(quant, name, type("Capture", (), {"__getitem__": lambda self, grid, record=record: record})())
T = quant.Tiles
# Every format on float32 with each launch path; the 16-bit dtypes on the default path of a few.
paths = (None, T(16, 16, splits=3), T(16, 16, pipelined=True))
cases = [(f, torch.float32, t) for f in FORMATS for t in paths]
cases += [(f, d, None) for f in FORMATS[::3] for d in (torch.float16, torch.bfloat16)]
for fmt, dtype, tiles in cases:
    scheme = parse(fmt)
    x = torch.randn(2, 64, 48, dtype=dtype)
    codes, scale, zero = quant.quantize(x, scheme, tiles)
    quant.compute_scales(x, scheme, tiles)
    quant.encode(x, scheme, scale, zero, tiles)
    quant.dequantize(codes, scale, zero, scheme, 48, dtype, tiles)
target = GPUTarget("cuda", 90, 32)
for fn, args, kwargs in launches.values():
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    signature = dict(zip(fn.arg_names, map(mangle_type, args)), **dict.fromkeys(kwargs, "constexpr"))
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args)
               if isinstance(a, torch.Tensor) or (isinstance(a, int) and a % 16 == 0)}
    triton.compile(ASTSource(fn, signature, kwargs, aligned), target=target, options=options)
print("compiled", len(launches))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"FORMATS = {FORMATS!r}\n{_COMPILE_FOR_SM90}"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("compiled")


# ---- GPU: full sizes ----------------------------------------------------------------------------

GPU_SHAPES = ((8, 4096, 128), (1, 16384, 1024), (3, 1000, 200), (64, 1, 128))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", (*kvpack.PRESETS, "int8-channel-g128", "int4-token-g6", "fp8-e5m2-channel"))
def test_gpu_matches_reference(fmt: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    check_format(_random(shape, dtype, seed=shape[1]), fmt)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("fmt", "shape", "tiles"),
    [
        ("int8-channel", (2, 32768, 512), None),  # 128 MB of float32: pipelined by default
        ("int4-channel", (1, 65536, 1000), None),
        ("int8-channel", (3, 7000, 300), Tiles(32, 32, pipelined=True)),
        ("int2-channel-g3000", (2, 7000, 300), Tiles(64, 16, pipelined=True, num_warps=8)),
        ("fp8-e4m3-channel", (3, 7000, 300), Tiles(16, 128, splits=7)),
        ("int8-channel-g2000", (2, 7000, 300), Tiles(64, 64)),
        ("int8-token", (2, 300, 20000), None),  # rows wider than a tile: two loops
    ]
    if _REASON is None
    else [],
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_launch_paths(fmt: str, shape: tuple[int, ...], tiles: Tiles | None, dtype: torch.dtype) -> None:
    check_format(_random(shape, dtype, seed=shape[2]), fmt, tiles)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_31_elements() -> None:
    """262144 x 8192 float16 (2^31 elements): scales against an exact float64 division, the codes of
    the first and last rows against the reference, and the dequantized last rows."""
    t, d = 262144, 8192
    x = torch.empty(1, t, d, dtype=torch.float16, device="cuda")
    for i in range(0, t, 16384):  # fill in slices, to keep the temporary small
        x[0, i : i + 16384] = torch.randn(16384, d, device="cuda", dtype=torch.float16)
    x[0, -1, 5] = 1000.0  # the max of channel 5 sits in the very last row
    scheme = parse("int8-channel")
    codes, scale, _ = quant.quantize(x, scheme)
    amax = torch.stack([x[0, i : i + 16384].abs().amax(0) for i in range(0, t, 16384)]).amax(0).float()
    want_scale = torch.where(amax == 0, 1.0, (amax.double() / 127).float())
    assert_same(scale[0, 0], want_scale, "scale")
    for rows in (slice(0, 64), slice(t - 64, t)):
        xs = x[:, rows].cpu()
        assert_same(codes[:, rows], reference.encode(xs, scheme, scale.cpu(), None), f"codes rows {rows}")
        back = quant.dequantize(codes[:, rows].contiguous(), scale, None, scheme, d, torch.float16)
        want = reference.dequantize(codes[:, rows].cpu(), scale.cpu(), None, scheme, d, torch.float16)
        assert_same(back, want, f"dequantize rows {rows}")
    assert codes[0, -1, 5].item() == 127
