"""Small helpers shared across the package: parameter counting and atomic directory writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from torch import nn


def _unique_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Each parameter once, even when tied (e.g. embeddings shared with lm_head)."""
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            yield param


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in _unique_parameters(model))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model))


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only if the block succeeds.

    The rename happens on the same filesystem, so readers see either the old complete directory or
    the new complete one, never a half-written checkpoint. On error the temporary directory is removed.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
