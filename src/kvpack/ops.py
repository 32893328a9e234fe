"""Public quantize / dequantize: validate the input, pick a backend, dispatch.

The kernels are reached through two torch custom ops, ``kvpack::quantize`` and ``kvpack::dequantize``,
with fake implementations that derive the output shapes from the format: ``torch.compile``
(``fullgraph=True`` included) traces :func:`quantize` and :func:`dequantize` as single graph nodes,
and CUDA-graph capture records the kernels' launches (nothing here syncs with the host while capturing).
"""

from __future__ import annotations

import math

import torch

from kvpack.backends import Backend, implementation, resolve
from kvpack.schemes import INPUT_DTYPES, QuantizedTensor, Scheme, parse

_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in INPUT_DTYPES)


@torch.library.custom_op("kvpack::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, fmt: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of a contiguous ``x [B, T, D]`` in format ``fmt`` on ``backend``;
    ``zero`` is an empty tensor for the symmetric formats (int8, fp8)."""
    scheme = parse(fmt)
    codes, scale, zero = implementation(resolve(backend, scheme, x.device)).quantize(x, scheme)
    return codes, scale, scale.new_empty(0) if zero is None else zero


@_quantize_op.register_fake
def _quantize_fake(
    x: torch.Tensor, fmt: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scheme = parse(fmt)
    b, t, d = x.shape
    codes = x.new_empty((b, *scheme.code_shape(t, d)), dtype=scheme.code_dtype)
    scale = x.new_empty((b, *scheme.scale_shape(t, d)), dtype=scheme.scale_dtype)
    return codes, scale, scale.new_empty(0 if scheme.symmetric else scale.shape)


@torch.library.custom_op("kvpack::dequantize", mutates_args=())
def _dequantize_op(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fmt: str,
    channels: int,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """``[B, T, channels]`` in ``dtype`` from contiguous codes and scales (``zero`` empty for the
    symmetric formats) on ``backend``."""
    scheme = parse(fmt)
    impl = implementation(resolve(backend, scheme, codes.device, "dequantize"))
    return impl.dequantize(codes, scale, None if scheme.symmetric else zero, scheme, channels, dtype)


@_dequantize_op.register_fake
def _dequantize_fake(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fmt: str,
    channels: int,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return codes.new_empty((codes.shape[0], codes.shape[1], channels), dtype=dtype)


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
    chosen = resolve(backend, scheme, x.device)
    *lead, t, d = x.shape
    x3 = x.reshape(math.prod(lead), t, d).contiguous()
    codes, scale, zero = _quantize_op(x3, scheme.name, chosen.value)
    zero = None if scheme.symmetric else zero
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
    chosen = resolve(backend, q.scheme, q.device, "dequantize")
    *lead, t, d = q.shape
    n = math.prod(lead)

    def flat(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(n, *a.shape[-2:]).contiguous()

    zero = q.scale.new_empty(0) if q.zero is None else flat(q.zero)
    out = _dequantize_op(flat(q.codes), flat(q.scale), zero, q.scheme.name, d, dtype, chosen.value)
    return out.reshape(q.shape)


def roundtrip(x: torch.Tensor, fmt: str | Scheme, backend: Backend | str = "auto") -> torch.Tensor:
    """``dequantize(quantize(x, fmt))``: what a consumer of the quantized tensor sees."""
    return dequantize(quantize(x, fmt, backend), backend)
