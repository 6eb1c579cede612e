"""Ranking metrics as LC-Rec computes them: one ground-truth item per user.

``HR@K`` is 1 if the target is among the first K recommendations; ``NDCG@K`` is ``1/log2(rank+2)``
for the 0-based rank of the target when it is below K (the ideal DCG of a single relevant item is 1).
Per-user values are kept (:func:`per_user_metrics`) so that a standard error over users can be reported
and so that shards evaluated on different processes can be gathered and summarized exactly.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

HR_KS = (1, 5, 10)
NDCG_KS = (5, 10)
STDERR_SUFFIX = "_se"


def target_rank(ranked: Sequence[Hashable], target: Hashable) -> int | None:
    """0-based position of ``target`` in ``ranked`` (``None`` if absent)."""
    for k, item in enumerate(ranked):
        if item == target:
            return k
    return None


def per_user_metrics(rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable],
                     hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, list[float]]:
    """``{"HR@10": [one value per user], ...}`` in the order of ``targets``."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} targets")
    out: dict[str, list[float]] = {f"HR@{k}": [] for k in hr_ks} | {f"NDCG@{k}": [] for k in ndcg_ks}
    for ranked, target in zip(rankings, targets):
        rank = target_rank(ranked, target)
        for k in hr_ks:
            out[f"HR@{k}"].append(float(rank is not None and rank < k))
        for k in ndcg_ks:
            out[f"NDCG@{k}"].append(1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0)
    return out


def summarize(per_user: Mapping[str, Sequence[float]], with_stderr: bool = False) -> dict[str, float]:
    """Means over users; with ``with_stderr`` also ``"<metric>_se"``, the standard error of each mean.

    The standard error is the sample standard deviation (n - 1) over ``sqrt(n)``: the spread one would see
    from evaluating other users drawn from the same population.
    """
    out: dict[str, float] = {}
    for name, values in per_user.items():
        n = len(values)
        if n == 0:
            raise ValueError("no users to evaluate")
        mean = sum(values) / n
        if not math.isfinite(mean):
            raise ValueError(f"{name} is not finite ({mean}): a per-user value is NaN or infinite")
        out[name] = mean
    if with_stderr:
        for name, values in per_user.items():
            n = len(values)
            if n < 2:
                raise ValueError(f"a standard error needs at least 2 users, got {n}")
            var = sum((v - out[name]) ** 2 for v in values) / (n - 1)
            out[name + STDERR_SUFFIX] = math.sqrt(var / n)
    return out


def ranking_metrics(rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable],
                    hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, float]:
    """Mean ``HR@K`` and ``NDCG@K`` over users; keys like ``"HR@10"``, ``"NDCG@5"``."""
    return summarize(per_user_metrics(rankings, targets, hr_ks, ndcg_ks))


def ranking_metrics_with_stderr(rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable],
                                hr_ks: Sequence[int] = HR_KS, ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, float]:
    """:func:`ranking_metrics` plus the standard error over users of each (``"HR@10_se"``, ...)."""
    return summarize(per_user_metrics(rankings, targets, hr_ks, ndcg_ks), with_stderr=True)
