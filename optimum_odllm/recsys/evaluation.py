"""Evaluate a generative recommender with constrained beam search, and the most-popular baseline."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import Example
from .instructions import InstructionEncoder, Template
from .metrics import ranking_metrics
from .trie import PrefixTrie, constrained_beam_search


logger = logging.get_logger(__name__)


def recommend(model, encoder: InstructionEncoder, examples: Sequence[Example], template: Template,
              num_beams: int = 20, batch_size: int = 32, progress: bool = True) -> list[list[int]]:
    """Ranked item lists (best first, ``num_beams`` long) for each example.

    Prompts are grouped by length so that batches need no padding; order of the output matches ``examples``.
    """
    model.eval()
    device = next(model.parameters()).device
    trie = PrefixTrie(encoder.item_ids)
    prompts = [encoder.prompt_ids(template, ex.history) for ex in examples]
    by_length: dict[int, list[int]] = defaultdict(list)
    for k, p in enumerate(prompts):
        by_length[len(p)].append(k)
    batches = [idx[s : s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]
    out: list[list[int]] = [[] for _ in examples]
    for batch in tqdm(batches, desc="beam search", disable=not progress):
        ids = torch.tensor([prompts[k] for k in batch], device=device)
        items, _ = constrained_beam_search(model, ids, trie, num_beams=num_beams)
        for k, ranked in zip(batch, items):
            out[k] = [i for i in ranked if i >= 0]
    return out


def evaluate_recommender(model, encoder: InstructionEncoder, examples: Sequence[Example], template: Template,
                         num_beams: int = 20, batch_size: int = 32, progress: bool = True) -> dict[str, float]:
    """HR@1/5/10 and NDCG@5/10 of the model's constrained beam-search rankings."""
    rankings = recommend(model, encoder, examples, template, num_beams, batch_size, progress)
    return ranking_metrics(rankings, [ex.target for ex in examples])


def popularity_rankings(train: dict[str, list[int]], examples: Sequence[Example], k: int = 20,
                        exclude_history: bool = True) -> list[list[int]]:
    """Most-popular baseline: items ranked by training interaction count (ties: smaller id first).

    With ``exclude_history`` items already in the user's training sequence are skipped, which makes
    the baseline stronger on datasets without repeat consumption such as MovieLens.
    """
    counts = Counter(i for seq in train.values() for i in seq)
    order = sorted(counts, key=lambda i: (-counts[i], i))
    out = []
    for ex in examples:
        seen = set(train.get(ex.user, ())) | set(ex.history) if exclude_history else set()
        ranked = []
        for i in order:
            if i not in seen:
                ranked.append(i)
                if len(ranked) == k:
                    break
        out.append(ranked)
    return out


def evaluate_popularity(train: dict[str, list[int]], examples: Sequence[Example], exclude_history: bool = True) -> dict[str, float]:
    """Metrics of :func:`popularity_rankings` on ``examples``."""
    return ranking_metrics(popularity_rankings(train, examples, exclude_history=exclude_history),
                           [ex.target for ex in examples])
