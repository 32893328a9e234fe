"""The paper's CPU baseline: a compiled, single-threaded, element-by-element loop for ``int8-channel``.

This module exists to be measured against, not to be fast. Each function is a plain loop over the
elements, compiled with numba (``pip install 'kvpack[cpu]'``) and run on one thread, in two passes
over memory like the paper's code:

1. scales: for each token row, for each channel, ``amax[c] = max(amax[c], |x[t, c]|)``; then
   ``scale[c] = amax[c] / 127`` (1 where the channel is all zeros);
2. codes: for each token row, for each channel, ``q = clamp(rint(x / scale[c]), -127, 127)``.

The default walk is row-major, the order the data lies in memory (an optimizing compiler may
vectorize the inner loop, as it would the paper's C). :func:`quantize_column_major` walks the same
data column by column (stride D), which is the order the paper's CPU loop used: cache-hostile, and
the reason its GPU speedups look so large. Both give the same codes and scales.

The numerics are those of :mod:`kvpack.reference`, bit for bit: float32 throughout (every constant is
a float32, so numba never widens a division to float64), IEEE division ``x / scale``, round half to
even (``np.rint``). A NaN or Inf in a channel makes its scale NaN or Inf, which
:func:`kvpack.ops.check_scales` reports.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import torch

from kvpack.schemes import Scheme

_QMAX = np.float32(127.0)
_ONE = np.float32(1.0)


def _absmax_rows(x: np.ndarray, amax: np.ndarray) -> None:
    """amax[b, c] = max_t |x[b, t, c]|, walking each batch row by row. NaN wins over any number."""
    nb, nt, nd = x.shape
    for b in range(nb):
        for c in range(nd):
            amax[b, c] = 0
        for t in range(nt):
            for c in range(nd):
                a = abs(x[b, t, c])
                if a > amax[b, c] or a != a:
                    amax[b, c] = a


def _absmax_columns(x: np.ndarray, amax: np.ndarray) -> None:
    """As :func:`_absmax_rows` for one ``[T, D]`` matrix, walking column by column (the paper's order)."""
    nt, nd = x.shape
    for c in range(nd):
        m = np.float32(0.0)
        for t in range(nt):
            a = abs(x[t, c])
            if a > m or a != a:
                m = a
        amax[c] = m


def _scales(amax: np.ndarray, scale: np.ndarray) -> None:
    """scale = amax / 127 in float32, and 1 where that is 0 (an all-zero channel)."""
    flat_a = amax.reshape(-1)
    flat_s = scale.reshape(-1)
    for i in range(flat_a.size):
        s = flat_a[i] / _QMAX
        flat_s[i] = _ONE if s == 0 else s


def _encode_rows(x: np.ndarray, scale: np.ndarray, codes: np.ndarray) -> None:
    """codes[b, t, c] = clamp(rint(x[b, t, c] / scale[b, c]), -127, 127), row by row."""
    nb, nt, nd = x.shape
    for b in range(nb):
        for t in range(nt):
            for c in range(nd):
                q = np.rint(x[b, t, c] / scale[b, c])
                if q > _QMAX:
                    q = _QMAX
                elif q < -_QMAX:
                    q = -_QMAX
                codes[b, t, c] = np.int8(q)


def _encode_columns(x: np.ndarray, scale: np.ndarray, codes: np.ndarray) -> None:
    """As :func:`_encode_rows` for one ``[T, D]`` matrix, walking column by column (the paper's order)."""
    nt, nd = x.shape
    for c in range(nd):
        s = scale[c]
        for t in range(nt):
            q = np.rint(x[t, c] / s)
            if q > _QMAX:
                q = _QMAX
            elif q < -_QMAX:
                q = -_QMAX
            codes[t, c] = np.int8(q)


def _decode_rows(codes: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out[b, t, c] = float32(codes[b, t, c]) * scale[b, c], row by row."""
    nb, nt, nd = codes.shape
    for b in range(nb):
        for t in range(nt):
            for c in range(nd):
                out[b, t, c] = np.float32(codes[b, t, c]) * scale[b, c]


def _decode_columns(codes: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """As :func:`_decode_rows` for one ``[T, D]`` matrix, walking column by column (the paper's order)."""
    nt, nd = codes.shape
    for c in range(nd):
        s = scale[c]
        for t in range(nt):
            out[t, c] = np.float32(codes[t, c]) * s


_LOOPS = (
    _absmax_rows,
    _absmax_columns,
    _scales,
    _encode_rows,
    _encode_columns,
    _decode_rows,
    _decode_columns,
)


@functools.cache
def _compiled() -> SimpleNamespace:
    """The loops above compiled with numba (no parallelism: one thread), keyed by name without ``_``."""
    try:
        import numba
    except ImportError:
        raise ImportError(
            "the cpu-scalar backend needs numba: pip install 'kvpack[cpu]' (or pip install numba)"
        ) from None
    jit = numba.njit(cache=True, nogil=True)
    return SimpleNamespace(**{f.__name__.lstrip("_"): jit(f) for f in _LOOPS})


def _check_scheme(scheme: Scheme) -> None:
    if scheme.fp8 is not None or scheme.bits != 8 or scheme.axis != "channel" or scheme.group is not None:
        raise ValueError(f"the cpu-scalar baseline implements int8-channel only, not {scheme.name}")


def _as_array(x: torch.Tensor, dims: int, what: str) -> np.ndarray:
    """A C-contiguous float32 numpy view (or copy) of a CPU tensor with ``dims`` dimensions."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() != dims:
        got = f"{tuple(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a {dims}-D CPU tensor, got {got}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    return x.detach().to(torch.float32).contiguous().numpy()


def compute_scales(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, None]:
    """Per-channel scales of ``x [B, T, D]`` (float32/16/bf16): ``([B, 1, D] float32, None)``.

    >>> scale, _ = compute_scales(torch.rand(1, 8, 4), parse("int8-channel"))
    """
    _check_scheme(scheme)
    xs = _as_array(x, 3, "x")
    loops = _compiled()
    amax = np.empty((xs.shape[0], xs.shape[2]), dtype=np.float32)
    loops.absmax_rows(xs, amax)
    scale = torch.empty(xs.shape[0], 1, xs.shape[2], dtype=torch.float32)
    loops.scales(amax, scale.numpy()[:, 0])
    return scale, None


def encode(x: torch.Tensor, scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """int8 codes ``[B, T, D]`` of ``x [B, T, D]`` given its scales ``[B, 1, D]`` (``zero`` is unused)."""
    _check_scheme(scheme)
    xs = _as_array(x, 3, "x")
    ss = _as_array(scale, 3, "scale")
    if ss.shape != (xs.shape[0], 1, xs.shape[2]):
        want = (xs.shape[0], 1, xs.shape[2])
        raise ValueError(f"scale has shape {ss.shape}; expected {want} for x of shape {xs.shape}")
    codes = torch.empty(xs.shape, dtype=torch.int8)
    _compiled().encode_rows(xs, ss[:, 0], codes.numpy())
    return codes


def quantize(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Quantize ``x [B, T, D]`` to int8-channel: ``(codes [B, T, D] int8, scale [B, 1, D] float32, None)``."""
    scale, _ = compute_scales(x, scheme)
    return encode(x, scheme, scale, None), scale, None


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: Scheme,
    channels: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rebuild ``[B, T, D]`` in ``dtype`` from int8 codes ``[B, T, D]`` and scales ``[B, 1, D]``
    (float32 products, one rounding to ``dtype`` at the end, as the reference does)."""
    _check_scheme(scheme)
    if codes.dim() != 3 or codes.dtype != torch.int8 or codes.shape[2] != channels:
        raise ValueError(f"codes must be int8 [B, T, {channels}], got {codes.dtype} {tuple(codes.shape)}")
    ss = _as_array(scale, 3, "scale")
    if ss.shape != (codes.shape[0], 1, channels):
        raise ValueError(f"scale has shape {ss.shape}; expected {(codes.shape[0], 1, channels)}")
    out = torch.empty(codes.shape, dtype=torch.float32)
    _compiled().decode_rows(codes.contiguous().numpy(), ss[:, 0], out.numpy())
    return out.to(dtype)


def quantize_column_major(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8-channel quantization of one matrix ``x [T, D]`` walking it column by column: the paper's order.

    Same numerics and results as :func:`quantize`; only the memory walk differs (stride D between
    consecutive elements), which is what the paper's CPU baseline timed. Returns
    ``(codes [T, D] int8, scale [1, D] float32)``.
    """
    xs = _as_array(x, 2, "x")
    loops = _compiled()
    amax = np.empty(xs.shape[1], dtype=np.float32)
    loops.absmax_columns(xs, amax)
    scale = torch.empty(1, xs.shape[1], dtype=torch.float32)
    loops.scales(amax, scale.numpy()[0])
    codes = torch.empty(xs.shape, dtype=torch.int8)
    loops.encode_columns(xs, scale.numpy()[0], codes.numpy())
    return codes, scale


def dequantize_column_major(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_column_major`, column by column: ``codes [T, D] int8``, ``scale [1, D]``
    to float32 ``[T, D]``."""
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"codes must be an int8 [T, D] tensor, got {codes.dtype} {tuple(codes.shape)}")
    ss = _as_array(scale, 2, "scale")
    if ss.shape != (1, codes.shape[1]):
        raise ValueError(f"scale has shape {ss.shape}; expected {(1, codes.shape[1])}")
    out = torch.empty(codes.shape, dtype=torch.float32)
    _compiled().decode_columns(codes.contiguous().numpy(), ss[0], out.numpy())
    return out
