"""``ODLLMConfig``: the transformers quantization config of OD-LLM (``quant_method="odllm"``).

Like VPTQ/SpQR configs, it carries per-module settings: after compression ``ranks`` maps every
factorized module (full dotted name) to its rank, which is all the loader needs to rebuild the
low-rank modules on the meta device before the safetensors weights are loaded.
"""

from __future__ import annotations

import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin


QUANT_METHOD = "odllm"
_COV_DTYPES = ("float64", "float32")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def _as_list(value: Any) -> Any:
    """A tuple becomes a list and a single name a one-element list; anything else is left for post_init to reject."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    return value


class ODLLMConfig(QuantizationConfigMixin):
    """Settings of an OD-LLM compression, and the result (``ranks``) once compressed.

    Args:
        ratio: fraction of the targeted modules' parameters the compressed model keeps, in (0, 1].
        whitening: token covariance normalization (SVD of ``W S`` with ``X^T X = S S^T``); ``False`` = plain SVD of ``W``.
        progressive: progressive layer-wise alignment (drifted inputs + closed-form least-squares update).
        target_modules: name suffixes of the ``nn.Linear`` modules to factorize (e.g. ``["q_proj", "mlp"]``);
            ``None`` = every ``nn.Linear`` inside the decoder layers.
        modules_to_not_convert: name suffixes never factorized (takes precedence over ``target_modules``).
        rank_multiple: ranks are rounded to this multiple (hardware-friendly GEMM shapes); small modules
            fall back to a smaller power of two.
        num_calibration_samples: how many calibration sequences are used (the rest is ignored).
        calibration_seq_len: sequences are truncated to this many tokens.
        min_calibration_tokens: refuse calibration data with fewer non-padding tokens than this.
        calibration_batch_size: sequences per forward pass while capturing activations.
        covariance_dtype: accumulation dtype of ``X^T X`` (``"float64"`` default, ``"float32"`` for speed on GPU).
        solver_dtype: dtype of the Cholesky/SVD/least-squares solves.
        alignment_damping: ridge term of the progressive least-squares update, as a fraction of the mean
            input variance (GPTQ-style damping; 0 = exact least squares, which can blow up directions the
            calibration data barely covers).
        svd_driver: ``torch.linalg.svd`` driver on CUDA (e.g. ``"gesvda"``); ignored on CPU.
        ranks: filled by the compressor: ``{module_name: rank}`` of every factorized module.
    """

    def __init__(
        self,
        ratio: float = 0.5,
        whitening: bool = True,
        progressive: bool = True,
        target_modules: list[str] | None = None,
        modules_to_not_convert: list[str] | None = None,
        rank_multiple: int = 128,
        num_calibration_samples: int = 256,
        calibration_seq_len: int = 2048,
        min_calibration_tokens: int = 64,
        calibration_batch_size: int = 8,
        covariance_dtype: str = "float64",
        solver_dtype: str = "float64",
        svd_driver: str | None = None,
        alignment_damping: float = 0.01,
        ranks: dict[str, int] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.ratio = ratio
        self.whitening = whitening
        self.progressive = progressive
        self.target_modules = _as_list(target_modules)
        self.modules_to_not_convert = _as_list(modules_to_not_convert)
        self.rank_multiple = rank_multiple
        self.num_calibration_samples = num_calibration_samples
        self.calibration_seq_len = calibration_seq_len
        self.min_calibration_tokens = min_calibration_tokens
        self.calibration_batch_size = calibration_batch_size
        self.covariance_dtype = covariance_dtype
        self.solver_dtype = solver_dtype
        self.svd_driver = svd_driver
        self.alignment_damping = alignment_damping
        self.ranks = dict(ranks) if isinstance(ranks, dict) else ({} if ranks is None else ranks)
        # Extra keys (e.g. provenance written by the compressor) survive a save/load round-trip.
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every setting up front, with an error that names the fix."""
        damping = self.alignment_damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < 1:
            raise ValueError(f"alignment_damping must be a number in [0, 1), got {damping!r} (0.01 is a good default)")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or math.isnan(self.ratio):
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(
                f"ratio must be in (0, 1] (the fraction of parameters to keep), got {self.ratio}. "
                "For example ratio=0.5 keeps half of the targeted parameters."
            )
        for flag in ("whitening", "progressive"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for name in ("rank_multiple", "num_calibration_samples", "calibration_seq_len", "calibration_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.min_calibration_tokens, bool) or not isinstance(self.min_calibration_tokens, int):
            raise ValueError(f"min_calibration_tokens must be an integer, got {self.min_calibration_tokens!r}")
        for name in ("covariance_dtype", "solver_dtype"):
            if getattr(self, name) not in _COV_DTYPES:
                raise ValueError(f"{name} must be one of {_COV_DTYPES}, got {getattr(self, name)!r}")
        for name in ("target_modules", "modules_to_not_convert"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"{name} must be a list of module-name suffixes (non-empty strings), got {value!r}")
        if self.svd_driver not in _SVD_DRIVERS:
            raise ValueError(f"svd_driver must be one of {_SVD_DRIVERS}, got {self.svd_driver!r}")
        if not isinstance(self.ranks, dict):
            raise ValueError(f"ranks must be a dict {{module_name: rank}}, got {type(self.ranks).__name__}")
        for module, rank in self.ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"ranks[{module!r}] must be a positive integer, got {rank!r}")

    @property
    def is_compressed(self) -> bool:
        """True once ``ranks`` holds the result of a compression (or a compression kept every module dense)."""
        return bool(self.ranks) or getattr(self, "_kept_dense", False)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
