"""Which items a user has already interacted with, and whether to exclude them from recommendations.

On datasets where nobody consumes an item twice (MovieLens: one rating per movie) recommending a seen
item is a guaranteed miss, so full-ranking evaluations (RecBole's default) mask the history. On datasets
with repeats (groceries, music) the seen items are legitimate targets and must stay.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .data import Example


def has_repeats(train: Mapping[str, Sequence[int]]) -> bool:
    """``True`` if some user's training sequence holds an item more than once."""
    return any(len(set(seq)) < len(seq) for seq in train.values())


def seen_items(train: Mapping[str, Sequence[int]], examples: Sequence[Example]) -> list[set[int]]:
    """Per example: the user's training items plus the example's history (which may extend past ``train``)."""
    return [set(train.get(ex.user, ())) | set(ex.history) for ex in examples]


def history_exclusions(train: Mapping[str, Sequence[int]] | None, examples: Sequence[Example],
                       exclude_history: bool | None = None) -> list[set[int]] | None:
    """Items to exclude per example, or ``None`` for no exclusion.

    ``exclude_history=None`` decides from the data: on when ``train`` is given and has no repeated
    item in any user's sequence. ``True`` forces it (needs ``train``), ``False`` gives the unmasked numbers.
    """
    if exclude_history is None:
        exclude_history = train is not None and not has_repeats(train)
    if not exclude_history:
        return None
    if train is None:
        raise ValueError("exclude_history=True needs the users' training sequences: pass train=split.train")
    return seen_items(train, examples)
