"""optimum-odllm: OD-LLM compression of LLM-based sequential recommenders for on-device inference.

Importing this package registers ``quant_method="odllm"`` with transformers, so compressed
checkpoints load with the standard ``AutoModelForCausalLM.from_pretrained``.
"""

from .configuration import ODLLMConfig
from .hf_quantizer import ODLLMHfQuantizer, register as _register
from .lowrank import LowRankLinear, merge_lowrank, replace_with_lowrank_linear
from .compressor import CompressionReport, ODLLMCompressor
from .utils import count_parameters

_register()

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "LowRankLinear",
    "ODLLMCompressor",
    "ODLLMConfig",
    "ODLLMHfQuantizer",
    "count_parameters",
    "merge_lowrank",
    "replace_with_lowrank_linear",
]
