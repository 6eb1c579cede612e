"""Compile a recommender's forward for the constrained beam search (CPU inference).

On a CPU the eager search of a small recommender spends a large share of each step outside the matrix products:
RMSNorm, rotary embeddings, SiLU, residual adds and the KV-cache concatenations are each one pass over memory.
That share is the same for a dense and a low-rank model, so it also caps what the smaller factors can gain.
``torch.compile`` (Inductor) fuses those passes. On the ML-100K recommenders (fp32, one thread, 128 users; 2 x 256 /
4 x 256 layers) it made the OD-LLM model's search 1.41x / 1.38x faster and the dense model's 1.28x / 1.37x, with
the same ranked lists; OD-LLM over dense, both compiled: 1.34x / 1.28x (benchmarks/README.md, section 4i).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

_MARK = "_odllm_compiled_for_search"


def compile_for_search(model: PreTrainedModel, backend: str = "inductor", dynamic: bool = True) -> PreTrainedModel:
    """Replace ``model.forward`` by its ``torch.compile`` version, in place, and return ``model``.

    The model itself stays a ``PreTrainedModel`` (unlike ``torch.compile(model)``): the beam search still
    recognises it and keeps one shared copy of each prompt's cache (tree attention), and ``save_pretrained``
    saves the same weights. ``dynamic=True`` compiles once for all prompt lengths, batch sizes and cache lengths
    instead of once per shape. The first search pays the compilation (about 40 s for the ML-100K recommender on
    a 2-core CPU); Inductor on CPU needs a C++ compiler. Calling it twice compiles once; ``del model.forward``
    undoes it. Several compiled models of one architecture in one process share dynamo's per-function
    recompile limit (``torch._dynamo.config.recompile_limit``): raise it if you compile more than two.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"compile_for_search expects a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model.forward, _MARK, False):
        return model
    compiled = torch.compile(model.forward, backend=backend, dynamic=dynamic)
    setattr(compiled, _MARK, True)
    model.forward = compiled
    return model
