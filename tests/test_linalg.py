"""The linear algebra of OD-LLM against independent references (Eckart-Young, least squares)."""

from __future__ import annotations

import logging

import pytest
import torch

from optimum_odllm.linalg import (
    NonFiniteError,
    accumulate_covariance,
    accumulate_cross_covariance,
    aligned_target,
    aligned_target_times_factor,
    robust_cholesky,
    truncated_svd,
)


def correlated_inputs(n: int, d: int, condition: float, seed: int = 0) -> torch.Tensor:
    """Activations whose covariance has the given condition number (strongly correlated channels)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -0.5 * torch.log10(torch.tensor(condition)).item(), d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z * scales) @ q.T


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ approx.T) ** 2).sum())


@pytest.mark.parametrize("condition", [1e2, 1e10])
def test_whitened_svd_error_equals_truncated_singular_values(condition):
    x = correlated_inputs(4096, 48, condition)
    weight = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cov = accumulate_covariance(None, x)
    chol = robust_cholesky(cov)
    assert chol.jitter == 0.0  # float64 handles cond 1e10 without jitter
    factors = truncated_svd(weight, 12, chol.factor)

    # Independent reference: singular values of W S computed here, Eckart-Young optimum.
    sigma = torch.linalg.svdvals(weight @ torch.linalg.cholesky(x.T @ x))
    optimum = float((sigma[12:] ** 2).sum())
    error = output_error(x, weight, factors.up @ factors.down)
    assert error == pytest.approx(optimum, rel=0.02)
    assert factors.truncation_loss == pytest.approx(optimum, rel=1e-6)


def test_plain_svd_is_worse_than_whitened_on_correlated_inputs():
    x = correlated_inputs(4096, 48, 1e10, seed=5)
    weight = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    whitened = truncated_svd(weight, 8, robust_cholesky(accumulate_covariance(None, x)).factor)
    plain = truncated_svd(weight, 8)
    e_white = output_error(x, weight, whitened.up @ whitened.down)
    e_plain = output_error(x, weight, plain.up @ plain.down)
    assert e_white < 0.5 * e_plain


def test_jitter_is_small_and_logged_for_dead_channels(caplog):
    x = correlated_inputs(2048, 32, 1e4)
    x[:, 5] = 0.0  # a dead input channel makes X^T X singular
    cov = accumulate_covariance(None, x)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        chol = robust_cholesky(cov, name="cov of test")
    hf_logging.disable_propagation()
    assert chol.jitter > 0
    assert chol.jitter <= 1e-6 * float(cov.diagonal().mean())
    assert torch.isfinite(chol.factor).all()
    assert any("not positive definite" in r.message for r in caplog.records)
    # Still optimal for the live channels: error equals the truncated singular values.
    weight = torch.randn(24, 32, dtype=torch.float64)
    factors = truncated_svd(weight, 6, chol.factor)
    assert output_error(x, weight, factors.up @ factors.down) == pytest.approx(factors.truncation_loss, rel=0.02)


def test_cholesky_rejects_nan_and_empty():
    cov = torch.eye(4, dtype=torch.float64)
    cov[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        robust_cholesky(cov, name="cov of layer.q_proj")
    with pytest.raises(ValueError, match="non-padding"):
        robust_cholesky(torch.zeros(4, 4, dtype=torch.float64))


def test_covariance_excludes_masked_tokens():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cov = accumulate_covariance(None, x, mask)
    kept = torch.cat([x[0, :3], x[1]])
    torch.testing.assert_close(cov, kept.T @ kept)
    cross = accumulate_cross_covariance(None, x, 2 * x, mask)
    torch.testing.assert_close(cross, 2 * kept.T @ kept)


def test_aligned_target_is_least_squares_and_truncation_is_optimal():
    g = torch.Generator().manual_seed(7)
    x_ref = correlated_inputs(2048, 32, 1e3, seed=8)
    x_drift = x_ref + 0.1 * torch.randn(x_ref.shape, generator=g, dtype=torch.float64)
    weight = torch.randn(20, 32, generator=g, dtype=torch.float64)
    target_out = x_ref @ weight.T
    chol = robust_cholesky(accumulate_covariance(None, x_drift))
    cross = accumulate_cross_covariance(None, x_drift, x_ref)

    # Independent reference: lstsq of the drifted inputs onto the original outputs.
    m_lstsq = torch.linalg.lstsq(x_drift, target_out).solution.T
    torch.testing.assert_close(aligned_target(weight, cross, chol.factor), m_lstsq, rtol=1e-6, atol=1e-8)

    rank = 6
    factors = truncated_svd(aligned_target_times_factor(weight, cross, chol.factor), rank, chol.factor, target_is_whitened=True)
    residual = float(((x_drift @ m_lstsq.T - target_out) ** 2).sum())
    error = float(((x_drift @ (factors.up @ factors.down).T - target_out) ** 2).sum())
    assert error == pytest.approx(residual + factors.truncation_loss, rel=1e-6)
    # Better than ignoring the drift (whitened SVD of W itself on the drifted inputs).
    naive = truncated_svd(weight, rank, chol.factor)
    naive_error = float(((x_drift @ (naive.up @ naive.down).T - target_out) ** 2).sum())
    assert error < naive_error


def test_truncated_svd_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(torch.randn(4, 6), 0)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(torch.randn(4, 6), 5)
