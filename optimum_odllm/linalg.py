"""Pure linear algebra of OD-LLM: covariance whitening, truncated SVD and closed-form alignment.

Everything here works on plain tensors (no modules, no hooks) so that each step can be tested
against an independent reference. Conventions follow ``nn.Linear``: a weight ``W`` has shape
``[out_features, in_features]`` and maps row inputs ``X`` to ``X @ W.T``.

Why whitening: with the input covariance ``C = X^T X = S S^T`` (``S`` lower-triangular Cholesky
factor), the output error of any replacement ``W'`` is ``||X (W - W')^T||_F^2 = ||(W - W') S||_F^2``.
So the singular values of ``W S`` measure the real output loss, and truncating the SVD of ``W S``
is the optimal rank-r replacement (Eckart-Young) for the calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

#: Relative jitter steps (times the mean diagonal) tried when a covariance is not positive definite.
#: The first step (1e-10) is far below what would spoil the Eckart-Young optimum even for
#: condition numbers around 1e10; the last one (1e-2) only matters for nearly empty calibration.
JITTER_STEPS: tuple[float, ...] = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


class NonFiniteError(FloatingPointError):
    """Raised when a weight, activation or factor contains NaN or Inf."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{what} contains {bad} NaN/Inf value(s). Check the model weights and the calibration data "
            "(e.g. load the model in float32 instead of float16 if activations overflow)."
        )


def _gram(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a^T b`` accumulated in ``dtype``.

    On CUDA, half-precision activations take the tensor-core path with a float32 result
    (``torch.mm(..., out_dtype=float32)``): products of bf16/fp16 numbers are exact in float32, so
    this matches upcasting first while running at half-precision speed. The per-batch float32 sum
    is then added to the (float64 by default) running total by the caller.
    """
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        try:
            return torch.mm(a.T, b, out_dtype=torch.float32).to(dtype)
        except (RuntimeError, TypeError):  # older torch without mm(out_dtype=...)
            pass
    return a.to(dtype).T @ b.to(dtype)


def accumulate_covariance(
    covariance: torch.Tensor | None,
    inputs: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Add ``X^T X`` of a batch of activations to ``covariance`` (created when ``None``).

    ``inputs`` is ``[..., in_features]``; ``token_mask`` (same leading shape, bool) selects the tokens
    that count, so padding never enters the statistics. Accumulation happens in ``dtype``.
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    if token_mask is not None:
        x = x[token_mask.reshape(-1).to(x.device)]
    update = _gram(x, x, dtype)
    return update if covariance is None else covariance.add_(update)


def accumulate_cross_covariance(
    cross: torch.Tensor | None,
    inputs: torch.Tensor,
    reference_inputs: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Add ``X^T X_ref`` (drifted inputs against the original model's inputs) to ``cross``."""
    x = inputs.reshape(-1, inputs.shape[-1])
    r = reference_inputs.reshape(-1, reference_inputs.shape[-1])
    if token_mask is not None:
        keep = token_mask.reshape(-1).to(x.device)
        x, r = x[keep], r[keep.to(r.device)]
    update = _gram(x, r.to(x.device), dtype)
    return update if cross is None else cross.add_(update)


@dataclass
class CholeskyResult:
    """Lower-triangular factor ``S`` with ``C + jitter * I = S S^T``; ``jitter`` is absolute."""

    factor: torch.Tensor
    jitter: float


def robust_cholesky(covariance: torch.Tensor, name: str = "covariance") -> CholeskyResult:
    """Cholesky factor of a symmetric PSD matrix, adding the smallest jitter that makes it PD.

    Dead input channels or too few calibration tokens make ``X^T X`` singular. We retry with
    ``jitter = step * mean(diag)`` for the steps in :data:`JITTER_STEPS` and log a warning when any
    jitter was needed. Never returns a factor with NaN/Inf; raises if no step works.
    """
    check_finite(covariance, name)
    n = covariance.shape[0]
    mean_diag = float(covariance.diagonal().mean())
    if mean_diag <= 0:
        raise ValueError(
            f"{name} is all zeros: the module never saw a non-padding calibration token. "
            "Use calibration sequences with real (non-pad) tokens."
        )
    eye = torch.eye(n, dtype=covariance.dtype, device=covariance.device)
    sym = 0.5 * (covariance + covariance.T)
    for step in JITTER_STEPS:
        jitter = step * mean_diag
        factor, info = torch.linalg.cholesky_ex(sym + jitter * eye if jitter else sym)
        if int(info) == 0 and torch.isfinite(factor).all() and bool((factor.diagonal() > 0).all()):
            if jitter:
                logger.warning(
                    f"{name} is not positive definite (dead channels or too few calibration tokens); "
                    f"added jitter {step:.0e} x mean diagonal."
                )
            return CholeskyResult(factor=factor, jitter=jitter)
    raise FloatingPointError(
        f"{name} could not be factorized even with jitter {JITTER_STEPS[-1]:.0e} x mean diagonal. "
        "Provide more (and more diverse) calibration data."
    )


@dataclass
class LowRankFactors:
    """``W ~= up @ down`` with ``up = U_r sqrt(Sigma_r)`` ``[out, r]`` and ``down`` ``[r, in]``.

    ``singular_values`` are all singular values of the (whitened) target, so the truncation loss is
    ``(singular_values[rank:] ** 2).sum()``.
    """

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def truncation_loss(self) -> float:
        return float((self.singular_values[self.rank :] ** 2).sum())


def truncated_svd(
    target: torch.Tensor,
    rank: int,
    whitening_factor: torch.Tensor | None = None,
    driver: str | None = None,
    target_is_whitened: bool = False,
) -> LowRankFactors:
    """Best rank-``rank`` factors of ``target`` in the metric of ``whitening_factor``.

    With ``S = whitening_factor``: SVD ``target @ S = U Sigma V^T``, ``up = U_r Sigma_r^1/2`` and
    ``down = Sigma_r^1/2 V_r^T S^-1`` (a triangular solve, no explicit inverse). Without ``S`` it is
    plain SVD of ``target``. ``driver`` is passed to :func:`torch.linalg.svd` (CUDA only, e.g.
    ``"gesvda"``). ``target_is_whitened=True`` means ``target`` already is ``M S`` (see
    :func:`aligned_target_times_factor`), which avoids a round trip through ``S^-1``.
    """
    if not 0 < rank <= min(target.shape):
        raise ValueError(f"rank must be in [1, {min(target.shape)}], got {rank}")
    whitened = target if whitening_factor is None or target_is_whitened else target @ whitening_factor
    svd_kwargs = {"driver": driver} if driver is not None and whitened.is_cuda else {}
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False, **svd_kwargs)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if whitening_factor is not None:
        # down = down_w @ S^-1  <=>  down @ S = down_w
        down = torch.linalg.solve_triangular(whitening_factor, down, upper=False, left=False)
    check_finite(up, "low-rank factor 'up'")
    check_finite(down, "low-rank factor 'down'")
    return LowRankFactors(up=up, down=down, singular_values=s)


def aligned_target_times_factor(
    weight: torch.Tensor, cross_covariance: torch.Tensor, whitening_factor: torch.Tensor
) -> torch.Tensor:
    """``M* S`` for the least-squares aligned map ``M* = W C_xr^T C_xx^-1``.

    Progressive alignment wants the compressed module, fed the drifted inputs ``X`` of the already
    compressed prefix, to reproduce the *original* outputs ``X_ref W^T``. The unconstrained
    least-squares solution is ``M*``; the best rank-r ``M`` is the truncated SVD of ``M* S``
    (because ``||X M^T - X_ref W^T||^2 = ||(M - M*) S||^2 + const``), i.e. truncating and then
    updating the kept factors in closed form. ``M* S = W (S^-1 C_xr)^T`` needs one triangular solve.
    """
    solved = torch.linalg.solve_triangular(whitening_factor, cross_covariance, upper=False)
    return weight @ solved.T


def aligned_target(
    weight: torch.Tensor, cross_covariance: torch.Tensor, whitening_factor: torch.Tensor
) -> torch.Tensor:
    """The least-squares aligned map ``M* = W C_xr^T C_xx^-1`` itself (for unwhitened truncation)."""
    product = aligned_target_times_factor(weight, cross_covariance, whitening_factor)
    return torch.linalg.solve_triangular(whitening_factor, product, upper=False, left=False)


def max_useful_rank(in_features: int, out_features: int) -> int:
    """Largest rank whose two factors hold fewer parameters than the dense ``[out, in]`` weight."""
    return max(0, math.ceil(in_features * out_features / (in_features + out_features)) - 1)
