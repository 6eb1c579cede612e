"""``QuantizedLowRankLinear``: a ``LowRankLinear`` whose ``up``/``down`` factors are int8 or int4.

State-dict keys mirror ``LowRankLinear`` (``...q_proj.down.qweight``, ``...q_proj.up.scales``, ``...up.bias``)
and every buffer's name, dtype and shape is a function of the constructor arguments alone, so the loader can
build the module on the meta device from ``(in, out, rank, bits, group_size, bias)`` and load a safetensors
file into it bit-exactly. Kernel-specific layouts are derived on first use per (device, compute dtype) and
are not part of the state dict (see ``kernels.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..lowrank import LowRankLinear
from ..kernels import use_int_kernel
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
        self._drop_layouts()
        # fixed by the shape: decided once here, not on every forward
        self._triton_shape = kernels.triton_preferred_on_cuda(bits, out_features, in_features, self.group_size)

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

    def _drop_layouts(self) -> None:
        self._prepared: dict[tuple, kernels.PreparedWeight] = {}
        self._prepared_for: tuple = ()
        self._last_layout: tuple | None = None  # (device, activation dtype, layout): the eager fast path

    def _stored_signature(self) -> tuple:
        """What identifies the stored buffers' contents: a reload, move, cast or in-place write changes it.

        Read through ``_buffers`` (``nn.Module.__getattr__`` costs ~2 us a call, and a decode step of a
        Qwen2.5-0.5B-shaped model makes 336 factor calls)."""
        buffers = self._buffers
        signature = ()
        for name in ("qweight", "scales", "zeros"):
            t = buffers.get(name)
            if t is not None:  # inference tensors keep no version counter (and refuse in-place writes outside it)
                signature += (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)
        return signature

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_layouts()  # compiled code reads the cached layout without checking the stored buffers
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantizedFactor":
        self._drop_layouts()  # .to() / .cuda() / casts: same reason
        return super()._apply(fn, recurse)

    def prepared(self, device: torch.device, x_dtype: torch.dtype) -> kernels.PreparedWeight:
        """Kernel layout for this device and activation dtype, rebuilt when the stored buffers change.

        One layout is kept per (device, compute dtype): asking for another one (e.g. ``.kernel``, which asks for
        float32) must not free a layout that a captured CUDA graph still reads. All layouts are dropped together
        only when the stored buffers change (reloaded weights), which invalidates such graphs anyway.
        """
        if torch.compiler.is_compiling():
            compute = kernels.compute_dtype_for(x_dtype, device, self.bits)
            # Inside torch.compile the data-pointer check would break the graph at every factor. The layout an
            # eager call cached (generate's prefill runs eagerly first; prepare_kernel_layouts) is read as a graph
            # input. Loading, moving or casting the module drops the cache (_load_from_state_dict, _apply); an
            # in-place write to the buffers or a reassigned buffer is only seen here after one eager call (the
            # signature check runs eagerly). Without a cached layout the dequantized product runs in the graph:
            # building the kernel layout there would repack on every call, and Inductor cannot lower aten's CPU
            # integer kernels on scales computed in the graph (test_inductor_compiles_float32_model_...).
            entry = self._prepared.get((device, compute))
            if entry is not None:
                return entry
            return kernels.dequantized_layout(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                              compute)
        signature = self._stored_signature()
        if signature != getattr(self, "_prepared_for", None):  # getattr: modules pickled before this attribute
            self._drop_layouts()  # reloaded or moved weights: every layout is stale
            self._prepared_for = signature
        last = getattr(self, "_last_layout", None)
        if last is not None and last[0] == device and last[1] == x_dtype:
            return last[2]  # the common case: the same device and dtype as the previous call
        compute = kernels.compute_dtype_for(x_dtype, device, self.bits)
        entry = self._prepared.get((device, compute))
        if entry is None:
            entry = kernels.prepare(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                    self.in_features, compute)
            self._prepared[(device, compute)] = entry
        self._last_layout = (device, x_dtype, entry)
        return entry

    @property
    def stored_weights(self) -> int:
        """Weights this factor stands for (``out * in``): what ``count_parameters`` counts for it."""
        return self.in_features * self.out_features

    @property
    def kernel(self) -> str:
        """Name of the kernel a float32 input on this module's device would use now."""
        return self.prepared(self.qweight.device, torch.float32).kernel

    #: Set False to keep the aten/cuBLAS paths on CUDA (benchmarks compare them).
    prefer_triton: bool = True

    @property
    def triton_ready(self) -> bool:
        """Whether few-token products on CUDA take the Triton kernel (int8; int4 only where tinygemm cannot)."""
        return self.prefer_triton and self._triton_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.triton_ready and use_int_kernel(x2d, x2d.shape[0]):
            y = torch.ops.odllm.int_weight_mm(x2d, self.qweight, self.scales, self.zeros, self.bits,
                                              self.group_size or 0)
        else:
            prepared = self.prepared(x.device, x.dtype)
            if x2d.dtype != prepared.compute_dtype:  # skipping no-op casts: ~3 us a call on CPU
                x2d = x2d.to(prepared.compute_dtype)
            y = kernels.matmul(x2d, prepared)
        y = y.reshape(*x.shape[:-1], self.out_features)
        bias = self._parameters["bias"]
        if bias is not None:
            y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        return y if y.dtype == x.dtype else y.to(x.dtype)

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
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None,
        covariance: torch.Tensor | None,
        bits: Literal[8, 4],
        group_size: int | None = 128,
        method: Literal["gptq", "rtn"] = "gptq",
        damping: float = 0.01,
    ) -> "QuantizedLowRankLinear":
        """Quantize float factors ``up [out, r]``, ``down [r, in]`` (any float dtype; the solver's float64 ones
        lose nothing to an intermediate cast); ``covariance`` is the input covariance ``C`` (``[in, in]``)."""
        q_up, q_down = quantize_lowrank_factors(up.detach(), down.detach(), covariance, bits, group_size, method, damping)
        result = cls(down.shape[1], up.shape[0], up.shape[1], bits, group_size, bias is not None,
                     device=up.device, dtype=None if bias is None else bias.dtype)
        result.down = QuantizedFactor.from_quantized(q_down)
        result.up = QuantizedFactor.from_quantized(q_up, None if bias is None else bias.detach())
        return result

    @classmethod
    def from_lowrank(cls, module: LowRankLinear, covariance: torch.Tensor | None, bits: Literal[8, 4],
                     *args: Any, **kwargs: Any) -> "QuantizedLowRankLinear":
        """Quantize a ``LowRankLinear``'s factors; ``covariance`` is its input covariance ``C`` (``[in, in]``);
        ``group_size``, ``method``, ``damping`` as in :meth:`from_factors`."""
        return cls.from_factors(module.up.weight, module.down.weight, module.up.bias, covariance, bits, *args, **kwargs)

    def relative_output_error(self, up: torch.Tensor, down: torch.Tensor, covariance: torch.Tensor) -> float:
        """``tr(D C D^T) / tr(W C W^T)`` with ``W = up @ down`` (the float factors) and ``D`` = W minus this
        module's dequantized weight: the output energy the rounding costs, on the calibration inputs.
        Computed through the factors (``[out, 2r]`` times ``[2r, in]``), never the dense ``[out, in]`` weight."""
        c = covariance.to(torch.float64)
        a = torch.cat([up.to(torch.float64), -self.up.dequantized_weight(torch.float64)], dim=1)
        b = torch.cat([down.to(torch.float64), self.down.dequantized_weight(torch.float64)], dim=0)
        bcb = b @ c @ b.T
        error = float(torch.einsum("ij,jk,ik->", a, bcb, a))
        r = up.shape[1]
        energy = float(torch.einsum("ij,jk,ik->", a[:, :r], bcb[:r, :r], a[:, :r]))
        return error / energy if energy > 0 else 0.0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """Back to a float ``LowRankLinear`` (e.g. before LoRA recovery fine-tuning, which needs float factors)."""
        return LowRankLinear.from_factors(
            self.up.dequantized_weight(torch.float32), self.down.dequantized_weight(torch.float32),
            None if self.bias is None else self.bias.detach().float(), dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self._modules  # not self.up / self.down: nn.Module.__getattr__ costs ~2 us a lookup on CPU
        return factors["up"](factors["down"](x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")


def prepare_kernel_layouts(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Build every integer factor's kernel layout now, for activations of ``dtype`` on the factor's device.

    Call it before ``torch.compile`` (``recsys.compile_for_search`` does): a compiled graph reads the layouts an
    eager call cached and falls back to the slower dequantized product where none is cached. ``dtype`` defaults to
    the model's (``model.dtype``, else its first floating parameter). Returns the number of factors prepared.
    """
    if dtype is None:
        dtype = getattr(model, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    factors = [m for m in model.modules() if isinstance(m, QuantizedFactor)]
    for factor in factors:
        factor.prepared(factor.qweight.device, dtype)
    return len(factors)


def quantized_state_shapes(in_features: int, out_features: int, rank: int, bits: int, group_size: int | None,
                           bias: bool) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """``{state-dict suffix: (dtype, shape)}`` of a ``QuantizedLowRankLinear`` (``"down.qweight"``, ...); the bias
    dtype is ``None`` (the model's). What the loader and the resume check a checkpoint against."""
    out: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}
    for part, (fin, fout) in (("down", (in_features, rank)), ("up", (rank, out_features))):
        for key, spec in storage_shapes(fin, fout, bits, group_size).items():
            out[f"{part}.{key}"] = spec
    if bias:
        out["up.bias"] = (None, (out_features,))
    return out


def install_quantized_factors(
    model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor, covariance: torch.Tensor | None,
    bits: Literal[8, 4], group_size: int | None = 128, method: Literal["gptq", "rtn"] = "gptq",
) -> QuantizedLowRankLinear:
    """Write-back of quantized factors: replace the module ``name`` (dense or ``LowRankLinear``) by a
    :class:`QuantizedLowRankLinear`, keeping its bias (in its dtype), device and train/eval mode."""
    from ..lowrank import set_submodule
    from ..targets import linear_weight

    current = model.get_submodule(name)
    if isinstance(current, LowRankLinear):
        device, bias = current.up.weight.device, current.up.bias
    else:
        device, bias = linear_weight(current).device, current.bias
    replacement = QuantizedLowRankLinear.from_factors(
        up.to(device), down.to(device), None if bias is None else bias.detach(),
        None if covariance is None else covariance.to(device), bits, group_size, method,
    )
    replacement.train(current.training)
    set_submodule(model, name, replacement)
    return replacement


def load_quantized_factors(model: nn.Module, name: str, rank: int, bits: int, group_size: int | None,
                           tensors: dict[str, torch.Tensor]) -> QuantizedLowRankLinear:
    """Replace the dense module ``name`` by a :class:`QuantizedLowRankLinear` holding the stored ``tensors``
    (``{"down.qweight": ..., ...}``, no bias: the dense module's is kept). Used to resume a compression."""
    from ..lowrank import set_submodule
    from ..targets import linear_shape, linear_weight

    dense = model.get_submodule(name)
    in_features, out_features = linear_shape(dense)
    weight = linear_weight(dense)
    module = QuantizedLowRankLinear(in_features, out_features, rank, bits, group_size, dense.bias is not None,
                                    device=weight.device, dtype=weight.dtype)
    state = {k: v.to(weight.device) for k, v in tensors.items()}
    if dense.bias is not None:
        state["up.bias"] = dense.bias.detach()
    module.load_state_dict(state, strict=True)
    module.train(dense.training)
    set_submodule(model, name, module)
    return module


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
    """Replace every ``QuantizedLowRankLinear`` by its float ``LowRankLinear`` (the path to LoRA / merging);
    ``dtype`` defaults to each module's bias dtype, else float32."""
    from ..lowrank import set_submodule

    found = False
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLowRankLinear):
            target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            set_submodule(model, name, module.dequantize(target))
            found = True
    if found:  # saving must describe float factors now, or the checkpoint would not load
        _set_factor_storage(model, None, None, None)
    return model


def _odllm_config(model: nn.Module) -> Any:
    """The model's OD-LLM ``quantization_config``, or None for any other model."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config if getattr(config, "quant_method", None) == "odllm" else None


def _set_factor_storage(model: nn.Module, bits: int | None, group_size: int | None, quantizer: str | None) -> None:
    """Record how the factors are stored in the model's OD-LLM ``quantization_config`` (and its quantizer)."""
    from ..hf_quantizer import ODLLMHfQuantizer

    config = _odllm_config(model)
    if config is None:
        return
    updates = {"factor_bits": bits}
    if bits is not None:
        updates.update(factor_group_size=group_size, factor_quantizer=quantizer)
    new_config = type(config).from_dict({**config.to_dict(), **updates})
    model.config.quantization_config = new_config
    model.hf_quantizer = ODLLMHfQuantizer(new_config, pre_quantized=True)


def quantize_factors(model: nn.Module, bits: Literal[8, 4], group_size: int = 128) -> nn.Module:
    """Round the float factors of a compressed model to int8/int4 codes (RTN), in place: the step after recovery.

    Compression quantizes with GPTQ while it still holds each module's input covariance; recovery fine-tuning
    needs float factors (integer ones are refused), so a recovered model is quantized afterwards by plain
    rounding, here. The model's ``quantization_config`` is updated (``factor_bits``, ``factor_group_size``,
    ``factor_quantizer="rtn"``), so ``save_pretrained`` writes a checkpoint ``from_pretrained`` loads as the
    quantized model. On the ML-100K recommender this recipe kept 100.8% of dense NDCG@10 at ratio 0.5 + int8
    (docs/recsys.md).
    """
    from ..lowrank import set_submodule

    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    config = _odllm_config(model)
    if config is None:
        raise ValueError("quantize_factors needs an OD-LLM compressed model (ODLLMCompressor output or an OD-LLM "
                         "checkpoint loaded with `import optimum_odllm`).")
    if any(isinstance(m, QuantizedLowRankLinear) for m in model.modules()) or config.factor_bits is not None:
        raise ValueError("the factors are already integer codes; dequantize_model(model) first to re-quantize.")
    factors = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not factors:
        raise ValueError("the model has no LowRankLinear factors to quantize.")
    for name, module in factors:
        replacement = QuantizedLowRankLinear.from_lowrank(module, None, bits, group_size, "rtn")  # bias dtype kept
        replacement.train(module.training)
        set_submodule(model, name, replacement)
    _set_factor_storage(model, bits, group_size, "rtn")
    return model


def refuse_lora_on_quantized(model: nn.Module) -> None:
    """Raise if ``model`` has quantized factors: recovery fine-tuning (LoRA or full factors) must run on
    ``dequantize_model(model)`` instead (integer codes have no gradients)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLowRankLinear)]
    if names:
        raise ValueError(
            f"{len(names)} modules (e.g. '{names[0]}') hold quantized (integer) low-rank factors; recovery "
            "fine-tuning (LoRA or full factors) needs float factors. Call "
            "optimum_odllm.quantization.dequantize_model(model) first and fine-tune that; its float factors can "
            "be quantized again with QuantizedLowRankLinear.from_lowrank (method='rtn' needs no data)."
        )
