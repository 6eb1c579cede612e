"""Shared fixtures: tiny decoder-only models built from configs, and an offline tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 320


def tiny_config(arch: str = "llama", **overrides):
    """A 2-layer model of the given architecture, small enough for unit tests."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    common.update(overrides)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**common)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()


def calibration_ids(n: int = 16, length: int = 24, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=generator)


def word_tokenizer(index_tokens: tuple[str, ...] = ()):
    """A word-level tokenizer built here with `tokenizers` (no download); ``index_tokens`` (e.g. ``<a_0>``)
    take the ids of the last words, so a recommender's item index matches it without growing the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 4 - len(index_tokens))] + list(index_tokens)
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def random_sentences(n: int = 16, length: int = 20, seed: int = 2) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 4, (n, length), generator=generator)
    return [" ".join(f"w{int(i)}" for i in row) for row in ids]


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def calib():
    return calibration_ids()


#: refinement steps of the *default* (``refine_steps=None``) in unit tests: the same code path as the library's
#: 256, at a fraction of the time (test_refinement.py checks the real default; subprocess tests run 256)
TEST_DEFAULT_REFINE_STEPS = 8


@pytest.fixture(autouse=True)
def _short_default_refinement(monkeypatch):
    import optimum_odllm.refinement as refinement

    monkeypatch.setattr(refinement, "DEFAULT_REFINE_STEPS", TEST_DEFAULT_REFINE_STEPS)
