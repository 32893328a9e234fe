"""kvpack.metrics against direct float64 computations in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvpack import metrics


def pair(*shape: int, seed: int = 0, noise: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x, x + noise * torch.randn(shape, generator=g)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "chunks-of-5"])
def test_tensor_metrics_match_float64(
    dtype: torch.dtype, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk:
        monkeypatch.setattr(metrics, "_CHUNK", chunk)
    x, x_hat = pair(3, 7, 11)  # 231 elements: the last chunk of 5 holds one
    x, x_hat = x.to(dtype), x_hat.to(dtype)
    x_hat.view(-1)[-1] += 5.0  # the largest error sits in the last chunk
    a, b = f64(x), f64(x_hat)
    err = np.sum((a - b) ** 2)
    assert metrics.max_abs_error(x, x_hat) == np.abs(a - b).max()
    assert metrics.l2_error(x, x_hat) == pytest.approx(math.sqrt(err), rel=1e-13)
    assert metrics.relative_l2_error(x, x_hat) == pytest.approx(math.sqrt(err / np.sum(a**2)), rel=1e-13)
    assert metrics.sqnr_db(x, x_hat) == pytest.approx(10 * math.log10(np.sum(a**2) / err), rel=1e-13)
    rep = metrics.report(x, x_hat)
    assert rep["max_abs_error"] == metrics.max_abs_error(x, x_hat)
    assert rep["l2_error"] == pytest.approx(metrics.l2_error(x, x_hat), rel=1e-15)
    assert rep["relative_l2_error"] == pytest.approx(metrics.relative_l2_error(x, x_hat), rel=1e-15)
    assert rep["sqnr_db"] == pytest.approx(metrics.sqnr_db(x, x_hat), rel=1e-15)


def test_l2_of_many_small_errors_is_not_lost() -> None:
    """2^25 errors of 2^-10 each: the squared errors sum to exactly 32. A float32 running sum stalls at
    16 (after 2^24 terms, adding 2^-20 to 16 is a tie that rounds back to 16), as the paper's L2 did."""
    assert np.float32(16.0) + np.float32(2.0**-20) == np.float32(16.0)  # the trap is real
    x = torch.full((1 << 25,), 0.5)
    rep = metrics.report(x, x + 2.0**-10)
    assert rep["max_abs_error"] == 2.0**-10
    assert rep["l2_error"] == math.sqrt(32.0)
    assert rep["relative_l2_error"] == 2.0**-9  # sqrt(32 / (2^25 / 4))
    assert rep["sqnr_db"] == pytest.approx(180 * math.log10(2), rel=1e-14)


def test_exact_and_zero_signal_cases() -> None:
    x, _ = pair(4, 6)
    assert metrics.l2_error(x, x) == 0.0 and metrics.max_abs_error(x, x) == 0.0
    assert metrics.sqnr_db(x, x) == math.inf and metrics.relative_l2_error(x, x) == 0.0
    z = torch.zeros(4, 6)
    assert metrics.relative_l2_error(z, z) == 0.0
    assert metrics.relative_l2_error(z, x) == math.inf
    assert metrics.sqnr_db(z, x) == -math.inf
    rep = metrics.report(z, x)
    assert rep["relative_l2_error"] == math.inf and rep["sqnr_db"] == -math.inf


@pytest.mark.parametrize("queries", [None, 1, 5], ids=["one-query-1d", "one-query-2d", "five-queries"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["one-chunk", "chunks-of-4-rows"])
def test_attention_score_error(
    queries: int | None, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper's metric: mean over tokens (and queries) of |q . k_t - q . k_hat_t|."""
    if chunk:
        monkeypatch.setattr(metrics, "_CHUNK", chunk)
    k, k_hat = pair(2, 3, 11, 16, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(16, generator=g) if queries is None else torch.randn(queries, 16, generator=g)
    qs = f64(q).reshape(-1, 16)
    kk, kh = f64(k).reshape(-1, 16), f64(k_hat).reshape(-1, 16)
    total = sum(abs(qs[n] @ kk[t] - qs[n] @ kh[t]) for n in range(qs.shape[0]) for t in range(kk.shape[0]))
    want = total / (qs.shape[0] * kk.shape[0])
    assert metrics.attention_score_error(q, k, k_hat) == pytest.approx(want, rel=1e-12)
    assert metrics.attention_score_error(q, k, k) == 0.0
    assert metrics.report(k, k_hat, q)["attention_score_error"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_output_error_and_kl(scale: float | None) -> None:
    k, k_hat = pair(40, 16, seed=3, noise=0.05)
    v, v_hat = pair(40, 24, seed=4, noise=0.05)
    q = torch.randn(6, 16, generator=torch.Generator().manual_seed(5)) * 2
    c = 16**-0.5 if scale is None else scale
    p = softmax(f64(q) @ f64(k).T * c)
    p_hat = softmax(f64(q) @ f64(k_hat).T * c)
    out, out_hat = p @ f64(v), p_hat @ f64(v_hat)
    want = np.linalg.norm(out - out_hat) / np.linalg.norm(out)
    got = metrics.attention_output_error(q, k, v, k_hat, v_hat, scale=scale)
    assert got == pytest.approx(want, rel=1e-10) and got > 0
    kl = np.mean(np.sum(p * (np.log(p) - np.log(p_hat)), axis=-1))
    assert metrics.attention_kl(q, k, k_hat, scale=scale) == pytest.approx(kl, rel=1e-8) and kl > 0
    assert metrics.attention_output_error(q, k, v, k, v, scale=scale) == 0.0
    assert metrics.attention_kl(q, k, k, scale=scale) == 0.0
    one = metrics.attention_output_error(q[2], k, v, k_hat, v_hat, scale=scale)
    p1, p1_hat = p[2], p_hat[2]
    assert one == pytest.approx(
        np.linalg.norm(p1 @ f64(v) - p1_hat @ f64(v_hat)) / np.linalg.norm(p1 @ f64(v))
    )


def test_values_only_error_moves_output_not_kl() -> None:
    k, _ = pair(30, 8, seed=6)
    v, v_hat = pair(30, 8, seed=7)
    q = torch.randn(3, 8, generator=torch.Generator().manual_seed(8))
    assert metrics.attention_output_error(q, k, v, k, v_hat) > 0
    assert metrics.attention_kl(q, k, k) == 0.0


def test_shape_mismatches_raise() -> None:
    x, _ = pair(4, 8)
    y, _ = pair(8, 4)
    q = torch.randn(8)
    for fn in (
        metrics.max_abs_error,
        metrics.l2_error,
        metrics.relative_l2_error,
        metrics.sqnr_db,
        metrics.report,
    ):
        with pytest.raises(ValueError, match="shapes differ"):
            fn(x, y)
    one_row = x[:1]
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.attention_score_error(q, one_row, x)  # would broadcast silently
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.attention_kl(q, one_row, x)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.attention_output_error(q, x, x, one_row, x)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.attention_output_error(q, x, x, x, one_row)
    with pytest.raises(ValueError, match="same tokens"):
        metrics.attention_output_error(q, x, one_row, x, one_row)
    with pytest.raises(ValueError, match="queries must be"):
        metrics.attention_score_error(torch.randn(5), x, x)
    with pytest.raises(ValueError, match="queries must be"):
        metrics.attention_kl(torch.randn(2, 3, 8), x, x)


def test_report_is_one_pass_of_the_separate_metrics() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 300, 33, generator=g)
    x_hat = x + 0.01 * torch.randn(x.shape, generator=g)
    q = torch.randn(5, 33, generator=g)
    r = metrics.report(x, x_hat, q)
    assert r["max_abs_error"] == metrics.max_abs_error(x, x_hat)
    assert r["l2_error"] == pytest.approx(metrics.l2_error(x, x_hat), rel=1e-12)
    assert r["sqnr_db"] == pytest.approx(metrics.sqnr_db(x, x_hat), rel=1e-12)
    assert r["attention_score_error"] == pytest.approx(metrics.attention_score_error(q, x, x_hat), rel=1e-12)
    assert r["attention_score_error_first"] == pytest.approx(
        metrics.attention_score_error(q[0], x, x_hat), rel=1e-12
    )
