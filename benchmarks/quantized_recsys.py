"""Ranking quality over seeds on the ML-100K recommender: OD-LLM (float and quantized factors) against the
dense model, its own ablation and GPTQ on the dense weights (issues 12 and 14).

Per seed: train (or reuse) the dense recommender of ``examples/ml100k_end_to_end.py`` (same recipe; size,
epochs and learning rate are arguments), then compress it with the **wired** pipeline once per variant and
ratio, and evaluate every model on the held-out test users (leave-one-out last item, constrained beam search
20, seen items excluded inside the search; ``--unmasked`` labels are also evaluated without exclusion).
The dense model is also evaluated on the *validation* users (second-last item), which is what a model size
or recipe should be chosen by. NDCG@10 is a mean over users with its standard error; "kept" is variant /
dense with the standard error of the paired per-user difference divided by the dense mean; across seeds,
the mean of the per-seed "kept" with its standard error over seeds. Bytes are those of the decoder-layer
linears (codes, scales, zeros, biases) relative to the same modules as dense 16-bit weights.

Variants (``--variants``): ``odllm`` (the library's defaults), ``closed_form`` (no block refinement),
``no_progressive`` (the one-shot ablation, no refinement),
``odllm+refine`` / ``no_progressive+refine`` (block refinement: ``--refine-steps`` at ``--refine-lr``),
``odllm+int8 gptq|rtn``, ``odllm+int4 gptq|rtn`` (``factor_bits``), and ``gptq-w4`` / ``gptq-w3`` / ``gptq-w8``:
GPTQ on the dense weights (:func:`recsys_common.gptq_dense_fake_quantize`, this library's GPTQ solver, g128,
simulated by dequantized weights: quality only), and ``odllm+recovery`` / ``no_progressive+recovery``: the
compressed model's factors fine-tuned for ``--recovery-epochs`` at ``--recovery-lr`` on the dense model's own
training samples (:mod:`optimum_odllm.recovery`); ``odllm+recovery+int8 rtn`` then rounds the fine-tuned factors
to int8 (:func:`optimum_odllm.quantization.quantize_factors`); ``dense+recovery`` is the control: the same schedule given to the dense model (all its weights, not only
the decoder linears: extra training, not a matched parameter set). Choose such settings with ``--score-validation`` (every model
scored on the validation users), then score the test users once.

    python benchmarks/quantized_recsys.py --seeds 0 1 2 --out-dir runs/quant-recsys \\
        --json benchmarks/results/quantized_recsys_cpu.json
    python benchmarks/quantized_recsys.py --seeds 0 --train-only --out-dir runs/quant-recsys   # train dense only
    python benchmarks/quantized_recsys.py --merge a.json b.json --json all.json   # seeds run in separate processes
    python benchmarks/quantized_recsys.py --seeds 0 --variants odllm+recovery --recovery-epochs 1 \
        --recovery-lr 1e-4 --score-validation --json val.json                      # choose recovery settings
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import machine_info, markdown_table, write_json  # also puts the repository on sys.path
from recsys_common import gptq_dense_fake_quantize, grouped_storage_bits_per_weight

from optimum_odllm import ODLLMCompressor, ODLLMConfig  # noqa: E402
from optimum_odllm.lowrank import LowRankLinear  # noqa: E402
from optimum_odllm.quantization import QuantizedLowRankLinear, quantize_factors  # noqa: E402
from optimum_odllm.quantization.gptq import effective_group_size  # noqa: E402
from optimum_odllm.recsys import (  # noqa: E402
    PACKED_SEQREC_TEMPLATE,
    InstructionEncoder,
    ItemIndex,
    build_instruction_samples,
    build_item_index,
    build_offline_model,
    build_offline_tokenizer,
    leave_one_out,
    load_movielens_100k,
    train_recommender,
)
from optimum_odllm.recsys.evaluation import evaluate_per_user  # noqa: E402
from optimum_odllm.recsys.instructions import packed_sequences  # noqa: E402

#: name -> (ODLLMConfig overrides) for OD-LLM variants, or ("gptq", bits) for GPTQ on the dense weights.
VARIANTS: dict[str, Any] = {
    "odllm": {},  # the library's defaults, whatever they are
    "closed_form": {"refine_steps": 0},  # whitening + SVD + progressive update, no block refinement
    "no_progressive": {"progressive": False, "refine_steps": 0},
    "odllm+refine": {"refine": True},  # block refinement, --refine-steps at --refine-lr
    "no_progressive+refine": {"progressive": False, "refine": True},
    "odllm+int8 gptq": {"factor_bits": 8, "factor_quantizer": "gptq"},  # defaults: refined, then rounded
    "closed_form+int8 gptq": {"factor_bits": 8, "factor_quantizer": "gptq", "refine_steps": 0},
    "closed_form+int4 gptq": {"factor_bits": 4, "factor_quantizer": "gptq", "refine_steps": 0},
    "odllm+int8 rtn": {"factor_bits": 8, "factor_quantizer": "rtn"},
    "odllm+int4 gptq": {"factor_bits": 4, "factor_quantizer": "gptq"},
    "odllm+int4 rtn": {"factor_bits": 4, "factor_quantizer": "rtn"},
    "gptq-w8": ("gptq", 8),
    "gptq-w4": ("gptq", 4),
    "gptq-w3": ("gptq", 3),
}
#: name -> (the variant whose factors it fine-tunes after compression, then int8 rounding of the fine-tuned
#: factors or None). Fine-tuning: ``--recovery-epochs`` on the dense model's own training samples, factors and
#: their biases only (``optimum_odllm.recovery``); quantizing happens after it because integer factors cannot be
#: trained (the library refuses), so the rounding is plain RTN without covariances.
RECOVERED: dict[str, tuple[str, int | None]] = {
    "odllm+recovery": ("odllm", None),
    "no_progressive+recovery": ("no_progressive", None),
    "odllm+recovery+int8 rtn": ("odllm", 8),
    "dense+recovery": ("dense", None),  # control: the same schedule fine-tuning ALL of the dense model's weights
}
DEFAULT_VARIANTS = "odllm,no_progressive,odllm+int8 gptq,odllm+int4 gptq,gptq-w4,gptq-w3"
METRIC = "NDCG@10"
GROUP_SIZE = 128


def sixteen_bit_bytes(tensor: torch.Tensor) -> int:
    """Float tensors at 2 bytes per value (the issue's "16-bit bytes", whatever dtype the run used);
    integer codes at their real size."""
    return tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())


def decoder_linear_bytes(model: nn.Module, dense_bits: int | None = None) -> tuple[int, int]:
    """(bytes stored, bytes as dense 16-bit) of the linears inside the decoder layers.

    ``dense_bits``: the plain linears are counted as GPTQ-coded (``bits`` + a bfloat16 scale and zero per
    group of 128; int8 one bfloat16 scale per row) instead of 16-bit.
    """
    stored = dense = 0
    for name, module in model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(module, (LowRankLinear, QuantizedLowRankLinear)):
            stored += sum(sixteen_bit_bytes(t) for t in module.state_dict().values())
            dense += (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)) * 2
        elif isinstance(module, nn.Linear) and not name.endswith((".up", ".down")):
            full = sum(sixteen_bit_bytes(t) for t in module.state_dict().values())
            dense += full
            if dense_bits is None:
                stored += full
            else:
                weights = module.in_features * module.out_features
                group = effective_group_size(module.in_features, GROUP_SIZE)
                bits = (8 + 16 / module.in_features) if dense_bits == 8 else grouped_storage_bits_per_weight(dense_bits, group)
                stored += math.ceil(weights * bits / 8) + full - weights * 2
    return stored, dense


#: the dense recipe's settings, saved beside a trained model so that runs reusing it can record what they scored
RECIPE_FILE = "recipe.json"
RECIPE_KEYS = ("layers", "hidden_size", "heads", "epochs", "lr", "batch_size", "weight_decay", "history", "attention_dropout",
               "item_embeddings")


def trained_recipe(dense_dir: Path) -> dict[str, Any] | None:
    """The settings the model in ``dense_dir`` was trained with (None for models saved before they were recorded)."""
    path = dense_dir / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_or_load(seed: int, args: argparse.Namespace, data, split) -> tuple[nn.Module, InstructionEncoder, Any]:
    dense_dir = Path(args.out_dir) / f"seed{seed}" / "dense"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dense_dir / "config.json").exists():
        index = ItemIndex.load(dense_dir)
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        model = AutoModelForCausalLM.from_pretrained(dense_dir).to(args.device).eval()
        return model, InstructionEncoder(tokenizer, index, data.item_text), tokenizer
    random.seed(seed), torch.manual_seed(seed)
    index = build_item_index(data.item_text, data.item_ids, levels=3, codebook_size=64, steps=1500, seed=seed,
                             backend=args.item_embeddings, sequences=split.train.values())
    tokenizer = build_offline_tokenizer(data.item_text, index)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    samples = training_samples(encoder, split, seed)
    model = build_offline_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                                max_positions=max(256, 4 * (split.history + 1) + 16),
                                attention_dropout=args.attention_dropout, seed=seed)
    start = time.time()
    model = train_recommender(model, tokenizer, samples, dense_dir.parent / "trainer", epochs=args.epochs,
                              learning_rate=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                              seed=seed, disable_tqdm=True).eval()
    print(f"seed {seed}: trained in {time.time() - start:.0f}s", flush=True)
    model.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    index.save(dense_dir)
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS} | {"seed": seed}
    (dense_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    return model.to(args.device), encoder, tokenizer


def training_samples(encoder: InstructionEncoder, split, seed: int) -> list[dict]:
    """The dense recipe's training samples (also what recovery fine-tuning sees): train split only."""
    return build_instruction_samples(encoder, split.train, tasks=("seqrec", "item2index"), history=split.history,
                                     packed=True, short=True, seed=seed)


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def variant_config(ratio: float, overrides: dict[str, Any], args: argparse.Namespace) -> ODLLMConfig:
    overrides = dict(overrides)
    if overrides.pop("refine", False):
        overrides.update(refine_steps=args.refine_steps, refine_lr=args.refine_lr)
    return ODLLMConfig(ratio=ratio, rank_multiple=8, num_calibration_samples=args.calibration_samples,
                       min_calibration_tokens=16, factor_group_size=GROUP_SIZE, **overrides)


def calibration_of(seed: int, encoder: InstructionEncoder, split, args: argparse.Namespace) -> list[list[int]]:
    """Packed training sequences (the model's own input distribution), never test targets."""
    rng = random.Random(seed)
    chunks = packed_sequences(split.train, split.history)
    return [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, c) for c in rng.sample(chunks, args.calibration_samples)]


def recover(compressed: nn.Module, tokenizer, samples: list[dict], seed: int, args) -> nn.Module:
    """Fine-tune only the low-rank factors (and their biases) with the dense recipe's ``Trainer`` loop
    (a model without factors, the dense control, trains every weight)."""
    from optimum_odllm.recovery import lowrank_modules, mark_factors_trainable

    if lowrank_modules(compressed):
        mark_factors_trainable(compressed, train_bias=True)
    out_dir = Path(args.out_dir) / f"seed{seed}" / "recovery"
    return train_recommender(compressed, tokenizer, samples, out_dir, epochs=args.recovery_epochs,
                             learning_rate=args.recovery_lr, batch_size=args.batch_size, seed=seed,
                             disable_tqdm=True).eval()


def build_variant(name: str, ratio: float, model: nn.Module, tokenizer, calibration, args,
                  recovery=lambda compressed: compressed) -> tuple[nn.Module, tuple[int, int]]:
    """The compressed (or GPTQ-quantized) copy of ``model`` and its (stored, dense 16-bit) decoder bytes;
    ``recovery(compressed)`` is applied to the ``+recovery`` variants."""
    if name in RECOVERED:
        base, bits = RECOVERED[name]
        if base == "dense":
            compressed, nbytes = copy.deepcopy(model), decoder_linear_bytes(model)
        else:
            compressed, nbytes = build_variant(base, ratio, model, tokenizer, calibration, args)
        compressed = recovery(compressed)
        if bits is None:
            return compressed, nbytes
        quantize_factors(compressed, bits, GROUP_SIZE)
        return compressed, decoder_linear_bytes(compressed)
    spec = VARIANTS[name]
    if isinstance(spec, tuple):
        quantized = copy.deepcopy(model)
        gptq_dense_fake_quantize(quantized, calibration, spec[1], GROUP_SIZE)
        return quantized, decoder_linear_bytes(quantized, dense_bits=spec[1])
    cfg = variant_config(ratio, spec, args)
    compressed = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=cfg, tokenizer=tokenizer).compress(
        calibration, device=args.device)
    return compressed, decoder_linear_bytes(compressed)


def labels_to_run(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(label, variant, ratio) in run order; GPTQ baselines once (no ratio), RTN ablations at --rtn-ratios."""
    out = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS and name not in RECOVERED:
            raise SystemExit(f"error: unknown variant {name!r}; choose from {', '.join([*VARIANTS, *RECOVERED])}")
        if name in RECOVERED and not args.recovery_epochs:
            raise SystemExit(f"error: variant {name!r} needs --recovery-epochs (> 0)")
        if isinstance(VARIANTS.get(name), tuple):
            out.append((name, name, 1.0))
            continue
        if RECOVERED.get(name, ("",))[0] == "dense":
            out.append((name, name, 1.0))
            continue
        ratios = args.rtn_ratios if name.endswith("rtn") and name not in RECOVERED else args.ratios
        out.extend((f"{name}@{r:g}", name, r) for r in ratios)
    return out


def summarize_label(values: list[float], dense_values: list[float]) -> dict[str, float]:
    """Mean ± s.e. over users, and "kept" = variant / dense with the paired s.e. (dense mean 0: NaN)."""
    dense_mean = statistics.fmean(dense_values) or float("nan")  # an untrained smoke-test model ranks nothing
    m, se = mean_se(values)
    diff_m, diff_se = mean_se([v - d for v, d in zip(values, dense_values)])
    return {METRIC: m, f"{METRIC}_se": se, "kept": (dense_mean + diff_m) / dense_mean, "kept_se_paired": diff_se / dense_mean}


def run_seed(seed: int, args: argparse.Namespace, data, split, test, checkpoint=lambda out: None) -> dict[str, Any]:
    """Every label of one seed; ``checkpoint(out)`` is called after each, so a run cut short keeps what it did."""
    model, encoder, tokenizer = train_or_load(seed, args, data, split)

    def evaluate(m: nn.Module, examples=test, masked: bool = True) -> dict[str, list[float]]:
        return evaluate_per_user(m, encoder, examples, PACKED_SEQREC_TEMPLATE, num_beams=20, progress=False,
                                 train=split.train, exclude_history=masked)

    validation = {k: mean_se(v) for k, v in evaluate(model, split.valid).items()}
    c = model.config  # the model actually scored (a reused --out-dir model ignores --layers/--epochs/--lr)
    shape = {"layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "parameters": sum(p.numel() for p in model.parameters())}
    out: dict[str, Any] = {"dense": {"bytes_vs_bf16": 1.0, "validation": validation, "model": shape,
                                     "recipe": trained_recipe(Path(args.out_dir) / f"seed{seed}" / "dense")}}
    print(f"seed {seed} dense: {METRIC} validation {validation[METRIC][0]:.4f}", flush=True)
    if args.train_only:
        return out
    calibration = calibration_of(seed, encoder, split, args)
    unmasked = {u.strip() for u in args.unmasked.split(",") if u.strip()}
    samples = training_samples(encoder, split, seed) if any(n in RECOVERED for _, n, _ in labels_to_run(args)) else []
    start = time.time()
    dense_metrics = evaluate(model)
    out["dense"].update(eval_s=round(time.time() - start, 1), metrics={k: mean_se(v) for k, v in dense_metrics.items()},
                        **summarize_label(dense_metrics[METRIC], dense_metrics[METRIC]))
    if "dense" in unmasked:
        out["dense"]["unmasked"] = {k: mean_se(v) for k, v in evaluate(model, masked=False).items()}
    out["per_user"] = {"dense": dense_metrics[METRIC]}
    scored = "validation (--score-validation)" if getattr(args, "score_validation", False) else "test"
    print(f"seed {seed} dense: {METRIC} {scored} {out['dense'][METRIC]:.4f}", flush=True)
    checkpoint(out)
    for label, name, ratio in labels_to_run(args):
        start = time.time()
        compressed, (stored, dense) = build_variant(name, ratio, model, tokenizer, calibration, args,
                                                    lambda m: recover(m, tokenizer, samples, seed, args))
        compress_s = time.time() - start
        start = time.time()
        metrics = evaluate(compressed)
        out[label] = {"variant": name, "ratio": ratio, "bytes_vs_bf16": round(stored / dense, 4),
                      "compress_s": round(compress_s, 1), "eval_s": round(time.time() - start, 1),
                      "metrics": {k: mean_se(v) for k, v in metrics.items()},
                      **summarize_label(metrics[METRIC], dense_metrics[METRIC])}
        if label in unmasked:
            out[label]["unmasked"] = {k: mean_se(v) for k, v in evaluate(compressed, masked=False).items()}
        out["per_user"][label] = metrics[METRIC]
        print(f"seed {seed} {label}: {METRIC} {out[label][METRIC]:.4f} (dense {out['dense'][METRIC]:.4f}), "
              f"kept {out[label]['kept']:.1%}, bytes {stored / dense:.3f}", flush=True)
        del compressed
        checkpoint(out)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--rtn-ratios", type=float, nargs="+", default=[0.5], help="ratios of the *rtn ablations")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join([*VARIANTS, *RECOVERED])}")
    parser.add_argument("--unmasked", default="dense,odllm@0.5,odllm@0.3",
                        help="labels also evaluated without excluding seen items")
    parser.add_argument("--out-dir", default="runs/quant-recsys")
    parser.add_argument("--json", default="benchmarks/results/quantized_recsys_cpu.json")
    parser.add_argument("--epochs", type=float, default=6, help="dense training epochs (the example's default: 6)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the dense training")
    parser.add_argument("--history", type=int, default=20,
                        help="items of history per prompt, in training chunks, calibration and evaluation (SASRec's "
                             "baseline in benchmarks/sasrec.py reads 50)")
    parser.add_argument("--item-embeddings", default="offline", choices=["offline", "collaborative", "hybrid"],
                        help="what the semantic IDs are built from: item text (offline), training co-occurrence, or both")
    parser.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on the attention weights while training")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--max-eval-users", type=int, default=None, help="default: all test users")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true", help="train (or load) and evaluate on validation users only")
    parser.add_argument("--recovery-epochs", type=float, default=0.0, help="epochs of the +recovery variants")
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--refine-steps", type=int, default=256, help="refine_steps of the +refine variants")
    parser.add_argument("--refine-lr", type=float, default=1e-4, help="refine_lr of the +refine variants")
    parser.add_argument("--score-validation", action="store_true",
                        help="score every model on the validation users instead of the test users (to choose "
                             "settings such as --recovery-lr without looking at test users)")
    parser.add_argument("--merge", nargs="+", default=None, help="combine the per-seed results of these JSON files")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        files = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = merge_seeds([f["per_seed"] for f in files])
        # the merged runs differ in seeds/variants/ratios: keep every run's arguments, not the first one's
        runs_args = [f["args"] for f in files]
        return report(merged, argparse.Namespace(json=args.json, merged_runs=runs_args), files[0]["eval_users"],
                      machine=files[0]["machine"])
    torch.set_num_threads(args.threads)
    data = load_movielens_100k(None)
    split = leave_one_out(data.sequences, history=args.history)
    scored = split.valid if args.score_validation else split.test
    test = scored[: args.max_eval_users] if args.max_eval_users else scored
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        def checkpoint(out: dict[str, Any], seed: int = seed) -> None:
            per_seed[seed] = out
            report(per_seed, args, len(test), quiet=True)

        per_seed[seed] = run_seed(seed, args, data, split, test, checkpoint)
        report(per_seed, args, len(test))


def merge_seeds(parts: list[dict[str, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Union of the labels of several runs per seed (processes that split the variants of one saved dense
    model). Refuses runs of one seed whose dense per-user scores differ (they did not score the same model);
    entries of one label are merged key by key (e.g. the dense ``unmasked`` numbers only one process computed)."""
    merged: dict[int, dict[str, Any]] = {}
    for part in parts:
        for seed, labels in part.items():
            into = merged.setdefault(int(seed), {"per_user": {}})
            dense = labels.get("per_user", {}).get("dense")
            if dense is not None and into["per_user"].get("dense", dense) != dense:
                raise SystemExit(f"error: seed {seed}: the runs to merge scored different dense models")
            for label, value in labels.items():
                if label == "per_user":
                    for name, values in value.items():
                        into["per_user"].setdefault(name, values)
                else:
                    entry = into.setdefault(label, {})
                    for key, item in value.items():
                        entry.setdefault(key, item)
    return merged


def report(per_seed: dict[int, dict[str, Any]], args: argparse.Namespace, eval_users: int, quiet: bool = False,
           machine: dict[str, Any] | None = None) -> None:
    """Table over seeds (labels every seed has) to stdout unless ``quiet``; everything to ``args.json``
    (``machine``: where the runs ran, when merging elsewhere)."""
    seeds = sorted(per_seed)
    rows = []
    for label in per_seed[seeds[0]]:
        if label == "per_user" or any(label not in per_seed[s] or "kept" not in per_seed[s][label] for s in seeds):
            continue
        cells = [per_seed[s][label] for s in seeds]
        kept = [c["kept"] for c in cells]
        kept_m, kept_se = mean_se(kept)
        row = {"model": label, "bytes vs bf16": f"{cells[0]['bytes_vs_bf16']:.3f}",
               "NDCG@10 per seed (mean ± SE over users)": "; ".join(f"{c[METRIC]:.4f} ± {c[METRIC + '_se']:.4f}" for c in cells),
               "kept per seed (± paired SE)": "; ".join(f"{c['kept']:.1%} ± {c['kept_se_paired']:.1%}" for c in cells),
               "kept, mean over seeds": f"{kept_m:.1%}" + (f" ± {kept_se:.1%}" if len(kept) > 1 else "")}
        rows.append(row)
    if rows and not quiet:
        print(markdown_table(rows, list(rows[0])))
    write_json(args.json, {"machine": machine or machine_info(), "args": vars(args), "seeds_done": seeds,
                           "eval_users": eval_users, "rows": rows, "per_seed": per_seed})


if __name__ == "__main__":
    main()
