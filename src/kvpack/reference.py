"""Plain-torch quantize and dequantize for every format: the specification, and the CPU path.

Every kernel in kvpack must reproduce these functions bit for bit (codes and scales). They run on
any device torch supports. Inputs are 3-D ``[batch, tokens, channels]`` tensors (``ops`` flattens
leading axes); all arithmetic is float32, whatever the input dtype.

The numerics, per group of elements that share a scale:

- symmetric int8:  ``scale = amax / 127``, ``q = clamp(round(x / scale), -127, 127)``, ``x_hat = q * scale``
- fp8 (E4M3/E5M2): ``scale = amax / fmax``, ``q = fp8(clamp(x / scale, -fmax, fmax))``, ``x_hat = q * scale``
- asymmetric intB: ``scale = fp16((max - min) / (2^B - 1))``, ``zero = fp16(min)``,
  ``q = clamp(round((x - zero) / scale), 0, 2^B - 1)``, ``x_hat = q * scale + zero``

``round`` is round-half-to-even and ``/`` is IEEE float32 division (correctly rounded), everywhere.
A group whose scale would be 0 (all zeros, or constant for the asymmetric types) gets scale 1, so
it dequantizes exactly (to 0, or to the constant) and never to NaN. A NaN or Inf in the input makes
the group's scale non-finite, which ``ops`` turns into an error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvpack.schemes import Scheme


def _grouped(x: torch.Tensor, scheme: Scheme, fill: float) -> torch.Tensor:
    """View ``x [B, T, D]`` as ``[B, nT, gT, nD, gD]`` groups, padding partial groups with ``fill``.

    For the channel axis the groups run along tokens (gD = 1); for the token axis along channels.
    """
    b, t, d = x.shape
    g = scheme.group_size(t, d)
    if scheme.axis == "channel":
        pad = -t % g
        if pad:
            x = F.pad(x, (0, 0, 0, pad), value=fill)
        return x.reshape(b, (t + pad) // g, g, d, 1)
    pad = -d % g
    if pad:
        x = F.pad(x, (0, pad), value=fill)
    return x.reshape(b, t, 1, (d + pad) // g, g)


def _reduce(x: torch.Tensor, scheme: Scheme, op: str) -> torch.Tensor:
    """amax / amin / max over each group, returned with the scale shape ``[B, sT, sD]``."""
    fill = {"absmax": 0.0, "min": math.inf, "max": -math.inf}[op]
    src = x.float().abs() if op == "absmax" else x.float()
    g = _grouped(src, scheme, fill)
    r = g.amin(dim=(2, 4)) if op == "min" else g.amax(dim=(2, 4))
    return r


def _ungroup(y: torch.Tensor, tokens: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`_grouped`: ``[B, nT, gT, nD, gD]`` back to a contiguous ``[B, T, D]``."""
    b, nt, gt, nd, gd = y.shape
    return y.reshape(b, nt * gt, nd * gd)[:, :tokens, :channels].contiguous()


def _bcast(s: torch.Tensor) -> torch.Tensor:
    """Per-group scales ``[B, sT, sD]`` as ``[B, sT, 1, sD, 1]``, to broadcast over :func:`_grouped`."""
    return s.float()[:, :, None, :, None]


def _div(a: torch.Tensor, d: float) -> torch.Tensor:
    """IEEE ``a / d`` on every device: on CUDA, dividing by a Python number multiplies by its
    reciprocal instead (not correctly rounded), so the divisor is given as a tensor."""
    return a / torch.full_like(a, d)


def compute_scales(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points for the asymmetric types) of ``x [B, T, D]``, shape ``[B, sT, sD]``."""
    if scheme.symmetric:
        scale = _div(_reduce(x, scheme, "absmax"), scheme.qmax)
        return torch.where(scale == 0, 1.0, scale), None
    lo = _reduce(x, scheme, "min")
    hi = _reduce(x, scheme, "max")
    scale = _div(hi - lo, scheme.qmax).to(scheme.scale_dtype)
    scale = torch.where(scale == 0, 1.0, scale).to(scheme.scale_dtype)
    return scale, lo.to(scheme.scale_dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``q [..., D]`` (values < 2^bits) along the last axis, first code in the low
    bits."""
    per = 8 // bits
    if per == 1:
        return q
    d = q.shape[-1]
    q = F.pad(q, (0, -d % per)).to(torch.uint8)
    q = q.reshape(*q.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(p: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., ceil(D / per)]`` bytes to ``[..., D]`` uint8 codes."""
    per = 8 // bits
    if per == 1:
        return p
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    q = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return q.reshape(*p.shape[:-1], -1)[..., :channels]


def encode(
    x: torch.Tensor, scheme: Scheme, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """Codes of ``x [B, T, D]`` given its scales: int8, packed uint8, or float8."""
    _, t, d = x.shape
    s = _bcast(scale)
    xg = _grouped(x.float(), scheme, 0.0)
    if scheme.fp8 is not None:
        y = torch.clamp(xg / s, -scheme.qmax, scheme.qmax)
        return _ungroup(y, t, d).to(scheme.code_dtype)
    if scheme.symmetric:
        y = (xg / s).round_().clamp_(-scheme.qmax, scheme.qmax)
        return _ungroup(y, t, d).to(torch.int8)
    y = ((xg - _bcast(zero)) / s).round_().clamp_(0, scheme.qmax)
    return pack(_ungroup(y, t, d).to(torch.uint8), scheme.bits)


def quantize(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x [B, T, D]`` (float32/16/bf16): returns ``(codes, scale, zero)``; ``zero`` is None
    for the symmetric formats.

    >>> codes, scale, _ = quantize(torch.randn(1, 16, 8), parse("int8-channel"))
    """
    scale, zero = compute_scales(x, scheme)
    return encode(x, scheme, scale, zero), scale, zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: Scheme,
    channels: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rebuild ``[B, T, D]`` in ``dtype`` from codes and scales (float32 arithmetic, one rounding at
    the end)."""
    t = codes.shape[1]
    if scheme.fp8 is not None or scheme.symmetric:
        y = _grouped(codes.float(), scheme, 0.0) * _bcast(scale)
    else:
        q = _grouped(unpack(codes, scheme.bits, channels).float(), scheme, 0.0)
        y = q * _bcast(scale) + _bcast(zero)
    return _ungroup(y, t, channels).to(dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v in float32, with grouped-query heads.

    Shapes: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``. With
    ``causal_offset = p``, query ``i`` sees keys ``j <= p + i`` (the new tokens sit after ``p`` past ones).
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    rep = hq // hkv
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    s = (q.float() @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal_offset is not None:
        lq, lk = q.shape[2], k.shape[2]
        keys = torch.arange(lk, device=q.device)[None, :]
        allowed = keys <= causal_offset + torch.arange(lq, device=q.device)[:, None]
        s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, dim=-1) @ v
