"""The recommender's artifact hook: check ``item_index.json`` against the tokenizer and ship it with the model.

The core knows nothing about item indexes; it calls the hooks registered in :mod:`optimum_odllm.extensions`
before compressing (so a mismatched index fails before any work) and copies the files they return beside
the saved weights. This module registers the hook for LC-Rec item indexes (also through the
``optimum_odllm.artifacts`` entry point, so it is active without importing :mod:`optimum_odllm.recsys`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .indexing import INDEX_FILE, LEVEL_NAMES, ItemIndex


def validate_item_index_file(path: str | os.PathLike, tokenizer: Any = None, vocab_size: int | None = None):
    """Load an LC-Rec ``item_index.json`` and check it fits the tokenizer (and the model's vocabulary).

    Returns the :class:`~optimum_odllm.recsys.indexing.ItemIndex`. Raises ``ValueError`` naming the file
    for a malformed file, index tokens the tokenizer does not know (an index built for another
    tokenizer) or token ids beyond the embedding matrix.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "item_index.json"

    def bad(problem: str) -> ValueError:
        return ValueError(f"Item index file {path} {problem}. Rebuild it (optimum-cli odllm train builds one) or fix the path.")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"cannot be read as JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("codes"), list):
        raise bad("has no 'codes' list")
    codes = data["codes"]
    for row, code in enumerate(codes):
        if not isinstance(code, list) or not code or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in code
        ):
            raise bad(f"has an invalid code for item {row} ({str(code)[:80]}): codes are lists of non-negative integers")
        if len(code) > len(LEVEL_NAMES):
            raise bad(f"has a code with {len(code)} levels; at most {len(LEVEL_NAMES)} are supported")
    item_ids = data.get("item_ids", [])
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids):
        raise bad("has 'item_ids' that are not a list of strings")
    if item_ids and len(item_ids) != len(codes):
        raise bad(f"has {len(item_ids)} item_ids but {len(codes)} codes")
    levels = data.get("levels")
    if codes and levels is not None and levels != len(codes[0]):
        raise bad(f"declares levels={levels!r} but its codes have {len(codes[0])} levels")
    try:
        index = ItemIndex(codes=[tuple(c) for c in codes], item_ids=list(item_ids))
    except ValueError as err:
        raise bad(f"is inconsistent ({err})") from None
    if tokenizer is None:
        return index
    vocab = tokenizer.get_vocab()
    tokens = index.all_tokens()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"Item index file {path} does not match the tokenizer: {len(missing)} of its {len(tokens)} index tokens "
            f"(e.g. {missing[0]}) are not in the vocabulary. Use the tokenizer saved with this recommender (the index "
            "was built for another one), or add the tokens with recsys.instructions.add_index_tokens."
        )
    if vocab_size is not None:
        too_large = [t for t in tokens if vocab[t] >= vocab_size]
        if too_large:
            raise ValueError(
                f"Item index file {path}: the tokenizer maps index token {too_large[0]} to id {vocab[too_large[0]]}, "
                f"beyond the model's {vocab_size} embeddings. Resize the embeddings "
                "(model.resize_token_embeddings(len(tokenizer))) or use the matching model."
            )
    return index


def item_index_artifact(source: Path | None, artifacts: dict[str, Path], tokenizer: Any, vocab_size: int | None) -> dict[str, Path]:
    """The ``item_index.json`` to ship: declared in ``artifacts`` or found beside the source model; validated."""
    path = artifacts.get(INDEX_FILE)
    if path is None and source is not None and (source / INDEX_FILE).is_file():
        path = source / INDEX_FILE
    if path is None:
        return {}
    validate_item_index_file(path, tokenizer, vocab_size)
    return {INDEX_FILE: Path(path)}
