"""Small helpers shared across the package: parameter counting."""

from __future__ import annotations

from typing import Iterator

from torch import nn


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Each parameter once, even when tied (e.g. embeddings shared with lm_head)."""
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            yield param


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once); integer-quantized factors
    (:class:`~optimum_odllm.quantization.QuantizedFactor`, whose codes are buffers) count the weights they store."""
    stored = sum(getattr(m, "stored_weights", 0) for m in model.modules())
    return sum(p.numel() for p in _unique_parameters(model)) + stored


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model))
