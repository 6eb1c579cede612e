"""``ODLLMConfig``: the transformers quantization config of OD-LLM (``quant_method="odllm"``).

Like VPTQ/SpQR configs, it carries per-module settings: after compression ``ranks`` maps every
factorized module (full dotted name) to its rank, which is all the loader needs to rebuild the
low-rank modules on the meta device before the safetensors weights are loaded. The settings
themselves are declared once, in :data:`optimum_odllm.settings.SETTINGS`.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .settings import DEFAULTS, SETTING_NAMES, SETTINGS
from .solvers import ALIGNMENTS


logger = logging.get_logger(__name__)

QUANT_METHOD = "odllm"
_RESULT_FIELDS = ("quant_method", "ranks")


def _as_list(value: Any) -> Any:
    """A tuple becomes a list and a single name a one-element list; anything else is left for post_init to reject."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _unknown_keyword(name: str) -> TypeError:
    close = difflib.get_close_matches(name, SETTING_NAMES + ("ranks",), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return TypeError(f"ODLLMConfig got an unknown setting {name!r}.{hint} Valid settings: {', '.join(SETTING_NAMES)}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ODLLMConfig(QuantizationConfigMixin):
    """Settings of an OD-LLM compression, and the result (``ranks``) once compressed.

    Every keyword is a setting of :data:`optimum_odllm.settings.SETTINGS` (``ODLLMConfig.settings()``
    lists them with their help text); a misspelled keyword raises naming the closest one.
    ``ranks`` is filled by the compressor: ``{module_name: rank}`` of every factorized module.
    """

    def __init__(self, ranks: dict[str, int] | None = None, **settings: Any):
        for name in settings:
            if name not in DEFAULTS and name != "quant_method":
                raise _unknown_keyword(name)
        self.quant_method = QUANT_METHOD
        for name, default in DEFAULTS.items():
            value = settings.get(name, default)
            setattr(self, name, _as_list(value) if name in ("target_modules", "modules_to_not_convert") else value)
        self.ranks = dict(ranks) if isinstance(ranks, dict) else ({} if ranks is None else ranks)
        self.post_init()

    @staticmethod
    def settings() -> dict[str, str]:
        """``{setting: help text}`` in the order data flows through the pipeline."""
        return {s.name: s.help for s in SETTINGS}

    def settings_dict(self) -> dict[str, Any]:
        """The current value of every setting (not the result): what decides a compression's outcome."""
        return {name: getattr(self, name) for name in SETTING_NAMES}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a saved ``quantization_config``; keys written by another version are dropped with a warning."""
        known = {k: v for k, v in config_dict.items() if k in DEFAULTS or k in _RESULT_FIELDS}
        dropped = sorted(set(config_dict) - set(known))
        if dropped:
            logger.warning(f"Ignoring quantization_config keys this version of optimum-odllm does not know: {dropped}")
        return super().from_dict(known, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def post_init(self) -> None:
        """Validate every setting up front, with an error that names the fix."""
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            kind = setting.kind
            if kind == "fraction":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1:
                    raise ValueError(
                        f"{setting.name} must be in (0, 1] (the fraction of parameters to keep), got {value!r}. "
                        "For example ratio=0.5 keeps half of the targeted parameters."
                    )
            elif kind == "damping":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                    raise ValueError(f"{setting.name} must be a number in [0, 1), got {value!r} (0.01 is a good default)")
            elif kind == "rate":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ValueError(f"{setting.name} must be a positive number, got {value!r}")
            elif kind == "steps" and value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{setting.name} must be None (the default) or an integer >= 0 (0 turns it off), got {value!r}")
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{setting.name} must be True or False, got {value!r}")
            elif kind == "int":
                minimum = 0 if setting.name == "min_calibration_tokens" else 1
                if not _is_int(value) or value < minimum:
                    raise ValueError(f"{setting.name} must be an integer >= {minimum}, got {value!r}")
            elif kind == "choice" and value not in setting.choices:
                raise ValueError(f"{setting.name} must be one of {setting.choices}, got {value!r}")
            elif kind == "names" and value is not None and (
                not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)
            ):
                raise ValueError(f"{setting.name} must be a list of module-name suffixes (non-empty strings), got {value!r}")
            elif kind == "name" and value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{setting.name} must be a non-empty string, got {value!r}")
        if self.factor_bits is not None and not _is_int(self.factor_bits):
            raise ValueError(f"factor_bits must be None, 8 or 4, got {self.factor_bits!r}")
        if self.factor_group_size % 2:
            raise ValueError(
                f"factor_group_size must be even (two int4 codes share a byte), got {self.factor_group_size}; "
                "128 is the default and 32/64/128/256 run on the integer kernels."
            )
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of the registered variants {sorted(ALIGNMENTS)}, got {self.alignment!r}")
        # a compressed checkpoint (ranks set) records a past run: refuse only what would run now
        if self.progressive and self.alignment_damping == 0 and not self.allow_undamped_alignment and not self.ranks:
            raise ValueError(
                "alignment_damping=0 with progressive=True is exact least squares, which can blow up on scarce or "
                "rank-deficient calibration data (docs/alignment.md). Use alignment_damping=0.01 (the default), "
                "or progressive=False, or pass allow_undamped_alignment=True (--allow-undamped-alignment) to run it anyway."
            )
        if not isinstance(self.ranks, dict):
            raise ValueError(f"ranks must be a dict {{module_name: rank}}, got {type(self.ranks).__name__}")
        for module, rank in self.ranks.items():
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"ranks[{module!r}] must be a positive integer, got {rank!r}")

    @property
    def is_compressed(self) -> bool:
        """True once ``ranks`` holds the result of a compression (or a compression kept every module dense)."""
        return bool(self.ranks) or getattr(self, "_kept_dense", False)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
