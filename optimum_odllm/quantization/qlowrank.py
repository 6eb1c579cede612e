"""``QuantizedLowRankLinear``: a ``LowRankLinear`` whose ``up``/``down`` factors are int8 or int4.

State-dict keys mirror ``LowRankLinear`` (``...q_proj.down.qweight``, ``...q_proj.up.scales``, ``...up.bias``)
and every buffer's name, dtype and shape is a function of the constructor arguments alone, so the loader can
build the module on the meta device from ``(in, out, rank, bits, group_size, bias)`` and load a safetensors
file into it bit-exactly. Kernel-specific layouts are derived on first use per (device, compute dtype) and
are not part of the state dict (see ``kernels.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..lowrank import LowRankLinear
from . import kernels
from .gptq import SCALE_DTYPE, QuantizedWeight, effective_group_size, quantize_lowrank_factors


def storage_shapes(in_features: int, out_features: int, bits: int, group_size: int | None) -> dict[str, tuple]:
    """``{buffer: (dtype, shape)}`` of one stored factor ``[out, in]`` (what the loader allocates)."""
    if bits == 8:
        return {"qweight": (torch.int8, (out_features, in_features)), "scales": (SCALE_DTYPE, (out_features,))}
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    groups = in_features // effective_group_size(in_features, group_size)
    return {
        "qweight": (torch.uint8, (out_features, in_features // 2)),
        "scales": (SCALE_DTYPE, (out_features, groups)),
        "zeros": (SCALE_DTYPE, (out_features, groups)),
    }


class QuantizedFactor(nn.Module):
    """One quantized ``nn.Linear(in_features, out_features)``: stored codes + bf16 scales, run by an integer kernel.

    Also usable alone as a dense int8/int4 linear (the benchmarks' stand-in for weight-only quantized models).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = 128,
                 bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = None if bits == 8 else effective_group_size(in_features, group_size)
        for name, (buf_dtype, shape) in storage_shapes(in_features, out_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        if not hasattr(self, "zeros"):
            self.zeros = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.get_default_dtype()))
        else:
            self.register_parameter("bias", None)
        self._prepared: dict[tuple, kernels.PreparedWeight] = {}

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantizedFactor":
        """Wrap the output of :func:`quantize_weight` (codes are packed into the portable storage layout)."""
        out_features, in_features = qw.shape
        module = cls(in_features, out_features, qw.bits, qw.group_size, bias is not None,
                     device=qw.qweight.device, dtype=None if bias is None else bias.dtype)
        with torch.no_grad():
            module.qweight.copy_(qw.qweight if qw.bits == 8 else kernels.pack_int4(qw.qweight))
            module.scales.copy_(qw.scales)
            if qw.bits == 4:
                module.zeros.copy_(qw.zeros)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weight the kernel multiplies by (reference and the LoRA/merge path)."""
        return kernels.dequantize_storage(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)

    def prepared(self, device: torch.device, x_dtype: torch.dtype) -> kernels.PreparedWeight:
        """Kernel layout for this device and activation dtype, rebuilt when the stored buffers change."""
        compute = kernels.compute_dtype_for(x_dtype, device, self.bits)
        stored = [t for t in (self.qweight, self.scales, self.zeros) if t is not None]
        key = (device, compute, *((t.data_ptr(), t._version, t.dtype) for t in stored))
        entry = self._prepared.get(key)
        if entry is None:
            self._prepared = {}  # stale layouts (old device, reloaded weights) are dropped, not accumulated
            entry = kernels.prepare(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                    self.in_features, compute)
            self._prepared[key] = entry
        return entry

    @property
    def kernel(self) -> str:
        """Name of the kernel a float32 input on this module's device would use now."""
        return self.prepared(self.qweight.device, torch.float32).kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = self.prepared(x.device, x.dtype)
        y = kernels.matmul(x.reshape(-1, self.in_features).to(prepared.compute_dtype), prepared)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantizedLowRankLinear(nn.Module):
    """``up(down(x))`` with both factors quantized: the quantized counterpart of ``LowRankLinear``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int | None = 128,
                 bias: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size
        self.down = QuantizedFactor(in_features, rank, bits, group_size, bias=False, device=device, dtype=dtype)
        self.up = QuantizedFactor(rank, out_features, bits, group_size, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @classmethod
    def from_lowrank(
        cls,
        module: LowRankLinear,
        covariance: torch.Tensor | None,
        bits: Literal[8, 4],
        group_size: int | None = 128,
        method: Literal["gptq", "rtn"] = "gptq",
        damping: float = 0.01,
    ) -> "QuantizedLowRankLinear":
        """Quantize a ``LowRankLinear``'s factors; ``covariance`` is its input covariance ``C`` (``[in, in]``)."""
        q_up, q_down = quantize_lowrank_factors(
            module.up.weight.detach(), module.down.weight.detach(), covariance, bits, group_size, method, damping
        )
        bias = None if module.up.bias is None else module.up.bias.detach()
        result = cls(module.in_features, module.out_features, module.rank, bits, group_size, bias is not None,
                     device=module.up.weight.device, dtype=None if bias is None else bias.dtype)
        result.down = QuantizedFactor.from_quantized(q_down)
        result.up = QuantizedFactor.from_quantized(q_up, bias)
        return result

    def dequantize(self, dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """Back to a float ``LowRankLinear`` (e.g. before LoRA recovery fine-tuning, which needs float factors)."""
        return LowRankLinear.from_factors(
            self.up.dequantized_weight(torch.float32), self.down.dequantized_weight(torch.float32),
            None if self.bias is None else self.bias.detach().float(), dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


def replace_with_quantized_lowrank(model: nn.Module, bits: int, group_size: int | None = 128) -> nn.Module:
    """Swap every ``LowRankLinear`` for an empty ``QuantizedLowRankLinear`` of the same shape (loader side).

    Meant for the meta-device skeleton after ``replace_with_lowrank_linear``: the quantized buffers are then
    filled by ``load_state_dict``/``from_pretrained``.
    """
    from ..lowrank import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            device = module.up.weight.device
            replacement = QuantizedLowRankLinear(
                module.in_features, module.out_features, module.rank, bits, group_size,
                bias=module.up.bias is not None, device=device, dtype=module.up.weight.dtype,
            )
            set_submodule(model, name, replacement)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``QuantizedLowRankLinear`` by its float ``LowRankLinear`` (the path to LoRA / merging)."""
    from ..lowrank import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLowRankLinear):
            target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            set_submodule(model, name, module.dequantize(target))
    return model


def refuse_lora_on_quantized(model: nn.Module) -> None:
    """Raise if ``model`` has quantized factors: LoRA recovery must run on ``dequantize_model(model)`` instead."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLowRankLinear)]
    if names:
        raise ValueError(
            f"{len(names)} modules (e.g. '{names[0]}') hold quantized low-rank factors; LoRA recovery fine-tuning "
            "needs float factors. Call optimum_odllm.quantization.dequantize_model(model) first, fine-tune, "
            "then quantize again."
        )
