"""Export a (compressed) causal LM to an ExecuTorch ``.pte`` (XNNPACK) and run it with ExecuTorch's runtime.

``torch.export`` keeps each ``LowRankLinear`` as two linears, which XNNPACK runs as two thin GEMMs. The
program has the same flat KV-cache signature as the ONNX export; ExecuTorch plans memory for the largest
shapes, so batch and sequence length get upper bounds (``max_batch``, ``max_seq_len``) at export time.
Needs the ``executorch`` extra (``pip install "optimum-odllm[executorch]"``: executorch 1.5.1, torchao 0.18).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..saving import staged_directory
from .common import (
    METADATA_FILE, FlatCacheCausalLM, check_signature, example_inputs, load_for_export, read_layout, require_extra,
    export_artifacts, write_sidecars,
)
from .runner import FlatCacheRunner


PTE_FILE = "model.pte"


def executorch_dynamic_shapes(layout: Any, max_batch: int, max_seq_len: int) -> dict[str, Any]:
    """Bounded dims: ExecuTorch sizes its buffers for the maxima; a call beyond them is refused at run time."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("sequence", min=1, max=max_seq_len)
    past = Dim("past_sequence", min=0, max=max_seq_len - 1)  # at least one new token per call
    total = Dim("total_sequence", min=1, max=max_seq_len)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in layout.past_names),
    }


def export_executorch(model_or_path: Any, output_dir: str | Path, *, max_batch: int = 32,
                      max_seq_len: int | None = None, tokenizer: Any = None,
                      item_index: str | Path | None = None, dequantize: bool = False,
                      all_logits: bool = False) -> Path:
    """Write ``model.pte`` (XNNPACK-delegated, factored, KV cache in and out) plus tokenizer, config, item index.

    ``max_batch`` must cover the beam search's decode batch (users per call x beams); ``max_seq_len``
    (default: the model's ``max_position_embeddings``, at most 512) bounds prompt plus generated tokens.
    ``dequantize`` and ``all_logits`` as in :func:`~optimum_odllm.exporters.onnx.export_onnx`.
    """
    require_extra("executorch", "ExecuTorch export", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    import torch.fx.experimental._config as fx_config

    model, source = load_for_export(model_or_path, dequantize=dequantize)
    artifacts = export_artifacts(model, source, tokenizer, item_index)  # checked before the expensive export
    max_seq_len = max_seq_len or min(int(getattr(model.config, "max_position_embeddings", 512)), 512)
    wrapper = FlatCacheCausalLM(model, all_logits=all_logits)
    layout = wrapper.layout
    check_signature(wrapper)
    shapes = executorch_dynamic_shapes(layout, max_batch, max_seq_len)
    # Sizes 0 and 1 (empty cache at prefill, one token per decode step) must stay dynamic, not specialized.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(wrapper, example_inputs(layout), dynamic_shapes=shapes, strict=False)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    # staged like a model save: files already in output_dir stay, nothing half-written, the source is refused
    with staged_directory(output_dir, protected=[source]) as staging:
        (staging / PTE_FILE).write_bytes(lowered.buffer)
        write_sidecars(model, source, staging, tokenizer=tokenizer, artifacts=artifacts, format="executorch",
                       file=PTE_FILE, backend="xnnpack", max_batch=max_batch, max_seq_len=max_seq_len,
                       all_logits=all_logits)
    return Path(output_dir) / PTE_FILE


class EtCausalLM(FlatCacheRunner):
    """ExecuTorch's Python runtime over ``model.pte``, with the recommender-facing model interface."""

    def __init__(self, directory: str | Path, num_threads: int | None = None):
        """``num_threads`` resizes ExecuTorch's threadpool (XNNPACK's threads), which is process-wide."""
        require_extra("executorch", "Running an ExecuTorch export", "executorch")
        from executorch.runtime import Runtime

        if num_threads is not None:
            from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

            if _threadpool_get_thread_count() != num_threads:
                _unsafe_reset_threadpool(num_threads)

        directory = Path(directory)
        self.layout = read_layout(directory)
        info = json.loads((directory / METADATA_FILE).read_text())
        self.max_batch, self.max_seq_len = int(info["max_batch"]), int(info["max_seq_len"])
        self.program = Runtime.get().load_program(str(directory / PTE_FILE))
        self.method = self.program.load_method("forward")
        self.directory = directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "EtCausalLM":
        return cls(directory, **kwargs)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        batch, total = inputs[1].shape  # the attention mask covers past + new tokens
        if batch > self.max_batch or total > self.max_seq_len:
            raise ValueError(
                f"this .pte was exported for batch <= {self.max_batch} and <= {self.max_seq_len} tokens, got batch "
                f"{batch} with {total} tokens: re-export with export_executorch(..., max_batch=, max_seq_len=) or "
                "call with fewer users per batch (the beam search's decode batch is users x beams)."
            )
        # Outputs alias the program's planned buffers, which the next call overwrites: keep copies.
        return [out.clone() for out in self.method.execute([t.contiguous() for t in inputs])]
