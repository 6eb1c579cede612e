"""Ranking metrics as LC-Rec computes them: one ground-truth item per user.

``HR@K`` is 1 if the target is among the first K recommendations; ``NDCG@K`` is ``1/log2(rank+2)``
for the 0-based rank of the target when it is below K (the ideal DCG of a single relevant item is 1).
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

HR_KS = (1, 5, 10)
NDCG_KS = (5, 10)


def target_rank(ranked: Sequence[Hashable], target: Hashable) -> int | None:
    """0-based position of ``target`` in ``ranked`` (``None`` if absent)."""
    for k, item in enumerate(ranked):
        if item == target:
            return k
    return None


def ranking_metrics(rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable],
                    hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, float]:
    """Mean ``HR@K`` and ``NDCG@K`` over users; keys like ``"HR@10"``, ``"NDCG@5"``."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} targets")
    if not targets:
        raise ValueError("no users to evaluate")
    sums = {f"HR@{k}": 0.0 for k in hr_ks} | {f"NDCG@{k}": 0.0 for k in ndcg_ks}
    for ranked, target in zip(rankings, targets):
        rank = target_rank(ranked, target)
        if rank is None:
            continue
        for k in hr_ks:
            sums[f"HR@{k}"] += float(rank < k)
        for k in ndcg_ks:
            sums[f"NDCG@{k}"] += 1.0 / math.log2(rank + 2) if rank < k else 0.0
    return {name: value / len(targets) for name, value in sums.items()}
