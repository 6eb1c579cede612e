"""Progressive update variants side by side on held-out data (issue 14): which one, if any, helps?

One dense recommender (the ML-100K LC-Rec recipe of ``examples/ml100k_end_to_end.py``, here with >= 6
decoder layers so drift can accumulate) is compressed at each ratio with every variant of
``optimum_odllm.solvers.ALIGNMENTS`` plus the one-shot ablation (``progressive=False``), exact least
squares (``alignment_damping=0``) and the solve as it was before the issue-14 fix (ridge toward zero, inside
the truncation metric; re-created here only to measure the fix). Calibration: packed *training* chunks only.

Measured on the test users, never seen in training or calibration:

* **held-out loss**: next-item negative log-likelihood of each test user's target item (its 3-4 index
  tokens) given the user's history, mean over users ± standard error, and the paired difference to
  ``progressive=False`` ± its paired standard error (same users, so most of the between-user spread cancels);
* **NDCG@10 / HR@10** with history-aware decoding (seen items excluded), mean ± s.e. over users, at the
  ratios in ``--ndcg-ratios`` (beam search is the expensive part).

    python benchmarks/alignment_variants.py --model-dir runs/align6/dense
    python benchmarks/alignment_variants.py --train-dir runs/align6 --layers 6 --hidden 128     # trains first
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recsys_common as rc  # noqa: E402
from common import machine_info, mean_se, write_json  # noqa: E402

from optimum_odllm.linalg import aligned_target_times_factor, robust_cholesky, truncated_svd  # noqa: E402
from optimum_odllm.solvers import ALIGNMENTS, register_alignment, ridge  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BEFORE_FIX = "least_squares_before_fix"


if BEFORE_FIX not in ALIGNMENTS:
    @register_alignment(BEFORE_FIX)
    def least_squares_before_fix(problem, chol, options):
        """The solve before issue 14: ``M* = W C_xr^T (C + lambda I)^-1`` truncated in the metric ``C + lambda I``."""
        damped = robust_cholesky(ridge(problem.covariance, options.damping))
        target = aligned_target_times_factor(problem.weight, problem.cross, damped.factor)
        return truncated_svd(target, problem.rank, damped.factor, options.driver, target_is_whitened=True)


#: block refinement as chosen on validation users (docs/alignment.md); every other method is closed form only
REFINED = dict(refine_steps=256, refine_lr=1e-4)
#: method name -> ODLLMConfig keywords (besides ratio and the shared calibration settings)
METHODS: dict[str, dict[str, Any]] = {
    "no_progressive": dict(progressive=False, refine_steps=0),
    "least_squares": dict(alignment="least_squares", refine_steps=0),
    "anchored": dict(alignment="anchored", refine_steps=0),
    "up_only": dict(alignment="up_only", refine_steps=0),
    "drift_whitening": dict(alignment="drift_whitening", refine_steps=0),
    "undamped": dict(alignment="least_squares", alignment_damping=0.0, allow_undamped_alignment=True, refine_steps=0),
    "before_fix": dict(alignment=BEFORE_FIX, refine_steps=0),
    "no_progressive+refine": dict(progressive=False, **REFINED),
    "least_squares+refine": dict(alignment="least_squares", **REFINED),
}



@torch.no_grad()
def target_nll(model, encoder, examples, batch_size: int = 64) -> list[float]:
    """Per example: mean negative log-likelihood of the target item's tokens after the packed history prompt."""
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE

    model.eval()
    rows = []
    for ex in examples:
        prompt = encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, ex.history)
        rows.append((prompt + list(encoder.item_ids[ex.target]), len(prompt)))
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (ids, start) in enumerate(rows):
        by_shape[(len(ids), start)].append(k)
    out = [0.0] * len(rows)
    for (length, start), idx in by_shape.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.tensor([rows[k][0] for k in chunk])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, start - 1 : length - 1].double(), -1)
            nll = -logp.gather(-1, ids[:, start:, None]).squeeze(-1).mean(-1)
            for k, v in zip(chunk, nll.tolist()):
                out[k] = v
    return out


def ranking(model, encoder, split, users, beams: int, masked: bool = True) -> dict[str, list[float]]:
    """Per-user HR@K/NDCG@K; ``masked``: the user's seen items are excluded inside the beam search."""
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, evaluate_per_user

    with torch.no_grad():
        return evaluate_per_user(model, encoder, users, PACKED_SEQREC_TEMPLATE, num_beams=beams, batch_size=32,
                                 progress=False, train=split.train, exclude_history=masked)


def compress(dense, method: str, ratio: float, calibration, args):
    from optimum_odllm import ODLLMCompressor, ODLLMConfig

    model = copy.deepcopy(dense)
    config = ODLLMConfig(ratio=ratio, rank_multiple=args.rank_multiple, num_calibration_samples=len(calibration),
                         min_calibration_tokens=16, **METHODS[method])
    ODLLMCompressor(model, config).compress(calibration, device="cpu")
    return model


def summarize_point(nll: list[float], base_nll: list[float] | None, dense_nll: list[float],
                    rank: dict[str, list[float]] | None, base_rank: dict[str, list[float]] | None) -> dict[str, float]:
    row: dict[str, float] = {}
    row["loss"], row["loss_se"] = mean_se(nll)
    row["d_dense"], row["d_dense_se"] = mean_se([a - b for a, b in zip(nll, dense_nll)])
    if base_nll is not None:
        row["d_noprog"], row["d_noprog_se"] = mean_se([a - b for a, b in zip(nll, base_nll)])
    if rank is not None:
        for m in ("NDCG@10", "HR@10"):
            row[m], row[m + "_se"] = mean_se(rank[m])
            if base_rank is not None:
                row[m + "_d_noprog"], row[m + "_d_noprog_se"] = mean_se([a - b for a, b in zip(rank[m], base_rank[m])])
    return row


def table(results: dict) -> str:
    base = results.get("baseline", "no_progressive")
    lines = [f"| ratio | method | held-out loss | Δ vs dense | Δ vs {base} (paired) | NDCG@10 (seen excl.) | "
             f"ΔNDCG@10 vs {base} (paired) |", "|---|---|---|---|---|---|---|"]
    d = results["dense"]
    lines.append(f"| 1.0 | dense | {d['loss']:.4f} ± {d['loss_se']:.4f} | | | "
                 + (f"{d['NDCG@10']:.4f} ± {d['NDCG@10_se']:.4f}" if "NDCG@10" in d else "") + " | |")
    for key, r in results["points"].items():
        ratio, method = key.split("@")[1], key.split("@")[0]
        if "error" in r:
            lines.append(f"| {ratio} | {method} | failed: {r['error']} | | | | |")
            continue
        noprog = f"{r['d_noprog']:+.4f} ± {r['d_noprog_se']:.4f}" if "d_noprog" in r else ""
        ndcg = f"{r['NDCG@10']:.4f} ± {r['NDCG@10_se']:.4f}" if "NDCG@10" in r else ""
        dndcg = f"{r['NDCG@10_d_noprog']:+.4f} ± {r['NDCG@10_d_noprog_se']:.4f}" if "NDCG@10_d_noprog" in r else ""
        lines.append(f"| {ratio} | {method} | {r['loss']:.4f} ± {r['loss_se']:.4f} | "
                     f"{r['d_dense']:+.4f} ± {r['d_dense_se']:.4f} | {noprog} | {ndcg} | {dndcg} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="a saved dense recommender (DIR/dense of the example)")
    p.add_argument("--train-dir", default="runs/align6", help="where to train one if there is no --model-dir")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--data-path", default=None)
    p.add_argument("--ratios", default="0.2,0.3,0.4,0.5,0.6")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ndcg-ratios", default="0.3,0.5", help="ratios at which NDCG@10 is also measured (beam search)")
    p.add_argument("--ndcg-methods", default="no_progressive,least_squares,anchored,up_only,drift_whitening")
    p.add_argument("--max-ndcg-users", type=int, default=None, help="seeded subset of test users for NDCG (default: all)")
    p.add_argument("--baseline", default="no_progressive",
                   help="method the paired differences are taken against (list it first in --methods)")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--rank-multiple", type=int, default=8)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "alignment_variants.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from optimum_odllm.recsys import InstructionEncoder

    t0 = time.time()
    data, split = rc.load_split(args.data_path)
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = rc.train_recommender_like_example(Path(args.train_dir), data, split, hidden=args.hidden,
                                                      layers=args.layers, epochs=args.epochs, seed=args.seed)
    dense, tokenizer, index = rc.load_recommender(model_dir)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    calibration = rc.calibration_ids(encoder, split, args.calibration_samples, args.seed)
    test = list(split.test)
    ndcg_users = rc.eval_users(split, args.max_ndcg_users, args.seed)
    ndcg_ratios = {float(r) for r in args.ndcg_ratios.split(",") if r}
    ndcg_methods = set(args.ndcg_methods.split(","))

    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "baseline": args.baseline, "model_dir": str(model_dir),
                               "layers": dense.config.num_hidden_layers, "hidden": dense.config.hidden_size,
                               "test_users": len(test), "ndcg_users": len(ndcg_users),
                               "calibration_tokens": sum(len(c) for c in calibration), "points": {}}
    dense_nll = target_nll(dense, encoder, test)
    dense_rank = ranking(dense, encoder, split, ndcg_users, args.beams) if ndcg_ratios else None
    results["dense"] = summarize_point(dense_nll, None, dense_nll, dense_rank, None)
    if dense_rank is not None:  # every metric, masked and unmasked: the numbers to set beside SASRec
        from optimum_odllm.recsys.metrics import summarize

        results["dense_metrics"] = {"masked": summarize(dense_rank, with_stderr=True), "unmasked": summarize(
            ranking(dense, encoder, split, ndcg_users, args.beams, masked=False), with_stderr=True)}
    print("dense", results["dense"], flush=True)
    out = Path(args.out)
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        base_nll = base_rank = None
        for method in [m for m in args.methods.split(",") if m]:
            key = f"{method}@{ratio:g}"
            t = time.time()
            try:
                model = compress(dense, method, ratio, calibration, args)
            except Exception as err:  # a failed point is reported, not hidden
                results["points"][key] = {"error": f"{type(err).__name__}: {err}"[:200]}
                continue
            nll = target_nll(model, encoder, test)
            rank = ranking(model, encoder, split, ndcg_users, args.beams) if (
                ratio in ndcg_ratios and method in ndcg_methods) else None
            is_base = method == args.baseline
            if is_base:
                base_nll, base_rank = nll, rank
            results["points"][key] = {**summarize_point(nll, None if is_base else base_nll, dense_nll, rank,
                                                        None if is_base else base_rank),
                                      "seconds": round(time.time() - t, 1)}
            print(key, {k: round(v, 5) for k, v in results["points"][key].items()}, flush=True)
            write_json(out, results)
            del model
    results["wall_s"] = round(time.time() - t0, 1)
    write_json(out, results)
    md = table(results)
    m = results["machine"]
    out.with_suffix(".md").write_text(
        f"{results['layers']} layers x hidden {results['hidden']}, {len(calibration)} calibration sequences "
        f"({results['calibration_tokens']} tokens), {len(test)} test users (NDCG: {len(ndcg_users)}); {m['date']}, "
        f"{m['cpu']}, {args.threads} thread(s), {results['wall_s']:.0f}s\n\n{md}\n")
    print(md)
    return results


if __name__ == "__main__":
    main()
