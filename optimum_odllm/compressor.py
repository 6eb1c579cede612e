"""``ODLLMCompressor``: OD-LLM behind Optimum's quantizer interface, a thin facade over the stages.

The pipeline, in the order data flows (one module each):

1. :mod:`.targets`      which modules to compress, their shapes, the decoder blocks;
2. :mod:`.calibration`  calibration data in any accepted form -> a validated :class:`CalibrationSet`;
3. :mod:`.layerwise`    capture of layer inputs and per-layer statistics (``X^T X``, ``X^T X_ref``);
4. :mod:`.solvers`      the solve, a pure function with registered alignment variants (math in :mod:`.linalg`);
5. :mod:`.lowrank`      write-back of the factors as :class:`LowRankLinear` modules;
6. :mod:`.pipeline`     the layer loop tying 3-5 together, with :mod:`.checkpointing` for resume;
7. :mod:`.result`       the :class:`CompressionResult` that :mod:`.saving`, :mod:`.modelcard` and :mod:`.hub` consume.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .calibration import CalibrationSet, prepare_calibration
from .checkpointing import (
    CHECKPOINT_DIRNAME,
    LayerCheckpointer,
    check_writable,
    hash_tensors,
    model_fingerprint,
    remove_checkpoint,
    settings_fingerprint,
)
from .configuration import QUANT_METHOD, ODLLMConfig
from .extensions import collect_artifacts
from .hf_quantizer import ODLLMHfQuantizer
from .hub import push_result_to_hub
from .pipeline import StageTimer, compress_data_free, compress_layerwise, plan_ranks
from .ranks import kept_parameters
from .result import CompressionReport, CompressionResult, ModuleReport
from .saving import save_result
from .targets import module_shapes, select_targets, vocabulary_size
from .utils import count_parameters


logger = logging.get_logger(__name__)

__all__ = ["CompressionReport", "ModuleReport", "ODLLMCompressor"]


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ``./``, ``~``, deeper) is a path."""
    return source.startswith((os.sep, ".", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)


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
        #: Human description of the calibration data, for the model card (set by ``compress`` if unset).
        self.calibration_source: str | None = None
        #: Extra files to ship beside the weights, ``{file name: path}`` (e.g. ``{"item_index.json": path}``);
        #: the recommender's files next to the source model are found by the registered artifact hooks.
        self.artifacts: dict[str, Path] = {}
        self._checkpoint_dir: Path | None = None

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
        if model_or_path is None:
            raise TypeError("model_or_path is None: pass a local model directory, a Hub model id or a PreTrainedModel.")
        source = str(model_or_path)
        if Path(source).expanduser().is_dir():
            source = str(Path(source).expanduser())  # transformers does not expand "~"
        elif isinstance(model_or_path, Path) or _looks_like_local_path(source):
            raise OSError(f"The model directory {source} does not exist. Pass an existing directory or a Hub model id.")
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        except OSError as err:
            if not Path(source).is_dir():
                raise OSError(
                    f"{source} is neither a local directory (it does not exist here) nor a Hub model id this machine "
                    f"can reach ({err})."
                ) from err
            raise
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, revision=model_kwargs.get("revision"))
            except (OSError, ValueError) as err:
                logger.info(f"No tokenizer loaded from {source} ({err}); calibration must be token ids.")
        return cls(model, config=config, tokenizer=tokenizer, source=source)

    # ------------------------------------------------------------------ stages
    def target_modules(self) -> dict[str, nn.Module]:
        """The modules that would be factorized, by full name, after validating the model."""
        return select_targets(self.model, self.config)

    def _prepare_calibration(self, data: Any) -> CalibrationSet | None:
        cfg = self.config
        if data is None and not cfg.whitening and not cfg.progressive:
            return None  # plain SVD needs no data
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return prepare_calibration(
            data,
            tokenizer=self.tokenizer,
            num_samples=cfg.num_calibration_samples,
            max_length=cfg.calibration_seq_len,
            min_tokens=cfg.min_calibration_tokens,
            vocab_size=vocabulary_size(self.model),
            pad_token_id=pad_id if isinstance(pad_id, int) and not isinstance(pad_id, bool) else None,
        )

    def _checkpointer(self, directory: Path, calibration: CalibrationSet, targets: dict, ranks: dict, resume: bool) -> LayerCheckpointer:
        checkpointer = LayerCheckpointer(
            directory,
            {
                **settings_fingerprint(self.config),
                "calibration data": hash_tensors(calibration.input_ids, calibration.attention_mask),
                "model": model_fingerprint(self.model, targets, ranks),
            },
        )
        if checkpointer.exists() and not resume:
            logger.warning(f"Discarding the existing checkpoint in {directory} (resume=False).")
            checkpointer.clear()
        return checkpointer

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
                continue are saved there atomically (safetensors + a JSON manifest with SHA-256 digests), so an
                interrupted run can resume. :meth:`save_pretrained` deletes it after a successful save.
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
        self.artifacts = collect_artifacts(self.source, self.artifacts, self.tokenizer, vocabulary_size(self.model))
        if checkpoint_dir is not None and calibration is not None:  # data-free runs are not checkpointed
            check_writable(checkpoint_dir)
        if calibration_dataset is not None and self.calibration_source is None:
            self.calibration_source = _describe(calibration_dataset)
        device = torch.device(device) if device is not None else _default_device(self.model)

        shapes = module_shapes(targets)
        ranks = plan_ranks(shapes, cfg)
        widest = max(shapes, key=lambda s: s.in_features)
        if calibration is not None and calibration.num_tokens < widest.in_features:
            logger.warning(
                f"OD-LLM: the calibration data has {calibration.num_tokens} non-padding tokens, fewer than the "
                f"{widest.in_features} inputs of {widest.name}: its input covariance is singular and will be "
                "regularized with jitter. Use more calibration data for a faithful compression."
            )
        checkpointer = None
        if checkpoint_dir is not None and calibration is not None:
            checkpointer = self._checkpointer(Path(checkpoint_dir), calibration, targets, ranks, resume)
            self._checkpoint_dir = Path(checkpoint_dir)
        report = CompressionReport(
            params_before=count_parameters(self.model),
            target_params_before=sum(s.dense_params for s in shapes),
            num_calibration_samples=0 if calibration is None else calibration.input_ids.shape[0],
            num_calibration_tokens=0 if calibration is None else calibration.num_tokens,
        )
        timer = StageTimer(report.stage_seconds, device)
        was_training = self.model.training
        self.model.eval()
        try:
            if calibration is None:
                compress_data_free(self.model, targets, ranks, cfg, report, timer)
            else:
                compress_layerwise(self.model, targets, ranks, calibration, cfg, report, device, timer, checkpointer, resume)
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

    @property
    def result(self) -> CompressionResult:
        """The compressed model with its config, report and provenance (after :meth:`compress`)."""
        if self.report is None:
            raise RuntimeError("Nothing compressed yet: call compress(calibration_data) first.")
        return CompressionResult(
            model=self.model, config=self.config, report=self.report, tokenizer=self.tokenizer, source=self.source,
            calibration_source=self.calibration_source, artifacts=dict(self.artifacts),
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self, save_directory: str | Path, *, eval_results: Any = None, repo_id: str | None = None, **kwargs: Any
    ) -> Path:
        """Write model (safetensors), tokenizer, report, artifacts and model card into ``save_directory``.

        Files already in the directory that this save does not write are kept; the save is staged so the
        directory never holds a loadable mix of old and new files; the source model's own directory is
        refused. ``eval_results`` (``{dataset: {"HR@10": v, ...}}``) is published as the card's
        ``model-index``; ``repo_id`` is the Hub id shown in the card's loading snippet and ``model_name`` (a
        keyword) the card's title. Afterwards the
        resume checkpoint of :meth:`compress` (if any) is deleted.
        """
        directory = save_result(self.result, save_directory, eval_results=eval_results, repo_id=repo_id, **kwargs)
        if self._checkpoint_dir is not None:
            remove_checkpoint(self._checkpoint_dir)  # only our files: the directory may be shared
            self._checkpoint_dir = None
        return directory

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
        a crash continues from there. The final save drops the checkpoint.
        ``file_prefix`` is accepted for interface compatibility; the weights file is ``model.safetensors``.
        """
        device = kwargs.pop("device", None)
        checkpoint_dir = Path(save_dir) / CHECKPOINT_DIRNAME if checkpoint else None
        self.compress(calibration_dataset, device=device, checkpoint_dir=checkpoint_dir, resume=resume and checkpoint)
        return self.save_pretrained(save_dir, **kwargs)

    def push_to_hub(self, repo_id: str, **push_kwargs: Any) -> Any:
        """Upload model, tokenizer, artifacts and model card to ``repo_id`` in one commit.

        Keyword arguments are those of :func:`optimum_odllm.hub.push_result_to_hub` (``private``,
        ``revision``, ``token``, ``commit_message``, ``create_pr``, ``eval_results`` and save options);
        returns its ``CommitInfo``.
        """
        if not self.config.is_compressed:
            raise RuntimeError(
                "Nothing to push yet: call compressor.compress(calibration_data) first "
                "(or push an already compressed model with model.push_to_hub(repo_id))."
            )
        return push_result_to_hub(self.result, repo_id, **push_kwargs)


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
