"""The CUDA C kernels (kvpack.cuda) against kvpack.reference, bit for bit.

Without a GPU (CI):
- every .cu source compiles with nvcc with no warning, both as a file and as the text NVRTC is
  given; the vectorized kernels use 16-byte accesses; the IEEE division and product survive the
  ``-ftz=true`` that CuPy passes;
- every kernel runs on the CPU under a small emulator (each CUDA thread a fiber, ``__syncthreads``
  a return to the scheduler, vector loads checked for alignment by UBSan), with the launch
  geometry of the loader, and is compared with the reference: odd shapes, tails, misaligned views,
  grids too small to cover the tensor, NaN/Inf, subnormals, ties;
- the loader imports without CuPy and names the package to install; bad inputs are refused.
With a GPU and CuPy: the same comparisons on the device, through the public API too.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kvpack
import kvpack.cuda as kc
from conftest import near_ties, requires_cuda, requires_nvcc
from kvpack import reference
from kvpack.schemes import parse

INT8 = parse("int8-channel")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
POISON = 77

requires_cupy = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is None, reason="needs CuPy: pip install cupy-cuda12x (or cupy-cuda13x)"
)
requires_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs the C++ compiler g++")


def on_gpu(test):
    """Marks a test as a GPU test: run only with a CUDA GPU and CuPy."""
    return pytest.mark.gpu(requires_cuda(requires_cupy(test)))


def expected(x: torch.Tensor):
    """Reference scales, codes and dequantized values of ``x [B, T, D]`` (computed on the CPU)."""
    x = x.cpu()
    scale, _ = reference.compute_scales(x, INT8)
    codes = reference.encode(x, INT8, scale, None)
    out = reference.dequantize(codes, scale, None, INT8, x.shape[2], x.dtype)
    return scale, codes, out


def random_input(shape: tuple[int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values of varied magnitude per channel, with one all-zero channel when D > 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[2], generator=g).add(0.1) * 4
    if shape[2] > 2:
        x[:, :, 1] = 0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# nvcc: the sources compile, cleanly, into the instructions they were written for.

NVCC_OPTS = ("--ptx", "-Werror", "all-warnings")


def _nvcc(src: Path, out: Path, *opts: str) -> str:
    r = subprocess.run(["nvcc", *NVCC_OPTS, *opts, "-o", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), f"nvcc {src.name} {' '.join(opts)}:\n{r.stderr}"
    return out.read_text()


@requires_nvcc
@pytest.mark.parametrize("name", kc.SOURCES)
def test_source_file_compiles_without_warnings(name, tmp_path):
    _nvcc(Path(kc.__file__).parent / f"{name}.cu", tmp_path / f"{name}.ptx", "-arch=sm_80")


@pytest.fixture(scope="module")
def nvrtc_ptx(tmp_path_factory) -> dict[str, str]:
    """PTX of the text NVRTC compiles (common.cuh pasted in), for sm_90, with CuPy's -ftz=true."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs the CUDA compiler nvcc on PATH")
    tmp = tmp_path_factory.mktemp("ptx")
    ptx = {}
    for name in kc.SOURCES:
        text = kc.source(name)
        assert "#include" not in text, f"{name}: NVRTC is given no include path"
        (tmp / f"{name}.cu").write_text(text)
        ptx[name] = _nvcc(tmp / f"{name}.cu", tmp / f"{name}.ptx", "-arch=sm_90", "-ftz=true")
    return ptx


def _entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"\.visible \.entry (\w+)\(", ptx)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_nvrtc_text_has_every_kernel(nvrtc_ptx):
    kernels = set()
    for ptx in nvrtc_ptx.values():
        kernels |= set(_entries(ptx))
    wanted = {
        f"{op}_{v}_{tag}" for op in ("quantize", "dequantize") for v in kc.VARIANTS for tag in TAGS.values()
    }
    wanted |= {f"absmax_partial_{tag}" for tag in TAGS.values()} | {"finalize_scales"}
    wanted |= {
        f"{op}_grouped_{tag}"
        for op in ("quantize", "scales", "encode", "dequantize")
        for tag in TAGS.values()
    }
    assert kernels == wanted


def _assert_16_bit_types_use_16_byte_accesses(entries, kind):
    for tag in ("f16", "bf16"):
        assert "ld.global.nc.v4.u32" in entries[f"quantize_{kind}_{tag}"]
        assert "st.global.v2.u32" in entries[f"quantize_{kind}_{tag}"]  # 8 packed codes
        assert "ld.global.nc.v2.u32" in entries[f"dequantize_{kind}_{tag}"]
        assert "st.global.v4.u32" in entries[f"dequantize_{kind}_{tag}"]


def test_vectorized_kernels_use_16_byte_accesses(nvrtc_ptx):
    entries = _entries(nvrtc_ptx["vectorized"])
    assert "ld.global.nc.v4.f32" in entries["quantize_vectorized_f32"]
    _assert_16_bit_types_use_16_byte_accesses(entries, "vectorized")
    assert "st.global.u32" in entries["quantize_vectorized_f32"]  # 4 packed codes (a char4)
    assert "ld.global.nc.u32" in entries["dequantize_vectorized_f32"]
    assert "st.global.v4.f32" in entries["dequantize_vectorized_f32"]


def test_grouped_kernels_use_16_byte_accesses(nvrtc_ptx):
    entries = _entries(nvrtc_ptx["grouped"])
    assert (
        "ld.global.nc.v4.f32" in entries["quantize_grouped_f32"]
        or "ld.global.nc.v4.u32" in entries["quantize_grouped_f32"]
    )
    _assert_16_bit_types_use_16_byte_accesses(entries, "grouped")
    assert "fma.rn.f32" in entries["quantize_grouped_f16"]  # Markstein's steps


def test_ieee_arithmetic_survives_flush_to_zero(nvrtc_ptx):
    """CuPy compiles with -ftz=true: the quotient and product that must be IEEE keep subnormals."""
    for name, ptx in nvrtc_ptx.items():
        assert not re.search(r"\b(div|mul|fma)\.rn\.ftz\.f32|div\.(approx|full)", ptx), name
        assert not re.search(r"setp\.\w+\.ftz\.f32", ptx), name
    assert "div.rn.f32" in nvrtc_ptx["scales"] and "div.rn.f32" in nvrtc_ptx["naive"]
    assert "mul.rn.f32" in nvrtc_ptx["vectorized"]


# ---------------------------------------------------------------------------------------------
# The loader without a GPU: imports, errors, launch geometry.


def test_loader_imports_without_cupy_and_names_the_package():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import kvpack.cuda as kc\n"
        "try:\n    kc.module('naive')\nexcept ImportError as e:\n    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install cupy-cuda12x" in r.stdout and "cupy-cuda13x" in r.stdout


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown CUDA variant"):
        kc.variant("fast")
    with pytest.raises(ValueError, match="unknown CUDA source"):
        kc.source("common")
    with pytest.raises(ValueError, match="int8-channel only"):
        kc.variant("naive").quantize(torch.randn(1, 4, 4), parse("int4-channel"))
    with pytest.raises(ValueError, match="int8-channel only"):
        kc.variant("naive").quantize(torch.randn(1, 4, 4), parse("int8-channel-g2"))


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(1, 4, 4, dtype=torch.float64), TypeError, "dtype torch.float64"),
        (torch.randn(4, 4), ValueError, "3-D"),
        (torch.randn(1, 0, 4), ValueError, "empty"),
        (torch.randn(1, 4, 6)[:, :, ::2], ValueError, "contiguous"),
        (torch.randn(1, 4, 4), ValueError, "CUDA tensor"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_launchers_refuse_bad_inputs(x, error, match):
    with pytest.raises(error, match=match):
        kc.variant("vectorized").quantize(x, INT8)


SIZES = [
    (1, 1, 1),
    (3, 1, 5),
    (1, 7, 3),
    (2, 33, 65),
    (1, 100, 127),
    (3, 64, 128),
    (1, 257, 4096),
    (70000, 2, 8),
    (1, 131072, 8192),
    (1, 262147, 8192),
    (4, 50_000_000, 1),
    (1, 3, 2**20 + 3),
]


def test_grouped_launcher_refuses_bad_arguments_and_sizes_its_grid():
    x = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="what must be one of both, scales, codes"):
        kc.grouped_quantize_into(x, 4, torch.empty(1, 2, 16), None, "all")
    with pytest.raises(ValueError, match="CUDA tensor"):
        kc.grouped_quantize_into(x, 4, torch.empty(1, 2, 16), None, "scales")
    sizes = [(1, 1, 1, 4, 2), (3, 300, 40, 128, 2), (2, 1000, 8192, 128, 4), (1, 9, 5, 300, 4)]
    for b, t, d, g, itemsize in sizes:
        g = min(g, t)
        grid, block = kc.grouped_geometry(b, t, d, g, itemsize)
        assert grid[0] == b * -(-t // g) and grid[1] * 32 * (16 // itemsize) >= d and block[0] == 32
        assert 1 <= block[1] <= kc.GROUPED_MAX_WARPS and block[1] * kc.GROUPED_ROWS >= min(g, 256)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("sms", [1, 132])
def test_launch_geometry_covers_and_fits(size, sms):
    b, t, d = size
    grid, block, split = kc.scale_geometry(b, t, d, sms)
    assert block[0] * block[1] == 256 and block[0] % 32 == 0
    assert grid[0] * block[0] >= d and grid[1] <= 1024 and grid[2] <= 65535
    assert (grid[1] - 1) * split < t <= grid[1] * split  # every split holds tokens, all are covered
    for variant in ("naive", "tiled", "coarsened"):
        grid, block = kc.paper_geometry(variant, b, t, d)
        assert block == (16, 16) and grid[1] <= 65535 and grid[2] <= 65535
        assert grid[0] * 16 * (4 if variant == "coarsened" else 1) >= d
    for itemsize in (4, 2):
        n = 16 // itemsize
        grid, block = kc.vector_geometry(b, t, d, itemsize, sms)
        assert block[0] * block[1] == 256 and grid[1] <= 65535 and grid[2] <= 65535
        assert grid[0] * block[0] >= max(-(-d // n), n)


# ---------------------------------------------------------------------------------------------
# Every kernel on the CPU, under an emulator of the CUDA execution model.

EMULATOR = r"""
// Runs kvpack's CUDA C kernels on the CPU. Each thread of a block is a fiber (ucontext);
// __syncthreads() returns to the scheduler, which runs every other thread of the block up to it.
// usage: emu KERNEL gx gy gz bx by ARG...   ARG = i:VALUE, or p:FILE:OFFSET for a buffer loaded
// OFFSET bytes past a 64-byte boundary and written back after the launch.
#define KVPACK_HOST_EMULATION
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
static float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
static unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static int __float2int_rn(float f) {  // PTX cvt.rni.s32.f32: nearest even, saturated, NaN -> 0
    if (f != f) return 0;
    if (f >= 2147483648.0f) return 2147483647;
    if (f <= -2147483648.0f) return -2147483647 - 1;
    return (int)std::nearbyint(f);
}
static float div_rn(float a, float b) { return a / b; }
static float mul_rn(float a, float b) { return a * b; }
static float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
static float half_bits_to_float(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
static unsigned short float_to_half_bits(float f) {
    _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h;
}
static ucontext_t scheduler;
static ucontext_t* running;
static void __syncthreads() { swapcontext(running, &scheduler); }

#include "kernels.cu"

typedef unsigned long long u64;
typedef unsigned short u16;
typedef std::function<void(const u64*)> Kernel;
#define Q(NAME, RAW) {#NAME, [](const u64* a) { \
    NAME((const RAW*)a[0], (const float*)a[1], (signed char*)a[2], (i64)a[3], (i64)a[4], (i64)a[5]); }}
#define DQ(NAME, RAW) {#NAME, [](const u64* a) { \
    NAME((const signed char*)a[0], (const float*)a[1], (RAW*)a[2], (i64)a[3], (i64)a[4], (i64)a[5]); }}
#define VARIANT(V) Q(quantize_##V##_f32, float), Q(quantize_##V##_f16, u16), Q(quantize_##V##_bf16, u16), \
    DQ(dequantize_##V##_f32, float), DQ(dequantize_##V##_f16, u16), DQ(dequantize_##V##_bf16, u16)
#define GQ(NAME, RAW) {#NAME, [](const u64* a) { \
    NAME((const RAW*)a[0], (float*)a[1], (signed char*)a[2], (i64)a[3], (i64)a[4], (i64)a[5], (i64)a[6]); }}
#define GDQ(NAME, RAW) {#NAME, [](const u64* a) { \
    NAME((const signed char*)a[0], (const float*)a[1], (RAW*)a[2], (i64)a[3], (i64)a[4], (i64)a[5], \
         (i64)a[6]); }}
#define GROUPED(TAG, RAW) GQ(quantize_grouped_##TAG, RAW), GQ(scales_grouped_##TAG, RAW), \
    GQ(encode_grouped_##TAG, RAW), GDQ(dequantize_grouped_##TAG, RAW)
#define ABSMAX(NAME, RAW) {#NAME, [](const u64* a) { \
    NAME((const RAW*)a[0], (float*)a[1], (i64)a[2], (i64)a[3], (i64)a[4], (i64)a[5]); }}

static const std::map<std::string, Kernel> kernels = {
    VARIANT(naive), VARIANT(tiled), VARIANT(coarsened), VARIANT(vectorized),
    GROUPED(f32, float), GROUPED(f16, u16), GROUPED(bf16, u16),
    ABSMAX(absmax_partial_f32, float), ABSMAX(absmax_partial_f16, u16), ABSMAX(absmax_partial_bf16, u16),
    {"finalize_scales", [](const u64* a) {
        finalize_scales((const float*)a[0], (float*)a[1], (i64)a[2], (i64)a[3], (i64)a[4]); }},
};

struct Fiber { ucontext_t ctx; std::vector<char> stack; dim3 tid; bool done; };
static const Kernel* kernel;
static const u64* kernel_args;
static Fiber* fiber;
static void fiber_main() { (*kernel)(kernel_args); fiber->done = true; }

struct Buffer { std::string path; char* data; size_t size; };

int main(int argc, char** argv) {
    auto it = kernels.find(argv[1]);
    if (argc < 7 || it == kernels.end()) { std::fprintf(stderr, "bad kernel or arguments\n"); return 2; }
    gridDim = {(unsigned)atoi(argv[2]), (unsigned)atoi(argv[3]), (unsigned)atoi(argv[4])};
    blockDim = {(unsigned)atoi(argv[5]), (unsigned)atoi(argv[6]), 1};
    std::vector<u64> args;
    std::vector<Buffer> buffers;
    for (int i = 7; i < argc; ++i) {
        std::string a = argv[i];
        if (a.rfind("i:", 0) == 0) { args.push_back((u64)std::stoll(a.substr(2))); continue; }
        size_t colon = a.rfind(':');
        size_t offset = std::stoul(a.substr(colon + 1));
        Buffer b{a.substr(2, colon - 2), nullptr, 0};
        FILE* f = std::fopen(b.path.c_str(), "rb");
        std::fseek(f, 0, SEEK_END); b.size = std::ftell(f); std::fseek(f, 0, SEEK_SET);
        b.data = (char*)std::aligned_alloc(64, (b.size + offset + 64) / 64 * 64) + offset;
        if (std::fread(b.data, 1, b.size, f) != b.size) return 3;
        std::fclose(f);
        args.push_back((u64)b.data);
        buffers.push_back(b);
    }
    kernel = &it->second;
    kernel_args = args.data();
    std::vector<Fiber> fibers(blockDim.x * blockDim.y);
    for (auto& f : fibers) f.stack.resize(1 << 15);
    for (unsigned bz = 0; bz < gridDim.z; ++bz)
    for (unsigned by = 0; by < gridDim.y; ++by)
    for (unsigned bx = 0; bx < gridDim.x; ++bx) {
        blockIdx = {bx, by, bz};
        for (unsigned i = 0; i < fibers.size(); ++i) {
            Fiber& f = fibers[i];
            f.tid = {i % blockDim.x, i / blockDim.x, 0};
            f.done = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = &scheduler;
            makecontext(&f.ctx, fiber_main, 0);
        }
        for (bool left = true; left;) {
            left = false;
            for (auto& f : fibers) {
                if (f.done) continue;
                threadIdx = f.tid;
                running = &f.ctx;
                fiber = &f;
                swapcontext(&scheduler, &f.ctx);
                left = left || !f.done;
            }
        }
    }
    for (auto& b : buffers) {
        FILE* f = std::fopen(b.path.c_str(), "wb");
        std::fwrite(b.data, 1, b.size, f);
        std::fclose(f);
    }
    return 0;
}
"""


class Emulator:
    """Launch a kernel of kvpack.cuda on CPU tensors: ``emu(name, grid, block, *args)`` where an
    argument is an int, a tensor, or ``(tensor, byte offset from a 64-byte boundary)``."""

    def __init__(self, exe: Path, tmp: Path) -> None:
        self.exe, self.tmp = exe, tmp

    def __call__(self, name: str, grid, block, *args) -> None:
        cmd = [str(self.exe), name, *map(str, grid), *map(str, block)]
        buffers = []
        for k, a in enumerate(args):
            if isinstance(a, int):
                cmd.append(f"i:{a}")
                continue
            t, offset = a if isinstance(a, tuple) else (a, 0)
            path = self.tmp / f"arg{k}.bin"
            t.contiguous().view(torch.uint8).numpy().tofile(path)
            cmd.append(f"p:{path}:{offset}")
            buffers.append((path, t))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{name} failed in the emulator:\n{r.stderr}"
        for path, t in buffers:
            t.view(torch.uint8).view(-1).copy_(torch.from_numpy(np.fromfile(path, dtype=np.uint8)))

    def scales(self, x: torch.Tensor, sms: int = 2) -> torch.Tensor:
        """What :func:`kvpack.cuda.absmax_scales_into` computes, with its geometry."""
        b, t, d = x.shape
        grid, block, split = kc.scale_geometry(b, t, d, sms)
        partial = torch.full((b, grid[1], d), float(POISON))
        self(f"absmax_partial_{TAGS[x.dtype]}", grid, block, x, partial, b, t, d, split)
        scale = torch.full((b, 1, d), float(POISON))
        self("finalize_scales", (-(-b * d // 256), 1, 1), (256, 1), partial, scale, b, grid[1], d)
        return scale

    def encode(self, variant: str, x, scale, grid=None, offsets=(0, 0, 0)) -> torch.Tensor:
        """What :func:`kvpack.cuda.encode_into` computes, into poisoned codes."""
        b, t, d = x.shape
        codes = torch.full((b, t, d), POISON, dtype=torch.int8)
        grid, block = geometry(variant, x, grid)
        ox, os_, oc = offsets
        self(f"quantize_{variant}_{TAGS[x.dtype]}", grid, block, (x, ox), (scale, os_), (codes, oc), b, t, d)
        return codes

    def decode(self, variant: str, codes, scale, dtype, grid=None, offsets=(0, 0, 0)) -> torch.Tensor:
        """What :func:`kvpack.cuda.decode_into` computes, into a poisoned output."""
        b, t, d = codes.shape
        out = torch.full((b, t, d), float(POISON), dtype=dtype)
        grid, block = geometry(variant, out, grid)
        oo, os_, oc = offsets
        self(
            f"dequantize_{variant}_{TAGS[dtype]}", grid, block, (codes, oc), (scale, os_), (out, oo), b, t, d
        )
        return out

    def grouped(self, x, group: int, what: str = "both", scale=None, grid=None, offsets=(0, 0)):
        """What :func:`kvpack.cuda.grouped_quantize_into` computes (``what``: both, scales or codes; the
        codes mode reads ``scale``), into poisoned outputs: ``(scale, codes)``."""
        b, t, d = x.shape
        g = min(group, t)
        if what == "codes":
            scale = scale.clone()
        else:
            scale = torch.full((b, -(-t // g), d), float(POISON))
        codes = torch.full((b, t, d), POISON, dtype=torch.int8)
        g_grid, block = kc.grouped_geometry(b, t, d, g, x.element_size())
        kernel = {"both": "quantize", "scales": "scales", "codes": "encode"}[what]
        ox, oc = offsets
        self(
            f"{kernel}_grouped_{TAGS[x.dtype]}",
            grid or g_grid,
            block,
            (x, ox),
            scale,
            (codes, oc),
            b,
            t,
            d,
            g,
        )
        return scale, codes

    def grouped_decode(self, codes, scale, group: int, dtype, grid=None, offsets=(0, 0)) -> torch.Tensor:
        """What :func:`kvpack.cuda.grouped_dequantize_into` computes, into a poisoned output."""
        b, t, d = codes.shape
        g = min(group, t)
        out = torch.full((b, t, d), float(POISON), dtype=dtype)
        g_grid, block = kc.grouped_geometry(b, t, d, g, out.element_size())
        oc, oo = offsets
        self(
            f"dequantize_grouped_{TAGS[dtype]}",
            grid or g_grid,
            block,
            (codes, oc),
            scale,
            (out, oo),
            b,
            t,
            d,
            g,
        )
        return out


def geometry(variant: str, wide: torch.Tensor, grid=None):
    """The loader's (grid, block) for ``variant`` (on a 2-SM GPU), or ``grid`` with its block."""
    b, t, d = wide.shape
    if variant == "vectorized":
        g, block = kc.vector_geometry(b, t, d, wide.element_size(), 2)
    else:
        g, block = kc.paper_geometry(variant, b, t, d)
    return (grid or g), block


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Emulator:
    if shutil.which("g++") is None:
        pytest.skip("needs the C++ compiler g++ for the CUDA emulator")
    tmp = tmp_path_factory.mktemp("emu")
    (tmp / "kernels.cu").write_text("\n".join(kc.source(name) for name in kc.SOURCES))
    (tmp / "emu.cpp").write_text(EMULATOR)
    cmd = [
        "g++",
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-fsanitize=alignment",
        "-fno-sanitize-recover=all",
        "-o",
        str(tmp / "emu"),
        str(tmp / "emu.cpp"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    return Emulator(tmp / "emu", tmp)


EMU_SHAPES = [(1, 1, 1), (1, 5, 3), (3, 17, 5), (2, 33, 65), (1, 19, 127), (2, 9, 128), (1, 2, 1030)]


@requires_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_emulated_scales_match_reference(emu, dtype):
    for i, shape in enumerate([*EMU_SHAPES, (2, 300, 40)]):
        x = random_input(shape, dtype, seed=i)
        want, _, _ = expected(x)
        for sms in (1, 132):
            assert torch.equal(emu.scales(x, sms), want), (shape, sms)


@requires_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_emulated_scales_flag_nan_and_inf(emu, dtype):
    x = random_input((2, 40, 6), dtype, seed=1)
    x[0, 3, 2], x[1, 39, 3], x[1, 0, 4] = float("nan"), float("inf"), -float("inf")
    scale = emu.scales(x)
    assert (
        scale[0, 0, 2] == float("inf") and scale[1, 0, 3] == float("inf") and scale[1, 0, 4] == float("inf")
    )
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    assert torch.equal(scale[finite], expected(x)[0][finite])
    assert torch.equal(scale[:, :, 1], torch.ones(2, 1))  # the all-zero channel


@requires_gxx
@pytest.mark.parametrize("variant", kc.VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_emulated_kernels_match_reference(emu, variant, dtype):
    for i, shape in enumerate(EMU_SHAPES):
        x = random_input(shape, dtype, seed=100 + i)
        scale, codes, out = expected(x)
        assert torch.equal(emu.encode(variant, x, scale), codes), shape
        saturated = reference.encode(x, INT8, scale / 2, None)  # quotients up to 254: clamped to +-127
        assert torch.equal(emu.encode(variant, x, scale / 2), saturated), shape
        for out_dtype in DTYPES:
            want = reference.dequantize(codes, scale, None, INT8, shape[2], out_dtype)
            assert torch.equal(emu.decode(variant, codes, scale, out_dtype), want), (shape, out_dtype)


@requires_gxx
@pytest.mark.parametrize("variant", kc.VARIANTS)
def test_emulated_ties_need_ieee_division(emu, variant):
    x = near_ties(16, 24)
    scale, codes, _ = expected(x)
    assert torch.equal(emu.scales(x), scale)
    assert torch.equal(emu.encode(variant, x, scale), codes)


@requires_gxx
@pytest.mark.parametrize("variant", ["naive", "vectorized"])
def test_emulated_subnormals_are_kept(emu, variant):
    x = random_input((1, 9, 8), torch.float32, seed=3) * 1e-39  # subnormal values, subnormal scales
    scale, codes, out = expected(x)
    assert (scale[0, 0, 0] < torch.finfo(torch.float32).tiny) and (scale[0, 0, 0] > 0)
    assert torch.equal(emu.scales(x), scale)
    assert torch.equal(emu.encode(variant, x, scale), codes)
    assert torch.equal(emu.decode(variant, codes, scale, torch.float32), out)


@requires_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_emulated_vectorized_handles_any_alignment(emu, dtype):
    """Offsets (bytes past a 16-byte boundary) of the wide side, the scales and the codes: rows
    with a head and a tail, both sides misaligned alike, unlike (all scalar), unaligned scales."""
    es = torch.empty(0, dtype=dtype).element_size()
    for shape in [(2, 7, 13), (1, 5, 16), (3, 4, 9)]:
        x = random_input(shape, dtype, seed=7)
        scale, codes, out = expected(x)
        for wide, sc, narrow in [(es, 0, 1), (3 * es, 4, 3), (es, 0, 0), (0, 0, 1), (0, 4, 0), (0, 0, 0)]:
            offsets = (wide, sc, narrow)
            assert torch.equal(emu.encode("vectorized", x, scale, offsets=offsets), codes), (shape, offsets)
            got = emu.decode("vectorized", codes, scale, dtype, offsets=offsets)
            assert torch.equal(got, out), (shape, offsets)


@requires_gxx
@pytest.mark.parametrize("variant", kc.VARIANTS)
def test_emulated_grid_stride_loops(emu, variant):
    """A grid of one block row and one batch block still converts every token of every batch entry
    (for the vectorized kernels: two tokens per step, and a last odd one)."""
    for shape, dtype in [
        ((3, 37, 20), torch.float16),
        ((3, 37, 64), torch.float16),
        ((3, 37, 64), torch.float32),
    ]:
        x = random_input(shape, dtype, seed=11)
        scale, codes, out = expected(x)
        (gx, _, _), _ = geometry(variant, x)
        assert torch.equal(emu.encode(variant, x, scale, grid=(gx, 1, 1)), codes), shape
        assert torch.equal(emu.decode(variant, codes, scale, dtype, grid=(gx, 1, 1)), out), shape


def expected_grouped(x: torch.Tensor, group: int):
    """Reference scales, codes and dequantized values of ``x`` in ``int8-channel-g<group>`` (on the CPU)."""
    scheme = parse(f"int8-channel-g{group}")
    x = x.cpu()
    scale, _ = reference.compute_scales(x, scheme)
    codes = reference.encode(x, scheme, scale, None)
    return scale, codes, reference.dequantize(codes, scale, None, scheme, x.shape[2], x.dtype)


#: (shape, group): groups longer than T, partial last groups, D not a multiple of 4 or 8, several
#: column blocks, and groups longer than one block holds in registers (300 > 16 rows x 16 warps).
GROUPED_CASES = [
    ((1, 1, 1), 4),
    ((1, 5, 3), 2),
    ((3, 17, 5), 8),
    ((2, 33, 65), 16),
    ((1, 19, 127), 128),
    ((2, 40, 128), 16),
    ((1, 300, 40), 128),
    ((1, 600, 24), 300),
    ((1, 3, 1030), 64),
]


@requires_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_emulated_grouped_matches_reference(emu, dtype):
    for i, (shape, group) in enumerate(GROUPED_CASES):
        x = random_input(shape, dtype, seed=200 + i)
        scale, codes, _ = expected_grouped(x, group)
        got_scale, got_codes = emu.grouped(x, group)
        assert torch.equal(got_scale, scale) and torch.equal(got_codes, codes), (shape, group)
        got_scale, untouched = emu.grouped(x, group, "scales")
        assert torch.equal(got_scale, scale) and (untouched == POISON).all(), (shape, group)
        _, got_codes = emu.grouped(x, group, "codes", scale=scale / 2)  # quotients up to 254: clamped
        saturated = reference.encode(x, parse(f"int8-channel-g{group}"), scale / 2, None)
        assert torch.equal(got_codes, saturated), (shape, group)
        for out_dtype in DTYPES:
            want = reference.dequantize(
                codes, scale, None, parse(f"int8-channel-g{group}"), shape[2], out_dtype
            )
            assert torch.equal(emu.grouped_decode(codes, scale, group, out_dtype), want), (shape, out_dtype)


@requires_gxx
def test_emulated_grouped_ties_subnormals_and_bad_values(emu):
    """Ties need the correctly rounded quotient (Markstein's steps); scales below 2^-96 take the
    division; a NaN or Inf makes its group's scale infinite and leaves the other groups exact."""
    for x in (near_ties(16, 24), random_input((1, 9, 8), torch.float32, seed=3) * 1e-39):
        scale, codes, out = expected_grouped(x, 4)
        got_scale, got_codes = emu.grouped(x, 4)
        assert torch.equal(got_scale, scale) and torch.equal(got_codes, codes)
        assert torch.equal(emu.grouped_decode(codes, scale, 4, torch.float32), out)
    x = random_input((2, 40, 6), torch.float16, seed=1)
    x[0, 3, 2], x[1, 39, 3] = float("nan"), float("inf")
    got_scale, _ = emu.grouped(x, 8)
    assert got_scale[0, 0, 2] == float("inf") and got_scale[1, 4, 3] == float("inf")
    finite = torch.isfinite(got_scale)
    assert finite.sum() == finite.numel() - 2
    assert torch.equal(got_scale[finite], expected_grouped(x.nan_to_num(0, 0, 0), 8)[0][finite])


@requires_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_emulated_grouped_handles_any_alignment_and_grid(emu, dtype):
    """Inputs and codes that start off a 16-byte boundary take the element path; a grid of one block
    walks every (batch row, group) pair and every column block."""
    es = torch.empty(0, dtype=dtype).element_size()
    for shape, group in [((2, 7, 16), 4), ((1, 20, 64), 8), ((3, 9, 9), 4)]:
        x = random_input(shape, dtype, seed=7)
        scale, codes, out = expected_grouped(x, group)
        for ox, oc in [(es, 0), (0, 1), (3 * es, 3), (0, 0)]:
            got_scale, got_codes = emu.grouped(x, group, offsets=(ox, oc))
            assert torch.equal(got_scale, scale) and torch.equal(got_codes, codes), (shape, ox, oc)
            got = emu.grouped_decode(codes, scale, group, dtype, offsets=(oc, ox))
            assert torch.equal(got, out), (shape, ox, oc)
    x = random_input((3, 37, 600), dtype, seed=11)
    scale, codes, out = expected_grouped(x, 8)
    got_scale, got_codes = emu.grouped(x, 8, grid=(1, 1, 1))
    assert torch.equal(got_scale, scale) and torch.equal(got_codes, codes)
    assert torch.equal(emu.grouped_decode(codes, scale, 8, dtype, grid=(1, 1, 1)), out)


# ---------------------------------------------------------------------------------------------
# On the GPU.

GPU_SHAPES = [
    (1, 1, 1),
    (3, 1, 5),
    (1, 7, 3),
    (3, 33, 65),
    (1, 100, 127),
    (3, 64, 128),
    (1, 257, 4096),
    (3, 5, 4096),
    (2, 1000, 128),
    (1, 4099, 72),
]
GiB = 2**30


def poisoned(shape, dtype, offset: int = 0) -> torch.Tensor:
    """A CUDA tensor full of POISON, starting ``offset`` elements into its storage."""
    n = int(np.prod(shape))
    return torch.full((n + offset,), POISON, dtype=dtype, device="cuda")[offset:].view(shape)


def offset_copy(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous CUDA copy of ``x`` whose data starts ``offset`` elements into its storage."""
    out = poisoned(tuple(x.shape), x.dtype, offset)
    return out.copy_(x)


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_gpu_bit_exact_with_reference(variant, dtype):
    for i, shape in enumerate(GPU_SHAPES):
        x = random_input(shape, dtype, seed=1000 + i).cuda()
        scale, codes, _ = expected(x)
        b, t, d = shape
        got_scale = kc.absmax_scales_into(x, poisoned((b, 1, d), torch.float32))
        got_codes = kc.encode_into(variant, x, got_scale, poisoned(shape, torch.int8))
        torch.testing.assert_close(got_scale.cpu(), scale, rtol=0, atol=0, msg=f"scales {shape}")
        torch.testing.assert_close(got_codes.cpu(), codes, rtol=0, atol=0, msg=f"codes {shape}")
        for out_dtype in DTYPES:
            want = reference.dequantize(codes, scale, None, INT8, d, out_dtype)
            got = kc.decode_into(variant, got_codes, got_scale, poisoned(shape, out_dtype))
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, msg=f"dequantize {shape} {out_dtype}")
        q_codes, q_scale, zero = kc.variant(variant).quantize(x, INT8)
        assert zero is None and torch.equal(q_codes.cpu(), codes) and torch.equal(q_scale.cpu(), scale)


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
def test_gpu_ties_and_subnormals(variant):
    for x in (near_ties(16, 24), random_input((1, 9, 8), torch.float32, seed=3) * 1e-39):
        scale, codes, out = expected(x)
        got_codes, got_scale, _ = kc.variant(variant).quantize(x.cuda(), INT8)
        assert torch.equal(got_scale.cpu(), scale) and torch.equal(got_codes.cpu(), codes)
        got = kc.variant(variant).dequantize(got_codes, got_scale, None, INT8, x.shape[2], torch.float32)
        assert torch.equal(got.cpu(), out)


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_gpu_any_alignment(variant, dtype):
    """Views whose data starts at odd offsets: the vectorized kernels take their head/tail and
    scalar paths; the others do not care."""
    for shape in [(2, 7, 13), (1, 33, 64), (3, 4, 9)]:
        x = random_input(shape, dtype, seed=5)
        scale, codes, out = expected(x)
        for ox, oc, oo in [(1, 1, 1), (3, 3, 3), (1, 0, 0), (0, 1, 2), (0, 0, 0)]:
            got_codes = kc.encode_into(
                variant, offset_copy(x.cuda(), ox), scale.cuda(), poisoned(shape, torch.int8, oc)
            )
            assert torch.equal(got_codes.cpu(), codes), (shape, ox, oc)
            got = kc.decode_into(
                variant, offset_copy(codes.cuda(), oc), scale.cuda(), poisoned(shape, dtype, oo)
            )
            assert torch.equal(got.cpu(), out), (shape, oc, oo)


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
def test_gpu_public_api_matches_cpu(variant):
    backend = f"cuda-{variant}"
    for x in (torch.randn(2, 3, 50, 64, dtype=torch.float16), torch.randn(2, 3, 64, 50).transpose(-1, -2)):
        want = kvpack.quantize(x, "int8-channel", backend="torch")
        got = kvpack.quantize(x.cuda(), "int8-channel", backend=backend)
        assert got.codes.is_cuda and got.scheme == want.scheme and got.shape == want.shape
        assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scale.cpu(), want.scale)
        assert torch.equal(
            kvpack.dequantize(got, backend=backend).cpu(), kvpack.dequantize(want, backend="torch")
        )


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gpu_nan_and_inf_give_the_cpu_error(variant, bad):
    x = torch.randn(2, 40, 24)
    x[1, 7, 5] = bad
    with pytest.raises(ValueError) as on_cpu:
        kvpack.quantize(x, "int8-channel", backend="torch")
    with pytest.raises(ValueError) as on_gpu_:
        kvpack.quantize(x.cuda(), "int8-channel", backend=f"cuda-{variant}")
    assert str(on_gpu_.value) == str(on_cpu.value)


@on_gpu
def test_gpu_launchers_refuse_mismatched_outputs():
    x = torch.randn(2, 8, 16, device="cuda")
    scale = kc.absmax_scales_into(x, torch.empty(2, 1, 16, device="cuda"))
    with pytest.raises(ValueError, match="shape"):
        kc.absmax_scales_into(x, torch.empty(2, 16, device="cuda").view(1, 2, 16))
    with pytest.raises(TypeError, match="dtype"):
        kc.encode_into("naive", x, scale, torch.empty(2, 8, 16, device="cuda"))
    with pytest.raises(ValueError, match="codes must have shape"):
        kc.encode_into("naive", x, scale, torch.empty(2, 8, 15, dtype=torch.int8, device="cuda"))
    with pytest.raises(ValueError, match="contiguous"):
        kc.encode_into(
            "naive",
            x.transpose(0, 1).contiguous().transpose(0, 1),
            scale,
            torch.empty_like(x, dtype=torch.int8),
        )
    with pytest.raises(ValueError, match="CUDA tensor"):
        kc.encode_into("naive", x, scale.cpu(), torch.empty_like(x, dtype=torch.int8))


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
def test_gpu_kernels_run_on_the_current_stream(variant):
    """On a side stream that first sleeps and then fills the input: a kernel launched on any other
    stream would read the input before it is written."""
    src = random_input((2, 512, 256), torch.float32, seed=9)
    scale, codes, _ = expected(src)
    x = torch.zeros(src.shape, device="cuda")
    src = src.cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(src)
        got_codes, got_scale, _ = kc.variant(variant).quantize(x, INT8)
    side.synchronize()
    assert torch.equal(got_scale.cpu(), scale) and torch.equal(got_codes.cpu(), codes)


@on_gpu
@pytest.mark.parametrize("variant", kc.VARIANTS)
def test_gpu_cuda_graph_capture(variant):
    v = kc.variant(variant)
    static_x = torch.randn(2, 300, 96, device="cuda", dtype=torch.bfloat16)
    v.dequantize(*v.quantize(static_x, INT8)[:2], None, INT8, 96, torch.bfloat16)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes, scale, _ = v.quantize(static_x, INT8)
        out = v.dequantize(codes, scale, None, INT8, 96, torch.bfloat16)
    fresh = random_input((2, 300, 96), torch.bfloat16, seed=12)
    static_x.copy_(fresh.cuda())
    graph.replay()
    torch.cuda.synchronize()
    want_scale, want_codes, want_out = expected(fresh)
    assert torch.equal(scale.cpu(), want_scale) and torch.equal(codes.cpu(), want_codes)
    assert torch.equal(out.cpu(), want_out)


@on_gpu
@pytest.mark.slow
def test_gpu_more_than_2_31_elements():
    """262147 x 8192 float16 (2^31 + 24576 elements, 4.3 GB): every code and value checked against
    the reference, computed on the GPU in chunks of tokens."""
    if torch.cuda.mem_get_info()[0] < 16 * GiB:
        pytest.skip("needs 16 GiB of free GPU memory")
    t, d, chunk = 2**18 + 3, 8192, 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((1, t, d), generator=g, device="cuda", dtype=torch.float16)
    x[0, -1, -1] = 300.0  # the channel max sits at the last element, past index 2^31
    assert x.numel() > 2**31
    want_scale = torch.stack(
        [reference.compute_scales(x[:, a : a + chunk], INT8)[0] for a in range(0, t, chunk)]
    )
    want_scale = want_scale.amax(dim=0)
    scale = kc.absmax_scales_into(x, poisoned((1, 1, d), torch.float32))
    assert torch.equal(scale, want_scale)
    assert scale[0, 0, -1].item() == np.float32(300.0) / np.float32(127.0)
    for variant in kc.VARIANTS:
        codes = kc.encode_into(variant, x, scale, poisoned((1, t, d), torch.int8))
        for a in range(0, t, chunk):
            want = reference.encode(x[:, a : a + chunk], INT8, scale, None)
            assert torch.equal(codes[:, a : a + chunk], want), (variant, a)
        assert codes[0, -1, -1] == 127
        if variant in ("naive", "vectorized"):
            out = kc.decode_into(variant, codes, scale, poisoned((1, t, d), torch.float16))
            for a in range(0, t, chunk):
                want = reference.dequantize(codes[:, a : a + chunk], scale, None, INT8, d, torch.float16)
                assert torch.equal(out[:, a : a + chunk], want), (variant, a)
            del out
        del codes


# The cuda-grouped kernel on the GPU.

GROUPS = (32, 64, 128, 300)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=TAGS.get)
def test_gpu_grouped_bit_exact_with_reference(dtype):
    for i, shape in enumerate(GPU_SHAPES):
        x = random_input(shape, dtype, seed=2000 + i).cuda()
        b, t, d = shape
        for group in GROUPS:
            g = min(group, t)
            scheme = parse(f"int8-channel-g{group}")
            scale, codes, _ = expected_grouped(x, group)
            got_scale = poisoned(tuple(scale.shape), torch.float32)
            got_codes = poisoned(shape, torch.int8)
            kc.grouped_quantize_into(x, g, got_scale, got_codes)
            torch.testing.assert_close(got_scale.cpu(), scale, rtol=0, atol=0, msg=f"scales {shape} g{group}")
            torch.testing.assert_close(got_codes.cpu(), codes, rtol=0, atol=0, msg=f"codes {shape} g{group}")
            only_scale = poisoned(tuple(scale.shape), torch.float32)
            kc.grouped_quantize_into(x, g, only_scale, None, "scales")
            assert torch.equal(only_scale.cpu(), scale), (shape, group)
            half = (scale / 2).cuda()
            encoded = poisoned(shape, torch.int8)
            kc.grouped_quantize_into(x, g, half, encoded, "codes")
            assert torch.equal(encoded.cpu(), reference.encode(x.cpu(), scheme, scale / 2, None)), (
                shape,
                group,
            )
            for out_dtype in DTYPES:
                want = reference.dequantize(codes, scale, None, scheme, d, out_dtype)
                got = kc.grouped_dequantize_into(got_codes, got_scale, g, poisoned(shape, out_dtype))
                assert torch.equal(got.cpu(), want), (shape, group, out_dtype)


@on_gpu
def test_gpu_grouped_ties_subnormals_and_alignment():
    v = kc.grouped()
    for x in (near_ties(16, 24), random_input((1, 9, 8), torch.float32, seed=3) * 1e-39):
        scale, codes, out = expected_grouped(x, 4)
        got_codes, got_scale, _ = v.quantize(x.cuda(), parse("int8-channel-g4"))
        assert torch.equal(got_scale.cpu(), scale) and torch.equal(got_codes.cpu(), codes)
        got = v.dequantize(got_codes, got_scale, None, parse("int8-channel-g4"), x.shape[2], torch.float32)
        assert torch.equal(got.cpu(), out)
    for dtype in DTYPES:
        for shape in [(2, 7, 13), (1, 33, 64), (3, 40, 16)]:
            x = random_input(shape, dtype, seed=5)
            scale, codes, out = expected_grouped(x, 8)
            for ox, oc in [(1, 1), (3, 3), (1, 0), (0, 1), (0, 0)]:
                got_scale = poisoned(tuple(scale.shape), torch.float32)
                got_codes = poisoned(shape, torch.int8, oc)
                kc.grouped_quantize_into(offset_copy(x.cuda(), ox), min(8, shape[1]), got_scale, got_codes)
                assert torch.equal(got_scale.cpu(), scale) and torch.equal(got_codes.cpu(), codes), (
                    shape,
                    ox,
                    oc,
                )
                got = kc.grouped_dequantize_into(
                    offset_copy(codes.cuda(), oc), scale.cuda(), min(8, shape[1]), poisoned(shape, dtype, ox)
                )
                assert torch.equal(got.cpu(), out), (shape, ox, oc)


@on_gpu
def test_gpu_grouped_public_api_errors_stream_and_graph():
    for x in (torch.randn(2, 3, 500, 64, dtype=torch.float16), torch.randn(2, 3, 64, 50).transpose(-1, -2)):
        want = kvpack.quantize(x, "int8-channel-g128", backend="torch")
        got = kvpack.quantize(x.cuda(), "int8-channel-g128", backend="cuda-grouped")
        assert got.codes.is_cuda and got.scheme == want.scheme and got.shape == want.shape
        assert torch.equal(got.codes.cpu(), want.codes) and torch.equal(got.scale.cpu(), want.scale)
        assert torch.equal(
            kvpack.dequantize(got, backend="cuda-grouped").cpu(), kvpack.dequantize(want, backend="torch")
        )
    x = torch.randn(2, 300, 24)
    x[1, 270, 5] = float("nan")
    with pytest.raises(ValueError) as on_cpu:
        kvpack.quantize(x, "int8-channel-g128", backend="torch")
    with pytest.raises(ValueError) as on_gpu_:
        kvpack.quantize(x.cuda(), "int8-channel-g128", backend="cuda-grouped")
    assert str(on_gpu_.value) == str(on_cpu.value)
    with pytest.raises(RuntimeError, match=r"groups of tokens \(-gN\)"):
        kvpack.quantize(x.cuda(), "int8-channel", backend="cuda-grouped")

    v, scheme = kc.grouped(), parse("int8-channel-g64")
    src = random_input((2, 512, 256), torch.float16, seed=9)
    want_scale, want_codes, want_out = expected_grouped(src, 64)
    x = torch.zeros(src.shape, device="cuda", dtype=torch.float16)
    src = src.cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(src)
        codes, scale, _ = v.quantize(x, scheme)
    side.synchronize()
    assert torch.equal(scale.cpu(), want_scale) and torch.equal(codes.cpu(), want_codes)

    static_x = torch.zeros(src.shape, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes, scale, _ = v.quantize(static_x, scheme)
        out = v.dequantize(codes, scale, None, scheme, 256, torch.float16)
    static_x.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(scale.cpu(), want_scale) and torch.equal(codes.cpu(), want_codes)
    assert torch.equal(out.cpu(), want_out)


@on_gpu
@pytest.mark.slow
def test_gpu_grouped_more_than_2_31_elements():
    """262147 x 8192 float16 in groups of 128 tokens: every scale, code and value past index 2^31
    checked against the reference, computed on the GPU in chunks of whole groups."""
    if torch.cuda.mem_get_info()[0] < 16 * GiB:
        pytest.skip("needs 16 GiB of free GPU memory")
    t, d, chunk = 2**18 + 3, 8192, 16384
    scheme = parse("int8-channel-g128")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn((1, t, d), generator=g, device="cuda", dtype=torch.float16)
    x[0, -1, -1] = 300.0
    scale = poisoned((1, -(-t // 128), d), torch.float32)
    codes = poisoned((1, t, d), torch.int8)
    kc.grouped_quantize_into(x, 128, scale, codes)
    assert scale[0, -1, -1].item() == np.float32(300.0) / np.float32(127.0) and codes[0, -1, -1] == 127
    out = kc.grouped_dequantize_into(codes, scale, 128, poisoned((1, t, d), torch.float16))
    for a in range(0, t, chunk):
        want_scale, _ = reference.compute_scales(x[:, a : a + chunk], scheme)
        assert torch.equal(scale[:, a // 128 : a // 128 + want_scale.shape[1]], want_scale), a
        want = reference.encode(x[:, a : a + chunk], scheme, want_scale, None)
        assert torch.equal(codes[:, a : a + chunk], want), a
        assert torch.equal(
            out[:, a : a + chunk], reference.dequantize(want, want_scale, None, scheme, d, torch.float16)
        ), a
