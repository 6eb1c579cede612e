"""The solve: one module's weight and input statistics in, two low-rank factors out.

A pure function of tensors and settings (no modules, no hooks), so each variant can be tested against
an independent reference. The progressive update has variants; each is one function registered by name
in :data:`ALIGNMENTS` and chosen by ``ODLLMConfig(alignment=...)``::

    @register_alignment("my_variant")
    def my_variant(problem: SolveProblem, chol: CholeskyResult, options: AlignmentOptions) -> LowRankFactors:
        ...

``chol`` always factors the *undamped* covariance of the drifted inputs: the metric in which every
variant truncates is the data the module will see, never ``C + lambda I``. The ridge term
(``options.damping``) enters only the least-squares solves, and it shrinks the correction toward the
original weight (not toward zero), so with no drift (``cross == covariance``) every variant returns the
whitened truncated SVD, the Eckart-Young optimum on the calibration data, whatever the damping.
Without progressive statistics (``progressive=False``, or the first layer, whose inputs have not
drifted yet) the solve is that whitened truncated SVD directly.

Notation (``nn.Linear`` convention, rows are tokens): ``X`` drifted inputs, ``X_ref`` the original
model's inputs, ``C = X^T X``, ``C_xr = X^T X_ref``, weight ``W``; the original outputs are ``X_ref W^T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .linalg import (
    CholeskyResult,
    LowRankFactors,
    aligned_target,
    aligned_target_times_factor,
    check_finite,
    robust_cholesky,
    truncated_svd,
)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class SolveProblem:
    """What one module's factorization depends on (all in the solver dtype, on one device).

    ``covariance`` is ``X^T X`` of the inputs the module sees (drifted inputs with progressive alignment);
    ``cross`` is ``X^T X_ref`` between those and the original model's inputs (``None``: nothing to align).
    """

    name: str
    weight: torch.Tensor
    covariance: torch.Tensor
    cross: torch.Tensor | None
    rank: int


@dataclass(frozen=True)
class AlignmentOptions:
    """The settings a progressive update reads: ``whitening`` (truncate in the data metric or plainly),
    ``damping`` (ridge strength, a fraction of the mean input variance) and the SVD ``driver``."""

    whitening: bool = True
    damping: float = 0.01
    driver: str | None = None


@dataclass
class Solution:
    factors: LowRankFactors
    jitter: float


Alignment = Callable[[SolveProblem, CholeskyResult, AlignmentOptions], LowRankFactors]
ALIGNMENTS: dict[str, Alignment] = {}


def register_alignment(name: str) -> Callable[[Alignment], Alignment]:
    """Register a progressive update variant under ``name`` (selected by ``ODLLMConfig(alignment=name)``)."""

    def register(fn: Alignment) -> Alignment:
        if name in ALIGNMENTS:
            raise ValueError(f"alignment variant {name!r} is already registered")
        ALIGNMENTS[name] = fn
        return fn

    return register


def ridge(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping * mean(diag C) * I``: GPTQ-style damping of a least-squares normal matrix."""
    if damping <= 0:
        return covariance
    return covariance + _ridge_eye(covariance, damping)


def _ridge_eye(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    return damping * float(covariance.diagonal().mean()) * eye


def _damped_statistics(problem: SolveProblem, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C + lambda I, C_xr + lambda I)``: the ridge as ``lambda`` virtual tokens on which nothing drifted.

    Minimizing ``||X M^T - X_ref W^T||^2 + lambda ||M - W||^2`` has exactly these normal equations, so the
    ridge pulls the update toward the original weight and vanishes when ``C_xr == C``.
    """
    if damping <= 0:
        return problem.covariance, problem.cross
    shift = _ridge_eye(problem.covariance, damping)
    return problem.covariance + shift, problem.cross + shift


def _data_metric(chol: CholeskyResult, options: AlignmentOptions) -> torch.Tensor | None:
    return chol.factor if options.whitening else None


@register_alignment("least_squares")
def least_squares(problem: SolveProblem, chol: CholeskyResult, options: AlignmentOptions) -> LowRankFactors:
    """Re-solve the whole map, then truncate it in the data metric.

    ``M* = W (C_xr + lambda I)^T (C + lambda I)^-1`` (damped least squares toward the original outputs),
    then the truncated SVD of ``M* S`` with ``S S^T = C``: the best rank-r approximation of ``M*`` on the
    drifted calibration inputs.
    """
    covariance, cross = _damped_statistics(problem, options.damping)
    damped = robust_cholesky(covariance, name=f"damped input covariance of {problem.name}")
    target = aligned_target(problem.weight, cross, damped.factor)
    return truncated_svd(target, problem.rank, _data_metric(chol, options), options.driver)


@register_alignment("anchored")
def anchored(problem: SolveProblem, chol: CholeskyResult, options: AlignmentOptions) -> LowRankFactors:
    """AA-SVD's objective solved jointly: the exact rank-r minimizer of
    ``||X M^T - X_ref W^T||^2 + lambda ||M - W||^2`` (truncated SVD of ``M* S_lambda``,
    ``S_lambda S_lambda^T = C + lambda I``).

    Differs from ``least_squares`` only in the truncation metric: the ridge's virtual tokens count there
    too, so it is optimal for the regularized objective rather than for the data.
    """
    covariance, cross = _damped_statistics(problem, options.damping)
    damped = robust_cholesky(covariance, name=f"damped input covariance of {problem.name}")
    if options.whitening:
        target = aligned_target_times_factor(problem.weight, cross, damped.factor)
        return truncated_svd(target, problem.rank, damped.factor, options.driver, target_is_whitened=True)
    return truncated_svd(aligned_target(problem.weight, cross, damped.factor), problem.rank, None, options.driver)


@register_alignment("drift_whitening")
def drift_whitening(problem: SolveProblem, chol: CholeskyResult, options: AlignmentOptions) -> LowRankFactors:
    """Whiten with the drifted covariance, target the original weight ``W`` (no cross term, no solve):
    the best rank-r ``M`` for ``||X (W - M)^T||^2``, i.e. SVD-LLM's whitening on the inputs the module sees."""
    return truncated_svd(problem.weight, problem.rank, _data_metric(chol, options), options.driver)


@register_alignment("up_only")
def up_only(problem: SolveProblem, chol: CholeskyResult, options: AlignmentOptions) -> LowRankFactors:
    """SVD-LLM's closed-form update: ``down`` from ``drift_whitening``, then only ``up`` re-solved.

    With ``Z = X down^T`` (the r-dim code) and ``G = Z^T Z = down C down^T``, ``up`` minimizes
    ``||Z up^T - X_ref W^T||^2 + lambda_r ||up - up_0||^2``, ``lambda_r = damping * mean(diag G)``:
    ``up = (W C_xr^T down^T + lambda_r up_0) (G + lambda_r I)^-1``. It fits ``out x r`` numbers instead
    of ``out x in``; with no drift ``up_0`` already solves it (whitened truncation makes ``G`` diagonal).
    """
    base = drift_whitening(problem, chol, options)
    down = base.down
    gram = down @ problem.covariance @ down.T
    rhs = problem.weight @ (problem.cross.T @ down.T)
    if options.damping > 0:
        shift = _ridge_eye(gram, options.damping)
        gram, rhs = gram + shift, rhs + base.up @ shift
    gram_chol = robust_cholesky(gram, name=f"code covariance of {problem.name}")
    up = torch.cholesky_solve(rhs.T, gram_chol.factor).T
    check_finite(up, f"low-rank factor 'up' of {problem.name}")
    return LowRankFactors(up=up, down=down, singular_values=base.singular_values)


def solve_module(problem: SolveProblem, config: Any) -> Solution:
    """Factor ``problem.weight`` to ``problem.rank`` under the settings of ``config`` (an ``ODLLMConfig``)."""
    # Undamped: this factor is the truncation metric, which must be the data (issue 14).
    chol = robust_cholesky(problem.covariance, name=f"input covariance of {problem.name}")
    if problem.cross is not None:
        options = AlignmentOptions(config.whitening, config.alignment_damping, config.svd_driver)
        factors = ALIGNMENTS[config.alignment](problem, chol, options)
    else:
        factors = truncated_svd(problem.weight, problem.rank, chol.factor if config.whitening else None, config.svd_driver)
    return Solution(factors, chol.jitter)


def solve_data_free(problem: SolveProblem, config: Any) -> Solution:
    """Plain truncated SVD of the weight (``whitening=False, progressive=False`` without calibration data)."""
    return Solution(truncated_svd(problem.weight, problem.rank, driver=config.svd_driver), 0.0)


def solver_dtype(config: Any) -> torch.dtype:
    return _DTYPES[config.solver_dtype]
