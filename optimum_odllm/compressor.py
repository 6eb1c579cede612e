"""``ODLLMCompressor``: the one-shot OD-LLM pipeline behind Optimum's quantizer interface.

Stages, one decoder layer at a time (so memory holds one layer's activations, as in GPTQ):

1. **capture**   run the model up to layer 0 on the calibration batches and keep its inputs;
2. **statistics** per layer, forward the stored inputs with hooks that accumulate ``X^T X`` per input
   group (float64 by default, padding excluded) and, with progressive alignment, ``X^T X_ref``
   between the drifted inputs of the compressed prefix and the original model's inputs;
3. **solve**     Cholesky ``S`` (jitter if needed), closed-form aligned target, truncated SVD of ``W S``;
4. **write back** swap each ``nn.Linear`` for a :class:`LowRankLinear` and push the stored hidden
   states through the layer to feed the next one.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .calibration import CalibrationBatch, prepare_calibration, validate_item_index_file
from .checkpointing import (
    CHECKPOINT_DIRNAME,
    LayerCheckpointer,
    ResumeState,
    hash_tensors,
    model_fingerprint,
    remove_checkpoint,
    settings_fingerprint,
)
from .configuration import QUANT_METHOD, ODLLMConfig
from .hf_quantizer import ODLLMHfQuantizer
from .layerwise import ActivationHooks, LayerInputs, capture_first_layer_inputs, find_decoder_layers, run_layer
from .linalg import aligned_target, aligned_target_times_factor, check_finite, robust_cholesky, truncated_svd
from .lowrank import LowRankLinear, set_submodule
from .ranks import ModuleShape, allocate_ranks, kept_parameters
from .utils import atomic_directory, count_parameters


logger = logging.get_logger(__name__)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class ModuleReport:
    """What happened to one targeted module."""

    name: str
    in_features: int
    out_features: int
    rank: int | None
    truncation_loss: float = 0.0
    relative_loss: float = 0.0
    jitter: float = 0.0


@dataclass
class CompressionReport:
    """Summary of a compression run (used for logs, model cards and benchmarks)."""

    params_before: int = 0
    params_after: int = 0
    target_params_before: int = 0
    target_params_after: int = 0
    num_calibration_samples: int = 0
    num_calibration_tokens: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def kept_ratio(self) -> float:
        return self.target_params_after / max(1, self.target_params_before)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept_ratio"] = self.kept_ratio
        return out


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (stored transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or ("." + p + ".") in ("." + name + ".") for p in patterns)


class ODLLMCompressor(OptimumQuantizer):
    """Compress a causal LM (e.g. an LC-Rec recommender) to ``config.ratio`` of its parameters.

    Example::

        compressor = ODLLMCompressor.from_pretrained("path/or/hub-id", config=ODLLMConfig(ratio=0.5))
        model = compressor.compress(calibration_texts)
        compressor.save_pretrained("out")   # AutoModelForCausalLM.from_pretrained("out") after `import optimum_odllm`
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: ODLLMConfig | None = None,
        tokenizer: Any = None,
        source: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else ODLLMConfig()
        if not isinstance(self.config, ODLLMConfig):
            raise TypeError(f"config must be an ODLLMConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self.source = source or getattr(getattr(model, "config", None), "_name_or_path", None)
        self.report: CompressionReport | None = None
        self.calibration_source: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | Path | PreTrainedModel,
        file_name: str | None = None,
        *,
        config: ODLLMConfig | None = None,
        tokenizer: Any = None,
        **model_kwargs: Any,
    ) -> "ODLLMCompressor":
        """Load the model to compress from a Hub id or local directory, or wrap an in-memory model.

        ``file_name`` is accepted for Optimum's interface and ignored (checkpoints are directories).
        ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``, ``revision``).
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, config=config, tokenizer=tokenizer)
        source = str(model_or_path)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, revision=model_kwargs.get("revision"))
            except (OSError, ValueError) as err:
                logger.info(f"No tokenizer loaded from {source} ({err}); calibration must be token ids.")
        return cls(model, config=config, tokenizer=tokenizer, source=source)

    # ------------------------------------------------------------------ validation
    def target_modules(self) -> dict[str, nn.Module]:
        """The modules that would be factorized, by full name, after validating the model."""
        model = self.model
        existing = getattr(getattr(model, "config", None), "quantization_config", None)
        if existing is not None:
            method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
            method = getattr(method, "value", method)
            if method == QUANT_METHOD:
                raise ValueError(
                    "This model is already OD-LLM-compressed. Re-compressing low-rank factors is not supported: "
                    "compress the original dense model again with a smaller ratio instead."
                )
            raise ValueError(
                f"This model is already quantized with '{method}'. OD-LLM factorizes dense float weights: "
                "load the unquantized checkpoint and compress that."
            )
        ours = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("optimum_odllm.")})
        if ours:  # LowRankLinear, or the fused inference modules built from it
            raise ValueError(
                f"This model already contains {', '.join(ours)} modules (OD-LLM-compressed). Compress the original "
                "dense model instead."
            )
        adapters = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")})
        if adapters:
            raise ValueError(
                f"This model carries peft adapters ({', '.join(adapters[:3])}). Merge them first "
                "(model = model.merge_and_unload()) and compress the merged dense model."
            )
        layers_name, _ = find_decoder_layers(model)
        cfg = self.config
        found: dict[str, nn.Module] = {}
        unsupported: list[str] = []
        for name, module in model.named_modules():
            if not name.startswith(layers_name + "."):
                continue
            if isinstance(module, (nn.Linear, Conv1D)):
                found[name] = module
            elif type(module).__name__ in {"Linear4bit", "Linear8bitLt", "QuantLinear"}:
                unsupported.append(f"{name} ({type(module).__name__})")
        if unsupported:
            raise ValueError(f"Quantized layers cannot be factorized: {unsupported[:3]}. Compress the dense model.")
        if cfg.target_modules is not None:
            unknown = [p for p in cfg.target_modules if not any(_matches(n, [p]) for n in found)]
            if unknown:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n in found})
                raise ValueError(
                    f"target_modules {unknown} match no nn.Linear inside the decoder layers '{layers_name}'. "
                    f"Available module names: {suffixes}."
                )
            found = {n: m for n, m in found.items() if _matches(n, cfg.target_modules)}
        if cfg.modules_to_not_convert:
            found = {n: m for n, m in found.items() if not _matches(n, cfg.modules_to_not_convert)}
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear (or Conv1D) layers inside its decoder layers "
                f"'{layers_name}' to compress (after target_modules/modules_to_not_convert)."
            )
        for name, module in found.items():
            weight = linear_weight(module)
            if weight.device.type == "meta":
                raise ValueError(
                    f"The weight of {name} is on the meta device (offloaded or not loaded). Load the whole model "
                    "into memory (no disk offload in device_map) before compressing."
                )
            if not weight.is_floating_point():
                raise ValueError(f"The weight of {name} has dtype {weight.dtype}; OD-LLM needs float weights.")
            check_finite(weight, f"weight of {name}")
        return found

    def _validate_item_index(self) -> None:
        """Check the recommender's ``item_index.json`` (``self.item_index_file`` or next to the model) against the tokenizer."""
        index_file = getattr(self, "item_index_file", None)
        if index_file is None and self.source and Path(self.source, "item_index.json").is_file():
            index_file = Path(self.source, "item_index.json")
        if index_file is None:
            return
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is not None and hasattr(embeddings, "num_embeddings"):
            vocab = embeddings.num_embeddings
        validate_item_index_file(index_file, self.tokenizer, vocab)

    def _prepare_calibration(self, data: Any) -> CalibrationBatch | None:
        cfg = self.config
        if data is None and not cfg.whitening and not cfg.progressive:
            return None  # plain SVD needs no data
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is not None and hasattr(embeddings, "num_embeddings"):
            vocab = embeddings.num_embeddings
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return prepare_calibration(
            data,
            tokenizer=self.tokenizer,
            num_samples=cfg.num_calibration_samples,
            max_length=cfg.calibration_seq_len,
            min_tokens=cfg.min_calibration_tokens,
            vocab_size=vocab,
            pad_token_id=pad_id if isinstance(pad_id, int) and not isinstance(pad_id, bool) else None,
        )

    # ------------------------------------------------------------------ compression
    def compress(
        self,
        calibration_dataset: Any = None,
        device: str | torch.device | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> PreTrainedModel:
        """Compress ``self.model`` in place and return it.

        Args:
            calibration_dataset: LongTensor ``[N, L]``, list of token-id lists, list of strings, a
                tokenizer output (``{"input_ids", "attention_mask"}``, or a list of such per-sample dicts) or a
                ``datasets.Dataset`` with ``input_ids``/``text`` (first ``num_calibration_samples`` used).
            device: where each layer is processed (default: CUDA if available, else the model's device).
                The model itself stays where it is; layers visit ``device`` one at a time.
            checkpoint_dir: if set, after every decoder layer the factors and the hidden states needed to
                continue are saved there atomically (safetensors + a JSON manifest), so an interrupted run
                can resume. :meth:`save_pretrained` deletes it after a successful save.
            resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (the result is
                bit-identical to an uninterrupted run). A checkpoint made with other settings, data or
                model raises :class:`~optimum_odllm.checkpointing.CheckpointError`. With ``resume=False``
                an existing checkpoint is discarded.
        """
        cfg = self.config
        cfg.post_init()
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (the directory the interrupted run checkpointed to).")
        targets = self.target_modules()
        calibration = self._prepare_calibration(calibration_dataset)
        self._validate_item_index()
        if calibration_dataset is not None and self.calibration_source is None:
            self.calibration_source = _describe(calibration_dataset)
        device = torch.device(device) if device is not None else _default_device(self.model)

        shapes = [ModuleShape(n, *linear_shape(m)) for n, m in targets.items()]
        ranks = allocate_ranks(shapes, cfg.ratio, cfg.rank_multiple)
        for shape in shapes:  # never store a factorization that is not smaller than the dense weight
            rank = ranks[shape.name]
            if rank is not None and shape.lowrank_params(rank) >= shape.dense_params:
                ranks[shape.name] = None
        widest = max(shapes, key=lambda s: s.in_features)
        if calibration is not None and calibration.num_tokens < widest.in_features:
            logger.warning(
                f"OD-LLM: the calibration data has {calibration.num_tokens} non-padding tokens, fewer than the "
                f"{widest.in_features} inputs of {widest.name}: its input covariance is singular and will be "
                "regularized with jitter. Use more calibration data for a faithful compression."
            )
        checkpointer = None
        if checkpoint_dir is not None and calibration is not None:
            checkpointer = LayerCheckpointer(
                checkpoint_dir,
                {
                    "settings": settings_fingerprint(cfg),
                    "calibration": hash_tensors(calibration.input_ids, calibration.attention_mask),
                    "model": model_fingerprint(self.model, targets, ranks),
                },
            )
            if checkpointer.exists() and not resume:
                logger.warning(f"Discarding the existing checkpoint in {checkpoint_dir} (resume=False).")
                checkpointer.clear()
            self._checkpoint_dir = Path(checkpoint_dir)
        report = CompressionReport(
            params_before=count_parameters(self.model),
            target_params_before=sum(s.dense_params for s in shapes),
            num_calibration_samples=0 if calibration is None else calibration.input_ids.shape[0],
            num_calibration_tokens=0 if calibration is None else calibration.num_tokens,
        )
        timer = _StageTimer(report.stage_seconds, device)
        was_training = self.model.training
        self.model.eval()
        try:
            if calibration is None:
                self._compress_data_free(targets, ranks, report, timer)
            else:
                self._compress_layerwise(targets, ranks, calibration, report, device, timer, checkpointer, resume)
        finally:
            self.model.train(was_training)

        report.target_params_after = kept_parameters(shapes, ranks)
        report.params_after = count_parameters(self.model)
        self.report = report
        cfg.ranks = {name: rank for name, rank in ranks.items() if rank is not None}
        cfg._kept_dense = not cfg.ranks
        if cfg.ranks:
            self._mark_compressed()
        else:
            logger.warning(
                f"OD-LLM: ratio={cfg.ratio} leaves every targeted module dense (a factorization would not save "
                "parameters), so the model is unchanged and will be saved as a plain dense checkpoint."
            )
        logger.info(
            f"OD-LLM: kept {report.kept_ratio:.3f} of the targeted parameters "
            f"({report.params_before:,} -> {report.params_after:,} parameters in the model)."
        )
        return self.model

    def _mark_compressed(self) -> None:
        """Attach the config/quantizer the way ``from_pretrained`` would, so saving writes quantization_config."""
        cfg = copy.deepcopy(self.config)
        self.model.config.quantization_config = cfg
        self.model.hf_quantizer = ODLLMHfQuantizer(cfg, pre_quantized=True)
        self.model.is_quantized = True
        self.model.quantization_method = QUANT_METHOD

    def _compress_data_free(self, targets: dict[str, nn.Module], ranks: dict[str, int | None], report: CompressionReport, timer: "_StageTimer") -> None:
        """``whitening=False, progressive=False``: plain truncated SVD of every weight."""
        solver = _DTYPES[self.config.solver_dtype]
        for name, module in logging.tqdm(list(targets.items()), desc="OD-LLM plain SVD"):
            rank = ranks[name]
            if rank is None:
                report.modules.append(ModuleReport(name, *linear_shape(module), None))
                continue
            weight = linear_weight(module).detach().to(solver)
            with timer("svd"):
                factors = truncated_svd(weight, rank, driver=self.config.svd_driver)
            self._write_back(name, module, factors.up, factors.down)
            report.modules.append(_module_report(name, module, rank, factors.singular_values, 0.0))

    def _compress_layerwise(
        self,
        targets: dict[str, nn.Module],
        ranks: dict[str, int | None],
        calibration: CalibrationBatch,
        report: CompressionReport,
        device: torch.device,
        timer: "_StageTimer",
        checkpointer: LayerCheckpointer | None = None,
        resume: bool = False,
    ) -> None:
        cfg = self.config
        layers_name, layers = find_decoder_layers(self.model)
        batches = list(calibration.batches(cfg.calibration_batch_size))
        with timer("capture"), torch.no_grad():
            reference = capture_first_layer_inputs(self.model, layers[0], batches, device)
        drifted: LayerInputs | None = None  # inputs seen through the compressed prefix (progressive only)
        cov_dtype = _DTYPES[cfg.covariance_dtype]
        start = 0
        if checkpointer is not None and resume and checkpointer.exists():
            state = checkpointer.load(len(batches))
            start = self._restore_layers(state, targets, ranks, layers_name, len(layers), checkpointer)
            report.modules.extend(ModuleReport(**entry) for entry in state.modules)
            reference = reference.with_hidden([h.to(device) for h in state.reference])
            if state.drifted is not None:
                drifted = reference.with_hidden([h.to(device) for h in state.drifted])
            logger.warning(
                f"OD-LLM: resuming from the checkpoint in {checkpointer.directory}: layers 0..{start - 1} "
                f"are restored, continuing with layer {start} of {len(layers)}."
            )

        for index in logging.tqdm(range(start, len(layers)), desc="OD-LLM layers", initial=start, total=len(layers)):
            layer = layers[index]
            prefix = f"{layers_name}.{index}."
            layer_targets = {n: m for n, m in targets.items() if n.startswith(prefix)}
            home = next(layer.parameters()).device
            layer.to(device)
            with torch.no_grad():
                hooks = ActivationHooks({n[len(prefix):]: m for n, m in layer_targets.items()}, cov_dtype, prefix)
                aligned = cfg.progressive and drifted is not None
                if cfg.progressive and drifted is None:
                    # Both streams are identical until the first compressed layer: share the tensors.
                    drifted = reference.with_hidden(list(reference.hidden))
                with timer("statistics"):
                    # Outputs overwrite the inputs batch by batch, so only two streams (reference and
                    # drifted) are ever held: the memory bound of a 7B run on one GPU.
                    for b, (hidden, kwargs, mask) in enumerate(reference):
                        mode = "record" if aligned else "accumulate"
                        output = hooks.forward(mode, layer, hidden, kwargs, mask, device)
                        if aligned:
                            hooks.forward("accumulate", layer, drifted.hidden[b], kwargs, mask, device)
                            hooks.clear_recorded()
                        reference.hidden[b] = output
                hooks.remove()
                for local_name in hooks.stats.group_of:
                    name = prefix + local_name
                    module = layer_targets[name]
                    if ranks[name] is None:
                        report.modules.append(ModuleReport(name, *linear_shape(module), None))
                        continue
                    group = hooks.stats.group_of[local_name]
                    covariance = hooks.stats.covariance[group]
                    cross = hooks.stats.cross_covariance.get(group) if aligned else None
                    self._solve_module(name, module, ranks[name], covariance, cross, report, timer)
                missing = set(n[len(prefix):] for n in layer_targets) - set(hooks.stats.group_of)
                if missing:
                    raise RuntimeError(f"Modules {sorted(missing)} of layer {index} were never called during calibration.")
                with timer("propagate"):
                    if cfg.progressive:
                        for b, (hidden, kwargs, _) in enumerate(drifted):
                            drifted.hidden[b] = run_layer(layer, hidden, kwargs, device)
                            check_finite(drifted.hidden[b], f"output hidden states of the compressed layer {layers_name}.{index}")
            layer.to(home)
            if checkpointer is not None:
                with timer("checkpoint"):
                    factors = {}
                    for name in layer_targets:
                        module = self.model.get_submodule(name)
                        if isinstance(module, LowRankLinear):
                            factors[name + ".down.weight"] = module.down.weight
                            factors[name + ".up.weight"] = module.up.weight
                    done = [asdict(m) for m in report.modules if m.name.startswith(prefix)]
                    checkpointer.save_layer(
                        index, factors, done, reference.hidden, drifted.hidden if drifted is not None else None
                    )

    def _restore_layers(
        self,
        state: ResumeState,
        targets: dict[str, nn.Module],
        ranks: dict[str, int | None],
        layers_name: str,
        num_layers: int,
        checkpointer: LayerCheckpointer,
    ) -> int:
        """Put the checkpointed factors of layers ``0..completed-1`` into the model; return the next layer."""
        completed = state.completed_layers
        if completed > num_layers:
            raise checkpointer._fail(f"it has {completed} layers but the model has {num_layers}")
        done_prefixes = tuple(f"{layers_name}.{i}." for i in range(completed))
        expected = {n for n in targets if n.startswith(done_prefixes) and ranks[n] is not None}
        saved = {key.rsplit(".", 2)[0] for key in state.factors}
        if saved != expected:
            odd = sorted(saved ^ expected)
            raise checkpointer._fail(f"its factors do not match the modules to compress (e.g. {odd[:3]})")
        for name in sorted(expected):
            module = targets[name]
            in_features, out_features = linear_shape(module)
            up, down = state.factors.get(name + ".up.weight"), state.factors.get(name + ".down.weight")
            shape_ok = (
                up is not None and down is not None
                and tuple(up.shape) == (out_features, ranks[name]) and tuple(down.shape) == (ranks[name], in_features)
            )
            if not shape_ok:
                raise checkpointer._fail(f"the factors of {name} are missing or have the wrong shape")
            self._write_back(name, module, up, down)
        return completed

    def _solve_module(
        self,
        name: str,
        module: nn.Module,
        rank: int,
        covariance: torch.Tensor,
        cross: torch.Tensor | None,
        report: CompressionReport,
        timer: "_StageTimer",
    ) -> None:
        """Whitening + (aligned) truncated SVD for one module, then write the factors back."""
        cfg = self.config
        solver = _DTYPES[cfg.solver_dtype]
        weight = linear_weight(module).detach().to(device=covariance.device, dtype=solver)
        covariance = covariance.to(solver)
        if cross is not None and cfg.alignment_damping > 0:
            # Ridge term of the least-squares alignment: without it, directions the calibration data
            # barely covers get huge gains (exploding gradients and poor generalization off-sample).
            damping = cfg.alignment_damping * float(covariance.diagonal().mean())
            covariance = covariance + damping * torch.eye(covariance.shape[0], dtype=solver, device=covariance.device)
        with timer("cholesky"):
            chol = robust_cholesky(covariance, name=f"input covariance of {name}")
        jitter = chol.jitter
        target, target_is_whitened = weight, False
        if cross is not None:
            with timer("alignment"):
                if cfg.whitening:
                    target, target_is_whitened = aligned_target_times_factor(weight, cross.to(solver), chol.factor), True
                else:
                    target = aligned_target(weight, cross.to(solver), chol.factor)
        with timer("svd"):
            factors = truncated_svd(
                target, rank, chol.factor if cfg.whitening else None, cfg.svd_driver, target_is_whitened=target_is_whitened
            )
        self._write_back(name, module, factors.up, factors.down)
        report.modules.append(_module_report(name, module, rank, factors.singular_values, jitter))

    def _write_back(self, name: str, module: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
        weight = linear_weight(module)
        replacement = LowRankLinear.from_factors(
            up.to(weight.device), down.to(weight.device), None if module.bias is None else module.bias.detach(), dtype=weight.dtype
        )
        replacement.train(module.training)
        set_submodule(self.model, name, replacement)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write model (safetensors), tokenizer and config atomically: a crash never leaves a loadable half.

        Everything is written to a temporary sibling directory that replaces ``save_directory`` by one
        rename once complete. Afterwards the resume checkpoint of :meth:`compress` (if any) is deleted.
        """
        if self.report is None:
            raise RuntimeError("Nothing to save yet: call compress(calibration_data) first.")
        if kwargs.get("safe_serialization") is False:
            raise ValueError("OD-LLM checkpoints are saved as safetensors only (no pickle); drop safe_serialization=False.")
        save_directory = Path(save_directory)
        with atomic_directory(save_directory) as tmp:
            self.model.save_pretrained(tmp, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            self._write_extras(tmp)
        checkpoint_dir = getattr(self, "_checkpoint_dir", None)
        if checkpoint_dir is not None:
            remove_checkpoint(checkpoint_dir)  # only our files: the directory may be shared
            self._checkpoint_dir = None
        logger.info(f"Saved the OD-LLM-compressed model to {save_directory}")
        return save_directory

    def _write_extras(self, directory: Path) -> None:
        """Hook for additional artifacts (model card, reports) written inside the atomic save.

        Writes ``odllm_report.json``, the model card ``README.md`` (with ``self.eval_results`` as
        ``model-index`` when set) and copies the recommender's ``item_index.json`` from the base model
        directory (or ``self.item_index_file``) so the checkpoint is self-contained.
        """
        import json
        import shutil

        from .modelcard import build_model_card

        if self.report is not None:
            (directory / "odllm_report.json").write_text(json.dumps(self.report.to_dict(), indent=2))
        index_file = getattr(self, "item_index_file", None)
        if index_file is None and self.source and Path(self.source, "item_index.json").is_file():
            index_file = Path(self.source, "item_index.json")
        if index_file is not None and not (directory / "item_index.json").exists():
            shutil.copyfile(index_file, directory / "item_index.json")
        card = build_model_card(
            self, repo_id=getattr(self, "card_repo_id", None), eval_results=getattr(self, "eval_results", None)
        )
        card.save(directory / "README.md")

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        calibration_dataset: Any = None,
        *,
        resume: bool = True,
        checkpoint: bool = True,
        **kwargs: Any,
    ) -> Path:
        """Optimum's entry point: ``compress(calibration_dataset)`` then ``save_pretrained(save_dir)``.

        With ``checkpoint=True`` (default) every finished decoder layer is checkpointed to
        ``save_dir/.odllm_checkpoint`` and, with ``resume=True`` (default), rerunning the same call after
        a crash continues from there. The final atomic save replaces ``save_dir`` and drops the checkpoint.
        ``file_prefix`` is accepted for interface compatibility; the weights file is ``model.safetensors``.
        """
        device = kwargs.pop("device", None)
        checkpoint_dir = Path(save_dir) / CHECKPOINT_DIRNAME if checkpoint else None
        self.compress(calibration_dataset, device=device, checkpoint_dir=checkpoint_dir, resume=resume and checkpoint)
        return self.save_pretrained(save_dir, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        eval_results: Any = None,
        **save_kwargs: Any,
    ) -> Any:
        """Upload model, tokenizer, item index and model card to ``repo_id`` in one commit.

        See :func:`optimum_odllm.hub.push_compressed_to_hub` (returns its ``CommitInfo``).
        """
        from .hub import push_compressed_to_hub

        return push_compressed_to_hub(
            self, repo_id, private=private, revision=revision, token=token, commit_message=commit_message,
            create_pr=create_pr, eval_results=eval_results, **save_kwargs,
        )


def _module_report(name: str, module: nn.Module, rank: int, singular_values: torch.Tensor, jitter: float) -> ModuleReport:
    energy = float((singular_values**2).sum())
    loss = float((singular_values[rank:] ** 2).sum())
    return ModuleReport(name, *linear_shape(module), rank, loss, loss / energy if energy else 0.0, jitter)


def _default_device(model: nn.Module) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next(model.parameters()).device


def _describe(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        return f"token-id tensor {tuple(data.shape)}"
    info = getattr(data, "info", None)
    name = getattr(info, "dataset_name", None) if info is not None else None
    if name:
        return f"datasets.Dataset '{name}'"
    try:
        return f"{type(data).__name__} of {len(data)} sequences"
    except TypeError:
        return type(data).__name__


class _StageTimer:
    """Accumulates wall time per stage name (synchronizing CUDA so GPU work is counted)."""

    def __init__(self, totals: dict[str, float], device: torch.device):
        self.totals = totals
        self.cuda = device.type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start
