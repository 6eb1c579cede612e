"""Export a (compressed) causal LM to ONNX with KV-cache inputs/outputs, keeping the low-rank factors.

Uses ``torch.onnx.export(dynamo=True)`` (``torch.export`` underneath): the traced graph keeps each
``LowRankLinear`` as two MatMuls, so the file is as small as the compressed checkpoint and ONNX Runtime
runs the two thin GEMMs. Dense runtimes that need one weight per projection should export the
model with ``dequantize=True`` (``model.dequantize()``) instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..saving import staged_directory
from .common import (
    FlatCacheCausalLM, check_signature, dynamic_shapes, example_inputs, export_artifacts, load_for_export,
    require_extra, write_sidecars,
)


ONNX_FILE = "model.onnx"


def export_onnx(model_or_path: Any, output_dir: str | Path, *, tokenizer: Any = None,
                item_index: str | Path | None = None, opset: int | None = None, optimize: bool = True,
                dequantize: bool = False, all_logits: bool = False) -> Path:
    """Write ``model.onnx`` (factored graph, KV cache in and out) plus tokenizer, config and item index.

    ``model_or_path`` is a compressed (or dense) model, or the directory it was saved to. The tokenizer and
    ``item_index.json`` are taken from that directory unless given. ``dequantize`` merges the factors first
    (for runtimes that need dense weights); ``all_logits`` returns logits for every position instead of the
    last one only. Returns the path of ``model.onnx``.
    Needs the ``export`` extra (``pip install "optimum-odllm[export]"``: onnx, onnxscript, onnxruntime).
    """
    require_extra("export", "ONNX export", "onnx", "onnxscript")
    model, source = load_for_export(model_or_path, dequantize=dequantize)
    artifacts = export_artifacts(model, source, tokenizer, item_index)  # checked before the expensive export
    wrapper = FlatCacheCausalLM(model, all_logits=all_logits)
    layout = wrapper.layout
    check_signature(wrapper)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter (deprecated kwargs, torchvision ops) is not for users
        program = torch.onnx.export(
            wrapper, example_inputs(layout), dynamo=True, dynamic_shapes=dynamic_shapes(layout),
            input_names=layout.input_names, output_names=layout.output_names, opset_version=opset,
            optimize=optimize, verbose=False,
        )
    # staged like a model save: files already in output_dir stay, nothing half-written, the source is refused
    with staged_directory(output_dir, protected=[source]) as staging:
        program.save(str(staging / ONNX_FILE))  # weights over 2 GiB go to model.onnx.data beside it (protobuf's limit)
        write_sidecars(model, source, staging, tokenizer=tokenizer, artifacts=artifacts,
                       format="onnx", file=ONNX_FILE, all_logits=all_logits)
    return Path(output_dir) / ONNX_FILE

