"""The solve: one module's weight and input statistics in, two low-rank factors out.

A pure function of tensors and settings (no modules, no hooks), so each variant can be tested against
an independent reference. The progressive update has variants; each is one function registered by name
in :data:`ALIGNMENTS` and chosen by ``ODLLMConfig(alignment=...)``::

    @register_alignment("my_variant")
    def my_variant(problem: SolveProblem, chol: CholeskyResult, whitening: bool, driver: str | None) -> LowRankFactors:
        ...

Without progressive statistics (``progressive=False``, or the first layer, whose inputs have not drifted
yet) every variant reduces to the whitened truncated SVD, the Eckart-Young optimum on the calibration data.
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


@dataclass
class Solution:
    factors: LowRankFactors
    jitter: float


Alignment = Callable[[SolveProblem, CholeskyResult, bool, "str | None"], LowRankFactors]
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
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    return covariance + damping * float(covariance.diagonal().mean()) * eye


@register_alignment("least_squares")
def least_squares(problem: SolveProblem, chol: CholeskyResult, whitening: bool, driver: str | None) -> LowRankFactors:
    """Re-solve the whole map in closed form: ``M* = W C_xr^T C_xx^-1``, then truncate ``M* S``.

    ``chol`` factors the (damped) covariance, which is both the least-squares normal matrix and the
    truncation metric.
    """
    if whitening:
        target = aligned_target_times_factor(problem.weight, problem.cross, chol.factor)
        return truncated_svd(target, problem.rank, chol.factor, driver, target_is_whitened=True)
    target = aligned_target(problem.weight, problem.cross, chol.factor)
    return truncated_svd(target, problem.rank, None, driver)


def solve_module(problem: SolveProblem, config: Any) -> Solution:
    """Factor ``problem.weight`` to ``problem.rank`` under the settings of ``config`` (an ``ODLLMConfig``)."""
    covariance = problem.covariance
    aligned = problem.cross is not None
    if aligned:
        # Ridge term of the least-squares alignment: without it, directions the calibration data
        # barely covers get huge gains (exploding gradients and poor generalization off-sample).
        covariance = ridge(covariance, config.alignment_damping)
    chol = robust_cholesky(covariance, name=f"input covariance of {problem.name}")
    if aligned:
        factors = ALIGNMENTS[config.alignment](problem, chol, config.whitening, config.svd_driver)
    else:
        factors = truncated_svd(problem.weight, problem.rank, chol.factor if config.whitening else None, config.svd_driver)
    return Solution(factors, chol.jitter)


def solve_data_free(problem: SolveProblem, config: Any) -> Solution:
    """Plain truncated SVD of the weight (``whitening=False, progressive=False`` without calibration data)."""
    return Solution(truncated_svd(problem.weight, problem.rank, driver=config.svd_driver), 0.0)


def solver_dtype(config: Any) -> torch.dtype:
    return _DTYPES[config.solver_dtype]
