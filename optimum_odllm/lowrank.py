"""The low-rank layer and the module surgery around it (replace / merge).

``LowRankLinear`` computes ``up(down(x))``: ``down`` is ``[rank, in]`` (``Sigma_r^1/2 V_r^T S^-1``) and
``up`` is ``[out, rank]`` (``U_r Sigma_r^1/2``) plus the original bias. Both are plain ``nn.Linear``
children, so state-dict keys are readable (``...q_proj.down.weight``), every backend's GEMM applies,
and peft can put LoRA adapters on ``up``/``down`` for recovery fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .targets import FACTORIZABLE, linear_shape, linear_weight


class LowRankLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear(in_features, out_features)`` by two rank-``rank`` factors."""

    # set per instance by optimum_odllm.fused (siblings share their GEMMs). A class-level default, read as a plain
    # attribute: dynamo then guards on it, so a fused model never reuses the graph compiled for an unfused one of
    # the same architecture (with ``self.__dict__.get`` it did: the fused model silently ran unfused)
    _odllm_group = None

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
        group = self._odllm_group
        if group is not None:
            out = group(self, x)  # None: the group steps aside (a gradient, a wrapped factor)
            if out is not None:
                return out
        down, up = self._modules["down"], self._modules["up"]  # not nn.Module.__getattr__: eager decode pays per call
        if not (_is_plain_linear(down) and _is_plain_linear(up)):
            return up(down(x))  # adapters (peft) or hooks on a factor: keep module calls
        if not x.is_cuda:  # the Triton kernels are CUDA-only: two plain GEMMs, nothing to decide
            return F.linear(F.linear(x, down.weight), up.weight, up.bias)
        return lowrank_outputs(x, down.weight, [up.weight], [up.bias])[0]

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


def needs_grad(module: LowRankLinear) -> bool:
    """Whether any factor of ``module`` takes a gradient (read through ``_modules``: called per forward)."""
    down, up = module._modules["down"], module._modules["up"]
    return any(p.requires_grad for p in (*down.parameters(), *up.parameters()))


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward nobody wraps, so calling ``F.linear`` on its weight is equivalent."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def lowrank_outputs(
    x: torch.Tensor, down: torch.Tensor, ups: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``up_g(down_g(x))`` for projections whose ``down`` factors are stacked in ``down`` (rows in order).

    One ``down`` GEMM for all of them, then each ``up``. Calls ``F.linear`` directly (no module calls:
    Python overhead is what eager decoding pays for). On CUDA at small token counts both steps run as
    the Triton kernels of :mod:`optimum_odllm.kernels` (one launch each, whatever the group size).
    """
    lead = x.shape[:-1]
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if kernels.use_kernels(x, tokens) and down.dtype == x.dtype and len(ups) <= kernels.MAX_GROUPS and (
        all(b is not None for b in biases) or all(b is None for b in biases)
    ):
        t = kernels.lowrank_down(x.reshape(tokens, x.shape[-1]), down)
        y = kernels.grouped_up(t, list(ups), [b for b in biases if b is not None])
        return [part.reshape(*lead, part.shape[-1]) for part in y.split([u.shape[0] for u in ups], dim=-1)]
    t = F.linear(x, down)
    parts = t.split([u.shape[1] for u in ups], dim=-1) if len(ups) > 1 else (t,)
    return [F.linear(part, up, bias) for part, up, bias in zip(parts, ups, biases)]


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
        if not isinstance(linear, FACTORIZABLE):
            raise ValueError(
                f"module '{name}' is a {type(linear).__name__}, expected nn.Linear (or GPT-2's Conv1D) to factorize."
            )
        in_features, out_features = linear_shape(linear)
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


def install_factors(model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """Write-back: replace the dense module ``name`` by a :class:`LowRankLinear` holding ``up @ down``.

    The factors take the dense weight's dtype and device and keep its bias; the new module inherits its
    train/eval mode.
    """
    dense = model.get_submodule(name)
    weight = linear_weight(dense)
    bias = None if dense.bias is None else dense.bias.detach()
    replacement = LowRankLinear.from_factors(up.to(weight.device), down.to(weight.device), bias, dtype=weight.dtype)
    replacement.train(dense.training)
    set_submodule(model, name, replacement)
    return replacement


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every ``LowRankLinear`` by its merged dense ``nn.Linear`` (e.g. after recovery fine-tuning)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(model, name, module.to_linear())
    return model
