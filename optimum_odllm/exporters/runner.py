"""The model-call adapter shared by the runtime wrappers: flat KV cache in, ``CausalLMOutputWithPast`` out.

A runner answers ``model(input_ids=..., attention_mask=..., position_ids=..., past_key_values=...,
use_cache=True)`` with ``.logits`` and a ``.past_key_values`` cache supporting ``batch_repeat_interleave``
and ``reorder_cache``: exactly what :func:`optimum_odllm.recsys.trie.constrained_beam_search` calls. So the
same search (and ``recsys.evaluate_recommender``) ranks items with an exported graph, with no second copy
of it. Subclasses only say how to run the graph on a list of tensors.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import CacheLayout


class FlatKVCache:
    """Per-layer key/value tensors ``[batch, kv_heads, length, head_dim]``, in the exported graph's order."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.tensors[2 * layer_idx].shape[2])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Copy every row ``repeats`` times (one per beam), as ``DynamicCache.batch_repeat_interleave``."""
        self.tensors = [t.repeat_interleave(repeats, dim=0) for t in self.tensors]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows of the surviving beams, as ``DynamicCache.reorder_cache``."""
        self.tensors = [t.index_select(0, beam_idx.cpu()) for t in self.tensors]


class FlatCacheRunner:
    """Base of the runtime wrappers: builds the graph's inputs and wraps its outputs like transformers."""

    device = torch.device("cpu")
    layout: CacheLayout

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the exported graph on ``layout.input_names``-ordered CPU tensors."""
        raise NotImplementedError

    def eval(self) -> "FlatCacheRunner":
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        """``recsys.recommend`` reads the device from the first parameter; the runtimes here take CPU inputs."""
        yield torch.empty(0, device=self.device)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, past_key_values: Any = None, cache: Any = None,
                 use_cache: bool = True, **unsupported: Any) -> CausalLMOutputWithPast:
        if any(v is not None for v in unsupported.values()):
            raise TypeError(f"{type(self).__name__} does not support {sorted(unsupported)}: the exported graph "
                            "takes input_ids, attention_mask, position_ids and the KV cache only.")
        batch, seq = input_ids.shape
        past = self._past(cache if cache is not None else past_key_values, batch)
        past_len = past.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
        ids = [t.detach().cpu().long().contiguous() for t in (input_ids, attention_mask, position_ids)]
        logits, *present = self.run([*ids, *past.tensors])
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"{type(self).__name__}: the exported graph returned NaN/Inf logits.")
        return CausalLMOutputWithPast(logits=logits, past_key_values=FlatKVCache(present) if use_cache else None)

    forward = __call__

    def _past(self, cache: Any, batch: int) -> FlatKVCache:
        if isinstance(cache, FlatKVCache):
            return cache
        if cache is None or cache.get_seq_length() == 0:  # a fresh transformers DynamicCache means "empty"
            return FlatKVCache(self.layout.empty_past(batch))
        raise TypeError(
            f"{type(self).__name__} got a filled {type(cache).__name__}; pass None (or an empty cache) on the "
            "first call and then the .past_key_values it returned."
        )
