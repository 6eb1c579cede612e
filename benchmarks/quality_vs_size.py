"""Ranking quality vs model size of the ML-100K LC-Rec recommender: OD-LLM, its ablations, ASVD, FWSVD, GPTQ, SparseGPT.

For every kept ratio (default 0.2 ... 0.9) and low-rank method, a copy of the dense recommender is
compressed and evaluated with constrained beam search (beam 20) on the test users (leave-one-out):
HR@1/5/10, NDCG@5/10. Methods:

* ``odllm``           whitening + progressive layer-wise alignment (the library defaults)
* ``no-progressive``  whitening only (SVD-LLM-like)
* ``no-whitening``    plain SVD + progressive alignment
* ``svd``             plain truncated SVD (whitening=False, progressive=False)
* ``asvd``            ASVD-style: SVD of ``W diag(s)``, ``s = mean|x|^0.5`` per input channel (dense activations)
* ``fwsvd``           FWSVD-style: SVD of ``diag(sqrt(I)) W``, ``I`` = per-row empirical Fisher of the LM loss

plus GPTQ 4-bit (gptqmodel 7.6.0, asym, group 128, real int4 CPU kernel) and SparseGPT 50% unstructured
(llmcompressor 0.14.0.1), each run with its own venv (``benchmarks/run_baselines.sh`` builds them).
All methods get the same calibration sequences (packed training chunks, never test targets).

x axis (``storage``): bytes of the decoder-layer Linears relative to the dense ones at the same 16-bit
dtype. Low-rank factors: = kept ratio. GPTQ: measured from its checkpoint (qweight + scales + qzeros
+ g_idx). SparseGPT 50%: 0.5 + 1/16 (values + 1-bit mask, compressed-tensors ``sparse-bitmask``
layout); as run here it is stored and executed dense (1.0). Embeddings/lm_head are never compressed.

    python benchmarks/quality_vs_size.py --model-dir runs/ml100k/dense       # trained by examples/ml100k_end_to_end.py
    python benchmarks/quality_vs_size.py --train-dir runs/bench_ml100k       # trains with the example's recipe first

Writes ``--out`` (JSON, updated after every point; ``--resume`` skips points already there),
the markdown table next to it and ``benchmarks/results/quality_vs_size.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recsys_common as rc  # noqa: E402
from common import machine_info, markdown_table, write_json  # noqa: E402

LOWRANK = ("odllm", "no-progressive", "no-whitening", "svd", "asvd", "fwsvd")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="saved dense recommender (default: runs/ml100k/dense if it exists)")
    p.add_argument("--train-dir", default="runs/bench_ml100k", help="where to train one if there is no --model-dir")
    p.add_argument("--data-path", default=None)
    p.add_argument("--ratios", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--methods", default=",".join(LOWRANK))
    p.add_argument("--baselines", default="gptq,sparsegpt", help="comma list of gptq,sparsegpt (empty: none)")
    p.add_argument("--gptq-python", default="/tmp/venv-gptqm/bin/python")
    p.add_argument("--llmc-python", default="/tmp/venv-baselines/bin/python")
    p.add_argument("--baseline-dir", default="runs/bench_baselines")
    p.add_argument("--max-eval-users", type=int, default=None, help="fixed seeded subset of test users (default: all)")
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--rank-multiple", type=int, default=8)
    p.add_argument("--asvd-alpha", type=float, default=0.5)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--render-only", action="store_true", help="only rewrite the table and plot from --out")
    p.add_argument("--out", default="benchmarks/results/quality_vs_size.json")
    p.add_argument("--png", default="benchmarks/results/quality_vs_size.png")
    return p.parse_args(argv)


def odllm_config(method: str, ratio: float, args):
    from optimum_odllm import ODLLMConfig

    flags = {"odllm": (True, True), "no-progressive": (True, False), "no-whitening": (False, True), "svd": (False, False)}[method]
    # the closed form (refine_steps=0), as the documented table was measured; block refinement: docs/alignment.md
    return ODLLMConfig(ratio=ratio, whitening=flags[0], progressive=flags[1], rank_multiple=args.rank_multiple,
                       num_calibration_samples=args.calibration_samples, min_calibration_tokens=16, refine_steps=0)


def compress(method: str, ratio: float, dense, calibration, cache: dict, args):
    """A compressed copy of ``dense`` (the dense model is never modified)."""
    from optimum_odllm import ODLLMCompressor

    model = copy.deepcopy(dense)
    if method in ("odllm", "no-progressive", "no-whitening", "svd"):
        ODLLMCompressor(model, odllm_config(method, ratio, args)).compress(calibration, device="cpu")
        return model
    ranks = rc.allocate(model, ratio, args.rank_multiple)
    if method == "asvd":
        if "asvd" not in cache:
            cache["asvd"] = rc.activation_scales(dense, calibration, args.asvd_alpha)
        rc.scaled_svd_compress(model, ranks, col_scale=cache["asvd"])
    elif method == "fwsvd":
        if "fwsvd" not in cache:
            cache["fwsvd"] = {n: v.sqrt() for n, v in rc.fisher_row_importance(copy.deepcopy(dense), calibration).items()}
        rc.scaled_svd_compress(model, ranks, row_scale=cache["fwsvd"])
    else:
        raise ValueError(method)
    return model


def safetensors_bytes(directory: Path, predicate) -> int:
    from safetensors import safe_open

    total = 0
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if predicate(name):
                    t = st.get_slice(name)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1}.get(t.get_dtype(), 4)
    return total


def run_baselines(args, dense_dir: Path, dense, encoder, calibration, users, results: dict, save) -> None:
    wanted = [b for b in args.baselines.split(",") if b]
    bdir = Path(args.baseline_dir)
    bdir.mkdir(parents=True, exist_ok=True)
    cal_file = bdir / "calibration.json"
    cal_file.write_text(json.dumps(calibration))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "BENCH_THREADS": str(args.threads)}
    here = Path(__file__).resolve().parent
    dense_lin = rc.decoder_linear_params(dense)
    data_path = args.data_path or rc.default_data_path()
    from optimum_odllm.recsys.data import find_recbole_ml100k
    data_path = data_path or str(find_recbole_ml100k())
    if "gptq" in wanted and not (args.resume and "gptq-w4" in results["points"]):
        out = bdir / "gptq-w4"
        try:
            subprocess.run([args.gptq_python, str(here / "recsys_baselines.py"), "gptq", "--model-dir", str(dense_dir),
                            "--calibration", str(cal_file), "--out-dir", str(out)], check=True, env=env)
            metrics_file = bdir / "gptq-w4-eval.json"
            cmd = [args.gptq_python, str(here / "recsys_baselines.py"), "eval-gptq", "--model-dir", str(out),
                   "--data-path", data_path, "--beams", str(args.beams), "--seed", str(args.seed), "--json", str(metrics_file)]
            if args.max_eval_users:
                cmd += ["--max-eval-users", str(args.max_eval_users)]
            subprocess.run(cmd, check=True, env=env)
            row = json.loads(metrics_file.read_text())
            info = json.loads((out / "bench_info.json").read_text())
            q_bytes = safetensors_bytes(out, lambda n: ".layers." in n and "proj" in n)
            results["points"]["gptq-w4"] = {"method": "gptq-w4", "ratio": None, **row, "compress_s": info["quantize_s"],
                                            "storage": q_bytes / (2 * dense_lin), "storage_bytes": q_bytes,
                                            "note": "gptqmodel 7.6.0 asym g128, gptq_torch_aten int4 kernel, bf16 activations"}
        except (subprocess.CalledProcessError, OSError) as err:
            results["points"]["gptq-w4"] = {"method": "gptq-w4", "error": str(err)}
        save()
    if "sparsegpt" in wanted and not (args.resume and "sparsegpt-50" in results["points"]):
        out = bdir / "sparsegpt-50"
        try:
            subprocess.run([args.llmc_python, str(here / "recsys_baselines.py"), "sparsegpt", "--model-dir", str(dense_dir),
                            "--calibration", str(cal_file), "--out-dir", str(out)], check=True, env=env)
            info = json.loads((out / "bench_info.json").read_text())
            model, _, _ = rc.load_recommender(out)
            t = time.perf_counter()
            row = rc.evaluate(model, encoder, users, beams=args.beams)
            results["points"]["sparsegpt-50"] = {
                "method": "sparsegpt-50", "ratio": None, **row, "eval_s": time.perf_counter() - t, "compress_s": info["prune_s"],
                "storage": (1 - info["decoder_zero_fraction"]) + 1 / 16, "decoder_zero_fraction": info["decoder_zero_fraction"],
                "note": "llmcompressor 0.14.0.1, unstructured; storage = nonzeros + 1-bit mask (runs dense: 1.0)"}
        except (subprocess.CalledProcessError, OSError) as err:
            results["points"]["sparsegpt-50"] = {"method": "sparsegpt-50", "error": str(err)}
        save()


def write_outputs(results: dict, out: Path, png: Path) -> str:
    cols = ["method", "ratio", "storage", "decoder_params", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "NDCG@10_vs_dense"]
    dense = results["points"].get("dense", {})
    rows = []
    order = {m: k for k, m in enumerate(("dense",) + LOWRANK + ("gptq-w4", "sparsegpt-50"))}
    for key, r in sorted(results["points"].items(), key=lambda kv: (order.get(kv[1].get("method"), 99), kv[1].get("ratio") or 0)):
        if "NDCG@10" not in r:
            rows.append({"method": r.get("method", key), "ratio": r.get("ratio"), "storage": "error: " + r.get("error", "?")[:80]})
            continue
        row = dict(r)
        if dense.get("NDCG@10"):
            row["NDCG@10_vs_dense"] = r["NDCG@10"] / dense["NDCG@10"]
        rows.append(row)
    pop = results.get("popularity", {})
    table = markdown_table(rows, cols)
    if pop:
        table += f"\n\nMost-popular baseline on the same users: HR@10 {pop['HR@10']:.4f}, NDCG@10 {pop['NDCG@10']:.4f}."
    out.with_suffix(".md").write_text(table + "\n")
    try:
        plot(results, png)
    except Exception as err:  # the table is the result; the plot is a view of it
        print(f"plot failed: {err}")
    return table


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = results["points"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
        if "popularity" in results:
            ax.axhline(results["popularity"][metric], color="gray", ls=":", label="most popular")
        if "dense" in pts:
            ax.axhline(pts["dense"][metric], color="black", ls="--", lw=0.8)
            ax.scatter([1.0], [pts["dense"][metric]], color="black", marker="*", s=140, label="dense", zorder=4)
        for method, style in zip(LOWRANK, ("o-", "s--", "^--", "v:", "d-.", "x-.")):
            xs = sorted((r["storage"], r[metric]) for r in pts.values() if r.get("method") == method and metric in r)
            if xs:
                ax.plot(*zip(*xs), style, label=method, lw=2.2 if method == "odllm" else 1.2, ms=5)
        for key, marker, color in (("gptq-w4", "P", "tab:red"), ("sparsegpt-50", "X", "tab:purple")):
            r = pts.get(key, {})
            if metric in r:
                ax.scatter([r["storage"]], [r[metric]], marker=marker, s=130, color=color, label=key, zorder=5)
        ax.set_xlabel("decoder-Linear storage / dense (same 16-bit dtype)")
        ax.set_ylabel(f"{metric} ({results.get('eval_users', '?')} test users, beam {results.get('beams', 20)})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("ML-100K LC-Rec recommender: quality vs size")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render_only:
        results = json.loads(Path(args.out).read_text())
        print(write_outputs(results, Path(args.out), Path(args.png)))
        return results
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from optimum_odllm import count_parameters
    from optimum_odllm.recsys import InstructionEncoder, evaluate_popularity

    data, split = rc.load_split(args.data_path)
    model_dir = args.model_dir or ("runs/ml100k/dense" if Path("runs/ml100k/dense/item_index.json").is_file() else None)
    if model_dir is None:
        print(f"no --model-dir: training the recommender with the example's recipe into {args.train_dir}", flush=True)
        model_dir = rc.train_recommender_like_example(Path(args.train_dir), data, split, seed=args.seed)
    model_dir = Path(model_dir)
    dense, tokenizer, index = rc.load_recommender(model_dir)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    users = rc.eval_users(split, args.max_eval_users, args.seed)
    calibration = rc.calibration_ids(encoder, split, args.calibration_samples, args.seed)

    out = Path(args.out)
    results: dict[str, Any] = {"points": {}}
    if args.resume and out.is_file():
        results = json.loads(out.read_text())
    results.update({"machine": machine_info(), "args": vars(args), "model_dir": str(model_dir), "eval_users": len(users),
                    "test_users": len(split.test), "beams": args.beams, "dense_params": count_parameters(dense),
                    "dense_decoder_linear_params": rc.decoder_linear_params(dense)})
    results["popularity"] = evaluate_popularity(split.train, users, exclude_history=False)
    save = lambda: write_json(out, results)  # noqa: E731
    dense_lin = rc.decoder_linear_params(dense)

    if not (args.resume and "dense" in results["points"]):
        t = time.perf_counter()
        results["points"]["dense"] = {"method": "dense", "ratio": 1.0, "storage": 1.0, "decoder_params": dense_lin,
                                      **rc.evaluate(dense, encoder, users, args.beams), "eval_s": time.perf_counter() - t}
        print("dense", results["points"]["dense"], flush=True)
        save()

    cache: dict = {}
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    for ratio in ratios:  # ratio-major, in the order given: a cut-short run still compares every method
        for method in methods:
            key = f"{method}@{ratio:g}"
            if args.resume and key in results["points"] and "NDCG@10" in results["points"][key]:
                continue
            model = None
            try:
                t = time.perf_counter()
                model = compress(method, ratio, dense, calibration, cache, args)
                compress_s = time.perf_counter() - t
                lin = rc.decoder_linear_params(model)
                t = time.perf_counter()
                row = rc.evaluate(model, encoder, users, args.beams)
                results["points"][key] = {"method": method, "ratio": ratio, "storage": lin / dense_lin, "decoder_params": lin,
                                          "params": count_parameters(model), **row, "compress_s": compress_s,
                                          "eval_s": time.perf_counter() - t}
            except Exception as err:  # a failed point is reported in the table, not hidden
                results["points"][key] = {"method": method, "ratio": ratio, "error": f"{type(err).__name__}: {err}"[:300]}
            print(key, results["points"][key], flush=True)
            save()
            del model

    if args.baselines:
        run_baselines(args, model_dir, dense, encoder, calibration, users, results, save)
    save()
    print(write_outputs(results, out, Path(args.png)))
    return results


if __name__ == "__main__":
    main()
