"""Artifact hooks: how packages built on the core (the recommender) check and ship their own files.

A hook is ``hook(source_dir, artifacts, tokenizer, vocab_size) -> {file name: path}``. It runs before any
compression work (so it can refuse a mismatched file early, raising ``ValueError``) and returns the files
to copy beside the saved weights. Hooks come from :func:`register_artifact_hook` and from the
``optimum_odllm.artifacts`` entry-point group, so a plugin is active as soon as it is installed.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

ArtifactHook = Callable[[Path | None, dict[str, Path], Any, int | None], dict[str, Path]]
ENTRY_POINT_GROUP = "optimum_odllm.artifacts"
_HOOKS: dict[str, ArtifactHook] = {}


def register_artifact_hook(name: str, hook: ArtifactHook) -> None:
    """Register (or replace) the hook called ``name``."""
    _HOOKS[name] = hook


def artifact_hooks() -> dict[str, ArtifactHook]:
    """Registered hooks plus installed entry points (loaded on first use)."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _HOOKS:
            _HOOKS[entry.name] = entry.load()
    return dict(_HOOKS)


def collect_artifacts(source: str | None, declared: dict[str, Path], tokenizer: Any, vocab_size: int | None) -> dict[str, Path]:
    """Run every hook; returns the files to ship (declared ones included). Raises what a hook raises."""
    source_dir = Path(source) if source and Path(source).is_dir() else None
    files = {name: Path(path) for name, path in declared.items()}
    for hook in artifact_hooks().values():
        files.update(hook(source_dir, files, tokenizer, vocab_size))
    return files
