"""The outcome of a compression: what saving, model cards, Hub pushes and exporters consume.

:class:`CompressionReport` holds the numbers (parameters, ranks, losses, time per stage);
:class:`CompressionResult` bundles the compressed model with its config, report and provenance, so
that every consumer takes one explicit object instead of reaching into the compressor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class ModuleReport:
    """What happened to one targeted module."""

    name: str
    in_features: int
    out_features: int
    rank: int | None
    truncation_loss: float = 0.0
    relative_loss: float = 0.0
    jitter: float = 0.0
    factor_bits: int | None = None  # 8 / 4 when the factors are stored as integers
    quantization_loss: float = 0.0  # output energy the rounding costs, relative to the float factors'

    @classmethod
    def solved(cls, name: str, shape: tuple[int, int], rank: int, singular_values: torch.Tensor, jitter: float) -> "ModuleReport":
        """Report of a factorized module: the loss is the energy of the dropped singular values."""
        energy = float((singular_values**2).sum())
        loss = float((singular_values[rank:] ** 2).sum())
        return cls(name, *shape, rank, loss, loss / energy if energy else 0.0, jitter)


@dataclass
class CompressionReport:
    """Summary of a compression run (used for logs, model cards and benchmarks)."""

    params_before: int = 0
    params_after: int = 0
    target_params_before: int = 0
    target_params_after: int = 0
    num_calibration_samples: int = 0
    num_calibration_tokens: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    modules: list[ModuleReport] = field(default_factory=list)
    #: per refined layer (``refine_steps``): held-out block error before/after and the step kept
    refinement: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept_ratio(self) -> float:
        return self.target_params_after / max(1, self.target_params_before)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept_ratio"] = self.kept_ratio
        return out


@dataclass
class CompressionResult:
    """A compressed model and everything needed to publish it.

    ``source`` is the dense model's path or Hub id, ``calibration_source`` a human description of the
    calibration data, ``artifacts`` extra files to ship beside the weights (``{file name: path}``, e.g. the
    recommender's ``item_index.json``).
    """

    model: nn.Module
    config: Any
    report: CompressionReport
    tokenizer: Any = None
    source: str | None = None
    calibration_source: str | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
