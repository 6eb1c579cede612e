"""Spread per-user evaluation over the processes of ``accelerate launch`` and gather the results exactly.

Work is split in whole batches planned identically on every process, so each user's beam search runs
with the same batch (same shapes, same arithmetic) as in a single-process run; per-user values are
gathered with their global position and put back in order, so means and standard errors are computed
from the same numbers in the same order: the metrics equal the single-process ones bit for bit.
Outside a launch (one process) nothing is initialized and the functions are no-ops.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, get_int_from_env, parse_flag_from_env

T = TypeVar("T")
WORLD_SIZE_ENV = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


def launched_state() -> PartialState | None:
    """accelerate's process state when this process is one of several (``None`` otherwise).

    ``PartialState`` only picks the CPU (gloo) backend when told, so CPU-only hosts and ``ACCELERATE_USE_CPU``
    select it; a plain single process never initializes anything (no device or process group side effects).
    """
    if get_int_from_env(WORLD_SIZE_ENV, 1) <= 1:
        return None
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def process_share(work: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``work`` (all of it in a single process)."""
    state = launched_state()
    if state is None or state.num_processes == 1:
        return list(work)
    with state.split_between_processes(list(work)) as share:
        return list(share)


def gather_per_user(local: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Union over processes of ``{global position: {metric: value}}``; every process gets all of it."""
    state = launched_state()
    if state is None or state.num_processes == 1:
        return dict(local)
    gathered = gather_object(sorted(local.items()))
    merged = dict(gathered)
    if len(merged) != len(gathered):
        raise RuntimeError("two processes evaluated the same user: the work split is not a partition")
    return merged


def is_main_process() -> bool:
    """Whether this is the process that should print and write files (``True`` outside a launch)."""
    state = launched_state()
    return state is None or state.is_main_process


def check_same_across_processes(digest: str, what: str) -> None:
    """Raise if ``digest`` (e.g. a hash of weights or item codes) differs between processes.

    Work that every process repeats (building the item index, compressing a model) must give the same result
    everywhere, or gathered metrics would silently mix different models.
    """
    state = launched_state()
    if state is None or state.num_processes == 1:
        return
    digests = gather_object([digest])
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differs between the {state.num_processes} processes ({len(set(digests))} versions): "
                           "build it once on one process, save it, and load it on every process")
