"""Calibration data: every accepted input form becomes right-padded ``input_ids`` plus an ``attention_mask``.

Accepted: a LongTensor ``[N, L]``, a list of token-id lists, a list of strings (needs a tokenizer),
or a ``datasets.Dataset`` with an ``input_ids`` or ``text`` column. All checks happen here, before
any forward pass, so bad data fails in milliseconds with an error that says what to change.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


@dataclass
class CalibrationSet:
    """The whole calibration set: right-padded token ids ``[N, L]`` and a 0/1 mask of the real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive slices of ``batch_size`` sequences (the last one may be shorter)."""
        for start in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]


def _token_list(seq: Any, row: int) -> list[int]:
    """One sequence of token ids as a list of Python ints, or a ValueError saying which row is wrong."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1 or seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise ValueError(
                f"Calibration sequence {row} must be a 1-D integer tensor of token ids, got dtype={seq.dtype}, "
                f"shape={tuple(seq.shape)}."
            )
        return [int(v) for v in seq.tolist()]
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) and not hasattr(seq, "tolist"):
        raise ValueError(
            f"Calibration sequence {row} is a {type(seq).__name__}; each sequence must be a list of token ids "
            "(or pass a list of strings, all of them text)."
        )
    values = seq.tolist() if hasattr(seq, "tolist") else list(seq)
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"Calibration sequence {row} contains {value!r} ({type(value).__name__}); token ids must be integers."
            )
        if not 0 <= value < 2**62:
            raise ValueError(
                f"Calibration sequence {row} contains token id {value}; token ids are in [0, vocabulary size)."
            )
        out.append(int(value))
    return out


def _masked(seq: Any, seq_mask: Any, row: int) -> list[int]:
    """The tokens of one sequence whose attention mask is 1."""
    seq, seq_mask = _token_list(seq, row), _token_list(seq_mask, row)
    if len(seq) != len(seq_mask) or any(m not in (0, 1) for m in seq_mask):
        raise ValueError(f"Calibration attention_mask row {row} must be 0/1 values of the same length as its input_ids.")
    return [t for t, m in zip(seq, seq_mask) if m]


def _rows(value: Any, what: str) -> list:
    if isinstance(value, torch.Tensor):
        if value.dim() != 2:
            raise ValueError(f"Calibration '{what}' must be a 2-D tensor [N, L], got shape {tuple(value.shape)}.")
        return list(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"Calibration '{what}' must be a 2-D tensor or a list of sequences, got {type(value).__name__}.")


def _from_token_lists(sequences: Sequence[Sequence[int]], pad_token_id: int) -> CalibrationSet:
    sequences = [list(seq) for seq in sequences]
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return CalibrationSet(ids, mask)


def _tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    if tokenizer is None:
        raise ValueError(
            "Calibration data is text but no tokenizer is available. Pass `tokenizer=` to "
            "ODLLMCompressor.from_pretrained (or load the model from a directory/Hub id that has one), "
            "or give token ids instead."
        )
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def prepare_calibration(
    data: Any,
    *,
    tokenizer: Any = None,
    num_samples: int = 256,
    max_length: int = 2048,
    min_tokens: int = 64,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
) -> CalibrationSet:
    """Normalize ``data`` to a :class:`CalibrationSet` of at most ``num_samples`` sequences.

    Raises ``ValueError`` for empty data, pad-only data, fewer than ``min_tokens`` real tokens,
    token ids outside ``[0, vocab_size)``, strings without a tokenizer, or an unknown type.
    """
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    # Tokens equal to a known pad id never count; an unknown pad id only fills the padding we add.
    known_pad = pad_token_id
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0
    if data is None:
        raise ValueError("No calibration data given. Pass e.g. ~256 representative sequences to compress().")

    if isinstance(data, Mapping):  # a tokenizer's BatchEncoding / {"input_ids", "attention_mask"}
        if "input_ids" not in data:
            raise ValueError(
                f"A calibration mapping needs an 'input_ids' entry (like a tokenizer's output); it has {sorted(map(str, data))}."
            )
        ids, given_mask = data["input_ids"], data.get("attention_mask")
        if given_mask is None:
            data = ids
        else:
            ids, given_mask = _rows(ids, "input_ids"), _rows(given_mask, "attention_mask")
            if len(ids) != len(given_mask):
                raise ValueError("Calibration 'attention_mask' must have as many rows as 'input_ids'.")
            rows = [_masked(seq, seq_mask, row) for row, (seq, seq_mask) in enumerate(zip(ids, given_mask))]
            if len(rows) and not any(rows):
                raise ValueError("Calibration data has only padding tokens (attention_mask is all 0); give sequences with real text.")
            data = [row for row in rows if row]  # rows that are all padding carry no information

    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"A calibration tensor must be a LongTensor of token ids with shape [N, L], got "
                f"dtype={data.dtype}, shape={tuple(data.shape)}."
            )
        ids = data[:num_samples, :max_length].long()
        # A tensor carries no padding information: every position counts unless it is the pad id
        # *and* pad differs from real content (tensors from tokenizers are usually unpadded).
        mask = torch.ones_like(ids)
        batch = CalibrationSet(ids, mask)
    else:
        if _is_dataset(data):
            columns = data.column_names
            if "input_ids" in columns:
                data = data["input_ids"]
            elif "text" in columns:
                data = data["text"]
            else:
                raise ValueError(
                    f"A calibration datasets.Dataset needs an 'input_ids' or 'text' column; it has {columns}. "
                    "Rename the column (dataset.rename_column(old, 'text'))."
                )
        if isinstance(data, str):
            raise ValueError("Calibration data is a single string; pass a list of strings (one per sequence).")
        if not isinstance(data, (list, tuple)):
            try:
                data = list(data)
            except TypeError:
                raise ValueError(
                    f"Unsupported calibration data type {type(data).__name__}: use a LongTensor [N, L], a list of "
                    "token-id lists, a list of strings, or a datasets.Dataset with 'input_ids' or 'text'."
                ) from None
        data = list(data)[:num_samples]
        if len(data) == 0:
            raise ValueError("Calibration data is empty. Pass e.g. ~256 representative sequences to compress().")
        if all(isinstance(item, Mapping) for item in data):  # [{"input_ids": [...], "attention_mask": [...]}, ...]
            if not all("input_ids" in item for item in data):
                raise ValueError("Each calibration sample dict needs an 'input_ids' entry (like a tokenizer's output).")
            data = [
                _masked(item["input_ids"], item["attention_mask"], row) if item.get("attention_mask") is not None
                else _token_list(item["input_ids"], row)
                for row, item in enumerate(data)
            ]
            if not any(len(seq) for seq in data):
                raise ValueError("Calibration data has only padding tokens (attention_mask is all 0); give sequences with real text.")
            data = [seq for seq in data if len(seq)]
        if all(isinstance(item, str) for item in data):
            data = _tokenize(data, tokenizer, max_length)
        elif any(isinstance(item, str) for item in data):
            raise ValueError("Calibration list mixes strings and token ids; use one kind.")
        data = [_token_list(seq, row)[:max_length] for row, seq in enumerate(data)]
        if any(len(seq) == 0 for seq in data):
            raise ValueError("Calibration data contains an empty sequence; drop empty rows before compressing.")
        batch = _from_token_lists(data, pad_token_id)

    if batch.input_ids.numel() == 0:
        raise ValueError("Calibration data is empty. Pass e.g. ~256 representative sequences to compress().")
    ids = batch.input_ids
    if int(ids.min()) < 0:
        raise ValueError(
            f"Calibration token ids must be non-negative; found {int(ids.min())}. Tokenize with the model's own tokenizer."
        )
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"Calibration token ids must be in [0, {vocab_size}) (the model's vocabulary); found "
            f"min={int(ids.min())}, max={int(ids.max())}. Tokenize with the model's own tokenizer "
            "(or resize the embeddings after adding tokens)."
        )
    real = batch.attention_mask.bool()
    if known_pad is not None:
        real &= ids != known_pad
        batch.attention_mask = real.long() * batch.attention_mask
    num_tokens = int(real.sum())
    if num_tokens == 0:
        raise ValueError("Calibration data has only padding tokens; give sequences with real text.")
    if num_tokens < min_tokens:
        raise ValueError(
            f"Calibration data has {num_tokens} non-padding tokens, fewer than min_calibration_tokens="
            f"{min_tokens}. Give more or longer sequences (OD-LLM uses ~256 sequences), or lower "
            "ODLLMConfig(min_calibration_tokens=...) if you know what you are doing."
        )
    return batch


def _is_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, datasets.Dataset)
