"""The paper's four CUDA C variants of ``int8-channel`` quantize and dequantize, the one-pass
group-wise kernel of ``int8-channel-gN``, and their loader.

The kernels live beside this file as ``.cu`` sources that take raw pointers and know nothing of
torch: ``scales.cu`` (the per-channel absmax reduction every variant uses), ``naive.cu``,
``tiled.cu``, ``coarsened.cu`` and ``vectorized.cu`` (see each file's header for its design). Each
has one ``extern "C"`` kernel per dtype: ``quantize_<variant>_<f32|f16|bf16>`` and
``dequantize_<variant>_<f32|f16|bf16>``. ``grouped.cu`` (backend ``cuda-grouped``) quantizes
channel-axis int8 in groups of tokens in one pass, its threads each owning a few channels and walking
the group's rows. All are bit-exact with :mod:`kvpack.reference`.

They are compiled at run time by CuPy, which wraps NVRTC: no host compiler and no build step are
needed, nothing ties the binaries to torch's C++ ABI (the same code runs with every torch version),
``RawModule`` and its ``(grid, block, args)`` launch have been stable across CuPy releases, and
CuPy keeps the compiled binaries in a disk cache (``~/.cupy/kernel_cache``), so a source is compiled
once per GPU architecture and later processes only load it. Kernels run on torch's current CUDA
stream, on the tensors' memory (``data_ptr``); outputs are allocated by torch.

>>> k = torch.randn(4096, 128, device="cuda")
>>> q = kvpack.quantize(k, "int8-channel", backend="cuda-vectorized")  # or cuda-naive, -tiled, -coarsened
>>> codes, scale, _ = variant("vectorized").quantize(k[None], parse("int8-channel"))  # the raw kernels
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpack.schemes import INPUT_DTYPES, Scheme

VARIANTS = ("naive", "tiled", "coarsened", "vectorized")
SOURCES = ("scales", *VARIANTS, "grouped")

_DIR = Path(__file__).parent
_HEADER = '#include "common.cuh"'
_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_MAX_GRID_YZ = 65535
_BLOCK_THREADS = 256
_BLOCKS_PER_SM = 2048 // _BLOCK_THREADS  # resident 256-thread blocks per SM (H100, A100)
_WAVES = 8  # grids sized to several full waves of blocks, so the last one matters little
_PAPER_BLOCK = (16, 16)
_COARSEN = 4
_MIN_TOKENS_PER_THREAD = 8  # absmax splits keep at least this many loads per thread
#: grouped.cu: rows a thread holds (KVPACK_GROUPED_ROWS) and the most warps of a block.
GROUPED_ROWS = 16
GROUPED_MAX_WARPS = 16
_MAX_GRID_X = 2**31 - 1

Grid = tuple[int, int, int]
Block = tuple[int, int]

_NO_CUPY = (
    "kvpack's CUDA C kernels are compiled at run time with CuPy (NVRTC): pip install cupy-cuda12x "
    "(CUDA 12) or pip install cupy-cuda13x (CUDA 13)"
)


def source(name: str) -> str:
    """The CUDA C text of ``name`` (one of :data:`SOURCES`) as NVRTC compiles it: ``common.cuh``
    is pasted in place of its ``#include``, so that CuPy's disk cache, keyed by the source text,
    sees any change to it."""
    if name not in SOURCES:
        raise ValueError(f"unknown CUDA source {name!r}; choose one of: {', '.join(SOURCES)}")
    return pasted(_DIR / f"{name}.cu")


def pasted(path: Path) -> str:
    """The text of the ``.cu`` file at ``path`` with ``common.cuh`` pasted in place of its ``#include``
    (NVRTC is given no include path)."""
    return path.read_text().replace(_HEADER, (_DIR / "common.cuh").read_text(), 1)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise ImportError(_NO_CUPY) from e
    return cupy


@functools.cache
def module(name: str) -> Any:
    """The ``cupy.RawModule`` of source ``name``; it compiles on first use on each device."""
    return _cupy().RawModule(code=source(name))


@functools.cache
def _kernel(src: str, name: str) -> Any:
    return module(src).get_function(name)


class _StreamHandle:
    """A raw ``cudaStream_t`` seen through the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _stream(cp: Any, device: torch.device) -> Any:
    """torch's current stream on ``device``, as a CuPy stream (CuPy 14's ``from_external``, or
    ``ExternalStream`` on older CuPy, where it is not deprecated)."""
    ptr = torch.cuda.current_stream(device).cuda_stream
    if hasattr(cp.cuda.Stream, "from_external"):
        return cp.cuda.Stream.from_external(_StreamHandle(ptr))
    return cp.cuda.ExternalStream(ptr)


def _launch(src: str, name: str, grid: Grid, block: Block, args: tuple, device: torch.device) -> None:
    cp = _cupy()
    with cp.cuda.Device(device.index):
        kernel = _kernel(src, name)
        with _stream(cp, device):
            kernel(grid, block, args)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _sizes(*sizes: int) -> tuple[np.int64, ...]:
    return tuple(np.int64(s) for s in sizes)


# Launch geometry: plain functions of the sizes, so that they can be checked without a GPU.


def scale_geometry(b: int, t: int, d: int, sms: int) -> tuple[Grid, Block, int]:
    """``(grid, block, split_tokens)`` of ``absmax_partial``: a block is 256 threads, a power of
    two from 32 to 256 channels wide; the tokens are cut into splits (grid y, at most 1024) until
    the grid fills the GPU's ``sms`` multiprocessors several times over."""
    rx = min(_BLOCK_THREADS, max(32, 1 << (d - 1).bit_length()))
    ry = _BLOCK_THREADS // rx
    gx, gz = _cdiv(d, rx), min(b, _MAX_GRID_YZ)
    most = max(1, min(1024, _cdiv(t, ry * _MIN_TOKENS_PER_THREAD)))
    splits = min(most, _cdiv(_WAVES * _BLOCKS_PER_SM * sms, gx * gz))
    split_tokens = _cdiv(t, splits)
    return (gx, _cdiv(t, split_tokens), gz), (rx, ry), split_tokens


def paper_geometry(variant: str, b: int, t: int, d: int) -> tuple[Grid, Block]:
    """``(grid, block)`` of the naive, tiled and coarsened kernels: 16 x 16 blocks over
    (channels, tokens), one block column per 16 channels (64 when coarsened), the batch on grid z."""
    width = _PAPER_BLOCK[0] * (_COARSEN if variant == "coarsened" else 1)
    rows = min(_cdiv(t, _PAPER_BLOCK[1]), _MAX_GRID_YZ)
    return (_cdiv(d, width), rows, min(b, _MAX_GRID_YZ)), _PAPER_BLOCK


def vector_geometry(b: int, t: int, d: int, itemsize: int, sms: int) -> tuple[Grid, Block]:
    """``(grid, block)`` of the vectorized kernels: at least ``max(ceil(D / N), N)`` vector slots
    per row (N = 16 / itemsize elements), a 256-thread block of a power-of-two number of slots (at
    most 128) times rows, and a grid of a few waves whose threads walk the tokens."""
    n = 16 // itemsize
    slots = max(_cdiv(d, n), n)
    bx = min(128, 1 << (slots - 1).bit_length())
    by = _BLOCK_THREADS // bx
    gx, gz = _cdiv(slots, bx), min(b, _MAX_GRID_YZ)
    gy = max(1, min(_cdiv(t, by), _MAX_GRID_YZ, _cdiv(_WAVES * _BLOCKS_PER_SM * sms, gx * gz)))
    return (gx, gy, gz), (bx, by)


def grouped_geometry(b: int, t: int, d: int, group: int, itemsize: int) -> tuple[Grid, Block]:
    """``(grid, block)`` of ``grouped.cu`` for groups of ``group`` tokens (at most ``t``): a block of
    ``ceil(group / GROUPED_ROWS)`` warps (1 to 16) takes one (batch row, group) pair (grid x) times 32
    vector slots of channels (grid y); both axes loop with a grid stride beyond the grid limits."""
    n = 16 // itemsize
    warps = max(1, min(GROUPED_MAX_WARPS, _cdiv(group, GROUPED_ROWS)))
    grid = (min(b * _cdiv(t, group), _MAX_GRID_X), min(_cdiv(d, 32 * n), _MAX_GRID_YZ), 1)
    return grid, (32, warps)


def _variant_geometry(variant: str, x: torch.Tensor) -> tuple[Grid, Block]:
    b, t, d = x.shape
    if variant == "vectorized":
        return vector_geometry(b, t, d, x.element_size(), _sm_count(x.device.index))
    return paper_geometry(variant, b, t, d)


# Validation.


def _check_tensor(t: Any, what: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{what} has dtype {t.dtype}; the CUDA C kernels take {names}")
    if t.dim() != 3:
        raise ValueError(f"{what} must be 3-D [batch, tokens, channels], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(t.shape)})")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() first), got strides {t.stride()}")
    if t.device.type != "cuda":
        raise ValueError(f"{what} must be a CUDA tensor for the CUDA C kernels, got one on {t.device}")


def _check_scale(scale: Any, like: torch.Tensor, what: str = "scale") -> None:
    _check_tensor(scale, what, (torch.float32,))
    b, _, d = like.shape
    if tuple(scale.shape) != (b, 1, d):
        raise ValueError(
            f"{what} must have shape {(b, 1, d)} for a tensor of shape {tuple(like.shape)}, "
            f"got {tuple(scale.shape)}"
        )
    if scale.device != like.device:
        raise ValueError(f"{what} is on {scale.device} but the data is on {like.device}")


def _check_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.device != b.device:
        raise ValueError(
            f"{what} must have shape {tuple(a.shape)} on {a.device}, got {tuple(b.shape)} on {b.device}"
        )


def _check_scheme(scheme: Scheme) -> None:
    if scheme.fp8 is not None or scheme.bits != 8 or scheme.axis != "channel" or scheme.group is not None:
        raise ValueError(f"the CUDA C kernels implement int8-channel only, not {scheme.name}")


def _check_grouped_scheme(scheme: Scheme) -> None:
    if scheme.fp8 is not None or scheme.bits != 8 or scheme.axis != "channel" or scheme.group is None:
        raise ValueError(
            f"the cuda-grouped kernel implements int8-channel in groups of tokens (int8-channel-gN) only, "
            f"not {scheme.name}"
        )


def _check_grouped_scale(scale: Any, like: torch.Tensor, group: int) -> None:
    if group < 1:
        raise ValueError(f"group must be a positive number of tokens, got {group}")
    _check_tensor(scale, "scale", (torch.float32,))
    b, t, d = like.shape
    want = (b, _cdiv(t, group), d)
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale must have shape {want} for a tensor of shape {tuple(like.shape)} in groups of {group} "
            f"tokens, got {tuple(scale.shape)}"
        )
    if scale.device != like.device:
        raise ValueError(f"scale is on {scale.device} but the data is on {like.device}")


def _check_variant(name: str) -> None:
    if name not in VARIANTS:
        raise ValueError(f"unknown CUDA variant {name!r}; choose one of: {', '.join(VARIANTS)}")


# Launchers: validate, size the grid, launch on the current stream into caller-given outputs.


def absmax_scales_into(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Write the int8-channel scales of ``x [B, T, D]`` (float32/16/bf16, CUDA, contiguous) into
    ``scale [B, 1, D]`` float32: ``max_t |x| / 127``, 1 for an all-zero channel, +Inf where the
    channel holds a NaN or Inf. Returns ``scale``."""
    _check_tensor(x, "input", INPUT_DTYPES)
    _check_scale(scale, x)
    b, t, d = x.shape
    grid, block, split_tokens = scale_geometry(b, t, d, _sm_count(x.device.index))
    partial = torch.empty((b, grid[1], d), dtype=torch.float32, device=x.device)
    _launch(
        "scales",
        f"absmax_partial_{_TAGS[x.dtype]}",
        grid,
        block,
        (_ptr(x), _ptr(partial), *_sizes(b, t, d, split_tokens)),
        x.device,
    )
    n = b * d
    _launch(
        "scales",
        "finalize_scales",
        (min(_cdiv(n, _BLOCK_THREADS), 65535), 1, 1),
        (_BLOCK_THREADS, 1),
        (_ptr(partial), _ptr(scale), *_sizes(b, grid[1], d)),
        x.device,
    )
    return scale


def encode_into(variant: str, x: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Write the int8 codes of ``x [B, T, D]`` given ``scale [B, 1, D]`` into ``codes`` (int8,
    the shape of ``x``) with the kernel of ``variant``. Returns ``codes``."""
    _check_variant(variant)
    _check_tensor(x, "input", INPUT_DTYPES)
    _check_scale(scale, x)
    _check_tensor(codes, "codes", (torch.int8,))
    _check_same(x, codes, "codes")
    b, t, d = x.shape
    grid, block = _variant_geometry(variant, x)
    _launch(
        variant,
        f"quantize_{variant}_{_TAGS[x.dtype]}",
        grid,
        block,
        (_ptr(x), _ptr(scale), _ptr(codes), *_sizes(b, t, d)),
        x.device,
    )
    return codes


def decode_into(variant: str, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``codes [B, T, D] * scale [B, 1, D]`` into ``out`` (float32/16/bf16, the shape of
    ``codes``) with the kernel of ``variant``: float32 products, rounded once to ``out.dtype``.
    Returns ``out``."""
    _check_variant(variant)
    _check_tensor(codes, "codes", (torch.int8,))
    _check_scale(scale, codes)
    _check_tensor(out, "out", INPUT_DTYPES)
    _check_same(codes, out, "out")
    b, t, d = codes.shape
    grid, block = _variant_geometry(variant, out)
    _launch(
        variant,
        f"dequantize_{variant}_{_TAGS[out.dtype]}",
        grid,
        block,
        (_ptr(codes), _ptr(scale), _ptr(out), *_sizes(b, t, d)),
        out.device,
    )
    return out


def _dequantize_output(
    codes: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme, channels: int, dtype: torch.dtype
) -> torch.Tensor:
    """Check a dequantize call's codes, zero point and dtype (symmetric int8 codes, ``channels`` wide);
    return the empty output."""
    if zero is not None:
        raise ValueError(f"{scheme.name} is symmetric: zero must be None")
    _check_tensor(codes, "codes", (torch.int8,))
    if codes.shape[2] != channels:
        raise ValueError(f"codes have {codes.shape[2]} channels, expected {channels}")
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"dequantize dtype {dtype} is not supported by the CUDA C kernels")
    return torch.empty(codes.shape, dtype=dtype, device=codes.device)


_GROUPED_KERNELS = {"both": "quantize", "scales": "scales", "codes": "encode"}


def grouped_quantize_into(
    x: torch.Tensor, group: int, scale: torch.Tensor, codes: torch.Tensor | None, what: str = "both"
) -> None:
    """Quantize ``x [B, T, D]`` (float32/16/bf16, CUDA, contiguous) in groups of ``group`` tokens
    (at most T) with ``grouped.cu``: ``what="both"`` writes ``scale [B, ceil(T / group), D]`` float32 and
    the int8 ``codes`` (the shape of ``x``) in one pass, ``"scales"`` the scales only, ``"codes"`` the
    codes from the given scales."""
    if what not in _GROUPED_KERNELS:
        raise ValueError(f"what must be one of {', '.join(_GROUPED_KERNELS)}, got {what!r}")
    _check_tensor(x, "input", INPUT_DTYPES)
    _check_grouped_scale(scale, x, group)
    if what != "scales":
        _check_tensor(codes, "codes", (torch.int8,))
        _check_same(x, codes, "codes")
    b, t, d = x.shape
    grid, block = grouped_geometry(b, t, d, group, x.element_size())
    _launch(
        "grouped",
        f"{_GROUPED_KERNELS[what]}_grouped_{_TAGS[x.dtype]}",
        grid,
        block,
        (_ptr(x), _ptr(scale), np.uint64(0 if codes is None else codes.data_ptr()), *_sizes(b, t, d, group)),
        x.device,
    )


def grouped_dequantize_into(
    codes: torch.Tensor, scale: torch.Tensor, group: int, out: torch.Tensor
) -> torch.Tensor:
    """Write ``codes [B, T, D] * scale[:, t // group]`` into ``out`` (float32/16/bf16, the shape of
    ``codes``): float32 products, rounded once. Returns ``out``."""
    _check_tensor(codes, "codes", (torch.int8,))
    _check_grouped_scale(scale, codes, group)
    _check_tensor(out, "out", INPUT_DTYPES)
    _check_same(codes, out, "out")
    b, t, d = codes.shape
    grid, block = grouped_geometry(b, t, d, group, out.element_size())
    _launch(
        "grouped",
        f"dequantize_grouped_{_TAGS[out.dtype]}",
        grid,
        block,
        (_ptr(codes), _ptr(scale), _ptr(out), *_sizes(b, t, d, group)),
        out.device,
    )
    return out


class CudaGrouped:
    """Backend ``cuda-grouped``: the functions of :mod:`kvpack.reference` for ``int8-channel-gN`` on
    3-D contiguous CUDA tensors ``[B, T, D]``, by ``grouped.cu`` (``zero`` is always None)."""

    name = "grouped"

    @staticmethod
    def _scale(x: torch.Tensor, scheme: Scheme) -> tuple[int, torch.Tensor]:
        """The group size of ``x [B, T, D]`` in ``scheme`` and an empty ``scale [B, ceil(T / G), D]``."""
        _check_grouped_scheme(scheme)
        _check_tensor(x, "input", INPUT_DTYPES)
        b, t, d = x.shape
        g = scheme.group_size(t, d)
        return g, torch.empty((b, _cdiv(t, g), d), dtype=torch.float32, device=x.device)

    def compute_scales(self, x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, None]:
        """``scale [B, ceil(T / G), D]`` float32 of ``x [B, T, D]``."""
        g, scale = self._scale(x, scheme)
        grouped_quantize_into(x, g, scale, None, "scales")
        return scale, None

    def encode(
        self, x: torch.Tensor, scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> torch.Tensor:
        """int8 codes ``[B, T, D]`` of ``x`` given its scales."""
        _check_grouped_scheme(scheme)
        if zero is not None:
            raise ValueError(f"{scheme.name} is symmetric: zero must be None")
        _check_tensor(x, "input", INPUT_DTYPES)
        codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        grouped_quantize_into(x, scheme.group_size(x.shape[1], x.shape[2]), scale, codes, "codes")
        return codes

    def quantize(self, x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``(codes [B, T, D] int8, scale [B, ceil(T / G), D] float32, None)`` in one pass over ``x``."""
        g, scale = self._scale(x, scheme)
        codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        grouped_quantize_into(x, g, scale, codes, "both")
        return codes, scale, None

    def dequantize(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        scheme: Scheme,
        channels: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``codes * scale`` as ``dtype`` (float32/16/bf16), shape ``[B, T, channels]``."""
        _check_grouped_scheme(scheme)
        out = _dequantize_output(codes, zero, scheme, channels, dtype)
        return grouped_dequantize_into(codes, scale, scheme.group_size(codes.shape[1], channels), out)


@functools.cache
def grouped() -> CudaGrouped:
    """The ``cuda-grouped`` backend object."""
    return CudaGrouped()


@dataclass(frozen=True)
class CudaVariant:
    """One of the paper's kernel variants, with the functions of :mod:`kvpack.reference` on 3-D
    contiguous CUDA tensors ``[B, T, D]`` (int8-channel only; ``zero`` is always None)."""

    name: str

    def compute_scales(self, x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, None]:
        """``scale [B, 1, D]`` float32 of ``x [B, T, D]``, by the GPU reduction (shared by the variants)."""
        _check_scheme(scheme)
        _check_tensor(x, "input", INPUT_DTYPES)
        scale = torch.empty((x.shape[0], 1, x.shape[2]), dtype=torch.float32, device=x.device)
        return absmax_scales_into(x, scale), None

    def encode(
        self, x: torch.Tensor, scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> torch.Tensor:
        """int8 codes ``[B, T, D]`` of ``x`` given its scales."""
        _check_scheme(scheme)
        if zero is not None:
            raise ValueError("int8-channel is symmetric: zero must be None")
        _check_tensor(x, "input", INPUT_DTYPES)
        return encode_into(self.name, x, scale, torch.empty(x.shape, dtype=torch.int8, device=x.device))

    def quantize(self, x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``(codes [B, T, D] int8, scale [B, 1, D] float32, None)``: the scale reduction, then this
        variant's quantize kernel."""
        scale, _ = self.compute_scales(x, scheme)
        return self.encode(x, scheme, scale, None), scale, None

    def dequantize(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        scheme: Scheme,
        channels: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``codes * scale`` as ``dtype`` (float32/16/bf16), shape ``[B, T, channels]``."""
        _check_scheme(scheme)
        return decode_into(self.name, codes, scale, _dequantize_output(codes, zero, scheme, channels, dtype))


@functools.cache
def variant(name: str) -> CudaVariant:
    """The kernel variant ``name``: ``"naive"``, ``"tiled"``, ``"coarsened"`` or ``"vectorized"``."""
    _check_variant(name)
    return CudaVariant(name)
