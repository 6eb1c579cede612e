"""Interaction data for sequential recommendation: loaders and the leave-one-out split.

Every loader returns a :class:`RecDataset`: items get dense internal ids (``0..n_items-1``) with a text
description each, and every user a chronologically sorted list of internal item ids. The split follows
LC-Rec / SASRec: per user the last interaction is the test target, the second-last the validation
target and the rest is training data; histories are truncated to the last ``history`` items.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from transformers.utils import logging


logger = logging.get_logger(__name__)

DEFAULT_HISTORY = 20


class MalformedDataError(ValueError):
    """A row of an input file cannot be parsed; the message names the file and the line."""


@dataclass
class RecDataset:
    """Items with text and chronological per-user item sequences (internal item ids)."""

    name: str
    item_ids: list[str]
    item_text: list[str]
    sequences: dict[str, list[int]]

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences.values())


@dataclass(frozen=True)
class Example:
    """One prediction task: the user's recent history (oldest first) and the item to predict."""

    user: str
    history: tuple[int, ...]
    target: int


@dataclass
class LeaveOneOutSplit:
    """``train`` holds each user's full training prefix; ``valid``/``test`` one example per user."""

    train: dict[str, list[int]]
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    history: int = DEFAULT_HISTORY


def leave_one_out(sequences: dict[str, list[int]], history: int = DEFAULT_HISTORY) -> LeaveOneOutSplit:
    """Split chronological sequences: last item -> test, second-last -> validation, the rest -> train.

    The test history ends with the validation item (as in LC-Rec), but neither target ever appears
    in ``train``. Users with fewer than 3 interactions only contribute training data.
    """
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    split = LeaveOneOutSplit(train={}, history=history)
    for user, seq in sequences.items():
        if len(seq) < 3:
            split.train[user] = list(seq)
            continue
        split.train[user] = list(seq[:-2])
        split.valid.append(Example(user, tuple(seq[:-2][-history:]), seq[-2]))
        split.test.append(Example(user, tuple(seq[:-1][-history:]), seq[-1]))
    return split


def training_examples(train: dict[str, list[int]], history: int = DEFAULT_HISTORY) -> Iterator[Example]:
    """All sliding-window examples of the training prefixes (every position after the first)."""
    for user, seq in train.items():
        for t in range(1, len(seq)):
            yield Example(user, tuple(seq[max(0, t - history) : t]), seq[t])


def build_dataset(
    name: str,
    interactions: Iterable[tuple[str, str, float]],
    item_text: dict[str, str] | None = None,
    min_user_interactions: int = 0,
    min_item_interactions: int = 0,
) -> RecDataset:
    """Turn ``(user, item, timestamp)`` rows into a :class:`RecDataset`.

    Ties in timestamps keep the input order (stable sort). Optional k-core filtering is iterated
    until both thresholds hold, as for the Amazon datasets of the paper. Items without text use
    their id as text so that every item can still be indexed.
    """
    rows = [(str(u), str(i), float(t), n) for n, (u, i, t) in enumerate(interactions)]
    while min_user_interactions > 1 or min_item_interactions > 1:
        users = Counter(r[0] for r in rows)
        items = Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= min_user_interactions and items[r[1]] >= min_item_interactions]
        if len(kept) == len(rows):
            break
        rows = kept
    rows.sort(key=lambda r: (r[0], r[2], r[3]))
    item_index: dict[str, int] = {}
    sequences: dict[str, list[int]] = {}
    for user, item, _, _ in sorted(rows, key=lambda r: (r[2], r[3])):
        # first appearance order in time gives deterministic ids independent of file order of users
        item_index.setdefault(item, len(item_index))
    for user, item, _, _ in rows:
        sequences.setdefault(user, []).append(item_index[item])
    item_ids = [None] * len(item_index)
    for item, idx in item_index.items():
        item_ids[idx] = item
    text = item_text or {}
    texts = [text.get(i) or f"item {i}" for i in item_ids]
    missing = sum(1 for i in item_ids if not text.get(i))
    if missing:
        logger.warning(f"{name}: {missing} of {len(item_ids)} items have no text; their id is used instead.")
    return RecDataset(name=name, item_ids=item_ids, item_text=texts, sequences=sequences)


# --------------------------------------------------------------------------------------------------
# RecBole atomic files (MovieLens-100K from the recbole wheel)
# --------------------------------------------------------------------------------------------------


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    path = str(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_atomic_file(lines: Iterable[str], source: str) -> tuple[list[str], list[list[str]]]:
    """Parse a RecBole atomic file (tab-separated, header ``name:type``); return field names and rows."""
    it = iter(lines)
    try:
        header = next(it).rstrip("\n").split("\t")
    except StopIteration:
        raise MalformedDataError(f"{source}: empty file") from None
    names = [h.split(":", 1)[0] for h in header]
    rows = []
    for lineno, line in enumerate(it, start=2):
        line = line.rstrip("\n")
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != len(names):
            raise MalformedDataError(
                f"{source}, line {lineno}: expected {len(names)} tab-separated fields {names}, got {len(cols)}: {line!r}"
            )
        rows.append(cols)
    return names, rows


def _parse_interactions(
    names: list[str], rows: list[list[str]], source: str, user: str, item: str, time: str
) -> list[tuple[str, str, float]]:
    for col in (user, item, time):
        if col not in names:
            raise MalformedDataError(f"{source}: missing column {col!r} (found {names})")
    u, i, t = names.index(user), names.index(item), names.index(time)
    out = []
    for lineno, cols in enumerate(rows, start=2):
        try:
            ts = float(cols[t])
        except ValueError:
            raise MalformedDataError(f"{source}, line {lineno}: timestamp {cols[t]!r} is not a number") from None
        if not cols[u] or not cols[i]:
            raise MalformedDataError(f"{source}, line {lineno}: empty user or item id")
        out.append((cols[u], cols[i], ts))
    return out


def find_recbole_ml100k() -> Path:
    """Directory of ``dataset_example/ml-100k`` inside the installed ``recbole`` package (not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MovieLens-100K is read from the recbole wheel: run `pip install --no-deps recbole==1.2.1` "
            "or pass the directory (or .whl file) that contains ml-100k.inter and ml-100k.item."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset_example" / "ml-100k"
        if (candidate / "ml-100k.inter").is_file():
            return candidate
    raise FileNotFoundError(f"recbole is installed at {list(spec.submodule_search_locations)} but has no ml-100k example")


def _ml100k_lines(path: str | os.PathLike | None, suffix: str) -> tuple[list[str], str]:
    """Lines of ``ml-100k.{suffix}`` from a directory, a recbole wheel (zip) or the installed package."""
    root = Path(path) if path is not None else find_recbole_ml100k()
    if root.is_file() and root.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(root) as zf:
            member = next((n for n in zf.namelist() if n.endswith(f"ml-100k/ml-100k.{suffix}")), None)
            if member is None:
                raise FileNotFoundError(f"{root} has no ml-100k/ml-100k.{suffix}")
            return zf.read(member).decode("utf-8").splitlines(), f"{root}!{member}"
    file = root / f"ml-100k.{suffix}"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    with open(file, encoding="utf-8") as f:
        return f.read().splitlines(), str(file)


def load_movielens_100k(path: str | os.PathLike | None = None) -> RecDataset:
    """MovieLens-100K from RecBole's atomic files; item text is ``title (year) genres``."""
    lines, source = _ml100k_lines(path, "inter")
    names, rows = read_atomic_file(lines, source)
    interactions = _parse_interactions(names, rows, source, "user_id", "item_id", "timestamp")
    lines, source = _ml100k_lines(path, "item")
    names, rows = read_atomic_file(lines, source)
    cols = {n: k for k, n in enumerate(names)}
    texts = {}
    for r in rows:
        title = r[cols["movie_title"]] if "movie_title" in cols else ""
        year = r[cols["release_year"]] if "release_year" in cols else ""
        genres = r[cols["class"]] if "class" in cols else ""
        texts[r[cols["item_id"]]] = " ".join(p for p in (title, f"({year})" if year else "", genres) if p)
    return build_dataset("ml-100k", interactions, texts)


# --------------------------------------------------------------------------------------------------
# Generic tables through `datasets`
# --------------------------------------------------------------------------------------------------


def _datasets_format(path: str) -> str:
    p = path.lower().removesuffix(".gz")
    for ext, fmt in ((".csv", "csv"), (".tsv", "csv"), (".json", "json"), (".jsonl", "json"), (".parquet", "parquet")):
        if p.endswith(ext):
            return fmt
    raise ValueError(f"cannot infer the format of {path}: use .csv, .tsv, .json, .jsonl or .parquet")


def _load_table(path: str):
    import datasets

    fmt = _datasets_format(path)
    kwargs = {"delimiter": "\t"} if path.lower().removesuffix(".gz").endswith(".tsv") else {}
    return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)


def _row_location(path: str, k: int) -> str:
    # CSV rows start after a header line; JSON-lines rows start at line 1.
    fmt = _datasets_format(path)
    return f"{path}, line {k + 2}" if fmt == "csv" else (f"{path}, line {k + 1}" if fmt == "json" else f"{path}, row {k}")


def load_interactions_table(
    interactions: str,
    items: str | None = None,
    user_column: str = "user_id",
    item_column: str = "item_id",
    time_column: str = "timestamp",
    text_columns: tuple[str, ...] = ("title",),
    name: str | None = None,
    min_user_interactions: int = 0,
    min_item_interactions: int = 0,
) -> RecDataset:
    """Any CSV/TSV/JSON(-lines)/Parquet interaction table (plus optional item table) via ``datasets``."""
    table = _load_table(interactions)
    for col in (user_column, item_column, time_column):
        if col not in table.column_names:
            raise MalformedDataError(f"{interactions}: missing column {col!r} (found {table.column_names})")
    rows = []
    for k, (u, i, t) in enumerate(zip(table[user_column], table[item_column], table[time_column])):
        if u is None or i is None or t is None or str(u) == "" or str(i) == "":
            raise MalformedDataError(f"{_row_location(interactions, k)}: empty user, item or timestamp")
        try:
            ts = float(t) if not hasattr(t, "timestamp") else t.timestamp()
        except (TypeError, ValueError):
            raise MalformedDataError(f"{_row_location(interactions, k)}: timestamp {t!r} is not a number") from None
        rows.append((str(u), str(i), ts))
    texts = None
    if items is not None:
        meta = _load_table(items)
        if item_column not in meta.column_names:
            raise MalformedDataError(f"{items}: missing column {item_column!r} (found {meta.column_names})")
        present = [c for c in text_columns if c in meta.column_names]
        if not present:
            raise MalformedDataError(f"{items}: none of the text columns {text_columns} exist (found {meta.column_names})")
        texts = {}
        for row in meta:
            texts[str(row[item_column])] = " ".join(str(row[c]) for c in present if row[c] not in (None, ""))
    return build_dataset(
        name or Path(interactions).stem, rows, texts, min_user_interactions, min_item_interactions
    )


# --------------------------------------------------------------------------------------------------
# Amazon reviews (2014 / 2018 / 2023 formats, as used by LC-Rec and OD-LLM)
# --------------------------------------------------------------------------------------------------


def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)``; also accepts the 2014 dumps that use Python dict literals."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise MalformedDataError(f"{path}, line {lineno}: neither JSON nor a Python dict literal") from None
            if not isinstance(record, dict):
                raise MalformedDataError(f"{path}, line {lineno}: expected an object, got {type(record).__name__}")
            yield lineno, record


def _first_key(record: dict, keys: tuple[str, ...]):
    for k in keys:
        if record.get(k) not in (None, ""):
            return record[k]
    return None


def load_amazon_reviews(
    reviews: str,
    meta: str | None = None,
    name: str | None = None,
    min_interactions: int = 5,
) -> RecDataset:
    """Amazon review dumps (``reviewerID/asin/unixReviewTime`` or 2023 ``user_id/parent_asin/timestamp``).

    ``meta`` provides item text from ``title`` (plus ``brand``/``categories``). 5-core filtering as
    in LC-Rec by default.
    """
    rows = []
    for lineno, r in _json_lines(reviews):
        user = _first_key(r, ("reviewerID", "user_id"))
        item = _first_key(r, ("parent_asin", "asin"))
        ts = _first_key(r, ("unixReviewTime", "timestamp"))
        if user is None or item is None or ts is None:
            raise MalformedDataError(f"{reviews}, line {lineno}: needs user (reviewerID/user_id), item (asin) and time")
        try:
            rows.append((str(user), str(item), float(ts)))
        except (TypeError, ValueError):
            raise MalformedDataError(f"{reviews}, line {lineno}: timestamp {ts!r} is not a number") from None
    texts = None
    if meta is not None:
        texts = {}
        for lineno, r in _json_lines(meta):
            item = _first_key(r, ("parent_asin", "asin"))
            if item is None:
                raise MalformedDataError(f"{meta}, line {lineno}: no asin/parent_asin")
            parts = [str(r.get("title") or "")]
            if r.get("brand"):
                parts.append(str(r["brand"]))
            cats = r.get("categories") or r.get("category")
            if isinstance(cats, list) and cats:
                flat = cats[-1] if isinstance(cats[-1], list) else cats
                parts.append(" ".join(map(str, flat[-2:])))
            texts[str(item)] = " ".join(p for p in parts if p).strip()
    return build_dataset(name or Path(reviews).name.split(".")[0], rows, texts, min_interactions, min_interactions)
