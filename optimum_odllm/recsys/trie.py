"""Prefix trie over valid item codes and constrained beam search with a KV cache.

Every beam can only extend a prefix of a real item's token sequence, so every finished beam is an
existing item (no hallucinated codes). The search is written out here rather than using
``generate(prefix_allowed_tokens_fn=...)`` because item codes have a fixed length, which keeps the
loop short, batched across users, and independent of generation-config defaults of a given model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache


class PrefixTrie:
    """Maps every proper prefix of the valid token sequences to the token ids allowed next."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        lengths = {len(s) for s in sequences}
        if len(lengths) != 1:
            raise ValueError(f"all sequences must have the same length, got lengths {sorted(lengths)}")
        self.length = lengths.pop()
        children: dict[tuple[int, ...], set[int]] = {}
        self.leaves: dict[tuple[int, ...], int] = {}
        for k, seq in enumerate(sequences):
            seq = tuple(int(t) for t in seq)
            if seq in self.leaves:
                raise ValueError(f"sequence {seq} appears twice (items {self.leaves[seq]} and {k})")
            self.leaves[seq] = k
            for depth in range(self.length):
                children.setdefault(seq[:depth], set()).add(seq[depth])
        self._allowed = {p: torch.tensor(sorted(c)) for p, c in children.items()}
        self._empty = torch.empty(0, dtype=torch.long)

    def allowed(self, prefix: Sequence[int]) -> torch.Tensor:
        """Token ids that may follow ``prefix`` (empty if the prefix is not in the trie)."""
        return self._allowed.get(tuple(prefix), self._empty)

    def item(self, sequence: Sequence[int]) -> int | None:
        """Position of ``sequence`` in the list the trie was built from, or ``None``."""
        return self.leaves.get(tuple(int(t) for t in sequence))


@torch.no_grad()
def constrained_beam_search(model, prompts: torch.Tensor, trie: PrefixTrie, num_beams: int = 20,
                            attention_mask: torch.Tensor | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Top ``num_beams`` valid items per prompt, best first, with their summed log-probabilities.

    ``prompts`` is ``[batch, length]``; left padding needs ``attention_mask``. Returns item positions
    (as in the trie's input list; ``-1`` where fewer valid items exist than beams) and scores ``[batch, beams]``.
    """
    batch, _ = prompts.shape
    device = prompts.device
    k = num_beams
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    out = model(input_ids=prompts, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [batch, vocab]
    vocab = logp.shape[-1]
    mask = torch.full((vocab,), float("-inf"), device=device)
    mask[trie.allowed(()).to(device)] = 0
    first = logp + mask
    scores, tokens = first.topk(min(k, vocab), dim=-1)
    if scores.shape[1] < k:  # tiny vocabularies in tests
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((batch, pad), float("-inf"))], 1)
        tokens = torch.cat([tokens, tokens.new_zeros((batch, pad))], 1)
    sequences = tokens.unsqueeze(-1)  # [batch, beams, step]
    cache.batch_repeat_interleave(k)
    if attention_mask is not None:
        attention_mask = attention_mask.repeat_interleave(k, 0)
        last_pos = position_ids[:, -1].repeat_interleave(k, 0)
    for step in range(1, trie.length):
        flat_tokens = sequences[:, :, -1].reshape(-1, 1)
        kwargs = {}
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch * k, 1))], 1)
            kwargs = {"attention_mask": attention_mask, "position_ids": (last_pos + step).unsqueeze(-1)}
        out = model(input_ids=flat_tokens, past_key_values=cache, use_cache=True, **kwargs)
        cache = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(batch, k, vocab)
        step_mask = torch.full_like(logp, float("-inf"))
        prefixes = sequences.tolist()
        for b in range(batch):
            for j in range(k):
                if scores[b, j] > float("-inf"):
                    allowed = trie.allowed(prefixes[b][j])
                    if len(allowed):
                        step_mask[b, j, allowed.to(device)] = 0
        cand = (scores.unsqueeze(-1) + logp + step_mask).view(batch, k * vocab)
        scores, flat = cand.topk(k, dim=-1)
        beam, token = flat // vocab, flat % vocab
        sequences = torch.cat([sequences.gather(1, beam.unsqueeze(-1).expand(-1, -1, step)), token.unsqueeze(-1)], -1)
        cache.reorder_cache((beam + torch.arange(batch, device=device).unsqueeze(1) * k).view(-1))
    items = []
    for b, row in enumerate(sequences.tolist()):
        items.append([trie.item(seq) if scores[b, j] > float("-inf") else None for j, seq in enumerate(row)])
        items[-1] = [-1 if i is None else i for i in items[-1]]
    return items, scores
