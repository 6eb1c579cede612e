"""Saving a compression result without ever destroying what the library did not write.

Like transformers' ``save_pretrained``, a save writes *into* the target directory and replaces only its
own files; everything else there (notes, other runs, the current directory with ``-o .``) stays. Unlike
it, a save is staged: all files are written to a hidden ``.odllm-staging-*`` directory inside the target,
then moved into place with ``config.json`` last (and the old ``config.json`` removed first), so at any
moment the target either loads as the previous model, as the new one, or not at all (no config), never
as a mix. Saving onto the directory the dense model was loaded from is refused. Leftovers of an
interrupted save are removed by the next one, and our loader refuses to load a staging directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from transformers.utils import logging

from .modelcard import build_model_card
from .result import CompressionResult


logger = logging.get_logger(__name__)

STAGING_PREFIX = ".odllm-staging-"
#: Files written by the last save into a directory, so the next save can remove the ones it no longer writes.
SAVED_FILES = ".odllm_saved_files.json"
CONFIG_NAME = "config.json"
_LEGACY_LEFTOVER = r"\.{name}\.(?:tmp-[A-Za-z0-9_]+|old-\d+)"


def is_save_leftover(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is what an interrupted save left behind (ours or version 0.1's): never a model."""
    name = Path(directory).name
    return name.startswith(STAGING_PREFIX) or re.fullmatch(_LEGACY_LEFTOVER.format(name=".+"), name) is not None


def check_save_target(target: Path, protected: Sequence[str | os.PathLike | None] = ()) -> None:
    """Refuse a target that is a file, or the directory of the model we compressed (it would be overwritten)."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a directory: choose another output directory (nothing was written).")
    resolved = target.resolve()
    for source in protected:
        if source and Path(source).is_dir() and Path(source).resolve() == resolved:
            raise ValueError(
                f"{target} is the source model's directory: saving there would overwrite the dense model that was "
                "compressed. Choose another output directory (nothing was written)."
            )


def remove_leftovers(target: Path) -> None:
    """Clean up after interrupted saves into ``target``, deleting only what the library wrote.

    Our staging directories (inside ``target``) and version 0.1's staging siblings (``.NAME.tmp-*``) held
    nothing but files a save was writing: they are deleted. Version 0.1 also renamed the previous directory
    aside to ``.NAME.old-PID`` before replacing it, so that backup may hold the user's own files: it is moved
    back when ``target`` is missing, and otherwise kept with a warning (the loader refuses it as a model).
    """
    for path in target.glob(STAGING_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    if not target.parent.is_dir():
        return
    legacy = re.compile(_LEGACY_LEFTOVER.format(name=re.escape(target.name)))
    for path in sorted(target.parent.iterdir()):
        if not (path.is_dir() and legacy.fullmatch(path.name)):
            continue
        if ".tmp-" in path.name:
            shutil.rmtree(path, ignore_errors=True)
        elif not target.exists():
            path.rename(target)
            logger.warning(f"Restored {target} from {path.name}, the copy an interrupted optimum-odllm 0.1 save had set aside.")
        else:
            logger.warning(
                f"{path} holds what an interrupted optimum-odllm 0.1 save moved aside from {target}; it may contain your "
                "own files. It was left untouched: delete it yourself once you have checked it."
            )


def _publish_file(source: Path, destination: Path) -> None:
    if destination.is_dir():
        raise IsADirectoryError(f"cannot write {destination.name}: {destination} is a directory. Rename it or save elsewhere.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)


def _previously_saved(target: Path) -> set[str]:
    try:
        names = json.loads((target / SAVED_FILES).read_text())
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str) and Path(n).name == n} if isinstance(names, list) else set()


def publish(staging: Path, target: Path) -> None:
    """Move every staged file into ``target``: ``config.json`` removed first and written last."""
    files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    stale = _previously_saved(target) - {str(f) for f in files}
    (target / CONFIG_NAME).unlink(missing_ok=True)
    for relative in files:
        if relative.name != CONFIG_NAME or relative.parent != Path("."):
            _publish_file(staging / relative, target / relative)
    for name in stale:  # our own files from the previous save that this one does not write
        if (target / name).is_file():
            (target / name).unlink()
    (target / SAVED_FILES).write_text(json.dumps([str(f) for f in files]))
    if (staging / CONFIG_NAME).is_file():
        _publish_file(staging / CONFIG_NAME, target / CONFIG_NAME)


@contextmanager
def staged_directory(target: str | os.PathLike, protected: Sequence[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a staging directory whose files are published into ``target`` when the block succeeds."""
    target = Path(target)
    check_save_target(target, protected)
    remove_leftovers(target)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        yield staging
        publish(staging, target)
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)  # it held nothing but our staging directory
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_result(
    result: CompressionResult,
    save_directory: str | os.PathLike,
    *,
    eval_results: Any = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Write the model (safetensors), tokenizer, report, artifacts and model card into ``save_directory``.

    ``eval_results`` (``{dataset: {"HR@10": v, ...}}``) becomes the card's ``model-index``; ``repo_id`` is the
    Hub id shown in the card's loading snippet; ``model_name`` titles the card and its ``model-index`` (default:
    the repository name, else ``<base directory>-odllm-<ratio>``).
    """
    if save_kwargs.get("safe_serialization") is False:
        raise ValueError("OD-LLM checkpoints are saved as safetensors only (no pickle); drop safe_serialization=False.")
    save_directory = Path(save_directory)
    with staged_directory(save_directory, protected=[result.source]) as staging:
        result.model.save_pretrained(staging, **save_kwargs)
        if result.tokenizer is not None:
            result.tokenizer.save_pretrained(staging)
        (staging / "odllm_report.json").write_text(json.dumps(result.report.to_dict(), indent=2))
        for name, path in result.artifacts.items():
            shutil.copyfile(path, staging / name)
        build_model_card(result, repo_id=repo_id, eval_results=eval_results, model_name=model_name).save(staging / "README.md")
    logger.info(f"Saved the OD-LLM-compressed model to {save_directory}")
    return save_directory
