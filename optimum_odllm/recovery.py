"""Fine-tuning around OD-LLM: recovery of the low-rank factors after compression, and compress-at-the-end.

Compressed checkpoints are ordinary float ``nn.Linear`` factors behind a trainable transformers
quantizer (``is_trainable``/``is_qat_trainable``), so ``transformers.Trainer`` fine-tunes them directly.
Two recovery styles:

* **full factors**: :func:`mark_factors_trainable` freezes everything but the ``up``/``down`` factors
  (optionally their biases); the fine-tuned factors are saved/loaded like any weights;
* **LoRA**: :func:`apply_lora_to_factors` puts peft LoRA adapters on the ``up``/``down`` factors;
  :func:`merge_lora` folds them back so the result is again a plain OD-LLM checkpoint.

:class:`CompressAtEndCallback` (or :func:`compress_after_training`) runs the compressor when a
fine-tuning run of a dense model ends, so "train, then compress" is one ``trainer.train()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .compressor import ODLLMCompressor
from .configuration import ODLLMConfig
from .lowrank import LowRankLinear
from .quantization import refuse_lora_on_quantized


logger = logging.get_logger(__name__)


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every :class:`LowRankLinear` of ``model`` by full name (peft wrappers included).

    Where every recovery path starts, so a model with integer factors (``factor_bits``) is refused here with
    the way out (:func:`~optimum_odllm.quantization.dequantize_model`), never trained as if it were dense.
    """
    refuse_lora_on_quantized(model)
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def _require_lowrank(model: nn.Module) -> dict[str, LowRankLinear]:
    modules = lowrank_modules(model)
    if not modules:
        raise ValueError(
            "The model has no LowRankLinear factors: compress it first (ODLLMCompressor(...).compress(data)) or "
            "load an OD-LLM checkpoint after `import optimum_odllm`."
        )
    return modules


def mark_factors_trainable(model: nn.Module, train_bias: bool = True, train_others: bool = False) -> int:
    """Make only the low-rank ``up``/``down`` factors trainable (recovery fine-tuning); return that count.

    Training only the factors recovers most of the quality at a fraction of the optimizer memory and
    keeps the checkpoint layout unchanged. ``train_others=True`` also trains embeddings, norms and head.
    """
    modules = _require_lowrank(model)
    for param in model.parameters():
        param.requires_grad_(train_others)
    for module in modules.values():
        module.down.weight.requires_grad_(True)
        module.up.weight.requires_grad_(True)
        if module.up.bias is not None:
            module.up.bias.requires_grad_(train_bias)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Recovery fine-tuning: {trainable:,} trainable parameters (low-rank factors).")
    return trainable


def lowrank_lora_targets(model: nn.Module) -> list[str]:
    """Full names of every ``up``/``down`` factor (explicit, so LoRA never lands on dense ``up_proj``-style names)."""
    names = []
    for name in _require_lowrank(model):
        names += [f"{name}.down", f"{name}.up"]
    return names


def apply_lora_to_factors(
    model: nn.Module, r: int = 8, alpha: int | None = None, dropout: float = 0.0, **lora_kwargs: Any
) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the low-rank factors (needs ``pip install peft``)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - exercised only without peft
        raise ImportError("LoRA recovery needs peft: `pip install optimum-odllm[train]` (or `pip install peft`).") from err
    config = LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
        target_modules=lowrank_lora_targets(model), task_type="CAUSAL_LM", **lora_kwargs,
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the factors and return the plain (still low-rank) transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    return merge_lora(model)


class CompressAtEndCallback(TrainerCallback):
    """Compress the trained model with OD-LLM when ``trainer.train()`` ends (optionally saving it).

    Example::

        callback = CompressAtEndCallback(ODLLMConfig(ratio=0.5), calibration=train_texts[:256], save_directory="out")
        Trainer(model, args, train_dataset=ds, callbacks=[callback]).train()
        compressed = callback.compressor.model

    The trainer's model object is compressed in place (its linears become :class:`LowRankLinear`), so
    evaluating with the same trainer afterwards measures the compressed model.
    """

    def __init__(
        self,
        config: ODLLMConfig,
        calibration: Any,
        save_directory: str | Path | None = None,
        tokenizer: Any = None,
        device: str | None = None,
    ):
        if calibration is None and (config.whitening or config.progressive):
            raise ValueError("CompressAtEndCallback needs calibration data (e.g. ~256 training sequences).")
        self.config = config
        self.calibration = calibration
        self.save_directory = save_directory
        self.tokenizer = tokenizer
        self.device = device
        self.compressor: ODLLMCompressor | None = None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None,
        processing_class: Any = None, **kwargs: Any,
    ) -> None:
        if model is None:
            raise RuntimeError("CompressAtEndCallback got no model from the Trainer.")
        model = _unwrap(model)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if hasattr(tokenizer, "tokenizer") and not callable(getattr(tokenizer, "pad", None)):
            tokenizer = tokenizer.tokenizer  # processors wrap their tokenizer
        self.compressor = ODLLMCompressor(model, config=self.config, tokenizer=tokenizer)
        was_training = model.training
        self.compressor.compress(self.calibration, device=self.device)
        model.train(was_training)
        if self.save_directory is not None and state.is_world_process_zero:
            self.compressor.save_pretrained(self.save_directory)
        logger.info(f"Compressed the fine-tuned model with OD-LLM (ratio {self.config.ratio:g}).")


def compress_after_training(
    trainer: Any,
    config: ODLLMConfig,
    calibration: Any,
    save_directory: str | Path | None = None,
    device: str | None = None,
    **train_kwargs: Any,
) -> ODLLMCompressor:
    """Recipe: ``trainer.train(**train_kwargs)`` then OD-LLM-compress (and save) the result; returns the compressor."""
    callback = CompressAtEndCallback(config, calibration, save_directory, tokenizer=trainer.processing_class, device=device)
    trainer.add_callback(callback)
    try:
        trainer.train(**train_kwargs)
    finally:
        trainer.remove_callback(callback)
    assert callback.compressor is not None
    return callback.compressor


def sample_calibration(samples: Sequence[dict], n: int, seed: int = 0) -> list[list[int]]:
    """``n`` random ``input_ids`` of training samples: the model's own input distribution, never test data."""
    import random

    rng = random.Random(seed)
    chosen = rng.sample(list(samples), min(n, len(samples)))
    return [list(s["input_ids"]) for s in chosen]
