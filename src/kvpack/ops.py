"""Public quantize / dequantize: validate the input, pick a backend, dispatch."""

from __future__ import annotations

import math

import torch

from kvpack.backends import Backend, implementation, resolve
from kvpack.schemes import INPUT_DTYPES, QuantizedTensor, Scheme, parse

_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in INPUT_DTYPES)


def check_input(x: torch.Tensor, what: str = "input") -> None:
    """Raise a clear TypeError/ValueError for anything kvpack cannot quantize (NaN/Inf excepted: those
    are caught from the scales, which costs no extra pass over the data)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{what} has dtype {x.dtype}; accepted: {_DTYPE_NAMES}")
    if x.dim() < 2:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}; expected at least 2 dimensions [..., tokens, channels]"
        )
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); there is nothing to quantize")


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_scales(x: torch.Tensor, scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
    """A non-finite scale means the input held NaN/Inf, or a range the scales cannot store.

    Skipped under CUDA-graph capture and torch.compile, where a host sync is not allowed.
    """
    if _capturing():
        return
    meta = scale if zero is None else torch.stack([scale.float(), zero.float()])
    if bool(torch.isfinite(meta).all()):
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"input holds {bad} NaN or Inf value(s); kvpack quantizes finite values only")
    lo, hi = float(x.min()), float(x.max())
    raise ValueError(
        f"input range [{lo:.4g}, {hi:.4g}] overflows the {str(scheme.scale_dtype).removeprefix('torch.')} "
        f"scales of {scheme.name}; rescale the input or use an int8/fp8 format (float32 scales)"
    )


def quantize(x: torch.Tensor, fmt: str | Scheme, backend: Backend | str = "auto") -> QuantizedTensor:
    """Quantize ``x [..., tokens, channels]`` (float32, float16 or bfloat16) into ``fmt``.

    Leading axes (batch, heads) each get their own scales. Returns a :class:`QuantizedTensor`;
    ``kvpack.dequantize`` restores the shape and dtype.

    >>> q = quantize(torch.randn(2, 128, 64), "int8-channel")
    >>> q.codes.dtype, q.scale.shape
    (torch.int8, torch.Size([2, 1, 64]))
    """
    scheme = parse(fmt)
    check_input(x)
    impl = implementation(resolve(backend, scheme, x.device))
    *lead, t, d = x.shape
    x3 = x.reshape(math.prod(lead), t, d).contiguous()
    codes, scale, zero = impl.quantize(x3, scheme)
    check_scales(x3, scheme, scale, zero)
    return QuantizedTensor(
        codes=codes.reshape(*lead, *codes.shape[1:]),
        scale=scale.reshape(*lead, *scale.shape[1:]),
        zero=None if zero is None else zero.reshape(*lead, *zero.shape[1:]),
        scheme=scheme,
        shape=x.shape,
        dtype=x.dtype,
    )


def dequantize(
    q: QuantizedTensor, backend: Backend | str = "auto", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rebuild the tensor ``q`` was made from: same shape, and its dtype unless ``dtype`` is given."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize takes a QuantizedTensor (from kvpack.quantize), got {type(q).__name__}")
    dtype = dtype or q.dtype
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"dequantize dtype {dtype} is not supported; accepted: {_DTYPE_NAMES}")
    impl = implementation(resolve(backend, q.scheme, q.device))
    *lead, t, d = q.shape
    n = math.prod(lead)

    def flat(a: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else a.reshape(n, *a.shape[-2:]).contiguous()

    out = impl.dequantize(flat(q.codes), flat(q.scale), flat(q.zero), q.scheme, d, dtype)
    return out.reshape(q.shape)


def roundtrip(x: torch.Tensor, fmt: str | Scheme, backend: Backend | str = "auto") -> torch.Tensor:
    """``dequantize(quantize(x, fmt))``: what a consumer of the quantized tensor sees."""
    return dequantize(quantize(x, fmt, backend), backend)
