"""The int4 decode-attention kernel in CUDA C (``decode.cu``): when it applies, and its launch.

Triton cannot place loaded data in a tensor-core operand's register layout: the packed int4 codes
of its decode kernel go through shared memory to get there, and that traffic, not DRAM, bounds it
(about 1,230 instructions per 32-token tile on sm_90). ``decode.cu`` moves the codes into mma
fragments with no layout change (about 1,470 instructions per 64-token tile on sm_90, a key group's
scale folding and the next tile's ``cp.async`` copies into shared memory included), for
the layout ``kvpack.cache`` stores for the ``int4`` preset: keys ``int4-channel-gG`` (``G`` a multiple
of 64), values ``int4-token``, head dim 64 or 128, at most 8 query rows per KV head (GQA heads times
new tokens). :func:`why_not` says why a call does not qualify;
:func:`kvpack.triton.attention.decode_attention` then runs the Triton kernel. The kernel writes the
same split partials as the Triton one, combined by the same kernel.

Compiled at run time by CuPy (NVRTC), like the paper's variants (:mod:`kvpack.cuda`), and cached per
process and on disk.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpack.cuda import pasted
from kvpack.schemes import Scheme

SOURCE = Path(__file__).with_name("decode.cu")
#: Tokens per tile: a split starts and a key group ends on a multiple of it.
TILE = 64
HEAD_DIMS = (64, 128)
MAX_ROWS = 8
_NAMES = {(d, dt): f"decode_int4_d{d}_{'bf16' if dt == torch.bfloat16 else 'f16'}"
          for d in HEAD_DIMS for dt in (torch.float16, torch.bfloat16)}
#: The programs of a (batch row, KV head) take its tiles from a counter, so that those on the GPU's
#: faster SMs take more (an H100's SMs streamed at rates up to 20% apart, and the slowest set the
#: kernel's end); False: each takes every ``splits``-th unit (benchmarks compare the two).
SHARE_TILES = True
_REGISTERS_PER_SM = 65536
_MAX_BLOCKS_PER_SM = 32
_SHARED_RESERVED_PER_BLOCK = 1024


@functools.cache
def _cupy_missing() -> bool:
    return importlib.util.find_spec("cupy") is None


def why_not(q: torch.Tensor, key_scheme: Scheme, value_scheme: Scheme, group: int, rows: int,
            tensors: tuple[torch.Tensor | None, ...], window: tuple[torch.Tensor, ...] = ()) -> str | None:
    """Why the CUDA kernel cannot serve this call (None if it can). ``tensors``: the store's key codes,
    key scale, key zero, value codes, value scale, value zero (all None while the store is empty);
    ``window``: the window's key and value buffers, read 16 bytes at a time."""
    if q.device.type != "cuda":
        return "it runs on CUDA devices"
    if _cupy_missing():
        return "CuPy is not installed"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "it needs sm_80 or later (mma.sync m16n8k16, movmatrix)"
    if (key_scheme.bits, key_scheme.axis, key_scheme.fp8) != (4, "channel", None):
        return f"keys are {key_scheme.name}, not int4 per-channel"
    v = value_scheme
    if (v.bits, v.axis, v.fp8, v.group) != (4, "token", None, None):
        return f"values are {value_scheme.name}, not int4-token"
    if group % TILE:
        return f"key groups of {group} tokens are not a multiple of {TILE}"
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim {d} is not one of {HEAD_DIMS}"
    if rows > MAX_ROWS:
        return f"{rows} query rows per KV head (GQA heads x new tokens), more than {MAX_ROWS}"
    for t in window:
        if t.stride(-1) != 1 or not _aligned16(t, 3):
            return "the window's rows are not 16-byte aligned"
    kc, ks, kz, vc, vs, vz = tensors
    if kc is None:
        return None
    wanted = {"key codes": (kc, d // 2), "value codes": (vc, d // 2), "key scale": (ks, d),
              "key zero": (kz, d), "value scale": (vs, 1), "value zero": (vz, 1)}
    for what, (t, row) in wanted.items():
        if t is None or t.stride(-1) != 1 or (t.dim() == 4 and t.stride(2) != row):
            return f"the {what} are not rows of {row} contiguous elements"
        if not _aligned16(t, 2):
            return f"the {what} are not 16-byte aligned per sequence and head"
    return None


def _aligned16(t: torch.Tensor, dims: int) -> bool:
    """Whether ``t`` starts on 16 bytes and its first ``dims`` strides are whole multiples of 16 bytes."""
    return t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:dims])


@functools.cache
def _kernel(name: str, device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        kernel = cupy.RawModule(code=pasted(SOURCE), options=("-std=c++17",)).get_function(name)
        prefer_shared_memory(kernel)
        return kernel


def prefer_shared_memory(kernel: Any) -> None:
    """Ask for the largest shared-memory carveout: 12 programs, each with two stages of about 9 KB, need
    more than the default split of the SM's L1 gives."""
    kernel.preferred_shared_memory_carveout = 100


def device_index(t: torch.Tensor) -> int:
    """The CUDA device index of ``t`` (the current device for a bare ``"cuda"``)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def resident_per_sm(d: int, dtype: torch.dtype, device_index: int) -> int:
    """One-warp programs one SM holds at once, from the compiled kernel's registers (allocated per warp
    in units of 256) and shared memory (plus the 1 KB the hardware reserves per block)."""
    attributes = _kernel(_NAMES[(d, dtype)], device_index).attributes
    per_warp = math.ceil(attributes["num_regs"] * 32 / 256) * 256
    props = torch.cuda.get_device_properties(device_index)
    shared = getattr(props, "shared_memory_per_multiprocessor", props.shared_memory_per_block_optin)
    by_shared = shared // (attributes["shared_size_bytes"] + _SHARED_RESERVED_PER_BLOCK)
    return max(1, min(_MAX_BLOCKS_PER_SM, _REGISTERS_PER_SM // per_warp, by_shared))


def launch(q: torch.Tensor, out: torch.Tensor, mid_o: torch.Tensor, mid_l: torch.Tensor,
           store: tuple[torch.Tensor | None, ...], window_keys: torch.Tensor, window_values: torch.Tensor,
           start: torch.Tensor | None, end: torch.Tensor | None, qk_scale: float, num_quantized: int,
           num_window: int, splits: int, group: int) -> None:
    """Run ``decode.cu`` on torch's current stream: grid (batch x KV heads, splits), one warp each,
    the warps of a (batch row, KV head) taking its tiles from a counter (:data:`SHARE_TILES`).
    ``qk_scale`` is the softmax scale times log2(e)."""
    import cupy

    from kvpack.cuda import _stream

    bsz, hq, lq, d = q.shape
    hkv = window_keys.shape[1]
    kc, ks, kz, vc, vs, vz = store
    # The kernel reads one int32 per batch row (the Triton kernel takes any integer type).
    start, end = (None if x is None else x.to(torch.int32).contiguous() for x in (start, end))
    # One counter per (batch row, KV head), zeroed for each call (a memset; graph-capturable).
    units = torch.zeros(bsz * hkv, dtype=torch.int32, device=q.device) if SHARE_TILES and splits > 1 else None
    if kc is None:  # an empty store is never read: any pointer of the right strides' kind will do
        kc = vc = torch.empty(1, 1, 1, d // 2, dtype=torch.uint8, device=q.device)
        ks = kz = torch.empty(1, 1, 1, d, dtype=torch.float16, device=q.device)
        vs = vz = torch.empty(1, 1, 1, 1, dtype=torch.float16, device=q.device)

    def ptr(t: torch.Tensor | None) -> np.uint64:
        return np.uint64(0 if t is None else t.data_ptr())

    def strides(t: torch.Tensor, n: int) -> tuple[np.int64, ...]:
        return tuple(np.int64(s) for s in t.stride()[:n])

    args = (
        ptr(q), ptr(out), ptr(mid_o), ptr(mid_l), ptr(kc), ptr(ks), ptr(kz), ptr(vc), ptr(vs), ptr(vz),
        ptr(window_keys), ptr(window_values), ptr(start), ptr(end), ptr(units),
        np.float32(qk_scale), np.int32(num_quantized), np.int32(num_window), np.int32(splits),
        np.int32(hkv), np.int32(hq // hkv), np.int32(lq), np.int32(group),
        *strides(q, 3), *strides(out, 3), *strides(kc, 2), *strides(ks, 2), *strides(vc, 2), *strides(vs, 2),
        *strides(window_keys, 3), *strides(window_values, 3),
    )
    device = device_index(q)
    kernel = _kernel(_NAMES[(d, q.dtype)], device)
    with cupy.cuda.Device(device), _stream(cupy, q.device):
        kernel((bsz * hkv, splits, 1), (32, 1, 1), args)
