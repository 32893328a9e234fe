"""Error metrics of a quantized tensor against the original, accumulated in float64.

The paper's published L2 error was summed in float32 and under-reports at large sizes (about 22.3
instead of about 74.5 at 131072 x 8192); here every sum is float64, over chunks so that a tensor of
a billion elements never needs a float64 copy of itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

_CHUNK = 1 << 24  # elements per float64 chunk (128 MiB)


def _same_shape(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")


def _pairs(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    _same_shape(x, y)
    xf, yf = x.reshape(-1), y.reshape(-1)
    for i in range(0, xf.numel(), _CHUNK):
        yield xf[i : i + _CHUNK].double(), yf[i : i + _CHUNK].double()


def max_abs_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """max |x - x_hat| over all elements."""
    return max(float((a - b).abs().max()) for a, b in _pairs(x, x_hat))


def _sum_sq(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float]:
    """(sum x^2, sum (x - x_hat)^2) in float64."""
    sig = err = 0.0
    for a, b in _pairs(x, x_hat):
        sig += float(a.square().sum())
        err += float((a - b).square().sum())
    return sig, err


def _relative(sig: float, err: float) -> float:
    return math.sqrt(err / sig) if sig else (0.0 if err == 0 else math.inf)


def _sqnr(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    return 10.0 * math.log10(sig / err) if sig else -math.inf


def l2_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Frobenius norm ||x - x_hat||_F."""
    return math.sqrt(_sum_sq(x, x_hat)[1])


def relative_l2_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """||x - x_hat||_F / ||x||_F (0 when both are zero)."""
    return _relative(*_sum_sq(x, x_hat))


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x - x_hat)^2), in dB (inf if exact)."""
    return _sqnr(*_sum_sq(x, x_hat))


def _queries(q: torch.Tensor, d: int) -> torch.Tensor:
    q = q.reshape(1, -1) if q.dim() == 1 else q
    if q.dim() != 2 or q.shape[-1] != d:
        raise ValueError(f"queries must be [D] or [N, D] with D = {d}, got {tuple(q.shape)}")
    return q.double()


def attention_score_error(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> float:
    """The paper's metric: mean over tokens t (and queries) of |q . k_t - q . k_hat_t|.

    ``q``: one query ``[D]`` or a batch ``[N, D]``; ``k``, ``k_hat``: ``[..., T, D]``.
    """
    _same_shape(k, k_hat)
    qd = _queries(q, k.shape[-1])
    total, count = 0.0, 0
    rows = max(1, _CHUNK // max(k.shape[-1], 1))
    kf, kh = k.reshape(-1, k.shape[-1]), k_hat.reshape(-1, k.shape[-1])
    for i in range(0, kf.shape[0], rows):
        diff = (kf[i : i + rows].double() - kh[i : i + rows].double()) @ qd.T
        total += float(diff.abs().sum())
        count += diff.numel()
    return total / count


def _softmax_parts(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    d = k.shape[-1]
    return (_queries(q, d) @ k.reshape(-1, d).double().T) * (scale if scale is not None else d**-0.5)


def attention_output_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
    scale: float | None = None,
) -> float:
    """Relative L2 error of softmax(q K^T * scale) V computed with (k_hat, v_hat) instead of (k, v).

    ``q [D]`` or ``[N, D]``; ``k, v, k_hat, v_hat [T, D]``; ``scale`` defaults to 1/sqrt(D).
    """
    _same_shape(k, k_hat)
    _same_shape(v, v_hat)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same tokens")
    p = torch.softmax(_softmax_parts(q, k, scale), dim=-1)
    p_hat = torch.softmax(_softmax_parts(q, k_hat, scale), dim=-1)
    out = p @ v.reshape(p.shape[-1], -1).double()
    out_hat = p_hat @ v_hat.reshape(p.shape[-1], -1).double()
    return float(torch.linalg.norm(out - out_hat) / torch.linalg.norm(out).clamp_min(1e-300))


def attention_kl(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor, scale: float | None = None) -> float:
    """Mean over queries of KL(softmax(q K^T) || softmax(q K_hat^T)), in nats."""
    _same_shape(k, k_hat)
    logp = torch.log_softmax(_softmax_parts(q, k, scale), dim=-1)
    logp_hat = torch.log_softmax(_softmax_parts(q, k_hat, scale), dim=-1)
    return float((logp.exp() * (logp - logp_hat)).sum(dim=-1).mean())


def report(x: torch.Tensor, x_hat: torch.Tensor, q: torch.Tensor | None = None) -> dict[str, float]:
    """All tensor metrics in one float64 pass over ``x [..., T, D]``: max abs, L2, relative L2, SQNR,
    and with queries ``q [D]`` or ``[N, D]`` the attention-score error averaged over them
    (``attention_score_error``) and that of the first query alone (``attention_score_error_first``)."""
    _same_shape(x, x_hat)
    d = x.shape[-1]
    qd = None if q is None else _queries(q, d)
    xf, yf = x.reshape(-1, d), x_hat.reshape(-1, d)
    rows = max(1, _CHUNK // max(d, 1))
    worst = sig = err = 0.0
    per_query = None if qd is None else torch.zeros(qd.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, xf.shape[0], rows):
        a = xf[i : i + rows].double()
        diff = a - yf[i : i + rows].double()
        worst = max(worst, float(diff.abs().max()))
        sig += float(a.square().sum())
        err += float(diff.square().sum())
        if per_query is not None:
            per_query += (diff @ qd.T).abs().sum(dim=0)
    out = {
        "max_abs_error": worst,
        "l2_error": math.sqrt(err),
        "relative_l2_error": _relative(sig, err),
        "sqnr_db": _sqnr(sig, err),
    }
    if per_query is not None:
        out["attention_score_error"] = float(per_query.mean()) / xf.shape[0]
        out["attention_score_error_first"] = float(per_query[0]) / xf.shape[0]
    return out
