"""How solved factors are stored: float ``LowRankLinear`` weights, or integer ``QuantizedLowRankLinear`` codes.

The layer loop asks a storage for four things: write the solved factors back, the tensors a resume
checkpoint keeps per module, the shapes those tensors must have, and how to put them back. A new storage
(another bit width, another layout) is one class here, selected by :func:`factor_storage`, not another
branch in :mod:`optimum_odllm.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .lowrank import install_factors
from .quantization import install_quantized_factors, load_quantized_factors, quantized_state_shapes
from .result import ModuleReport
from .targets import linear_shape

Tensors = dict[str, torch.Tensor]


class FactorStorage(Protocol):
    #: name of the write-back stage in ``CompressionReport.stage_seconds``
    stage: str

    def install(self, model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor,
                covariance: torch.Tensor | None, report: ModuleReport) -> None: ...

    def checkpoint_tensors(self, module: nn.Module) -> Tensors: ...

    def expected_shapes(self, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]: ...

    def restore(self, model: nn.Module, name: str, rank: int, tensors: Tensors) -> None: ...


class FloatFactors:
    """``up``/``down`` as float ``nn.Linear`` weights in the model's dtype."""

    stage = "write-back"

    def install(self, model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor,
                covariance: torch.Tensor | None, report: ModuleReport) -> None:
        install_factors(model, name, up, down)

    def checkpoint_tensors(self, module: nn.Module) -> Tensors:
        return {"down.weight": module.down.weight, "up.weight": module.up.weight}

    def expected_shapes(self, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        in_features, out_features = linear_shape(module)
        return {"up.weight": (out_features, rank), "down.weight": (rank, in_features)}

    def restore(self, model: nn.Module, name: str, rank: int, tensors: Tensors) -> None:
        install_factors(model, name, tensors["up.weight"], tensors["down.weight"])


@dataclass(frozen=True)
class IntegerFactors:
    """Both factors quantized (int8 per row / int4 group-wise) against the covariance the solve used."""

    bits: int
    group_size: int | None
    quantizer: str
    stage = "quantize"

    def install(self, model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor,
                covariance: torch.Tensor | None, report: ModuleReport) -> None:
        module = install_quantized_factors(model, name, up, down, covariance, self.bits, self.group_size, self.quantizer)
        report.factor_bits = self.bits
        if covariance is not None:
            report.quantization_loss = module.relative_output_error(up, down, covariance)

    def checkpoint_tensors(self, module: nn.Module) -> Tensors:
        # the bias is the dense module's, restored from it
        return {k: v for k, v in module.state_dict().items() if k != "up.bias"}

    def expected_shapes(self, module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
        in_features, out_features = linear_shape(module)
        shapes = quantized_state_shapes(in_features, out_features, rank, self.bits, self.group_size, False)
        return {key: shape for key, (_, shape) in shapes.items()}

    def restore(self, model: nn.Module, name: str, rank: int, tensors: Tensors) -> None:
        load_quantized_factors(model, name, rank, self.bits, self.group_size, tensors)


def factor_storage(config: Any) -> FactorStorage:
    """The storage ``config`` asks for (``factor_bits=None``: float factors)."""
    if config.factor_bits is None:
        return FloatFactors()
    return IntegerFactors(config.factor_bits, config.factor_group_size, config.factor_quantizer)


__all__ = ["FactorStorage", "FloatFactors", "IntegerFactors", "factor_storage"]
