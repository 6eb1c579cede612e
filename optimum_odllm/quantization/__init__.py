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
    install_quantized_factors,
    load_quantized_factors,
    prepare_kernel_layouts,
    quantize_factors,
    quantized_state_shapes,
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
    "install_quantized_factors",
    "load_quantized_factors",
    "prepare_kernel_layouts",
    "quantize_lowrank_factors",
    "quantize_factors",
    "quantize_weight",
    "quantized_state_shapes",
    "refuse_lora_on_quantized",
    "replace_with_quantized_lowrank",
    "storage_shapes",
    "up_covariance",
]
