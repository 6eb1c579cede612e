"""Export compressed models to device runtimes (ONNX Runtime, ExecuTorch) with the low-rank factors kept.

Submodules import their runtime only when used, so ``import optimum_odllm.exporters`` needs neither.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OrtCausalLM", "export_executorch", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    if name == "OrtCausalLM":
        from .onnx_runtime import OrtCausalLM

        return OrtCausalLM
    if name == "export_executorch":
        from .executorch import export_executorch

        return export_executorch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
