"""Model cards of OD-LLM-compressed checkpoints, rendered from a Jinja template with ``huggingface_hub``.

The card is what a Hub user reads first: it must say what the model was compressed from, how (ratio,
whitening, progressive alignment, calibration data), what it costs and saves (parameters/bytes, per-layer
ranks), how well it recommends (HR@K/NDCG@K as ``model-index`` metadata, so the Hub shows them) and the
exact loading snippet. Metadata goes through :class:`huggingface_hub.ModelCardData` (never hand-written
YAML), so ``ModelCard.load`` parses the result back.
"""

from __future__ import annotations

import os
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from .quantization import QuantizedFactor
from .result import CompressionResult
from .settings import SETTINGS
from .utils import parameter_bytes


logger = logging.get_logger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "odllm_model_card.md"
"""The packaged template (``model_cards/odllm_template.md`` in the repository is an identical copy)."""

TAGS = ["odllm", "optimum", "low-rank", "compressed", "sequential-recommendation"]
EVAL_TASK_TYPE = "text-generation"
EVAL_TASK_NAME = "Sequential recommendation"

#: Metric display name -> model-index ``metric.type`` (lower case ids, as the Hub expects).
_METRIC_TYPES = {"HR": "hit_rate", "NDCG": "ndcg", "MRR": "mrr", "RECALL": "recall"}

EvalResultsLike = Mapping[str, Mapping[str, float]] | Sequence[EvalResult] | None


def eval_results_from_metrics(
    results: EvalResultsLike, split: str = "test", task_type: str = EVAL_TASK_TYPE
) -> list[EvalResult]:
    """Turn ``{dataset_name: {"HR@10": 0.12, "NDCG@10": 0.07, ...}}`` into Hub ``EvalResult``s.

    ``EvalResult`` lists pass through unchanged. Metric names are kept as display names
    (``metric_name="HR@10"``) with Hub-style ids (``metric_type="hit_rate@10"``).
    """
    if not results:
        return []
    if isinstance(results, Mapping):
        out: list[EvalResult] = []
        for dataset, metrics in results.items():
            if not isinstance(metrics, Mapping) or not metrics:
                raise ValueError(
                    f"eval_results[{dataset!r}] must be a non-empty dict like {{'HR@10': 0.12}}, got {metrics!r}"
                )
            for metric, value in metrics.items():
                out.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=EVAL_TASK_NAME,
                        dataset_type=_slug(dataset),
                        dataset_name=str(dataset),
                        dataset_split=split,
                        metric_type=_metric_type(metric),
                        metric_name=str(metric),
                        metric_value=float(value),
                    )
                )
        return out
    results = list(results)
    if not all(isinstance(r, EvalResult) for r in results):
        raise TypeError("eval_results must be {dataset: {metric: value}} or a list of huggingface_hub.EvalResult")
    return results


def _metric_type(name: str) -> str:
    base, sep, k = str(name).partition("@")
    return f"{_METRIC_TYPES.get(base.upper(), base.lower())}{sep}{k}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text).strip().lower()).strip("-") or "dataset"


def _is_hub_id(source: str | None) -> bool:
    """A plausible ``owner/name`` or ``name`` Hub id that is not a local path."""
    if not source or os.path.exists(source) or source.startswith((".", "/", "~")) or "\\" in source:
        return False
    return source.count("/") <= 1 and all(part and " " not in part for part in source.split("/"))


def base_model_license(source: str | None, token: str | bool | None = None) -> str | None:
    """The base model's license, read from its model card (local ``README.md`` or, when online, the Hub).

    Never raises: a missing/unreadable card just means "unknown" (``None``), which the card says.
    """
    if not source:
        return None
    try:
        local = Path(source)
        if local.is_dir():
            readme = local / "README.md"
            return ModelCard.load(readme).data.license if readme.is_file() else None
        if _is_hub_id(source):
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                return None
            return ModelCard.load(source, token=token).data.license
    except Exception as err:  # network errors, missing cards, malformed YAML: the license is just unknown
        logger.info(f"Could not read the license of the base model {source!r}: {err}")
    return None


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:,.0f}{unit}" if suffix == "" else f"{n:.2f}{suffix}{unit}"
        n /= 1000.0
    return str(n)


def rank_summary_markdown(ranks: Mapping[str, int], dense: Mapping[str, tuple[int, int]] | None = None) -> str:
    """A per-layer table (one row per decoder layer, one column per module type) plus min/median/max per type.

    ``dense`` optionally maps module names to ``(in_features, out_features)`` to show the full rank.
    """
    if not ranks:
        return "No module was factorized."
    layers: "OrderedDict[str, dict[str, int]]" = OrderedDict()
    kinds: list[str] = []
    for name, rank in ranks.items():
        layer, kind = _split_layer(name)
        layers.setdefault(layer, {})[kind] = rank
        if kind not in kinds:
            kinds.append(kind)
    header = "| Layer | " + " | ".join(f"`{k}`" for k in kinds) + " |"
    lines = [header, "|---|" + "---|" * len(kinds)]
    for layer, row in layers.items():
        lines.append(f"| {layer} | " + " | ".join(str(row.get(k, "-")) for k in kinds) + " |")
    lines += ["", "| Module | min rank | median rank | max rank | full rank |", "|---|---|---|---|---|"]
    for kind in kinds:
        values = [row[kind] for row in layers.values() if kind in row]
        full = "-"
        if dense:
            fulls = {min(dense[n]) for n in ranks if _split_layer(n)[1] == kind and n in dense}
            full = "/".join(str(f) for f in sorted(fulls)) or "-"
        lines.append(
            f"| `{kind}` | {min(values)} | {statistics.median(values):g} | {max(values)} | {full} |"
        )
    return "\n".join(lines)


def _split_layer(name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``"3"``, ``"self_attn.q_proj"``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return part, ".".join(parts[i + 1 :]) or name
    return "-", name


def eval_table_markdown(eval_results: Sequence[EvalResult]) -> str:
    if not eval_results:
        return (
            "No evaluation results were attached. Run `optimum-cli odllm evaluate <model> --dataset ...` and pass the "
            "metrics to `save_pretrained`/`push_to_hub` (`eval_results=`) to publish HR@K/NDCG@K here."
        )
    datasets: "OrderedDict[str, dict[str, float]]" = OrderedDict()
    metrics: list[str] = []
    for r in eval_results:
        label = r.dataset_name + (f" ({r.dataset_split})" if r.dataset_split else "")
        name = r.metric_name or r.metric_type
        datasets.setdefault(label, {})[name] = r.metric_value
        if name not in metrics:
            metrics.append(name)
    lines = ["| Dataset | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, row in datasets.items():
        cells = [f"{row[m]:.4f}" if isinstance(row.get(m), (int, float)) else "-" for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_model_card(
    result: CompressionResult,
    *,
    repo_id: str | None = None,
    eval_results: EvalResultsLike = None,
    license: str | None = None,
    model_name: str | None = None,
    token: str | bool | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of a compressed model.

    Args:
        result: a :class:`~optimum_odllm.result.CompressionResult` (``ODLLMCompressor.result`` after
            ``compress()``): its ``config``, ``report``, ``source``, ``calibration_source`` and ``model`` fill the card.
        repo_id: Hub id used in the loading snippet (default: ``"path/to/this/directory"``).
        eval_results: ``{dataset_name: {"HR@10": v, "NDCG@10": v, ...}}`` or ``EvalResult``s -> ``model-index``.
        license: override; default is the base model's license (read from its card), else left unset.
        model_name: ``model-index`` name (default: the repo name or "<base>-odllm-<ratio>").
    """
    config = result.config
    if not config.is_compressed:
        raise RuntimeError("The model is not compressed yet: compress the model first.")
    report = result.report
    source = result.source
    if license is None:
        license = base_model_license(source, token=token)
    results = eval_results_from_metrics(eval_results)
    base_display = f"`{source}`" if source else "an unnamed base model"
    if model_name is None:
        stem = repo_id.split("/")[-1] if repo_id else f"{(source or 'model').rstrip('/').split('/')[-1]}-odllm-{config.ratio:g}"
        model_name = stem
    card_data = ModelCardData(
        base_model=source if _is_hub_id(source) else None,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        model_name=model_name,
        eval_results=results or None,
        metrics=sorted({r.metric_type for r in results}) or None,
    )

    params_before = report.params_before if report else None
    params_after = report.params_after if report else None
    float_bytes, factor_bytes, factor_weights = parameter_bytes(result.model), 0, 0
    for module in result.model.modules():
        if isinstance(module, QuantizedFactor):
            factor_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            factor_weights += module.stored_weights
    bytes_after = float_bytes + factor_bytes
    bytes_before = None
    if params_before is not None and params_after is not None:
        itemsize = next(result.model.parameters()).element_size()
        # what the float parameters would weigh without compression (integer factors replaced by dense weights)
        bytes_before = float_bytes + (params_before - (params_after - factor_weights)) * itemsize

    dense: dict[str, tuple[int, int]] = {}
    if report:
        dense = {m.name: (m.in_features, m.out_features) for m in report.modules}

    def kept(a: int | None, b: int | None) -> str:
        return f"{b / a:.1%}" if a and b is not None else "n/a"

    calib_source = result.calibration_source or ("none (plain SVD)" if not (config.whitening or config.progressive) else "unknown")
    license_note = None if license else (
        "The license of the base model could not be detected: check the base model's license before redistributing."
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_title=f"{model_name} (OD-LLM, ratio {config.ratio:g})",
        base_model_display=base_display,
        load_path=repo_id or "path/to/this/directory",
        ratio=f"{config.ratio:g}",
        kept_ratio=f"{report.kept_ratio:.3f}" if report else "n/a",
        whitening="yes" if config.whitening else "no",
        progressive="yes" if config.progressive else "no",
        refinement=refinement_summary(report),
        rank_multiple=config.rank_multiple,
        factor_storage=factor_storage(config, factor_weights, factor_bytes),
        calibration_source=calib_source,
        num_calibration_samples=report.num_calibration_samples if report else "n/a",
        num_calibration_tokens=report.num_calibration_tokens if report else "n/a",
        num_factorized=len(config.ranks),
        params_before=_human(params_before) if params_before is not None else "n/a",
        params_after=_human(params_after) if params_after is not None else "n/a",
        params_kept=kept(params_before, params_after),
        bytes_before=_human(bytes_before, "B") if bytes_before is not None else "n/a",
        bytes_after=_human(bytes_after, "B"),
        bytes_kept=kept(bytes_before, bytes_after),
        rank_summary=rank_summary_markdown(config.ranks, dense),
        eval_table=eval_table_markdown(results),
        license_note=license_note,
        settings_table=settings_markdown(config),
    )
    return card


def refinement_summary(report: Any) -> str:
    """What block refinement did, from the report: steps kept and the held-out block error, mean over layers."""
    if report is None:
        return "n/a"
    entries = getattr(report, "refinement", None)
    if not entries:
        return "no (closed form)"
    mean = lambda key: sum(e[key] for e in entries) / len(entries)  # noqa: E731
    improved = sum(e["steps"] > 0 for e in entries)
    return (f"yes, {len(entries)} layers ({improved} improved on held-out calibration batches); relative block "
            f"output error, mean over layers, {mean('held_out_before'):.3g} -> {mean('held_out_after'):.3g}")


def factor_storage(config: Any, weights: int = 0, stored_bytes: int = 0) -> str:
    """How the factors are stored, e.g. ``int4 (group size 128, GPTQ), 4.25 bits per weight``."""
    bits = getattr(config, "factor_bits", None)
    if bits is None:
        return "floating point (the model's dtype)"
    grid = "per output channel" if bits == 8 else f"group size {config.factor_group_size}"
    text = f"int{bits} ({grid}, {config.factor_quantizer.upper()})"
    if weights:
        text += f", {8 * stored_bytes / weights:.2f} bits per weight with scales/zeros"
    return text


def settings_markdown(config: Any) -> str:
    """Every setting of the config with its help text (the same table the CLI and the resume fingerprint read)."""
    lines = ["| Setting | Value | Meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        lines.append(f"| `{setting.name}` | `{getattr(config, setting.name)!r}` | {setting.help} |")
    return "\n".join(lines)


def update_card_eval_results(card_path: str | os.PathLike, eval_results: EvalResultsLike, split: str = "test") -> ModelCard:
    """Add/replace evaluation results in an existing card file (e.g. after ``optimum-cli odllm evaluate``).

    Updates both the ``model-index`` metadata and the human-readable table under ``## Evaluation``.
    """
    card_path = Path(card_path)
    card = ModelCard.load(card_path)
    new = eval_results_from_metrics(eval_results, split=split)
    keep = [r for r in (card.data.eval_results or []) if not any(r.unique_identifier == n.unique_identifier and r.metric_type == n.metric_type for n in new)]
    merged = keep + new
    card.data.eval_results = merged
    if not card.data.model_name:
        card.data.model_name = card_path.parent.name
    card.data.metrics = sorted({r.metric_type for r in merged}) or None
    text = card.text
    start = text.find("## Evaluation")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end
        text = text[:start] + "## Evaluation\n\n" + eval_table_markdown(merged) + "\n" + text[end:]
    card.text = text
    card.save(card_path)
    return ModelCard.load(card_path)
