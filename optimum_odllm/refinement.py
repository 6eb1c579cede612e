"""Block refinement: a few gradient steps on one decoder layer's factors after its closed-form solve.

The closed-form solve fits each Linear to its own outputs; what the next layer sees is the whole block's
output, where the modules' errors meet the attention softmax, the activation and the residual stream.
Refinement (AA-SVD's block-level step) therefore fits the block: Adam on the layer's ``up``/``down``
factors to match the dense layer's outputs on the original inputs, ``||layer(X_in) - Y_dense||^2`` over real
tokens, where ``X_in`` is what the layer receives through the already-compressed prefix.

It must never make the model worse than the closed form: a share of the calibration batches is held out,
the factors with the lowest held-out error are kept (checked before the first step and at regular intervals),
so with no gain the closed-form factors are restored unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers.utils import logging

from .layerwise import run_layer
from .linalg import check_finite

#: how many times per run the held-out error is measured (and the best factors so far remembered)
CHECKS_PER_RUN = 8
#: ``refine_steps=None`` means this many with calibration data (chosen on validation users, docs/alignment.md)
DEFAULT_REFINE_STEPS = 256


def resolve_refine_steps(refine_steps: int | None, calibrated: bool) -> int:
    """Steps to run: the default where ``None`` (none without calibration data, which refinement needs)."""
    if refine_steps is None:
        return DEFAULT_REFINE_STEPS if calibrated else 0
    if refine_steps and not calibrated:
        raise ValueError(
            "refine_steps fits each layer to the dense layer's outputs on calibration data: pass calibration data, "
            "or use refine_steps=0 for the data-free plain SVD."
        )
    return refine_steps


@dataclass(frozen=True)
class RefinementBatch:
    """One calibration batch: the layer's input (through the compressed prefix), its call keywords, the
    real-token mask and the dense layer's output on the original input (the target)."""

    inputs: torch.Tensor
    kwargs: dict[str, Any]
    mask: torch.Tensor
    target: torch.Tensor


@dataclass
class RefinementOutcome:
    """Relative output error ``sum ||layer(x) - y||^2 / sum ||y||^2`` on the held-out batches, before and
    after; ``steps`` is where the kept factors were taken (0: the closed-form factors were kept)."""

    held_out_before: float
    held_out_after: float
    steps: int


def split_held_out(batches: Sequence[RefinementBatch], every: int = 8) -> tuple[list, list]:
    """(train, held out): every ``every``-th batch is held out from the Adam steps, at least one when there are
    two or more. (They did feed the closed-form statistics, which favours the closed form in the comparison.)
    With a single batch both are that batch (the check then guards the training error only)."""
    if len(batches) < 2:
        return list(batches), list(batches)
    step = min(every, len(batches))
    held = [b for i, b in enumerate(batches) if i % step == step - 1]
    train = [b for i, b in enumerate(batches) if i % step != step - 1]
    return train, held


def _relative_error(layer: nn.Module, batches: Sequence[RefinementBatch], device: torch.device, dtype: torch.dtype) -> float:
    error = energy = 0.0
    with torch.no_grad():
        for batch in batches:
            diff, target = _masked_residual(layer, batch, device, dtype)
            error += float(diff.square().sum())
            energy += float(target.square().sum())
    return error / energy if energy else 0.0


def _masked_residual(layer: nn.Module, batch: RefinementBatch, device: torch.device, dtype: torch.dtype):
    mask = batch.mask.to(device)
    output = run_layer(layer, batch.inputs.to(device=device, dtype=dtype), _cast(batch.kwargs, dtype), device)
    target = batch.target.to(device=device, dtype=dtype)
    return (output - target)[mask], target[mask]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of the layer's keywords (rotary tables, additive masks) in the refinement dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@contextmanager
def _float32_weights(layer: nn.Module) -> Iterator[None]:
    """Every floating parameter and buffer of ``layer`` in float32 inside the block, each back in its own dtype
    after it (a float32 norm kept inside a bfloat16 layer stays float32)."""
    dtypes = {name: t.dtype for name, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_floating_point()}
    layer.float()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])
            for name, buffer in layer.named_buffers():
                if name in dtypes and buffer.dtype != dtypes[name]:
                    module_name, _, attr = name.rpartition(".")
                    layer.get_submodule(module_name)._buffers[attr] = buffer.to(dtypes[name])


@contextmanager
def _only_trainable(layer: nn.Module, factors: Sequence[nn.Parameter]) -> Iterator[None]:
    """``factors`` require gradients and nothing else in ``layer`` does; flags restored and gradients
    dropped afterwards (they would otherwise stay on the model, one extra copy of every factor)."""
    params = list(layer.parameters())
    flags = [p.requires_grad for p in params]
    trainable = {id(f) for f in factors}
    for p in params:
        p.requires_grad_(id(p) in trainable)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)


def refine_block(
    layer: nn.Module,
    factors: Sequence[nn.Parameter],
    batches: Sequence[RefinementBatch],
    steps: int,
    lr: float,
    device: torch.device,
    name: str = "",
) -> RefinementOutcome:
    """Adam on ``factors`` (parameters of ``layer``) for ``steps`` batches; keeps the best held-out factors.

    The weights are float32 while refining (Adam on 16-bit weights loses the small updates) and go back to
    their own dtypes afterwards; nothing but ``factors`` changes, and with no gain they come back bit for bit.
    A bfloat16 layer on CUDA computes its training steps under bfloat16 autocast (its own precision, at
    tensor-core speed). The held-out errors are measured in float32, before the cast back. A transient progress
    bar (``transformers.logging``'s tqdm, off with ``disable_progress_bar()``) shows the steps and the best
    held-out error so far: on a CPU one layer can take minutes.
    """
    if steps < 1 or not factors:
        raise ValueError(f"refine_block needs steps >= 1 and factors to train, got {steps} steps, {len(factors)} factors")
    train, held = split_held_out(batches)
    fast = device.type == "cuda" and next(layer.parameters()).dtype == torch.bfloat16
    with _float32_weights(layer), _only_trainable(layer, factors):
        dtype = torch.float32
        best_error = before = _relative_error(layer, held, device, dtype)
        best_state, best_step = [p.detach().clone() for p in factors], 0
        optimizer = torch.optim.Adam(factors, lr=lr)
        interval = max(1, steps // CHECKS_PER_RUN)
        bar = logging.tqdm(range(1, steps + 1), desc=f"refining {name}".strip(), leave=False)
        try:
            with torch.enable_grad():
                for step in bar:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast):
                        diff, target = _masked_residual(layer, train[(step - 1) % len(train)], device, dtype)
                    diff, target = diff.float(), target.float()
                    loss = diff.square().sum() / target.square().sum().clamp_min(1e-30)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if step % interval == 0 or step == steps:
                        error = _relative_error(layer, held, device, dtype)
                        if error < best_error:  # NaN never compares smaller: a diverged run is never kept
                            best_error, best_step = error, step
                            best_state = [p.detach().clone() for p in factors]
                        bar.set_postfix(held_out=f"{before:.4g} -> {best_error:.4g}")
        finally:
            bar.close()
            with torch.no_grad():
                for p, best in zip(factors, best_state):
                    p.copy_(best)
        for p in factors:
            check_finite(p, f"refined factor of {name}")
    return RefinementOutcome(before, best_error, best_step)


__all__ = [
    "DEFAULT_REFINE_STEPS", "RefinementBatch", "RefinementOutcome", "refine_block", "resolve_refine_steps", "split_held_out",
]
