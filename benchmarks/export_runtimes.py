"""The ML-100K recommender in device runtimes: dense vs OD-LLM, PyTorch vs ONNX Runtime vs ExecuTorch.

For a trained recommender (``--model-dir``, saved by ``examples/ml100k_end_to_end.py`` or trained here with
``--train-to``), this compresses it with OD-LLM (``--ratio``, calibration as the example), exports both models
with ``optimum_odllm.exporters`` and measures, all in ONE process with the timings taken round-robin:

* ``file_mib``: size on disk of what the runtime loads (safetensors / model.onnx / model.pte);
* ``load_s``: median time to load it (3 loads);
* ``prefill_ms_b1``: one forward over a real evaluation prompt at batch 1 (empty cache);
* ``decode_ms_per_token_b1``: one-token forwards fed the previous step's KV cache, batch 1, per token;
* ``decode_ms_per_step_beam_batch``: the same at the beam search's batch (``--eval-batch`` x ``--beams`` rows);
* ``users_per_s``: the recommender's constrained beam search (``recsys.recommend``; beam 20) on test users;
* quality: HR@10 / NDCG@10 (with standard errors over users) of each model in each runtime on
  ``--eval-users`` test users, and the fraction of users whose whole ranked list equals PyTorch's.

ExecuTorch is measured when ``executorch`` imports (its own venv: see docs/export.md)::

    PYTHONPATH=. /tmp/et/bin/python benchmarks/export_runtimes.py --model-dir runs/ml100k/dense \
        --out benchmarks/results/export_runtimes_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recsys_common as rc  # noqa: E402
from common import machine_info, markdown_table, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="runs/ml100k/dense", help="trained dense recommender directory")
    p.add_argument("--train-to", default=None, help="train a recommender with the example's recipe into DIR/dense first")
    p.add_argument("--work-dir", default="runs/export_runtimes", help="compressed model and exports go here")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rank-multiple", type=int, default=8)
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--runtimes", default="pytorch,onnxruntime,executorch")
    p.add_argument("--eval-users", type=int, default=None, help="test users for the quality comparison (default: all)")
    p.add_argument("--speed-users", type=int, default=64, help="test users per round of the users/s measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=8, help="users per beam search call (ExecuTorch max batch = this x beams)")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fused", action="store_true",
                   help="also OD-LLM after optimum_odllm.fused.fuse_shared_inputs (PyTorch, and its exported graphs)")
    p.add_argument("--out", default="benchmarks/results/export_runtimes_cpu.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- models
def compress(dense_dir: Path, out_dir: Path, args, encoder, split) -> Path:
    """OD-LLM at ``args.ratio`` with the example's calibration (packed training sequences), saved to ``out_dir``."""
    from optimum_odllm import ODLLMCompressor, ODLLMConfig

    if (out_dir / "config.json").is_file():
        return out_dir
    model, tokenizer, _ = rc.load_recommender(dense_dir)
    config = ODLLMConfig(ratio=args.ratio, rank_multiple=args.rank_multiple,
                         num_calibration_samples=args.calibration_samples)
    compressor = ODLLMCompressor(model, config, tokenizer=tokenizer)
    compressor.artifacts["item_index.json"] = dense_dir / "item_index.json"  # exported beside the graph
    compressor.compress(rc.calibration_ids(encoder, split, args.calibration_samples))
    compressor.save_pretrained(out_dir)
    return out_dir


def export(model_dir: Path, runtime: str, max_batch: int, max_seq_len: int, fused: bool = False) -> Path:
    """Directory of ``model_dir`` exported for ``runtime`` (reused when present); ``fused``: the model is loaded and
    passed through ``fuse_shared_inputs`` first, so the graph holds the shared ``down`` and batched ``up`` products."""
    source: Any = loader("pytorch", model_dir, torch.get_num_threads(), fused=True)() if fused else model_dir
    tag = "-fused" if fused else ""
    if runtime == "onnxruntime":
        from optimum_odllm.exporters import export_onnx

        out = model_dir.parent / f"{model_dir.name}{tag}-onnx"
        if not (out / "model.onnx").is_file():
            export_onnx(source, out)
        return out
    from optimum_odllm.exporters.executorch import export_executorch

    out = model_dir.parent / f"{model_dir.name}{tag}-executorch-b{max_batch}-s{max_seq_len}"
    if not (out / "model.pte").is_file():
        export_executorch(source, out, max_batch=max_batch, max_seq_len=max_seq_len)
    return out


def loader(runtime: str, directory: Path, threads: int, fused: bool = False) -> Callable[[], Any]:
    if runtime == "pytorch":  # the model only, as the runtimes below (no tokenizer or item index)
        from transformers import AutoModelForCausalLM

        from optimum_odllm.fused import fuse_shared_inputs

        def load() -> Any:
            model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
            if fused:
                fuse_shared_inputs(model)
            return model

        return load
    if runtime == "onnxruntime":
        from optimum_odllm.exporters import OrtCausalLM

        return lambda: OrtCausalLM(directory, num_threads=threads)
    from optimum_odllm.exporters.executorch import EtCausalLM

    return lambda: EtCausalLM(directory, num_threads=threads)


def file_mib(runtime: str, directory: Path) -> float:
    pattern = {"pytorch": "*.safetensors", "onnxruntime": "model.onnx*", "executorch": "model.pte"}[runtime]
    return sum(f.stat().st_size for f in directory.glob(pattern)) / 2**20


# ------------------------------------------------------------------------------------------ timings
def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill(model, prompt: torch.Tensor) -> Any:
    from transformers.cache_utils import DynamicCache

    # the exports return the last position's logits only; ask PyTorch for the same work
    last_only = {"logits_to_keep": 1} if isinstance(model, torch.nn.Module) else {}
    return model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True, **last_only)


def decode_seconds_per_token(model, prompt: torch.Tensor, tokens: int) -> float:
    """Greedy one-token steps after an (untimed) prefill; wall time per step."""
    out = prefill(model, prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        next_token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True)
    return (time.perf_counter() - start) / tokens


def per_user(rankings: list[list[int]], targets: list[int], metric: str) -> tuple[float, float]:
    """Mean and standard error over users of one metric (the library's formula, one user at a time)."""
    from optimum_odllm.recsys.metrics import ranking_metrics

    values = [ranking_metrics([r], [t])[metric] for r, t in zip(rankings, targets)]
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, InstructionEncoder, recommend

    data, split = rc.load_split()
    dense_dir = Path(args.model_dir)
    if args.train_to:
        dense_dir = rc.train_recommender_like_example(Path(args.train_to), data, split)
    _, tokenizer, index = rc.load_recommender(dense_dir)
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    work = Path(args.work_dir)
    models = {"dense": dense_dir, f"odllm-{args.ratio}": compress(dense_dir, work / f"odllm-{args.ratio}", args, encoder, split)}
    if args.fused:
        models[f"odllm-{args.ratio}-fused"] = models[f"odllm-{args.ratio}"]

    runtimes = [r for r in args.runtimes.split(",") if r]
    if "executorch" in runtimes and importlib.util.find_spec("executorch") is None:
        print("executorch is not installed in this environment: skipping it (see docs/export.md)")
        runtimes.remove("executorch")
    eval_examples = rc.eval_users(split, args.eval_users)
    speed_examples = rc.eval_users(split, args.speed_users, seed=1)
    prompts = [encoder.prompt_ids(PACKED_SEQREC_TEMPLATE, ex.history) for ex in eval_examples]
    max_seq_len = max(len(p) for p in prompts) + len(encoder.item_ids[0]) + args.decode_tokens
    prompt = torch.tensor([prompts[0]])
    beam_prompt = prompt.expand(args.eval_batch * args.beams, -1).contiguous()

    variants: dict[tuple[str, str], dict[str, Any]] = {}
    for name, directory in models.items():
        fused = name.endswith("-fused")
        for runtime in runtimes:
            where = directory if runtime == "pytorch" else export(directory, runtime, args.eval_batch * args.beams,
                                                                  max_seq_len, fused)
            load = loader(runtime, where, args.threads, fused and runtime == "pytorch")
            variants[(name, runtime)] = {"dir": where, "load": load, "model": load()}

    rows, quality = [], []
    targets = [ex.target for ex in eval_examples]
    reference: dict[str, list[list[int]]] = {}
    for (name, runtime), v in variants.items():
        start = time.perf_counter()
        ranked = recommend(v["model"], encoder, eval_examples, PACKED_SEQREC_TEMPLATE, num_beams=args.beams,
                           batch_size=args.eval_batch, progress=False)
        v["quality_s"] = time.perf_counter() - start
        if runtime == "pytorch":
            reference[name] = ranked
        same = [a == b for a, b in zip(ranked, reference.get(name, ranked))]
        hr, hr_se = per_user(ranked, targets, "HR@10")
        ndcg, ndcg_se = per_user(ranked, targets, "NDCG@10")
        quality.append({"model": name, "runtime": runtime, "users": len(ranked), "HR@10": hr, "HR@10_se": hr_se,
                        "NDCG@10": ndcg, "NDCG@10_se": ndcg_se, "same_ranking_as_pytorch": sum(same) / len(same)})
        print(f"quality {name}/{runtime}: HR@10 {hr:.4f} NDCG@10 {ndcg:.4f} same lists {sum(same)}/{len(same)}", flush=True)

    timings: dict[tuple[str, str], dict[str, list[float]]] = {key: {} for key in variants}
    load_before = os.getloadavg()[0]  # other processes on the machine: ratios are side by side, absolutes are not
    for _ in range(args.rounds):  # round-robin: a noisy neighbour hits every variant alike
        for key, v in variants.items():
            model, t = v["model"], timings[key]
            t.setdefault("load_s", []).append(median_seconds(v["load"], 1))
            with torch.no_grad():
                t.setdefault("prefill_ms_b1", []).append(1e3 * median_seconds(lambda: prefill(model, prompt), args.repeat))
                t.setdefault("decode_ms_per_token_b1", []).append(
                    1e3 * statistics.median(decode_seconds_per_token(model, prompt, args.decode_tokens) for _ in range(args.repeat)))
                # the beam search's decode step: users per call x beams rows, each with its own KV cache
                t.setdefault("decode_ms_per_step_beam_batch", []).append(
                    1e3 * statistics.median(decode_seconds_per_token(model, beam_prompt, 4) for _ in range(3)))
                start = time.perf_counter()
                recommend(model, encoder, speed_examples, PACKED_SEQREC_TEMPLATE, num_beams=args.beams,
                          batch_size=args.eval_batch, progress=False)
                t.setdefault("users_per_s", []).append(len(speed_examples) / (time.perf_counter() - start))
    for (name, runtime), v in variants.items():
        row = {"model": name, "runtime": runtime, "file_mib": file_mib(runtime, v["dir"])}
        row.update({k: statistics.median(vals) for k, vals in timings[(name, runtime)].items()})
        rows.append(row)
    for row in rows:  # ratios within one runtime, measured side by side in this run
        dense = next(r for r in rows if r["model"] == "dense" and r["runtime"] == row["runtime"])
        row["users_per_s_vs_dense"] = row["users_per_s"] / dense["users_per_s"]
        row["decode_speedup_vs_dense"] = dense["decode_ms_per_token_b1"] / row["decode_ms_per_token_b1"]
        row["size_vs_dense"] = row["file_mib"] / dense["file_mib"]
        torch_row = next(r for r in rows if r["model"] == row["model"] and r["runtime"] == "pytorch")
        row["users_per_s_vs_pytorch"] = row["users_per_s"] / torch_row["users_per_s"]

    speed_cols = ["model", "runtime", "file_mib", "size_vs_dense", "load_s", "prefill_ms_b1", "decode_ms_per_token_b1",
                  "decode_speedup_vs_dense", "decode_ms_per_step_beam_batch", "users_per_s", "users_per_s_vs_dense", "users_per_s_vs_pytorch"]
    quality_cols = ["model", "runtime", "users", "HR@10", "HR@10_se", "NDCG@10", "NDCG@10_se", "same_ranking_as_pytorch"]
    print(markdown_table(rows, speed_cols))
    print()
    print(markdown_table(quality, quality_cols))
    versions = {m: _version(m) for m in ("onnxruntime", "onnx", "onnxscript", "executorch", "transformers")}
    payload = {"machine": machine_info(), "versions": versions, "args": vars(args), "speed": rows, "quality": quality,
               "max_seq_len": max_seq_len, "load_average_1min_before_after_timings": [load_before, os.getloadavg()[0]]}
    write_json(args.out, payload)
    Path(args.out).with_suffix(".md").write_text(
        markdown_table(rows, speed_cols) + "\n\n" + markdown_table(quality, quality_cols) + "\n")
    return payload


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
