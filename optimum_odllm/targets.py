"""Which modules to compress: the decoder blocks, the projections inside them, and their shapes.

Everything that knows about layer types lives here: ``nn.Linear``, GPT-2's transposed ``Conv1D``,
quantized layers we refuse, and how the decoder-layer list is found. To support an architecture whose
block list is not found automatically, pass ``ODLLMConfig(block_name_to_compress="transformer.blocks")``;
to support another projection type, teach :func:`linear_weight` and :data:`FACTORIZABLE` about it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .configuration import QUANT_METHOD
from .linalg import check_finite
from .ranks import ModuleShape

#: Module types whose weight OD-LLM factorizes.
FACTORIZABLE: tuple[type, ...] = (nn.Linear, Conv1D)
#: Quantized layer types (bitsandbytes, GPTQ/AWQ kernels) that cannot be factorized.
QUANTIZED_LAYER_NAMES = frozenset({"Linear4bit", "Linear8bitLt", "QuantLinear"})


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (stored transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features


def find_decoder_layers(model: nn.Module, block_name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``model.layers``, ``transformer.h``, ...).

    With ``block_name`` that exact module is used. Otherwise we take the ModuleList whose length equals
    ``config.num_hidden_layers`` (or the longest one), which works for Llama/Qwen2/Mistral/Phi/Gemma/GPT-2
    style models without per-architecture code.
    """
    if block_name is not None:
        try:
            blocks = model.get_submodule(block_name)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList) or not len(blocks):
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
            raise ValueError(
                f"block_name_to_compress={block_name!r} is not a non-empty nn.ModuleList of {type(model).__name__}. "
                f"Its ModuleLists: {lists[:8]}."
            )
        return block_name, blocks
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of decoder layers; OD-LLM needs a decoder-only LM "
            "(or name the block list with block_name_to_compress)."
        )
    matching = [c for c in candidates if expected is not None and len(c[1]) == expected]
    return (matching or sorted(candidates, key=lambda c: -len(c[1])))[0]


def matches(name: str, patterns: list[str]) -> bool:
    """``name`` ends with one of the dotted suffixes, or contains one as a whole path component."""
    return any(name == p or name.endswith("." + p) or ("." + p + ".") in ("." + name + ".") for p in patterns)


def refuse_already_quantized(model: nn.Module) -> None:
    """Raise if the model is quantized, OD-LLM-compressed or carries adapters: OD-LLM needs dense float weights."""
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        method = getattr(method, "value", method)
        if method == QUANT_METHOD:
            raise ValueError(
                "This model is already OD-LLM-compressed. Re-compressing low-rank factors is not supported: "
                "compress the original dense model again with a smaller ratio instead."
            )
        raise ValueError(
            f"This model is already quantized with '{method}'. OD-LLM factorizes dense float weights: "
            "load the unquantized checkpoint and compress that."
        )
    ours = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("optimum_odllm.")})
    if ours:  # LowRankLinear, or the fused inference modules built from it
        raise ValueError(
            f"This model already contains {', '.join(ours)} modules (OD-LLM-compressed). Compress the original "
            "dense model instead."
        )
    adapters = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")})
    if adapters:
        raise ValueError(
            f"This model carries peft adapters ({', '.join(adapters[:3])}). Merge them first "
            "(model = model.merge_and_unload()) and compress the merged dense model."
        )


def select_targets(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """The modules to factorize, by full name, after checking the model can be compressed at all."""
    refuse_already_quantized(model)
    layers_name, _ = find_decoder_layers(model, config.block_name_to_compress)
    found: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name.startswith(layers_name + "."):
            continue
        if isinstance(module, FACTORIZABLE):
            found[name] = module
        elif type(module).__name__ in QUANTIZED_LAYER_NAMES:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(f"Quantized layers cannot be factorized: {unsupported[:3]}. Compress the dense model.")
    if config.target_modules is not None:
        unknown = [p for p in config.target_modules if not any(matches(n, [p]) for n in found)]
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in found})
            raise ValueError(
                f"target_modules {unknown} match no nn.Linear inside the decoder layers '{layers_name}'. "
                f"Available module names: {suffixes}."
            )
        found = {n: m for n, m in found.items() if matches(n, config.target_modules)}
    if config.modules_to_not_convert:
        found = {n: m for n, m in found.items() if not matches(n, config.modules_to_not_convert)}
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear (or Conv1D) layers inside its decoder layers "
            f"'{layers_name}' to compress (after target_modules/modules_to_not_convert)."
        )
    for name, module in found.items():
        weight = linear_weight(module)
        if weight.device.type == "meta":
            raise ValueError(
                f"The weight of {name} is on the meta device (offloaded or not loaded). Load the whole model "
                "into memory (no disk offload in device_map) before compressing."
            )
        if not weight.is_floating_point():
            raise ValueError(f"The weight of {name} has dtype {weight.dtype}; OD-LLM needs float weights.")
        check_finite(weight, f"weight of {name}")
    return found


def module_shapes(targets: dict[str, nn.Module]) -> list[ModuleShape]:
    return [ModuleShape(name, *linear_shape(module)) for name, module in targets.items()]


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the input embedding matrix (what token ids must stay below), else ``config.vocab_size``."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return embeddings.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)
