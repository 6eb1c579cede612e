"""The settings of an OD-LLM compression: one table, read by the config, the CLI, the resume fingerprint and
the model card, so a new setting is added in exactly one place.

Standard library only: ``optimum-cli`` imports this on every call to build its parsers (see
:mod:`optimum_odllm.cli_options`), so it must not pull in torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One ``ODLLMConfig`` field: its default, one help text, and how the command line spells it."""

    name: str
    default: Any
    help: str
    kind: str  # "fraction" | "damping" | "bool" | "int" | "steps" (None or int >= 0) | "rate" (float > 0) | "names" | "choice" | "name"
    choices: tuple = ()
    aliases: tuple[str, ...] = ()  # extra CLI spellings kept for compatibility

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: In the order data flows through the pipeline: what to compress, the data, the statistics, the solve.
SETTINGS: tuple[Setting, ...] = (
    Setting("ratio", 0.5, "fraction of the targeted modules' parameters to keep, in (0, 1]; 0.3 is aggressive", "fraction"),
    Setting("target_modules", None, "name suffixes of the nn.Linear modules to factorize, e.g. q_proj mlp "
            "(default: every linear inside the decoder layers)", "names"),
    Setting("modules_to_not_convert", None, "name suffixes never factorized (wins over target_modules)", "names"),
    Setting("block_name_to_compress", None, "dotted name of the decoder-layer list, e.g. model.layers, when the "
            "automatic guess is wrong for an architecture", "name"),
    Setting("rank_multiple", 128, "ranks are rounded to this multiple for efficient GEMMs; small modules fall back "
            "to a smaller power of two (use 8 for tiny models)", "int"),
    Setting("num_calibration_samples", 256, "calibration sequences to use (OD-LLM uses 256)", "int",
            aliases=("--num-samples",)),
    Setting("calibration_seq_len", 2048, "truncate calibration sequences to this many tokens", "int",
            aliases=("--seq-len",)),
    Setting("min_calibration_tokens", 64, "refuse calibration data with fewer non-padding tokens than this", "int"),
    Setting("calibration_batch_size", 8, "calibration sequences per forward pass while collecting statistics", "int"),
    Setting("covariance_dtype", "float64", "accumulation dtype of the input covariances X^T X", "choice",
            choices=("float64", "float32")),
    Setting("whitening", True, "token covariance normalization: SVD of W S instead of W (--no-whitening is the "
            "plain-SVD ablation)", "bool"),
    Setting("progressive", True, "progressive layer-wise alignment: statistics from the compressed prefix and a "
            "closed-form update of the factors (--no-progressive is the one-shot ablation)", "bool"),
    Setting("alignment", "least_squares", "progressive update variant, a name registered in "
            "optimum_odllm.solvers: least_squares (re-solve the whole weight from drifted inputs), anchored, "
            "drift_whitening, up_only; docs/alignment.md compares them", "name"),
    Setting("alignment_damping", 0.01, "ridge term of the progressive least squares, as a fraction of the mean "
            "input variance (GPTQ-style damping toward the original weight; enters the solve, never the "
            "truncation metric; 0 needs --allow-undamped-alignment)", "damping"),
    Setting("allow_undamped_alignment", False, "accept alignment_damping=0 with progressive alignment (exact "
            "least squares, which can blow up on scarce or rank-deficient calibration data; docs/alignment.md)", "bool"),
    Setting("refine_steps", None, "block refinement after each layer's closed-form solve: Adam steps (one calibration "
            "batch each) on the layer's float factors toward the dense layer's outputs, keeping the factors with the "
            "lowest error on held-out calibration batches (never worse than the closed form on them), then "
            "factor_bits rounding; default (none): 256 whenever there is calibration data; 0 turns it off "
            "(the closed form of the paper)", "steps"),
    Setting("refine_lr", 1e-4, "Adam learning rate of the block refinement", "rate"),
    Setting("solver_dtype", "float64", "dtype of the Cholesky, least-squares and SVD solves (float32 is much faster "
            "on GPUs)", "choice", choices=("float64", "float32")),
    Setting("svd_driver", None, "torch.linalg.svd driver on CUDA (gesvda is ~10x faster than the default at "
            "4096x4096); ignored on CPU", "choice", choices=(None, "gesvd", "gesvdj", "gesvda")),
    Setting("factor_bits", None, "store the up/down factors as 8-bit (per output channel) or 4-bit (group-wise) "
            "integers after the solve, with error compensation from the covariances already collected; "
            "none keeps float factors", "choice", choices=(None, 8, 4)),
    Setting("factor_group_size", 128, "int4 factors: input columns sharing one scale/zero; ranks are aligned to it "
            "(halved for small modules) and it is halved until it divides a factor's width; 32/64/128/256 use "
            "the integer kernels", "int"),
    Setting("factor_quantizer", "gptq", "how factors are rounded with factor_bits: gptq (error compensation "
            "weighted by the input covariance) or rtn (plain rounding, the ablation)", "choice",
            choices=("gptq", "rtn")),
)

SETTING_NAMES: tuple[str, ...] = tuple(s.name for s in SETTINGS)
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}
