"""Evaluate a generative recommender with constrained beam search, and the most-popular baseline."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .data import Example
from .distributed import gather_per_user, is_main_process, process_share
from .history import history_exclusions, seen_items
from .instructions import InstructionEncoder, Template
from .metrics import per_user_metrics, summarize
from .trie import PrefixTrie, constrained_beam_search


logger = logging.get_logger(__name__)


def plan_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Example positions grouped by prompt length (no padding needed), in a fixed order."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for k, p in enumerate(prompts):
        by_length[len(p)].append(k)
    return [idx[s : s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]


def _rank_batches(model, prompts: Sequence[Sequence[int]], batches: Sequence[Sequence[int]], trie: PrefixTrie,
                  num_beams: int, exclude: Sequence[Iterable[int]] | None, progress: bool) -> dict[int, list[int]]:
    """``{example position: ranked items}`` for the examples in ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[int, list[int]] = {}
    for batch in tqdm(batches, desc="beam search", disable=not progress):
        ids = torch.tensor([prompts[k] for k in batch], device=device)
        batch_exclude = [exclude[k] for k in batch] if exclude is not None else None
        items, _ = constrained_beam_search(model, ids, trie, num_beams=num_beams, exclude=batch_exclude)
        for k, ranked in zip(batch, items):
            out[k] = [i for i in ranked if i >= 0]
    return out


def recommend(model, encoder: InstructionEncoder, examples: Sequence[Example], template: Template,
              num_beams: int = 20, batch_size: int = 32, progress: bool = True,
              exclude: Sequence[Iterable[int]] | None = None) -> list[list[int]]:
    """Ranked item lists (best first, ``num_beams`` long) for each example.

    ``exclude`` (one set of item positions per example, e.g. :func:`~.history.seen_items`) is enforced
    inside the beam search. Order of the output matches ``examples``.
    """
    prompts = [encoder.prompt_ids(template, ex.history) for ex in examples]
    ranked = _rank_batches(model, prompts, plan_batches(prompts, batch_size), encoder.trie,
                           num_beams, exclude, progress)
    return [ranked[k] for k in range(len(examples))]


def evaluate_per_user(model, encoder: InstructionEncoder, examples: Sequence[Example], template: Template,
                      num_beams: int = 20, batch_size: int = 32, progress: bool = True,
                      train: Mapping[str, Sequence[int]] | None = None,
                      exclude_history: bool | None = None) -> dict[str, list[float]]:
    """Per-user HR@K/NDCG@K (in the order of ``examples``); under ``accelerate launch`` users are split
    across processes and gathered, and every process returns the full lists.

    ``exclude_history`` (see :func:`~.history.history_exclusions`): ``None`` masks the users' seen items
    when ``train`` is given and has no repeated interactions; ``False`` gives the unmasked numbers.
    """
    exclude = history_exclusions(train, examples, exclude_history)
    prompts = [encoder.prompt_ids(template, ex.history) for ex in examples]
    batches = process_share(plan_batches(prompts, batch_size))
    ranked = _rank_batches(model, prompts, batches, encoder.trie, num_beams, exclude,
                           progress and is_main_process())
    positions = sorted(ranked)
    local = per_user_metrics([ranked[k] for k in positions], [examples[k].target for k in positions])
    rows = gather_per_user({k: {m: v[n] for m, v in local.items()} for n, k in enumerate(positions)})
    if sorted(rows) != list(range(len(examples))):
        raise RuntimeError(f"gathered {len(rows)} users, expected {len(examples)}: were all processes given the "
                           "same examples in the same order?")
    return {m: [rows[k][m] for k in range(len(examples))] for m in local}


def evaluate_recommender(model, encoder: InstructionEncoder, examples: Sequence[Example], template: Template,
                         num_beams: int = 20, batch_size: int = 32, progress: bool = True,
                         train: Mapping[str, Sequence[int]] | None = None, exclude_history: bool | None = None,
                         with_stderr: bool = False) -> dict[str, float]:
    """HR@1/5/10 and NDCG@5/10 of the model's constrained beam-search rankings (means over users).

    ``with_stderr`` adds ``"HR@10_se"`` etc. (standard error over users). See :func:`evaluate_per_user`
    for ``train``/``exclude_history`` and for multi-process evaluation.
    """
    if not examples:
        raise ValueError("no users to evaluate")
    per_user = evaluate_per_user(model, encoder, examples, template, num_beams, batch_size, progress,
                                 train, exclude_history)
    return summarize(per_user, with_stderr=with_stderr)


def popularity_rankings(train: dict[str, list[int]], examples: Sequence[Example], k: int = 20,
                        exclude_history: bool = True) -> list[list[int]]:
    """Most-popular baseline: items ranked by training interaction count (ties: smaller id first).

    With ``exclude_history`` items already in the user's training sequence or history are skipped, which
    makes the baseline stronger on datasets without repeat consumption such as MovieLens.
    """
    counts = Counter(i for seq in train.values() for i in seq)
    order = sorted(counts, key=lambda i: (-counts[i], i))
    seen = seen_items(train, examples) if exclude_history else [set()] * len(examples)
    out = []
    for user_seen in seen:
        ranked = []
        for i in order:
            if i not in user_seen:
                ranked.append(i)
                if len(ranked) == k:
                    break
        out.append(ranked)
    return out


def evaluate_popularity(train: dict[str, list[int]], examples: Sequence[Example], exclude_history: bool = True,
                        with_stderr: bool = False) -> dict[str, float]:
    """Metrics of :func:`popularity_rankings` on ``examples`` (``with_stderr``: plus standard errors)."""
    rankings = popularity_rankings(train, examples, exclude_history=exclude_history)
    return summarize(per_user_metrics(rankings, [ex.target for ex in examples]), with_stderr=with_stderr)
