"""Train an LC-Rec-style recommender on MovieLens-100K, compress it with OD-LLM, and compare ranking quality.

    python examples/ml100k_end_to_end.py --output-dir runs/ml100k           # default run (< 30 min, 2-core CPU)
    python examples/ml100k_end_to_end.py --output-dir runs/smoke --quick    # smoke run (< 3 min)

Every model is evaluated twice: with each user's already-seen items excluded inside the beam search
(the headline numbers: nobody rates a MovieLens movie twice) and unmasked; each metric is the mean over
test users with its standard error (``HR@10_se``). Writes ``DIR/results.json`` (popularity, dense and
every compressed variant: HR@1/5/10, NDCG@5/10 masked, ``"unmasked": {...}``, params), ``DIR/results.md``
(mean ± s.e. table) and ``DIR/quality_vs_ratio.png``; the dense and the OD-LLM@0.5 models are saved under
``DIR/dense`` and ``DIR/odllm-0.5`` with their ``item_index.json``.
Needs MovieLens-100K from the recbole wheel: ``pip install --no-deps recbole==1.2.1`` (or ``--data-path``).

Several GPUs: ``accelerate launch --multi_gpu --num_processes N examples/ml100k_end_to_end.py ...`` trains with
DDP and splits the test users across processes (metrics equal a one-process run); every process repeats the
indexing and compression and checks that it got the same result; only the main process prints and writes.
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from optimum_odllm import ODLLMCompressor, ODLLMConfig, count_parameters
from optimum_odllm.recsys import (
    ItemIndex,
    PACKED_SEQREC_TEMPLATE,
    InstructionEncoder,
    build_instruction_samples,
    build_item_index,
    build_offline_model,
    build_offline_tokenizer,
    evaluate_popularity,
    evaluate_recommender,
    leave_one_out,
    load_movielens_100k,
    train_recommender,
)
from optimum_odllm.recsys.distributed import check_same_across_processes, is_main_process, launched_state
from optimum_odllm.recsys.instructions import packed_sequences
from optimum_odllm.recsys.metrics import STDERR_SUFFIX


METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
# modules this job needs beyond the package's own dependencies, and the extra that installs them
OPTIONAL_DEPENDENCIES = {"matplotlib": "recsys"}


def check_optional_dependencies() -> None:
    """Fail before any work (training takes minutes) if a module needed at the end is missing."""
    missing = {}
    for module, extra in OPTIONAL_DEPENDENCIES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing[module] = extra
    if missing:
        extras = ",".join(sorted(set(missing.values())))
        raise ImportError(f"examples/ml100k_end_to_end.py needs {', '.join(sorted(missing))} (for the quality plot); "
                          f"install it with: pip install 'optimum-odllm[{extras}]'")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data-path", default=None, help="ml-100k directory or recbole .whl (default: installed recbole)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 3 min): tiny model, half an epoch, 200 test users")
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=64)
    p.add_argument("--item-embeddings", default="collaborative", choices=["offline", "collaborative", "hybrid"],
                   help="semantic IDs from item text, from co-occurrence in the training sequences, or both")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5], help="OD-LLM kept ratios to evaluate")
    p.add_argument("--ablation-ratio", type=float, default=0.5, help="ratio of the closed-form, no-whitening, no-progressive and SVD runs")
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--max-eval-users", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-dense", default=None,
                   help="reuse a trained dense recommender (a DIR/dense folder of an earlier run) instead of training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-compression", action="store_true",
                   help="evaluate popularity and the dense model only (e.g. to time evaluation on 1 vs N GPUs)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden_size, args.layers, args.epochs, args.codebook_size = 64, 2, 0.5, 32
        args.max_eval_users = args.max_eval_users or 200
        args.calibration_samples = 64
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def variants(args) -> list[tuple[str, ODLLMConfig]]:
    """OD-LLM (default settings) at every requested ratio, plus at ``--ablation-ratio`` the closed form
    without block refinement and the ablations of its parts (closed form too)."""
    common = {"rank_multiple": 8, "num_calibration_samples": args.calibration_samples, "min_calibration_tokens": 16}
    out = [(f"odllm@{r:g}", ODLLMConfig(ratio=r, **common)) for r in args.ratios]
    r = args.ablation_ratio
    closed = {**common, "refine_steps": 0}
    out += [
        (f"odllm-closed-form@{r:g}", ODLLMConfig(ratio=r, **closed)),
        (f"odllm-no-whitening@{r:g}", ODLLMConfig(ratio=r, whitening=False, **closed)),
        (f"odllm-no-progressive@{r:g}", ODLLMConfig(ratio=r, progressive=False, **closed)),
        (f"svd@{r:g}", ODLLMConfig(ratio=r, whitening=False, progressive=False, **closed)),
    ]
    return out


UNMASKED_COLUMNS = ("HR@10", "NDCG@10")


def mean_se(r: dict, metric: str) -> str:
    """``0.1071 ± 0.0101`` (mean ± standard error over users)."""
    return f"{r[metric]:.4f} ± {r[metric + STDERR_SUFFIX]:.4f}"


def table_rows(results: dict) -> list[tuple[str, dict, dict]]:
    """``(name, masked, unmasked)`` per model; popularity's two variants become one row."""
    rows = [("popularity", results["popularity-unseen"], results["popularity"])]
    for name, r in results.items():
        if isinstance(r, dict) and "unmasked" in r:
            rows.append((name, r, r["unmasked"]))
    return rows


def write_table(results: dict, path: Path) -> None:
    """Masked metrics (seen items excluded) and, beside them, the unmasked HR@10/NDCG@10."""
    lines = ["| model | kept ratio | params | " + " | ".join(METRICS) + " | "
             + " | ".join(f"{m} unmasked" for m in UNMASKED_COLUMNS) + " |",
             "|---|---|---|" + "---|" * (len(METRICS) + len(UNMASKED_COLUMNS))]
    for name, masked, unmasked in table_rows(results):
        ratio = masked.get("ratio", "")
        params = f"{masked['params']:,}" if "params" in masked else ""
        cells = [mean_se(masked, m) for m in METRICS] + [mean_se(unmasked, m) for m in UNMASKED_COLUMNS]
        lines.append(f"| {name} | {ratio} | {params} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    se = "NDCG@10" + STDERR_SUFFIX
    dense = results["dense"]
    ax.axhline(results["popularity-unseen"]["NDCG@10"], color="gray", ls=":", label="most popular (unseen)")
    ax.errorbar([1.0], [dense["NDCG@10"]], yerr=[dense[se]], color="black", marker="*", ms=12, label="dense", zorder=3)
    families: dict[str, list[tuple[float, float, float]]] = {}
    for name, r in results.items():
        if "@" in name and isinstance(r, dict) and "ratio" in r:
            families.setdefault(name.split("@")[0], []).append((r["ratio"], r["NDCG@10"], r[se]))
    for family, pts in families.items():
        pts = sorted(pts + ([(1.0, dense["NDCG@10"], dense[se])] if family == "odllm" else []))
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=family)
    ax.set_xlabel("kept ratio of decoder-layer parameters")
    ax.set_ylabel("NDCG@10, seen items excluded (mean ± s.e.)")
    ax.set_title(f"{results['dataset']}: quality vs kept ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def say(message: str) -> None:
    """Print on the main process only (``accelerate launch`` runs this script once per GPU)."""
    if is_main_process():
        print(message, flush=True)


def print_metrics(name: str, r: dict) -> None:
    """One line per model: masked and unmasked mean ± s.e."""
    masked = ", ".join(f"{m} {mean_se(r, m)}" for m in METRICS)
    unmasked = ", ".join(f"{m} {mean_se(r['unmasked'], m)}" for m in UNMASKED_COLUMNS)
    say(f"{name}: seen items excluded: {masked} | unmasked: {unmasked}")


def weights_digest(model) -> str:
    """SHA-256 of every tensor's bytes: identical models on all processes, or the gathered metrics are wrong."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluation_device() -> torch.device:
    """This process's GPU under ``accelerate launch``, else CUDA if present, else the CPU."""
    state = launched_state()
    if state is not None:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_optional_dependencies()
    logging.set_verbosity_info()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}

    data = load_movielens_100k(args.data_path)
    split = leave_one_out(data.sequences, history=args.history)
    test = split.test[: args.max_eval_users] if args.max_eval_users else split.test
    say(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.n_interactions} interactions")

    if args.from_dense:
        dense_dir = Path(args.from_dense)
        index = ItemIndex.load(dense_dir)
        tokenizer = AutoTokenizer.from_pretrained(dense_dir)
        encoder = InstructionEncoder(tokenizer, index, data.item_text)
        model = AutoModelForCausalLM.from_pretrained(dense_dir).eval().to(evaluation_device())
        say(f"reusing the trained recommender in {dense_dir}")
    else:
        index = build_item_index(data.item_text, data.item_ids, levels=args.levels, codebook_size=args.codebook_size,
                                 steps=300 if args.quick else 1500, seed=args.seed, backend=args.item_embeddings,
                                 sequences=split.train.values())
        check_same_across_processes(json.dumps(index.codes), "the item index")
        tokenizer = build_offline_tokenizer(data.item_text, index)
        encoder = InstructionEncoder(tokenizer, index, data.item_text)
        samples = build_instruction_samples(encoder, split.train, tasks=("seqrec", "item2index"), history=args.history,
                                            packed=True, short=True, seed=args.seed)
        timings["indexing_s"] = round(time.time() - t0, 1)

        model = build_offline_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers,
                                    num_heads=args.heads, seed=args.seed)
        say(f"training {count_parameters(model):,}-parameter Llama on {len(samples)} samples")
        t = time.time()
        model = train_recommender(model, tokenizer, samples, out / "trainer", epochs=args.epochs, learning_rate=args.lr,
                                  batch_size=args.batch_size, seed=args.seed, disable_tqdm=args.quick)
        timings["training_s"] = round(time.time() - t, 1)
        model.eval()
        check_same_across_processes(weights_digest(model), "the trained model")
        dense_dir = out / "dense"
        if is_main_process():
            model.save_pretrained(dense_dir)
            tokenizer.save_pretrained(dense_dir)
            index.save(dense_dir)

    results: dict = {"dataset": data.name, "users": data.n_users, "items": data.n_items,
                     "interactions": data.n_interactions, "eval_users": len(test), "beams": args.beams,
                     "index": {"levels": index.levels, "codebook_size": args.codebook_size,
                               "item_embeddings": args.item_embeddings,
                               "collisions_before_repair": index.collisions_before}}
    results["popularity"] = evaluate_popularity(split.train, test, exclude_history=False, with_stderr=True)
    results["popularity-unseen"] = evaluate_popularity(split.train, test, exclude_history=True, with_stderr=True)

    def evaluate(m) -> dict:
        """Masked metrics (seen items excluded inside the beam search) with the unmasked ones under "unmasked"."""
        seconds = {}

        def run(mask: bool) -> dict:
            t = time.time()
            r = evaluate_recommender(m, encoder, test, PACKED_SEQREC_TEMPLATE, num_beams=args.beams,
                                     train=split.train, exclude_history=mask, with_stderr=True)
            seconds["masked" if mask else "unmasked"] = round(time.time() - t, 2)
            return r

        return {**run(True), "unmasked": run(False), "eval_s": seconds}

    t = time.time()
    results["dense"] = {**evaluate(model), "params": count_parameters(model), "ratio": 1.0}
    timings["eval_dense_s"] = round(time.time() - t, 1)
    print_metrics("dense", results["dense"])

    # calibration: packed training sequences (the model's real input distribution), never test targets
    rng = random.Random(args.seed)
    chunks = packed_sequences(split.train, args.history)
    calibration = [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, c) for c in rng.sample(chunks, args.calibration_samples)]
    calibration_description = (f"{data.name} training sequences ({args.calibration_samples} packed histories of "
                               f"{args.history} items, sampled with seed {args.seed}; no test targets)")
    for name, cfg in ([] if args.skip_compression else variants(args)):
        t = time.time()
        compressed = copy.deepcopy(model)
        compressor = ODLLMCompressor(compressed, config=cfg, tokenizer=tokenizer, source=str(dense_dir))
        compressor.calibration_source = calibration_description
        compressed = compressor.compress(calibration)
        compress_s = time.time() - t
        check_same_across_processes(weights_digest(compressed), f"the {name} model")
        results[name] = {**evaluate(compressed), "params": count_parameters(compressed), "ratio": cfg.ratio,
                         "whitening": cfg.whitening, "progressive": cfg.progressive,
                         "compress_s": round(compress_s, 1)}
        print_metrics(name, results[name])
        if name == f"odllm@{args.ablation_ratio:g}" and is_main_process():
            # the card publishes the masked test metrics (seen items excluded, as in the results table)
            card_metrics = {k: results[name][k] for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10") if k in results[name]}
            compressor.save_pretrained(out / f"odllm-{args.ablation_ratio:g}",
                                       eval_results={f"{data.name} (leave-one-out, seen items excluded)": card_metrics},
                                       model_name=f"{data.name}-lcrec-odllm-{args.ablation_ratio:g}")
            tokenizer.save_pretrained(out / f"odllm-{args.ablation_ratio:g}")
        del compressed, compressor

    dense = results["dense"]
    for name, r in list(results.items()):
        if isinstance(r, dict) and "ratio" in r and name != "dense" and dense["NDCG@10"] > 0:
            r["NDCG@10_kept"] = round(r["NDCG@10"] / dense["NDCG@10"], 4)
            if dense["unmasked"]["NDCG@10"] > 0:
                r["unmasked"]["NDCG@10_kept"] = round(r["unmasked"]["NDCG@10"] / dense["unmasked"]["NDCG@10"], 4)
    timings["total_s"] = round(time.time() - t0, 1)
    results["timings"] = timings
    results["settings"] = {k: v for k, v in vars(args).items()}
    state = launched_state()
    results["processes"] = state.num_processes if state is not None else 1
    if is_main_process():
        (out / "results.json").write_text(json.dumps(results, indent=2))
        write_table(results, out / "results.md")
        write_plot(results, out / "quality_vs_ratio.png")
        print((out / "results.md").read_text())
        print(f"wrote {out / 'results.json'} in {timings['total_s']:.0f}s")
    return results


if __name__ == "__main__":
    main()
