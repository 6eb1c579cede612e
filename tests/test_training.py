"""Recovery fine-tuning of compressed models with transformers.Trainer (full factors and LoRA), compress-at-end."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from conftest import calibration_ids, tiny_model

from optimum_odllm import LowRankLinear, ODLLMCompressor, ODLLMConfig
from optimum_odllm.recovery import (
    CompressAtEndCallback,
    apply_lora_to_factors,
    lowrank_modules,
    mark_factors_trainable,
    merge_lora,
)

TRAIN = calibration_ids(8, 24, seed=7)


def _dataset():
    return [{"input_ids": row, "labels": row} for row in TRAIN]


def _loss(model) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=TRAIN, labels=TRAIN).loss)


def _args(tmp_path, steps=8):
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, learning_rate=1e-2, per_device_train_batch_size=8,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100,
    )


def _compressed_model():
    compressor = ODLLMCompressor.from_pretrained(tiny_model(), config=ODLLMConfig(ratio=0.3, rank_multiple=8))
    return compressor.compress(calibration_ids(16, 24))


def test_factors_train_with_trainer_and_reload_bit_for_bit(tmp_path):
    model = _compressed_model()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    trainable = mark_factors_trainable(model)
    factors = sum(p.numel() for m in lowrank_modules(model).values() for p in m.parameters())
    assert trainable == factors
    before = _loss(model)
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset()).train()
    after = _loss(model)
    assert after < before - 0.1, (before, after)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)  # only factors moved

    model.save_pretrained(tmp_path / "recovered")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    for name, module in lowrank_modules(model).items():
        other = reloaded.get_submodule(name)
        assert isinstance(other, LowRankLinear)
        assert torch.equal(other.up.weight, module.up.weight) and torch.equal(other.down.weight, module.down.weight)
    assert abs(_loss(reloaded) - after) < 1e-6


def test_lora_on_factors_trains_and_merges(tmp_path):
    model = _compressed_model()
    before = _loss(model)
    peft_model = apply_lora_to_factors(model, r=4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and (".up." in n or ".down." in n) for n in trainable)
    Trainer(model=peft_model, args=_args(tmp_path), train_dataset=_dataset()).train()
    merged = merge_lora(peft_model)
    after = _loss(merged)
    assert after < before - 0.05, (before, after)
    assert all(isinstance(m, LowRankLinear) for m in lowrank_modules(merged).values())
    merged.save_pretrained(tmp_path / "lora")
    assert abs(_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "lora")) - after) < 1e-6


def test_compress_at_end_callback(tmp_path):
    model = tiny_model()
    callback = CompressAtEndCallback(
        ODLLMConfig(ratio=0.5, rank_multiple=8), calibration=calibration_ids(16, 24), save_directory=tmp_path / "out"
    )
    Trainer(model=model, args=_args(tmp_path, steps=3), train_dataset=_dataset(), callbacks=[callback]).train()
    assert callback.compressor is not None and callback.compressor.model is model
    assert lowrank_modules(model)  # the trainer's model object is the compressed one now
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(TRAIN).logits, model.eval()(TRAIN).logits)
    assert (tmp_path / "out" / "README.md").is_file()
