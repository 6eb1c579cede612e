"""The transformers-side loader: rebuilds low-rank modules before an OD-LLM checkpoint's weights load.

Registered under ``quant_method="odllm"`` when ``optimum_odllm`` is imported, so the standard
``AutoModelForCausalLM.from_pretrained(path)`` reads ``quantization_config`` from config.json, swaps
the factorized ``nn.Linear`` modules for :class:`LowRankLinear` on the meta device, and then loads
the ``up``/``down`` factors from safetensors like any other weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from .configuration import QUANT_METHOD, ODLLMConfig
from .lowrank import replace_with_lowrank_linear


if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
        return replace_with_lowrank_linear(model, self.quantization_config.ranks)

    def _process_model_after_weight_loading(self, model: "PreTrainedModel", **kwargs: Any) -> "PreTrainedModel":
        return model

    @property
    def is_trainable(self) -> bool:
        # The factors are ordinary float nn.Linear weights: full fine-tuning and LoRA both work.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True


def register() -> None:
    """Make transformers aware of ``quant_method="odllm"`` (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, ODLLMConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, ODLLMHfQuantizer)
