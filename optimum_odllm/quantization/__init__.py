"""Quantized low-rank factors (issue 12): GPTQ/RTN quantization of ``up``/``down`` and the integer-kernel module."""

from .gptq import (
    QuantizedWeight,
    dequantize,
    effective_group_size,
    quantize_lowrank_factors,
    quantize_weight,
    up_covariance,
)
from .qlowrank import (
    QuantizedFactor,
    QuantizedLowRankLinear,
    dequantize_model,
    refuse_lora_on_quantized,
    replace_with_quantized_lowrank,
    storage_shapes,
)

__all__ = [
    "QuantizedFactor",
    "QuantizedLowRankLinear",
    "QuantizedWeight",
    "dequantize",
    "dequantize_model",
    "effective_group_size",
    "quantize_lowrank_factors",
    "quantize_weight",
    "refuse_lora_on_quantized",
    "replace_with_quantized_lowrank",
    "storage_shapes",
    "up_covariance",
]
