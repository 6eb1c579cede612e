"""Calibration data: every accepted input form becomes right-padded ``input_ids`` plus an ``attention_mask``.

Accepted: a LongTensor ``[N, L]``, a list of token-id lists, a list of strings (needs a tokenizer),
or a ``datasets.Dataset`` with an ``input_ids`` or ``text`` column. All checks happen here, before
any forward pass, so bad data fails in milliseconds with an error that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class CalibrationBatch:
    """Right-padded token ids ``[N, L]`` and a 0/1 mask of the real (non-pad) tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int):
        for start in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]


def _from_token_lists(sequences: Sequence[Sequence[int]], pad_token_id: int) -> CalibrationBatch:
    sequences = [list(map(int, seq)) for seq in sequences]
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return CalibrationBatch(ids, mask)


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
) -> CalibrationBatch:
    """Normalize ``data`` to a :class:`CalibrationBatch` of at most ``num_samples`` sequences.

    Raises ``ValueError`` for empty data, pad-only data, fewer than ``min_tokens`` real tokens,
    token ids outside ``[0, vocab_size)``, strings without a tokenizer, or an unknown type.
    """
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0
    if data is None:
        raise ValueError("No calibration data given. Pass e.g. ~256 representative sequences to compress().")

    mask = None
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
        batch = CalibrationBatch(ids, mask)
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
        if all(isinstance(item, str) for item in data):
            data = _tokenize(data, tokenizer, max_length)
        elif any(isinstance(item, str) for item in data):
            raise ValueError("Calibration list mixes strings and token ids; use one kind.")
        data = [list(seq)[:max_length] for seq in data]
        if any(len(seq) == 0 for seq in data):
            raise ValueError("Calibration data contains an empty sequence; drop empty rows before compressing.")
        batch = _from_token_lists(data, pad_token_id)

    if batch.input_ids.numel() == 0:
        raise ValueError("Calibration data is empty. Pass e.g. ~256 representative sequences to compress().")
    ids = batch.input_ids
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"Calibration token ids must be in [0, {vocab_size}) (the model's vocabulary); found "
            f"min={int(ids.min())}, max={int(ids.max())}. Tokenize with the model's own tokenizer "
            "(or resize the embeddings after adding tokens)."
        )
    real = batch.attention_mask.bool()
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        real &= ids != tokenizer.pad_token_id
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
