"""The transformers-side loader: rebuilds low-rank modules before an OD-LLM checkpoint's weights load.

Registered under ``quant_method="odllm"`` when ``optimum_odllm`` is imported, so the standard
``AutoModelForCausalLM.from_pretrained(path)`` reads ``quantization_config`` from config.json, swaps
the factorized ``nn.Linear`` modules for :class:`LowRankLinear` on the meta device (or, with
``factor_bits``, for :class:`~optimum_odllm.quantization.QuantizedLowRankLinear`), and then loads
the ``up``/``down`` factors (or their integer codes, scales and zeros) from safetensors like any other weights.

Loading *without* ``import optimum_odllm`` must never give a model with random projections. transformers
skips an unknown ``quant_method`` with a warning, builds plain ``nn.Linear`` layers and would initialize
them randomly; but it refuses a checkpoint tensor whose shape mismatches the model's. So every save of a
compressed model (ours, ``model.save_pretrained``, ``model.push_to_hub``) adds a zero-size *guard*
tensor under the dense ``<module>.weight`` key of each factorized module, plus a key whose name spells
the fix: plain transformers stops with a size-mismatch error whose report lists
``odllm_requires.pip_install_optimum-odllm.then.import_optimum_odllm``; our loader ignores the guards.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from .configuration import QUANT_METHOD, ODLLMConfig
from .linalg import check_finite
from .lowrank import LowRankLinear, merge_lowrank, replace_with_lowrank_linear
from .quantization import QuantizedLowRankLinear, dequantize_model, replace_with_quantized_lowrank
from .saving import is_save_leftover


if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Key of the zero-size tensor whose name tells a user of plain transformers what to do.
NOTE_KEY = "odllm_requires.pip_install_optimum-odllm.then.import_optimum_odllm.before_from_pretrained"
GUARD_SUFFIX = ".weight"


def guard_keys(ranks: dict[str, int]) -> list[str]:
    """The dense weight key of every factorized module: where the zero-size guards go."""
    return [name + GUARD_SUFFIX for name in ranks]


def _refuse_save_leftovers(checkpoint_files: Any) -> None:
    for file in checkpoint_files or ():
        leftover = next((parent for parent in Path(file).parents if is_save_leftover(parent)), None)
        if leftover is not None:
            raise ValueError(
                f"{leftover} was left behind by an interrupted OD-LLM save, it is not a model: load the directory "
                "it was saving into (or save again; the next save removes it)."
            )


class ODLLMHfQuantizer(HfQuantizer):
    """Loads pre-compressed OD-LLM checkpoints (compression itself is :class:`ODLLMCompressor`)."""

    requires_calibration = True
    quantization_config: ODLLMConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.quantization_config.is_compressed:
            raise ValueError(
                "This ODLLMConfig has no ranks: it describes a compression, not a compressed checkpoint. "
                "Compress the model with `ODLLMCompressor.from_pretrained(model, config=...).compress(data)` instead "
                "of passing the config to from_pretrained."
            )

    def _process_model_before_weight_loading(self, model: "PreTrainedModel", **kwargs: Any) -> "PreTrainedModel":
        _refuse_save_leftovers(kwargs.get("checkpoint_files"))
        model = replace_with_lowrank_linear(model, self.quantization_config.ranks)
        if self.quantization_config.factor_bits is not None:
            config = self.quantization_config
            model = replace_with_quantized_lowrank(model, config.factor_bits, config.factor_group_size)
        ignored = {re.escape(key) + "$" for key in guard_keys(self.quantization_config.ranks)} | {re.escape(NOTE_KEY)}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignored
        # transformers only *warns* about missing/unexpected keys (and re-initializes missing factors
        # randomly), so we check the factors against the safetensors headers before anything loads.
        check_checkpoint_factors(model, self.quantization_config.ranks, kwargs.get("checkpoint_files"))
        return model

    def _process_model_after_weight_loading(self, model: "PreTrainedModel", **kwargs: Any) -> "PreTrainedModel":
        for name, module in model.named_modules():
            if isinstance(module, (LowRankLinear, QuantizedLowRankLinear)):
                for key, tensor in module.state_dict().items():
                    if tensor.is_floating_point() and tensor.device.type != "meta":
                        check_finite(tensor, f"loaded factor {name}.{key}")
        return model

    @property
    def is_trainable(self) -> bool:
        # Float factors are ordinary nn.Linear weights: full fine-tuning and LoRA both work. Integer factors
        # (factor_bits) are buffers without gradients: dequantize_model(model) first.
        return self.quantization_config.factor_bits is None

    @property
    def is_qat_trainable(self) -> bool:
        return self.is_trainable

    @property
    def is_compileable(self) -> bool:
        # Plain nn.Linear factors: torch.compile / CUDA graphs (generate's static-cache path) apply as is.
        return True

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    def get_state_dict_and_metadata(self, model: "PreTrainedModel") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state dict plus the guards that make plain transformers refuse to load it (see module docs).

        Factors that are slices of a larger storage (the stacked ``down`` of
        :func:`~optimum_odllm.fused.fuse_shared_inputs`) are copied so that each key owns its bytes.
        """
        state = {}
        for key, tensor in model.state_dict().items():
            slice_of_more = tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
            state[key] = tensor.clone() if slice_of_more else tensor
        ranks = self.quantization_config.ranks
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        for key in guard_keys(ranks):
            state[key] = torch.zeros(0, dtype=dtype)
        state[NOTE_KEY] = torch.zeros(0, dtype=dtype)
        metadata = {"odllm": "low-rank factors: pip install optimum-odllm, then import optimum_odllm before from_pretrained"}
        return state, metadata

    def _dequantize(self, model: "PreTrainedModel", dtype: "torch.dtype | None" = None) -> "PreTrainedModel":
        """Merge every ``up @ down`` back into one ``nn.Linear`` (for runtimes that need one dense weight).

        Called by transformers' ``model.dequantize()``, which then drops ``quantization_config`` so that
        ``save_pretrained`` writes a plain dense checkpoint any transformers install can load.
        """
        quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLowRankLinear)}
        if quantized and dtype is None:  # the merged weight takes the dtype of the rest of the model
            dtype = next((p.dtype for n, p in model.named_parameters() if p.is_floating_point()
                          and not any(n.startswith(q + ".") for q in quantized)), torch.float32)
        model = dequantize_model(model, torch.float32)  # integer codes -> exact float32 factors
        merged = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
        model = merge_lowrank(model)
        if dtype is not None:
            for name in merged:
                model.get_submodule(name).to(dtype)
        return model


_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?:down|up)\.(?:weight|bias|qweight|scales|zeros)$")
#: safetensors header dtype names of the integer code tensors (their dtype must match exactly: a cast would
#: silently change the codes).
_INTEGER_DTYPES = {torch.int8: "I8", torch.uint8: "U8"}


def check_checkpoint_factors(model: "torch.nn.Module", ranks: dict[str, int], checkpoint_files: Any) -> None:
    """Raise naming the module if a checkpoint's factors are missing, extra or wrongly shaped.

    Reads only the safetensors headers (no tensor data). Refuses anything but ``.safetensors`` files:
    OD-LLM checkpoints never need pickle.
    """
    if not checkpoint_files:
        return
    files = [str(f) for f in checkpoint_files]
    unsafe = [f for f in files if not f.endswith(".safetensors")]
    if unsafe:
        raise ValueError(
            f"OD-LLM checkpoints are loaded from safetensors only (no pickle), but the weights are in {unsafe[0]}. "
            "Re-save the model with save_pretrained (safetensors is the default)."
        )
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
                dtypes[key] = handle.get_slice(key).get_dtype()
    problems: list[str] = []
    for name, rank in ranks.items():
        # The skeleton built from the config says what must be there (float or quantized factors).
        skeleton = model.get_submodule(name).state_dict()
        expected = {f"{name}.{key}": tuple(t.shape) for key, t in skeleton.items()}
        for key, shape in expected.items():
            wanted = _INTEGER_DTYPES.get(skeleton[key[len(name) + 1:]].dtype)
            if key not in shapes:
                problems.append(f"module '{name}': factor '{key}' is missing from the checkpoint")
            elif shapes[key] != shape:
                problems.append(
                    f"module '{name}': '{key}' has shape {list(shapes[key])}, expected {list(shape)} (rank {rank})"
                )
            elif wanted is not None and dtypes[key] != wanted:
                problems.append(f"module '{name}': '{key}' has dtype {dtypes[key]}, expected {wanted} (integer codes)")
        guard = name + GUARD_SUFFIX
        for key in shapes:
            if key.startswith(name + ".") and key not in expected and not (key == guard and shapes[key] == (0,)):
                problems.append(f"module '{name}': unexpected tensor '{key}' (a factorized module has only up/down)")
    own = {key for key, _ in model.named_parameters()} | {key for key, _ in model.named_buffers()}
    for key in shapes:
        match = _FACTOR_KEY.match(key)
        if match and match.group("module") not in ranks and key not in own:
            problems.append(
                f"module '{match.group('module')}': the checkpoint has factor '{key}' but "
                "quantization_config.ranks does not list this module"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            "This OD-LLM checkpoint does not match its quantization_config: " + "; ".join(problems[:5]) + more
            + ". The weights file is damaged or from another compression run: re-save or re-download it."
        )


def register() -> None:
    """Make transformers aware of ``quant_method="odllm"`` (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, ODLLMConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, ODLLMHfQuantizer)
