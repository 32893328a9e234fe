"""Which implementation runs a quantize or dequantize: the Backend enum, availability, ``auto``.

``auto`` picks the fastest backend that can run the format on the tensor's device and falls back
quietly; naming a backend that cannot run raises an error that says what is missing. The
``KVPACK_BACKEND`` environment variable replaces ``auto`` (not an explicit choice).

Every backend module offers the same functions on 3-D ``[B, T, D]`` contiguous tensors:
``compute_scales``, ``encode``, ``quantize`` (may fuse the two) and ``dequantize``, with the
signatures of :mod:`kvpack.reference`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from enum import Enum
from types import ModuleType

import torch

from kvpack.schemes import Scheme


class Backend(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    CPU_SCALAR = "cpu-scalar"
    CUDA_NAIVE = "cuda-naive"
    CUDA_TILED = "cuda-tiled"
    CUDA_COARSENED = "cuda-coarsened"
    CUDA_VECTORIZED = "cuda-vectorized"
    CUDA_GROUPED = "cuda-grouped"
    TRITON = "triton"

    def __str__(self) -> str:
        return self.value


CUDA_VARIANTS = (Backend.CUDA_NAIVE, Backend.CUDA_TILED, Backend.CUDA_COARSENED, Backend.CUDA_VECTORIZED)

_MODULES = {
    Backend.TORCH: "kvpack.reference",
    Backend.CPU_SCALAR: "kvpack.baseline",
    Backend.TRITON: "kvpack.triton.quant",
    **{b: "kvpack.cuda" for b in CUDA_VARIANTS},
    Backend.CUDA_GROUPED: "kvpack.cuda",
}


#: Which optional packages are installed, looked up once at import (``find_spec`` imports nothing).
#: A plain dict so that ``torch.compile`` can trace backend resolution: Dynamo refuses
#: ``importlib.util.find_spec``.
_INSTALLED = {m: importlib.util.find_spec(m) is not None for m in ("numba", "cupy", "triton")}
#: Backends by name, for the same reason (Dynamo of torch 2.11 cannot trace ``Backend(value)``).
_BY_NAME = {b.value: b for b in Backend}


def _has(module: str) -> bool:
    return _INSTALLED[module]


def _backend(backend: Backend | str) -> Backend:
    """``backend`` as a :class:`Backend`; ValueError naming the choices for an unknown name."""
    if isinstance(backend, Backend):
        return backend
    if backend not in _BY_NAME:
        names = ", ".join(_BY_NAME)
        raise ValueError(f"unknown backend {backend!r}; choose one of: {names}")
    return _BY_NAME[backend]


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_paper_scheme(scheme: Scheme) -> bool:
    return scheme.fp8 is None and scheme.bits == 8 and scheme.axis == "channel" and scheme.group is None


def _is_grouped_int8_channel(scheme: Scheme) -> bool:
    return scheme.fp8 is None and scheme.bits == 8 and scheme.axis == "channel" and scheme.group is not None


def why_not(backend: Backend, scheme: Scheme, device: torch.device) -> str | None:
    """The reason ``backend`` cannot run ``scheme`` on ``device``, or None if it can."""
    backend = _backend(backend)
    if backend == Backend.TORCH:
        return None
    if backend == Backend.CPU_SCALAR:
        if device.type != "cpu":
            return "cpu-scalar runs on CPU tensors only"
        if not _is_paper_scheme(scheme):
            return f"cpu-scalar implements the paper's int8-channel only, not {scheme.name}"
        if not _has("numba"):
            return "cpu-scalar needs numba: pip install 'kvpack[cpu]' (or pip install numba)"
        return None
    if backend in CUDA_VARIANTS or backend == Backend.CUDA_GROUPED:
        if device.type != "cuda":
            return f"{backend} needs CUDA tensors (a tensor on {device} was given)"
        if backend == Backend.CUDA_GROUPED and not _is_grouped_int8_channel(scheme):
            return f"{backend} implements int8-channel in groups of tokens (-gN), not {scheme.name}"
        if backend != Backend.CUDA_GROUPED and not _is_paper_scheme(scheme):
            return f"{backend} implements the paper's int8-channel only, not {scheme.name}"
        if not _has("cupy"):
            return (
                f"{backend} compiles its CUDA C with CuPy's NVRTC: pip install cupy-cuda12x (or cupy-cuda13x)"
            )
        return None
    if backend == Backend.TRITON:
        if not _has("triton"):
            return "the triton backend needs triton: pip install 'kvpack[gpu]'"
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}"
        return None
    raise ValueError(f"no availability rule for backend {backend}")


#: ``auto``'s order on a GPU, fastest first, as measured at 131072 x 8192 on an H100 (README): the
#: CUDA C group-wise kernel quantizes int8-channel-gN at 95% of copy bandwidth against Triton's 75%,
#: while Triton dequantizes it faster (98% against 93%).
_GPU_ORDER = {
    "quantize": (Backend.CUDA_GROUPED, Backend.TRITON, Backend.CUDA_VECTORIZED, Backend.TORCH),
    "dequantize": (Backend.TRITON, Backend.CUDA_GROUPED, Backend.CUDA_VECTORIZED, Backend.TORCH),
}


def resolve(
    backend: Backend | str, scheme: Scheme, device: torch.device, operation: str = "quantize"
) -> Backend:
    """Turn ``auto`` (or ``KVPACK_BACKEND``) into a concrete backend for ``operation`` (``"quantize"``
    or ``"dequantize"``); check an explicit one can run."""
    backend = _backend(backend)
    if backend == Backend.AUTO and os.environ.get("KVPACK_BACKEND"):
        return resolve(os.environ["KVPACK_BACKEND"], scheme, device, operation)
    if backend == Backend.AUTO:
        if operation not in _GPU_ORDER:
            raise ValueError(f"unknown operation {operation!r}; choose quantize or dequantize")
        order = _GPU_ORDER[operation] if device.type == "cuda" else (Backend.TORCH,)
        return next(b for b in order if why_not(b, scheme, device) is None)
    reason = why_not(backend, scheme, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend} cannot run here: {reason}")
    return backend


def available(scheme: Scheme, device: torch.device) -> list[Backend]:
    """Every concrete backend that can run ``scheme`` on ``device``."""
    return [b for b in Backend if b != Backend.AUTO and why_not(b, scheme, device) is None]


def implementation(backend: Backend) -> ModuleType:
    """The object implementing a concrete backend (imported on first use): a module with
    ``compute_scales``, ``encode``, ``quantize`` and ``dequantize``; the CUDA variants share one
    module, which hands out a per-variant namespace."""
    backend = _backend(backend)
    mod = importlib.import_module(_MODULES[backend])
    if backend in CUDA_VARIANTS:
        return mod.variant(backend.value.removeprefix("cuda-"))
    if backend == Backend.CUDA_GROUPED:
        return mod.grouped()
    return mod
