"""Compile a recommender's forward for the constrained beam search (CPU inference).

On a CPU the eager search of a small recommender spends a large share of each step outside the matrix products:
RMSNorm, rotary embeddings, SiLU, residual adds and the KV-cache concatenations are each one pass over memory.
That share is the same for a dense and a low-rank model, so it also caps what the smaller factors can gain.
``torch.compile`` (Inductor) can fuse those passes and drop per-op dispatch (the compiled model was not profiled).
On the ML-100K recommenders (fp32, one thread, 128 users; 2 x 256 / 4 x 256 layers) it made the OD-LLM model's
search 1.41x / 1.38x faster and the dense model's 1.28x / 1.37x, with the same ranked lists; OD-LLM over dense,
both compiled: 1.28-1.34x / 1.28x (benchmarks/README.md, section 4i).
"""

from __future__ import annotations

import inspect
import types

import torch
from transformers import PreTrainedModel

from ..quantization import prepare_kernel_layouts

_MARK = "_odllm_compiled_for_search"  # on our compiled function: the backend it was compiled with


def compile_for_search(model: PreTrainedModel, backend: str = "inductor", dynamic: bool = True) -> PreTrainedModel:
    """Give ``model`` a ``torch.compile``-d forward, in place, and return it.

    The model itself stays a ``PreTrainedModel`` (unlike ``torch.compile(model)``): the beam search still
    recognises it and keeps one shared copy of each prompt's cache (tree attention), ``save_pretrained`` saves the
    same weights, and ``copy.deepcopy`` gives a copy that computes with its own weights (the class's forward is
    compiled and bound to the instance). ``dynamic=True`` compiles once for most prompt lengths, batch sizes and
    cache lengths instead of once per shape (sizes 1 are still special: a one-user batch compiles once more).
    The first search pays the compilation (9-87 s for the ML-100K recommenders on a 2-core CPU); on the
    ML-100K test users that pays back after about 4,000-17,000 ranked users, so it suits a long-running process
    more than one evaluation. Inductor on CPU needs a C++ compiler. Calling it again with the same backend does
    nothing; ``del model.forward`` undoes it. Each compiled model keeps its own recompile limit
    (``isolate_recompiles`` where torch has it), so several compiled models of one architecture do not fall back
    to eager for each other. A model with integer factors (``factor_bits``) gets their kernel layouts built first,
    for the model's dtype on each factor's device, so move or cast the model before calling this.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"compile_for_search expects a transformers PreTrainedModel, got {type(model).__name__}")
    own = model.__dict__.get("forward")
    if own is not None:
        compiled_with = getattr(getattr(own, "__func__", own), _MARK, None)
        if compiled_with is None:
            raise ValueError("model.forward is already replaced (by torch.compile or a wrapper); run `del model.forward` "
                             "first so that compile_for_search compiles the model's own forward")
        if compiled_with != backend:
            raise ValueError(f"model.forward was compiled for the search with backend={compiled_with!r}; run "
                             f"`del model.forward` first to compile it with backend={backend!r}")
        return model
    prepare_kernel_layouts(model)  # integer factors: the graph then reads their kernel layouts (else dequantizes)
    options = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
    compiled = torch.compile(type(model).forward, backend=backend, dynamic=dynamic, **options)
    setattr(compiled, _MARK, backend)
    model.forward = types.MethodType(compiled, model)  # deepcopy rebinds a bound method to the copy
    return model
