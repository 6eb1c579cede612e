"""The progressive update variants of ``optimum_odllm.solvers`` against independent numpy references.

Every reference is written from the objective, not from the package's formulas: a rank-r least-squares
fit through a QR factorization of the (possibly ridge-augmented) data, and plain ``numpy.linalg.lstsq``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_odllm import ODLLMConfig
from optimum_odllm.linalg import accumulate_covariance, accumulate_cross_covariance, robust_cholesky
from optimum_odllm.solvers import ALIGNMENTS, AlignmentOptions, SolveProblem, solve_module

N, D_IN, D_OUT, RANK = 400, 24, 16, 5


def drifted_data(drift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X_ref, X, W)``: correlated reference inputs, the same inputs plus a structured drift, a weight."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((D_IN, D_IN)) * np.logspace(0, -2, D_IN)
    x_ref = rng.standard_normal((N, D_IN)) @ mix.T
    x = x_ref + drift * (x_ref @ rng.standard_normal((D_IN, D_IN)) / np.sqrt(D_IN) + 0.1 * rng.standard_normal((N, D_IN)))
    return x_ref, x, rng.standard_normal((D_OUT, D_IN))


def problem_of(x_ref: np.ndarray, x: np.ndarray, w: np.ndarray, rank: int = RANK) -> SolveProblem:
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    return SolveProblem("m", t(w), accumulate_covariance(None, t(x)), accumulate_cross_covariance(None, t(x), t(x_ref)), rank)


def run(variant: str, problem: SolveProblem, damping: float, whitening: bool = True) -> np.ndarray:
    """The variant's rank-r map ``up @ down`` as a numpy array."""
    factors = ALIGNMENTS[variant](problem, robust_cholesky(problem.covariance), AlignmentOptions(whitening, damping))
    assert factors.up.shape == (D_OUT, problem.rank) and factors.down.shape == (problem.rank, D_IN)
    return (factors.up @ factors.down).numpy()


def rank_r_fit(x: np.ndarray, y: np.ndarray, rank: int) -> np.ndarray:
    """Reference: ``argmin_{rank(M) <= r} ||x M^T - y||_F`` via QR (``x = QR``: Eckart-Young on ``Q^T y``)."""
    q, r = np.linalg.qr(x)
    u, s, vt = np.linalg.svd(q.T @ y, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return np.linalg.solve(r, best).T


def ridge_rows(x: np.ndarray, damping: float) -> np.ndarray:
    """``sqrt(lambda) I`` with ``lambda = damping * mean(diag(x^T x))``: the ridge written as extra data rows."""
    return np.sqrt(damping * np.mean(np.sum(x * x, axis=0))) * np.eye(x.shape[1])


def sse(x: np.ndarray, m: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ m.T - y) ** 2).sum())


@pytest.mark.parametrize("variant", ["least_squares", "drift_whitening", "up_only"])
@pytest.mark.parametrize("damping", [0.0, 0.05, 0.3])
def test_no_drift_gives_the_eckart_young_optimum_whatever_the_damping(variant, damping):
    """With ``cross == covariance`` the damping must not move the truncation off the data optimum (issue 14)."""
    x, _, w = drifted_data(0.0)
    m = run(variant, problem_of(x, x, w), damping)
    sigma = torch.linalg.svdvals(torch.from_numpy(w) @ torch.linalg.cholesky(torch.from_numpy(x.T @ x)))
    optimum = float((sigma[RANK:] ** 2).sum())
    assert sse(x, m, x @ w.T) == pytest.approx(optimum, rel=1e-9)


def test_anchored_without_drift_truncates_in_the_damped_metric():
    """``anchored`` is optimal for the regularized objective: with no drift, W truncated in ``C + lambda I``."""
    x, _, w = drifted_data(0.0)
    damping = 0.3
    m = run("anchored", problem_of(x, x, w), damping)
    aug = np.vstack([x, ridge_rows(x, damping)])
    np.testing.assert_allclose(m, rank_r_fit(aug, aug @ w.T, RANK), rtol=1e-7, atol=1e-9)
    sigma = torch.linalg.svdvals(torch.from_numpy(w) @ torch.linalg.cholesky(torch.from_numpy(x.T @ x)))
    assert sse(x, m, x @ w.T) > float((sigma[RANK:] ** 2).sum()) * (1 + 1e-6)  # worse on the data itself


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_least_squares_is_damped_lstsq_then_data_optimal_truncation(damping):
    x_ref, x, w = drifted_data(0.5)
    y = x_ref @ w.T
    rows = ridge_rows(x, damping)
    full = np.linalg.lstsq(np.vstack([x, rows]), np.vstack([y, rows @ w.T]), rcond=None)[0].T  # ridge toward W
    expected = rank_r_fit(x, x @ full.T, RANK)
    np.testing.assert_allclose(run("least_squares", problem_of(x_ref, x, w), damping), expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(run("least_squares", problem_of(x_ref, x, w), damping, whitening=False),
                               rank_r_fit(np.eye(D_IN), full.T, RANK), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_anchored_is_the_rank_r_minimizer_of_the_augmented_objective(damping):
    x_ref, x, w = drifted_data(0.5)
    rows = ridge_rows(x, damping)
    expected = rank_r_fit(np.vstack([x, rows]), np.vstack([x_ref @ w.T, rows @ w.T]), RANK)
    np.testing.assert_allclose(run("anchored", problem_of(x_ref, x, w), damping), expected, rtol=1e-7, atol=1e-9)


def test_drift_whitening_fits_w_on_the_drifted_inputs():
    x_ref, x, w = drifted_data(0.5)
    np.testing.assert_allclose(run("drift_whitening", problem_of(x_ref, x, w), 0.05), rank_r_fit(x, x @ w.T, RANK),
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_up_only_keeps_down_and_solves_up_by_ridge_lstsq(damping):
    x_ref, x, w = drifted_data(0.5)
    problem = problem_of(x_ref, x, w)
    base = ALIGNMENTS["drift_whitening"](problem, robust_cholesky(problem.covariance), AlignmentOptions(True, damping))
    factors = ALIGNMENTS["up_only"](problem, robust_cholesky(problem.covariance), AlignmentOptions(True, damping))
    torch.testing.assert_close(factors.down, base.down)
    z = x @ base.down.numpy().T
    rows = ridge_rows(z, damping)
    up = np.linalg.lstsq(np.vstack([z, rows]), np.vstack([x_ref @ w.T, rows @ base.up.numpy().T]), rcond=None)[0].T
    np.testing.assert_allclose(factors.up.numpy(), up, rtol=1e-7, atol=1e-9)


def test_undamped_variants_are_ordered_on_the_anchored_objective():
    """On the calibration data, the exact minimizer beats the restricted updates, which beat no update."""
    x_ref, x, w = drifted_data(0.5)
    problem, y = problem_of(x_ref, x, w), x_ref @ w.T
    err = {v: sse(x, run(v, problem, 0.0), y) for v in ("least_squares", "anchored", "up_only", "drift_whitening")}
    assert err["least_squares"] == pytest.approx(err["anchored"], rel=1e-9)
    assert err["least_squares"] < err["up_only"] < err["drift_whitening"]


def test_solve_module_truncates_in_the_undamped_metric_and_reports_its_jitter():
    x, _, w = drifted_data(0.0)
    problem = problem_of(x, x, w)
    solution = solve_module(problem, ODLLMConfig(alignment_damping=0.2))
    sigma = torch.linalg.svdvals(torch.from_numpy(w) @ torch.linalg.cholesky(torch.from_numpy(x.T @ x)))
    m = (solution.factors.up @ solution.factors.down).numpy()
    assert sse(x, m, x @ w.T) == pytest.approx(float((sigma[RANK:] ** 2).sum()), rel=1e-9)
    assert solution.jitter == 0.0


def test_undamped_progressive_is_refused_unless_asked_for():
    with pytest.raises(ValueError, match="allow_undamped_alignment=True"):
        ODLLMConfig(alignment_damping=0.0)
    assert ODLLMConfig(alignment_damping=0.0, allow_undamped_alignment=True).alignment_damping == 0.0
    assert ODLLMConfig(alignment_damping=0.0, progressive=False).alignment_damping == 0.0


def test_a_checkpoint_compressed_undamped_before_the_refusal_still_loads():
    # quantization_config of a model compressed with alignment_damping=0 before allow_undamped_alignment existed
    saved = {"quant_method": "odllm", "ratio": 0.5, "progressive": True, "alignment_damping": 0.0,
             "ranks": {"model.layers.0.mlp.up_proj": 8}}
    assert ODLLMConfig.from_dict(saved).ranks == saved["ranks"]
