"""Weight quantization of the low-rank factors: round-to-nearest and GPTQ error compensation (pure functions).

GPTQ (Frantar et al., 2022) quantizes a weight ``W [out, in]`` one input column at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse input covariance, so the
output error ``tr((W - Q) H (W - Q)^T)`` ends up far below plain rounding. OD-LLM already holds ``H`` for both
factors (``down``: the layer's input covariance ``C``; ``up``: ``down C down^T``), so no extra calibration pass.

Grid conventions are the ones the integer kernels consume, so what is stored is exactly what runs:

- ``bits=8``: symmetric per output row, ``w = q * scale`` with ``q`` in [-127, 127] (int8), ``scale [out]``.
- ``bits=4``: asymmetric per group of ``group_size`` input columns, ``w = (q - 8) * scale + zero`` with ``q`` in
  [0, 15] (uint8), ``scale, zero [out, in / group_size]``: the "tinygemm" layout of aten's int4 kernels.
- ``bits=3`` / ``bits=2``: the same group-wise grid with ``2**bits`` levels centred on ``2**(bits-1)``. No
  kernel or storage format takes them: they exist to *simulate* 3-/2-bit GPTQ baselines (``dequantize``).

Scales and zeros are chosen, then rounded to ``bfloat16`` (the kernels' dtype), and only then are codes
computed against the rounded values, so ``dequantize`` reproduces the kernel's weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SCALE_DTYPE = torch.bfloat16
INT8_QMAX = 127
GPTQ_BLOCK = 128
SUPPORTED_BITS = (8, 4, 3, 2)  # 8 and 4 are stored and run by kernels; 3 and 2 are simulation only
SUPPORTED_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus the per-row (int8) or per-group (int4) parameters that map them back to floats."""

    qweight: torch.Tensor  # int8 [out, in] (bits 8) or uint8 [out, in] codes in 0..2**bits-1 (bits <= 4), unpacked
    scales: torch.Tensor  # bfloat16 [out] (bits 8) or [out, in // group_size] (bits 4)
    zeros: torch.Tensor | None  # bfloat16 [out, in // group_size] (bits 4), None for bits 8
    bits: int
    group_size: int | None  # None for bits 8 (one scale per output row)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(
            f"{name} has {bad} NaN/Inf entries; quantizing it would hide them. "
            "Fix the factor (or the calibration statistics) that produced them before quantizing."
        )


def _check_args(weight: torch.Tensor, bits: int, group_size: int | None, method: str) -> int | None:
    """Validate the request and return the effective group size (None for int8)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"method must be one of {SUPPORTED_METHODS}, got {method!r}")
    if bits == 8:
        return None  # int8 is per output channel: the int8 kernel takes one scale per row
    in_features = weight.shape[1]
    group_size = group_size or in_features
    if group_size % 2 or in_features % group_size:
        raise ValueError(
            f"int{bits} group_size={group_size} must be even and divide in_features={in_features}; "
            "pick a group size that divides it (ranks are multiples of rank_multiple, so group_size <= rank_multiple works)."
        )
    return group_size


def effective_group_size(in_features: int, group_size: int | None) -> int:
    """Group size actually used for an int4 factor with ``in_features`` inputs: ``group_size`` halved until it
    divides ``in_features`` (rank 192 with g128 -> g64), so every OD-LLM rank works and the loader can derive
    the stored shapes from (in_features, group_size) alone. ``None`` means one group per row."""
    if group_size is None:
        return in_features
    g = group_size
    while g >= 2 and (in_features % g or g % 2):
        g //= 2
    if g < 2:
        raise ValueError(f"no even int4 group size <= {group_size} divides in_features={in_features}; "
                         "use an even rank / in_features or group_size=None (one group per row).")
    return g


def _round_up_to_scale_dtype(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive scale to bfloat16 without going below it (so the grid still covers the range)."""
    rounded = scale.to(SCALE_DTYPE)
    too_small = rounded.float() < scale
    return torch.where(too_small, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)


def _tiny(reference: torch.Tensor) -> torch.Tensor:
    """Smallest scale allowed: keeps all-zero rows/groups finite (their codes are then exact zeros)."""
    return torch.full_like(reference, torch.finfo(SCALE_DTYPE).tiny)


def int8_row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row scale ``max|w| / 127``, rounded up to bfloat16: ``[out]``."""
    absmax = weight.abs().amax(dim=1).float()
    return _round_up_to_scale_dtype(torch.maximum(absmax / INT8_QMAX, _tiny(absmax)))


def group_grid(bits: int) -> tuple[int, int]:
    """(highest code, centre code) of the asymmetric group-wise grid of ``bits`` <= 4: (15, 8) for int4."""
    return 2 ** bits - 1, 2 ** (bits - 1)


def int4_group_params(group: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero of one column group ``[out, g]`` on the tinygemm grid ``(q - 8) * s + z``
    (``bits`` < 4: the same grid with fewer levels, see :func:`group_grid`).

    The zero is rounded to bfloat16 first and the scale is then widened so that ``[z - 8 s, z + 7 s]`` still
    covers the group's range: a group far from zero (where bfloat16 cannot hold the ideal zero) loses
    resolution, but is never clipped.
    """
    levels, center = group_grid(bits)
    low = group.amin(dim=1).float()
    high = group.amax(dim=1).float()
    ideal = torch.maximum((high - low) / levels, _tiny(low))
    zero = (low + center * ideal).to(SCALE_DTYPE)
    zf = zero.float()
    needed = torch.maximum((high - zf) / (levels - center), (zf - low) / center)
    scale = _round_up_to_scale_dtype(torch.maximum(torch.maximum(needed, ideal), _tiny(low)))
    return scale, zero


def quantize_to_codes(
    column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Nearest grid code of ``column`` (any shape broadcasting with ``scale``), as float values of the codes."""
    if bits == 8:
        return torch.clamp(torch.round(column / scale.float()), -INT8_QMAX, INT8_QMAX)
    levels, center = group_grid(bits)
    return torch.clamp(torch.round((column - zero.float()) / scale.float()) + center, 0, levels)


def codes_to_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Float weight values of ``codes`` (inverse of :func:`quantize_to_codes` on the grid)."""
    if bits == 8:
        return codes * scale.float()
    return (codes - group_grid(bits)[1]) * scale.float() + zero.float()


def _pack_result(codes: torch.Tensor, scales: list | torch.Tensor, zeros: list | None, bits: int,
                 group_size: int | None) -> QuantizedWeight:
    if bits == 8:
        return QuantizedWeight(codes.to(torch.int8), scales, None, 8, None)
    return QuantizedWeight(codes.to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1), bits, group_size)


def _rtn(weight: torch.Tensor, bits: int, group_size: int | None) -> QuantizedWeight:
    """Round to nearest, each row / group independently (the ablation, and GPTQ's grid choice)."""
    w = weight.float()
    if bits == 8:
        scales = int8_row_scales(w)
        return _pack_result(quantize_to_codes(w, scales[:, None], None, 8), scales, None, 8, None)
    scales, zeros, codes = [], [], []
    for start in range(0, w.shape[1], group_size):
        group = w[:, start:start + group_size]
        scale, zero = int4_group_params(group, bits)
        scales.append(scale), zeros.append(zero)
        codes.append(quantize_to_codes(group, scale[:, None], zero[:, None], bits))
    return _pack_result(torch.cat(codes, 1), scales, zeros, bits, group_size)


def inverse_cholesky_upper(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damping * mean(diag H) * I)^-1`` (``H^-1 = U^T U``), float64.

    Row ``i`` of ``U`` (from column ``i`` on) is exactly how GPTQ spreads column ``i``'s rounding error over the
    columns after it. Damping as in GPTQ keeps the inverse bounded on directions the data barely covers.
    """
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    mean_diag = diag.mean()
    if not mean_diag > 0:
        raise ValueError("the input covariance is all zeros: no calibration tokens reached this layer.")
    diag.add_(damping * mean_diag)
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            f"the damped input covariance is not positive definite (Cholesky failed at column {info.item()}); "
            "raise `damping` (e.g. 0.1) or check the covariance for corruption."
        )
    inverse = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inverse, upper=True)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
          damping: float) -> QuantizedWeight:
    """GPTQ in input-column order with lazy block updates; grid parameters come from the updated weights."""
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0  # inputs never active: any value is free, use 0 and keep H invertible
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_cholesky_upper(h, damping)
    rows, cols = w.shape
    codes = torch.zeros_like(w)
    block = group_size or GPTQ_BLOCK  # a block never straddles a group: group params see fully updated columns
    row_scale = int8_row_scales(w) if bits == 8 else None
    scales, zeros = [], []
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        wb = w[:, start:stop].clone()
        errors = torch.zeros_like(wb)
        if bits == 8:
            scale, zero = row_scale.to(torch.float64), None
        else:
            scale, zero = int4_group_params(wb, bits)
            scales.append(scale), zeros.append(zero)
        for j in range(stop - start):
            col = wb[:, j]
            q = quantize_to_codes(col, scale, zero, bits)
            codes[:, start + j] = q
            err = (col - codes_to_values(q, scale, zero, bits)) / u[start + j, start + j]
            wb[:, j:] -= err[:, None] * u[start + j, start + j:stop][None, :]
            errors[:, j] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    if bits == 8:
        return _pack_result(codes, row_scale, None, 8, None)
    return _pack_result(codes, scales, zeros, bits, group_size)


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: Literal[8, 4, 3, 2],
    group_size: int | None = 128,
    method: Literal["gptq", "rtn"] = "gptq",
    damping: float = 0.01,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` to ``bits``; ``hessian [in, in]`` is its input covariance (needed for GPTQ).

    ``group_size`` applies to bits <= 4 only (int8 is per output row); 3 and 2 bits can only be dequantized
    (no storage format or kernel), for simulated baselines. ``damping`` is GPTQ's fraction of the mean
    covariance diagonal added before inversion. NaN/Inf in either input raises.
    """
    group_size = _check_args(weight, bits, group_size, method)
    _check_finite("weight", weight)
    if method == "rtn":
        return _rtn(weight, bits, group_size)
    if hessian is None:
        raise ValueError("method='gptq' needs the input covariance `hessian`; pass it or use method='rtn'.")
    in_features = weight.shape[1]
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian must be [{in_features}, {in_features}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    _check_finite("hessian", hessian)
    return _gptq(weight, hessian, bits, group_size, damping)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]`` the codes stand for (exactly what the integer kernels multiply by)."""
    codes = qw.qweight.float()
    if qw.bits == 8:
        return codes_to_values(codes, qw.scales[:, None], None, 8).to(dtype)
    scale = qw.scales.repeat_interleave(qw.group_size, dim=1)
    zero = qw.zeros.repeat_interleave(qw.group_size, dim=1)
    return codes_to_values(codes, scale, zero, qw.bits).to(dtype)


def up_covariance(down: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Input covariance of ``up``: ``down C down^T`` (``down`` is what ``up`` actually reads, rounding included)."""
    d = down.to(torch.float64)
    return d @ covariance.to(torch.float64) @ d.T


def quantize_lowrank_factors(
    up: torch.Tensor,
    down: torch.Tensor,
    covariance: torch.Tensor | None,
    bits: Literal[8, 4, 3, 2],
    group_size: int | None = 128,
    method: Literal["gptq", "rtn"] = "gptq",
    damping: float = 0.01,
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Quantize ``down [r, in]`` against ``C`` then ``up [out, r]`` against ``deq(down) C deq(down)^T``.

    ``up`` is compensated for the rounding of ``down`` too, because its covariance is built from the
    dequantized ``down``. ``covariance`` may be None only with ``method='rtn'``. For bits <= 4 each factor uses
    :func:`effective_group_size` of its own input width.
    """
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} do not share a rank")
    g_down = effective_group_size(down.shape[1], group_size) if bits != 8 else None
    g_up = effective_group_size(up.shape[1], group_size) if bits != 8 else None
    q_down = quantize_weight(down, covariance, bits, g_down, method, damping)
    h_up = None if covariance is None else up_covariance(dequantize(q_down, torch.float64), covariance)
    q_up = quantize_weight(up, h_up, bits, g_up, method, damping)
    return q_up, q_down
