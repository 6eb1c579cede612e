"""Ranking quality of OD-LLM with quantized factors on the ML-100K recommender (issue 12's quality goal).

Per seed: train (or reuse) the dense recommender of ``examples/ml100k_end_to_end.py`` (same recipe, same
arguments), then compress it with the **wired** pipeline, ``ODLLMConfig(ratio=R, factor_bits=..,
factor_quantizer=..)``, once per variant (dense factors, int8/int4 x GPTQ/RTN), and evaluate every model on the
held-out test users (leave-one-out last item, constrained beam search, seen items excluded). NDCG@10 is a
mean over users with its standard error; "kept" is variant / dense with the standard error of the paired
per-user difference divided by the dense mean. Bytes are those of the decoder-layer linears (codes, scales,
zeros, biases) relative to the dense bf16 weights of the same modules.

    python benchmarks/quantized_recsys.py --seeds 0 1 2 --out-dir runs/quant-recsys \
        --json benchmarks/results/quantized_recsys_cpu.json
    python benchmarks/quantized_recsys.py --seeds 0 --train-only --out-dir runs/quant-recsys   # train dense only
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

from optimum_odllm import ODLLMCompressor, ODLLMConfig  # noqa: E402
from optimum_odllm.lowrank import LowRankLinear  # noqa: E402
from optimum_odllm.quantization import QuantizedLowRankLinear  # noqa: E402
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

#: (name, factor_bits, factor_quantizer); None bits = float factors (plain OD-LLM).
VARIANTS = [("odllm", None, "gptq"), ("odllm+int8 gptq", 8, "gptq"), ("odllm+int8 rtn", 8, "rtn"),
            ("odllm+int4 gptq", 4, "gptq"), ("odllm+int4 rtn", 4, "rtn")]
METRIC = "NDCG@10"


def sixteen_bit_bytes(tensor: torch.Tensor) -> int:
    """Float tensors at 2 bytes per value (the issue's "16-bit bytes", whatever dtype the CPU run used);
    integer codes at their real size."""
    return tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())


def decoder_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes stored, bytes as dense 16-bit) of the linears inside the decoder layers."""
    stored = dense = 0
    for name, module in model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(module, (LowRankLinear, QuantizedLowRankLinear)):
            stored += sum(sixteen_bit_bytes(t) for t in module.state_dict().values())
            dense += (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)) * 2
        elif isinstance(module, nn.Linear) and not name.endswith((".up", ".down")):
            stored += sum(sixteen_bit_bytes(t) for t in module.state_dict().values())
            dense += sum(sixteen_bit_bytes(t) for t in module.state_dict().values())
    return stored, dense


def train_or_load(seed: int, args: argparse.Namespace, data, split) -> tuple[nn.Module, InstructionEncoder, Any]:
    dense_dir = Path(args.out_dir) / f"seed{seed}" / "dense"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dense_dir / "config.json").exists():
        index = ItemIndex.load(dense_dir)
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
        return model, InstructionEncoder(tokenizer, index, data.item_text), tokenizer
    random.seed(seed), torch.manual_seed(seed)
    index = build_item_index(data.item_text, data.item_ids, levels=3, codebook_size=64, steps=1500, seed=seed)
    tokenizer = build_offline_tokenizer(data.item_text, index)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    samples = build_instruction_samples(encoder, split.train, tasks=("seqrec", "item2index"), history=20,
                                        packed=True, short=True, seed=seed)
    model = build_offline_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, seed=seed)
    start = time.time()
    model = train_recommender(model, tokenizer, samples, dense_dir.parent / "trainer", epochs=args.epochs,
                              learning_rate=2e-3, batch_size=64, seed=seed, disable_tqdm=True).eval()
    print(f"seed {seed}: trained in {time.time() - start:.0f}s", flush=True)
    model.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    index.save(dense_dir)
    return model, encoder, tokenizer


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def variant_config(ratio: float, bits: int | None, quantizer: str, args: argparse.Namespace) -> ODLLMConfig:
    return ODLLMConfig(ratio=ratio, rank_multiple=8, num_calibration_samples=args.calibration_samples,
                       min_calibration_tokens=16, factor_bits=bits, factor_quantizer=quantizer)


def calibration_of(seed: int, encoder: InstructionEncoder, split, args: argparse.Namespace) -> list[list[int]]:
    """Packed training sequences (the model's own input distribution), never test targets."""
    rng = random.Random(seed)
    chunks = packed_sequences(split.train, 20)
    return [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, c) for c in rng.sample(chunks, args.calibration_samples)]


def recount_bytes(args: argparse.Namespace, data, split) -> None:
    """Recompute ``bytes_vs_bf16`` of an existing result file (compression only, no evaluation)."""
    result = json.loads(Path(args.json).read_text())
    per_seed = {int(k): v for k, v in result["per_seed"].items()}
    for seed in per_seed:
        model, encoder, tokenizer = train_or_load(seed, args, data, split)
        calibration = calibration_of(seed, encoder, split, args)
        for name, bits, quantizer in VARIANTS:
            for ratio in args.ratios:
                cfg = variant_config(ratio, bits, quantizer, args)
                compressed = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=cfg).compress(calibration)
                stored, dense = decoder_linear_bytes(compressed)
                per_seed[seed][f"{name}@{ratio:g}"]["bytes_vs_bf16"] = round(stored / dense, 4)
    report(per_seed, argparse.Namespace(**{**result["args"], "json": args.json}), result["eval_users"])


def run_seed(seed: int, args: argparse.Namespace, data, split, test) -> dict[str, Any]:
    model, encoder, tokenizer = train_or_load(seed, args, data, split)
    if args.train_only:
        return {}
    calibration = calibration_of(seed, encoder, split, args)

    def evaluate(m: nn.Module) -> list[float]:
        return evaluate_per_user(m, encoder, test, PACKED_SEQREC_TEMPLATE, num_beams=20, progress=False,
                                 train=split.train, exclude_history=True)[METRIC]

    start = time.time()
    per_user = {"dense": evaluate(model)}
    out: dict[str, Any] = {"dense": {"eval_s": round(time.time() - start, 1), "bytes_vs_bf16": 1.0}}
    for name, bits, quantizer in VARIANTS:
        for ratio in args.ratios:
            label = f"{name}@{ratio:g}"
            cfg = variant_config(ratio, bits, quantizer, args)
            start = time.time()
            compressed = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=cfg, tokenizer=tokenizer).compress(calibration)
            compress_s = time.time() - start
            stored, dense = decoder_linear_bytes(compressed)
            start = time.time()
            per_user[label] = evaluate(compressed)
            out[label] = {"ratio": ratio, "factor_bits": bits, "factor_quantizer": quantizer if bits else None,
                          "bytes_vs_bf16": round(stored / dense, 4), "compress_s": round(compress_s, 1),
                          "eval_s": round(time.time() - start, 1)}
            print(f"seed {seed} {label}: {METRIC} {statistics.fmean(per_user[label]):.4f} "
                  f"(dense {statistics.fmean(per_user['dense']):.4f}), bytes {stored / dense:.3f}", flush=True)
    dense_mean = statistics.fmean(per_user["dense"])
    for label, values in per_user.items():
        m, se = mean_se(values)
        diff_m, diff_se = mean_se([v - d for v, d in zip(values, per_user["dense"])])
        out[label].update({METRIC: m, f"{METRIC}_se": se, "kept": (dense_mean + diff_m) / dense_mean,
                           "kept_se_paired": diff_se / dense_mean})
    out["per_user"] = per_user
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--out-dir", default="runs/quant-recsys")
    parser.add_argument("--json", default="benchmarks/results/quantized_recsys_cpu.json")
    parser.add_argument("--epochs", type=float, default=6, help="dense training epochs (the example's default: 6)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--max-eval-users", type=int, default=None, help="default: all test users")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--recount-bytes", action="store_true",
                        help="only recompute the bytes column of an existing --json (compression, no evaluation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_movielens_100k(None)
    split = leave_one_out(data.sequences, history=20)
    test = split.test[: args.max_eval_users] if args.max_eval_users else split.test
    if args.recount_bytes:
        return recount_bytes(args, data, split)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(seed, args, data, split, test)
        if not args.train_only:
            report(per_seed, args, len(test))  # after every seed, so an interrupted run keeps what it finished


def report(per_seed: dict[int, dict[str, Any]], args: argparse.Namespace, eval_users: int) -> None:
    seeds = sorted(per_seed)
    rows = []
    for label in per_seed[seeds[0]]:
        if label == "per_user":
            continue
        cells = [per_seed[s][label] for s in seeds]
        kept = [c["kept"] for c in cells]
        row = {"model": label, "bytes vs bf16": f"{cells[0]['bytes_vs_bf16']:.3f}",
               "NDCG@10 per seed (mean ± SE over users)": "; ".join(f"{c[METRIC]:.4f} ± {c[METRIC + '_se']:.4f}" for c in cells),
               "kept per seed (± paired SE)": "; ".join(f"{c['kept']:.1%} ± {c['kept_se_paired']:.1%}" for c in cells),
               "kept, mean over seeds": f"{statistics.fmean(kept):.1%}"
               + (f" ± {statistics.stdev(kept) / math.sqrt(len(kept)):.1%}" if len(kept) > 1 else "")}
        rows.append(row)
    print(markdown_table(rows, list(rows[0])))
    write_json(args.json, {"machine": machine_info(), "args": vars(args), "seeds_done": seeds,
                           "eval_users": eval_users, "rows": rows, "per_seed": per_seed})


if __name__ == "__main__":
    main()
