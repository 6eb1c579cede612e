"""Rank allocation: turn a kept-parameter ratio into one hardware-aligned rank per module.

A rank-r factorization of an ``[out, in]`` weight keeps ``r * (in + out)`` parameters. We start from
the rank each module would get on its own (``ratio * in * out / (in + out)``), round it down to a
multiple that GPUs like (128 by default: unaligned ranks made the two GEMMs *slower* than the dense
layer on an H100), and hand the parameters freed by rounding back to the modules that lost the
most, one aligned step at a time, while the global budget allows. So the total never exceeds
``ratio`` x the original parameters and normally lands within one aligned step of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .linalg import max_useful_rank


@dataclass(frozen=True)
class ModuleShape:
    name: str
    in_features: int
    out_features: int

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.in_features + self.out_features)


def effective_multiple(ideal_rank: float, rank_multiple: int, min_multiple: int = 1) -> int:
    """The alignment step used for a module: ``rank_multiple``, or a smaller power of two for small modules.

    A 64-wide toy layer cannot hold a rank-128 factor; for it we fall back to the largest power of
    two that still leaves at least two steps below the ideal rank (never below 1). ``min_multiple`` is a
    floor kept whenever the ideal rank holds one such step (int4 factors: their groups need >= 32 columns).
    """
    multiple = max(1, rank_multiple)
    while multiple > 1 and multiple * 2 > ideal_rank:
        multiple //= 2
    if multiple < min_multiple <= ideal_rank:
        return min_multiple
    return multiple


def allocate_ranks(shapes: list[ModuleShape], ratio: float, rank_multiple: int = 128,
                   min_multiple: int = 1) -> dict[str, int | None]:
    """Rank per module name (``None`` = keep dense) so that kept params <= ``ratio`` x original.

    Modules whose best rank would not save parameters (``ratio`` close to 1) stay dense. ``min_multiple``: see
    :func:`effective_multiple`.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    total = sum(s.dense_params for s in shapes)
    budget = int(ratio * total)
    ranks: dict[str, int | None] = {}
    multiples: dict[str, int] = {}
    ideals: dict[str, float] = {}
    for shape in shapes:
        ideal = ratio * shape.dense_params / (shape.in_features + shape.out_features)
        multiple = effective_multiple(ideal, rank_multiple, min_multiple)
        useful = max_useful_rank(shape.in_features, shape.out_features)
        if ideal > useful or useful < 1:
            ranks[shape.name] = None  # no factorization of this size would save anything
        else:
            ranks[shape.name] = max(1, min(int(ideal // multiple) * multiple, (useful // multiple) * multiple))
        multiples[shape.name] = multiple
        ideals[shape.name] = ideal

    def used() -> int:
        return kept_parameters(shapes, ranks)

    for shape in shapes:  # ratio just under 1: dense modules may not fit, factorize them fully
        useful = max_useful_rank(shape.in_features, shape.out_features)
        if ranks[shape.name] is None and useful >= 1 and used() > budget:
            ranks[shape.name] = useful
    if used() > budget:
        raise ValueError(
            f"ratio={ratio} is too small: even rank 1 everywhere keeps {used()} > {budget} parameters. "
            "Use a larger ratio."
        )

    # Redistribute what rounding freed, one aligned step at a time: first to the modules furthest
    # below their ideal rank, then (second pass) to anyone still able to grow.
    spent = used()
    for capped in (True, False):
        progressed = True
        while progressed:
            progressed = False
            for shape in sorted(shapes, key=lambda s: (ranks[s.name] or 0) - ideals[s.name]):
                rank, step = ranks[shape.name], multiples[shape.name]
                if rank is None or rank + step > max_useful_rank(shape.in_features, shape.out_features):
                    continue
                if capped and rank + step > ideals[shape.name] + step:
                    continue
                cost = shape.lowrank_params(step)
                if spent + cost <= budget:
                    ranks[shape.name] = rank + step
                    spent += cost
                    progressed = True
    return ranks


def kept_parameters(shapes: list[ModuleShape], ranks: dict[str, int | None]) -> int:
    """Parameters the targeted modules hold after factorization (dense ones count in full)."""
    return sum(s.dense_params if ranks.get(s.name) is None else s.lowrank_params(ranks[s.name]) for s in shapes)
