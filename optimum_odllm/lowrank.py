"""The low-rank layer and the module surgery around it (replace / merge).

``LowRankLinear`` computes ``up(down(x))``: ``down`` is ``[rank, in]`` (``Sigma_r^1/2 V_r^T S^-1``) and
``up`` is ``[out, rank]`` (``U_r Sigma_r^1/2``) plus the original bias. Both are plain ``nn.Linear``
children, so state-dict keys are readable (``...q_proj.down.weight``), every backend's GEMM applies,
and peft can put LoRA adapters on ``up``/``down`` for recovery fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features)`` by two rank-``rank`` factors."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight this layer represents (computed, for inspection and merge)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> "LowRankLinear":
        """Build from ``up`` ``[out, r]`` and ``down`` ``[r, in]`` (cast to ``dtype``, default ``up``'s)."""
        dtype = dtype or up.dtype
        module = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=up.device, dtype=dtype)
        with torch.no_grad():
            module.down.weight.copy_(down.to(dtype))
            module.up.weight.copy_(up.to(dtype))
            if bias is not None:
                module.up.bias.copy_(bias.to(dtype))
        return module

    def to_linear(self) -> nn.Linear:
        """Merge the factors back into one dense ``nn.Linear`` (exact up to rounding)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.up.weight.device, dtype=self.up.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def replace_with_lowrank_linear(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Swap every ``nn.Linear`` (or GPT-2 ``Conv1D``) named in ``ranks`` for an (uninitialized) ``LowRankLinear``.

    Called by the transformers quantizer on the meta-device skeleton before weights load, like
    ``replace_with_vptq_linear``. Raises if a named module is missing or is not an ``nn.Linear``, so a
    config that does not match the architecture fails loudly instead of loading random weights.
    """
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        linear = modules.get(name)
        if linear is None:
            raise ValueError(
                f"quantization_config.ranks names module '{name}', which this model does not have. "
                "The checkpoint's config.json does not match its architecture."
            )
        if isinstance(linear, LowRankLinear):
            if linear.rank != rank:
                raise ValueError(f"module '{name}' already is a LowRankLinear of rank {linear.rank}, config says {rank}.")
            continue
        if isinstance(linear, nn.Linear):
            in_features, out_features = linear.in_features, linear.out_features
        elif isinstance(linear, Conv1D):  # GPT-2 style: weight stored as [in, out]
            in_features, out_features = linear.weight.shape
        else:
            raise ValueError(
                f"module '{name}' is a {type(linear).__name__}, expected nn.Linear (or GPT-2's Conv1D) to factorize."
            )
        if not 1 <= rank < min(in_features, out_features) + 1:
            raise ValueError(
                f"quantization_config.ranks['{name}'] = {rank} is not in [1, {min(in_features, out_features)}] "
                f"for a {out_features}x{in_features} weight."
            )
        replacement = LowRankLinear(
            in_features, out_features, rank, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        set_submodule(model, name, replacement)
    return model


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` by its merged dense ``nn.Linear`` (e.g. after recovery fine-tuning)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(model, name, module.to_linear())
    return model
