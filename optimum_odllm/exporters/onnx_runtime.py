"""Run a model exported by :func:`~optimum_odllm.exporters.export_onnx` in ONNX Runtime (CPU by default).

``OrtCausalLM(directory)`` can be passed wherever the recommender expects a transformers model:
``constrained_beam_search(OrtCausalLM(d), prompts, trie)`` or ``recsys.evaluate_recommender(OrtCausalLM(d), ...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .common import read_layout, require_extra
from .onnx import ONNX_FILE
from .runner import FlatCacheRunner


class OrtCausalLM(FlatCacheRunner):
    """An ONNX Runtime session over ``model.onnx`` with the recommender-facing model interface."""

    def __init__(self, directory: str | Path, num_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        require_extra("export", "Running an ONNX export", "onnxruntime")
        import onnxruntime as ort

        directory = Path(directory)
        self.layout = read_layout(directory)
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(directory / ONNX_FILE), options, providers=list(providers))
        self.directory = directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "OrtCausalLM":
        return cls(directory, **kwargs)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {name: np.ascontiguousarray(t.numpy()) for name, t in zip(self.layout.input_names, inputs)}
        return [torch.from_numpy(out) for out in self.session.run(self.layout.output_names, feeds)]
