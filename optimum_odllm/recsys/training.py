"""Instruction fine-tuning recipe with the Hugging Face ``Trainer``.

Two starting points: a base causal LM from the Hub or a local path (LC-Rec's setting; index tokens
are added and embeddings resized), or - fully offline - a small Llama built from a config with a
word-level tokenizer trained here. The same ``Trainer`` call serves both, so ``accelerate launch``
spreads either over several GPUs without code changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging

from .indexing import ItemIndex
from .instructions import IGNORE_INDEX, add_index_tokens, template_texts, train_word_tokenizer


logger = logging.get_logger(__name__)


@dataclass
class PadCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) and builds the attention mask."""

    pad_id: int

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for k, f in enumerate(features):
            n = len(f["input_ids"])
            ids[k, :n] = torch.tensor(f["input_ids"])
            labels[k, :n] = torch.tensor(f["labels"])
            mask[k, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_offline_tokenizer(item_texts: Sequence[str], index: ItemIndex, vocab_size: int = 2000):
    """Word-level tokenizer trained on template words and item texts, plus the index tokens."""
    tokenizer = train_word_tokenizer([*template_texts(), *item_texts], vocab_size=vocab_size)
    add_index_tokens(tokenizer, index)
    return tokenizer


def build_offline_model(tokenizer: PreTrainedTokenizerBase, hidden_size: int = 128, num_layers: int = 2,
                        num_heads: int = 4, intermediate_size: int | None = None, max_positions: int = 256,
                        attention_dropout: float = 0.0, seed: int = 0) -> LlamaForCausalLM:
    """A small randomly initialised Llama sized to the tokenizer (no download); ``attention_dropout`` is
    active in training only (Llama has no other dropout)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, attention_dropout=attention_dropout, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def load_base_model(name_or_path: str, index: ItemIndex, **model_kwargs):
    """LC-Rec setting: a pretrained causal LM (Hub id or path) with the index tokens added."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    added = add_index_tokens(tokenizer, index, model)
    logger.info(f"added {added} index tokens to {name_or_path}")
    return model, tokenizer


def train_recommender(model, tokenizer: PreTrainedTokenizerBase, samples: Sequence[dict], output_dir: str | os.PathLike,
                      epochs: float = 10, learning_rate: float = 1e-3, batch_size: int = 32, warmup_ratio: float = 0.05,
                      weight_decay: float = 0.01, seed: int = 0, logging_steps: int = 50, **training_kwargs):
    """Fine-tune with ``Trainer`` (cosine schedule, response-only loss); returns the trained model.

    Extra keyword arguments go to :class:`~transformers.TrainingArguments` (e.g. ``bf16=True``,
    ``gradient_accumulation_steps``); on several GPUs run the calling script with ``accelerate launch``
    (DDP: ``batch_size`` is per process, so the global batch is ``batch_size x processes``). The warmup is
    passed as a fraction so that the ``Trainer`` applies it to the real number of optimizer steps, which
    depends on the number of processes.
    """
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, warmup_steps=warmup_ratio,
        lr_scheduler_type="cosine", weight_decay=weight_decay, logging_steps=logging_steps, save_strategy="no",
        report_to="none", seed=seed, data_seed=seed, train_sampling_strategy="group_by_length",
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), **training_kwargs,
    )
    trainer = Trainer(model=model, args=args, train_dataset=list(samples), data_collator=PadCollator(tokenizer.pad_token_id))
    trainer.train()
    return trainer.model
