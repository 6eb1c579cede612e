"""Prefix trie over valid item codes and constrained beam search with a KV cache.

Every beam can only extend a prefix of a real item's token sequence, so every finished beam is an
existing item (no hallucinated codes). With ``exclude`` a beam also never enters a prefix whose every
completion is an excluded item (the user's history), so each user still gets ``num_beams`` unseen
items instead of fewer after filtering. The search is written out here rather than using
``generate(prefix_allowed_tokens_fn=...)`` because item codes have a fixed length, which keeps the
loop short, batched across users, and independent of generation-config defaults of a given model.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Collection, Iterable, Mapping, Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer


class PrefixTrie:
    """Maps every proper prefix of the valid token sequences to the token ids allowed next."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        lengths = {len(s) for s in sequences}
        if len(lengths) != 1:
            raise ValueError(f"all sequences must have the same length, got lengths {sorted(lengths)}")
        self.length = lengths.pop()
        children: dict[tuple[int, ...], set[int]] = {}
        self.leaves: dict[tuple[int, ...], int] = {}
        self.sequences: list[tuple[int, ...]] = []
        self._size: Counter[tuple[int, ...]] = Counter()  # items below each prefix (1 for a full sequence)
        for k, seq in enumerate(sequences):
            seq = tuple(int(t) for t in seq)
            if seq in self.leaves:
                raise ValueError(f"sequence {seq} appears twice (items {self.leaves[seq]} and {k})")
            self.leaves[seq] = k
            self.sequences.append(seq)
            for depth in range(self.length):
                children.setdefault(seq[:depth], set()).add(seq[depth])
                self._size[seq[: depth + 1]] += 1
        self._allowed_lists = {p: sorted(c) for p, c in children.items()}
        # tensors only for the prefixes asked for (the beam search reads the lists): one tensor per prefix up
        # front was about two thirds of the build time on ML-100K (36 -> 13 ms, 1,682 items)
        self._allowed: dict[tuple[int, ...], torch.Tensor] = {}
        self._empty = torch.empty(0, dtype=torch.long)

    def allowed(self, prefix: Sequence[int],
                blocked: Mapping[tuple[int, ...], Collection[int]] | None = None) -> torch.Tensor:
        """Token ids that may follow ``prefix`` (empty if the prefix is not in the trie).

        ``blocked`` (from :meth:`blocked_children`) removes tokens that lead only to excluded items.
        """
        prefix = tuple(prefix)
        tokens = self._allowed.get(prefix)
        if tokens is None:
            listed = self._allowed_lists.get(prefix)
            if listed is None:
                return self._empty
            tokens = self._allowed[prefix] = torch.tensor(listed, dtype=torch.long)
        if blocked and prefix in blocked:
            banned = blocked[prefix]
            tokens = torch.tensor([t for t in tokens.tolist() if t not in banned], dtype=torch.long)
        return tokens

    def allowed_list(self, prefix: tuple[int, ...],
                     blocked: Mapping[tuple[int, ...], Collection[int]] | None = None) -> list[int]:
        """:meth:`allowed` as a plain list (the beam search's hot loop: no tensor per beam)."""
        tokens = self._allowed_lists.get(prefix, [])
        if blocked and prefix in blocked:
            banned = blocked[prefix]
            return [t for t in tokens if t not in banned]
        return tokens

    def blocked_children(self, items: Iterable[int]) -> dict[tuple[int, ...], frozenset[int]]:
        """``{prefix: tokens}`` such that ``prefix + (token,)`` is completed only by items in ``items``.

        Blocking whole subtrees (not only the leaves) keeps beams from being spent on prefixes that can no
        longer finish as an allowed item.
        """
        hits: Counter[tuple[int, ...]] = Counter()
        for item in set(items):
            if not 0 <= item < len(self.sequences):
                raise ValueError(f"cannot exclude item {item}: the trie holds items 0..{len(self.sequences) - 1}")
            seq = self.sequences[item]
            for depth in range(1, self.length + 1):
                hits[seq[:depth]] += 1
        blocked: dict[tuple[int, ...], set[int]] = {}
        for prefix, count in hits.items():
            if count == self._size[prefix]:
                blocked.setdefault(prefix[:-1], set()).add(prefix[-1])
        return {p: frozenset(t) for p, t in blocked.items()}

    def item(self, sequence: Sequence[int]) -> int | None:
        """Position of ``sequence`` in the list the trie was built from, or ``None``."""
        return self.leaves.get(tuple(int(t) for t in sequence))


def _allowed_mask(trie: PrefixTrie, prefixes: list[tuple[int, ...]], blocked: list, alive: list[bool],
                  shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[rows, vocab]``: 0 where row ``i`` may take the token next, ``-inf`` elsewhere (dead rows: all ``-inf``).

    One index-put for all rows: a per-beam tensor write costs more than the model's decode step for a
    small recommender (640 rows per step at batch 32, beam 20).
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, prefix in enumerate(prefixes):
        if alive[i]:
            tokens = trie.allowed_list(prefix, blocked[i])
            rows.extend([i] * len(tokens))
            cols.extend(tokens)
    mask = torch.full(shape, float("-inf"), device=device)
    if rows:
        mask[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = 0
    return mask


def reorder_beams(cache, rows: torch.Tensor, prompt_length: int) -> None:
    """``cache.reorder_cache(rows)``, copying only the positions generated after the prompt where it can.

    Beams are only ever permuted among the beams of one prompt, and those all hold the same prompt keys and
    values (repeated from one row), so the prompt part of every row is already right after the permutation.
    Copying the whole cache instead was the largest cost of the recommender's search on a CPU (one full copy
    of ``[users x beams, heads, prompt, head_dim]`` per layer and step). Caches of other kinds (sliding
    windows, the exported runtimes' caches) take the plain ``reorder_cache``.
    """
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys.shape[-2] <= prompt_length for layer in layers):
        cache.reorder_cache(rows)
        return
    for layer in layers:
        for states in (layer.keys, layer.values):
            states[:, :, prompt_length:] = states[:, :, prompt_length:].index_select(0, rows.to(states.device))


def shares_prompt_cache(model, cache) -> bool:
    """Whether ``model`` can take the shared-prompt search: a transformers model whose attention (eager or SDPA)
    accepts a custom 4-D mask as is, with full attention in every layer and a plain dynamic cache.

    Other callables (the exported runtimes' runners, ``torch.compile`` wrappers with static caches) keep the
    repeated-prompt search.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        return False
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def prefers_shared_prompt(model, cache, device: torch.device) -> bool:
    """The default of ``constrained_beam_search(shared_prompt=None)``: tree attention where it runs and was measured
    faster, i.e. on CPUs (2.0-2.7x more users/s on the ML-100K recommenders). On an H200 it gave no gain (0.96x: the
    search is bound by kernel launches there, not by cache copies) and, in bfloat16, other roundings than the
    repeated layout that reorder near-tied beams, so CUDA keeps the repeated layout unless asked."""
    return torch.device(device).type == "cpu" and shares_prompt_cache(model, cache)


def _takes_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def tree_attention_mask(prompt_mask: torch.Tensor, ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[batch, 1, beams, prompt + steps * beams]`` mask for feeding every prompt's beams as one sequence.

    The cache holds each prompt once, then one block of ``beams`` generated tokens per step, in the beam order of
    that step. ``ancestors[b, j, s]`` is the position, inside block ``s``, of beam ``j``'s token at step ``s``, so beam
    ``j`` sees the prompt (minus padding) and exactly one token of every block: the path it extends.
    """
    batch, beams, steps = ancestors.shape
    path = torch.zeros(batch, beams, steps, beams, dtype=torch.bool, device=ancestors.device)
    path.scatter_(3, ancestors.unsqueeze(-1), True)
    visible = torch.cat([prompt_mask[:, None, :].expand(batch, beams, -1), path.view(batch, beams, steps * beams)], -1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


class _RepeatedPrompt:
    """The textbook layout: the prompt's cache repeated once per beam, one row per beam, rows reordered after each
    step (only the generated positions are copied, :func:`reorder_beams`). Works with any cache."""

    def __init__(self, model, cache, batch: int, k: int, prompt_length: int, attention_mask, last_pos):
        self.model, self.cache, self.batch, self.k, self.prompt_length = model, cache, batch, k, prompt_length
        cache.batch_repeat_interleave(k)
        self.attention_mask = attention_mask.repeat_interleave(k, 0) if attention_mask is not None else None
        self.last_pos = last_pos.repeat_interleave(k, 0) if last_pos is not None else None

    def log_probs(self, step: int, tokens: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.attention_mask is not None:
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.batch * self.k, 1))], 1)
            kwargs = {"attention_mask": self.attention_mask, "position_ids": (self.last_pos + step).unsqueeze(-1)}
        out = self.model(input_ids=tokens.reshape(-1, 1), past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1).view(self.batch, self.k, -1)

    def keep(self, beam: torch.Tensor, step: int, last: bool) -> None:
        if not last:  # the last step's cache is never read again
            rows = (beam + torch.arange(self.batch, device=beam.device).unsqueeze(1) * self.k).view(-1)
            reorder_beams(self.cache, rows, self.prompt_length)


class _SharedPrompt:
    """Tree attention: each prompt's cache is kept once and every step appends its beams' tokens as one block of
    that prompt's sequence, with :func:`tree_attention_mask` telling each token which earlier tokens are its path.
    Nothing is repeated or reordered: the cache a step extends is ``beams`` times smaller than the repeated one."""

    def __init__(self, model, cache, batch: int, k: int, prompt_length: int, attention_mask, last_pos):
        self.model, self.cache, self.k = model, cache, k
        device = cache.layers[0].keys.device
        self.prompt_mask = (attention_mask.bool() if attention_mask is not None
                            else torch.ones(batch, prompt_length, dtype=torch.bool, device=device))
        self.last_pos = last_pos if last_pos is not None else torch.full((batch,), prompt_length - 1, device=device)
        self.ancestors = torch.empty(batch, k, 0, dtype=torch.long, device=device)
        self.dtype = model.dtype

    def log_probs(self, step: int, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        block = torch.arange(self.k, device=tokens.device).expand(batch, self.k).unsqueeze(-1)
        self.ancestors = torch.cat([self.ancestors, block], -1)
        out = self.model(input_ids=tokens, attention_mask=tree_attention_mask(self.prompt_mask, self.ancestors, self.dtype),
                         position_ids=(self.last_pos + step).unsqueeze(-1).expand(batch, self.k),
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits.float(), dim=-1)

    def keep(self, beam: torch.Tensor, step: int, last: bool) -> None:
        self.ancestors = self.ancestors.gather(1, beam.unsqueeze(-1).expand(-1, -1, step))


@torch.no_grad()
def constrained_beam_search(model, prompts: torch.Tensor, trie: PrefixTrie, num_beams: int = 20,
                            attention_mask: torch.Tensor | None = None,
                            exclude: Sequence[Iterable[int]] | None = None,
                            shared_prompt: bool | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Top ``num_beams`` valid items per prompt, best first, with their summed log-probabilities.

    ``prompts`` is ``[batch, length]``; left padding needs ``attention_mask``. ``exclude`` holds one set of
    item positions per prompt (e.g. the user's history) that no beam may complete. Returns item positions
    (as in the trie's input list; ``-1`` where fewer valid items exist than beams) and scores ``[batch, beams]``.
    ``shared_prompt`` keeps one copy of each prompt's cache and attends to it from all its beams through a tree
    mask, instead of repeating it per beam; the results are the same up to floating-point rounding (in bfloat16
    that can reorder near-tied beams). Default (``None``): :func:`prefers_shared_prompt`, i.e. on CPUs.
    """
    batch, prompt_length = prompts.shape
    device = prompts.device
    k = num_beams
    if exclude is not None and len(exclude) != batch:
        raise ValueError(f"exclude needs one set of items per prompt: got {len(exclude)} for {batch} prompts")
    blocked = [trie.blocked_children(e) for e in exclude] if exclude is not None else [None] * batch
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    last_only = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}  # the prompt's other logits are unused
    out = model(input_ids=prompts, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, **last_only)
    cache = out.past_key_values
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [batch, vocab]
    vocab = logp.shape[-1]
    mask = _allowed_mask(trie, [()] * batch, blocked, [True] * batch, (batch, vocab), device)
    first = logp + mask
    scores, tokens = first.topk(min(k, vocab), dim=-1)
    if scores.shape[1] < k:  # tiny vocabularies in tests
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((batch, pad), float("-inf"))], 1)
        tokens = torch.cat([tokens, tokens.new_zeros((batch, pad))], 1)
    sequences = tokens.unsqueeze(-1)  # [batch, beams, step]
    if shared_prompt is None:
        shared_prompt = prefers_shared_prompt(model, cache, device)
    elif shared_prompt and not shares_prompt_cache(model, cache):
        raise ValueError("shared_prompt=True needs a transformers model with eager or SDPA attention, full attention "
                         "in every layer and a dynamic cache; pass shared_prompt=None to choose automatically")
    last_pos = position_ids[:, -1] if position_ids is not None else None
    beams = (_SharedPrompt if shared_prompt else _RepeatedPrompt)(model, cache, batch, k, prompt_length,
                                                                  attention_mask, last_pos)
    row_blocked = [blocked[i // k] for i in range(batch * k)]  # beams of a prompt share its exclusions
    for step in range(1, trie.length):
        logp = beams.log_probs(step, sequences[:, :, -1])
        prefixes = [tuple(p) for row in sequences.tolist() for p in row]
        alive = (scores > float("-inf")).view(-1).tolist()
        step_mask = _allowed_mask(trie, prefixes, row_blocked, alive, (batch * k, vocab), device).view(batch, k, vocab)
        cand = (scores.unsqueeze(-1) + logp + step_mask).view(batch, k * vocab)
        scores, flat = cand.topk(k, dim=-1)
        beam, token = flat // vocab, flat % vocab
        sequences = torch.cat([sequences.gather(1, beam.unsqueeze(-1).expand(-1, -1, step)), token.unsqueeze(-1)], -1)
        beams.keep(beam, step, last=step == trie.length - 1)
    alive = (scores > float("-inf")).tolist()
    leaves = trie.leaves  # sequences of Python ints already: no per-beam conversion (640 beams per batch)
    items = [[leaves.get(tuple(seq), -1) if ok else -1 for seq, ok in zip(row, alive_row)]
             for row, alive_row in zip(sequences.tolist(), alive)]
    return items, scores
