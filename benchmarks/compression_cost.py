"""Cost of running OD-LLM itself: wall time per stage and peak memory, on a Llama-shaped model.

The model lives on the CPU; decoder layers visit ``--device`` one at a time (as a 7B model would
on one GPU). Random weights are fine for timing; calibration is random token ids.
Stages come from ``CompressionReport.stage_seconds``: capture, statistics (forward passes +
covariance accumulation), solve (cholesky, alignment, svd), refine, propagate. ``--refine-steps`` defaults to 0
(the closed form, as every documented cost table was measured); ``--refine-steps 256`` times the library's
default block refinement.

GPU (Llama-7B shape, 256 x 2048 calibration tokens)::

    python benchmarks/compression_cost.py --device cuda --layers 32 --samples 256 --seq-len 2048 \
        --solver-dtype float32 --svd-driver gesvda --out benchmarks/results/cost_gpu.json

CPU scaling sweep on a small model (width and calibration size)::

    python benchmarks/compression_cost.py --device cpu --sweep --out benchmarks/results/cost_cpu.json

On the 2-core CPU box (2 layers, 256-token sequences; ~1-2 min)::

    python benchmarks/compression_cost.py --device cpu --sweep --layers 2 --seq-len 256 --vocab 8000 \
        --sweep-hidden 256,512,1024 --sweep-samples 32,128,512 --out benchmarks/results/cost_cpu.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from common import add_model_args, llama_model, machine_info, markdown_table, write_json
from optimum_odllm import ODLLMCompressor, ODLLMConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rank-multiple", type=int, default=128)
    p.add_argument("--cov-dtype", default="float64")
    p.add_argument("--solver-dtype", default="float64")
    p.add_argument("--svd-driver", default=None)
    p.add_argument("--no-progressive", action="store_true")
    p.add_argument("--refine-steps", type=int, default=0, help="block refinement steps per layer (0: closed form only)")
    p.add_argument("--refine-lr", type=float, default=1e-4)
    p.add_argument("--check-gesvda", action="store_true", help="also compare gesvda against the default SVD driver")
    p.add_argument("--sweep", action="store_true", help="CPU scaling sweep over width and calibration size")
    p.add_argument("--sweep-hidden", default="256,512,1024", help="hidden sizes of the sweep (intermediate = 2.6875 x hidden)")
    p.add_argument("--sweep-samples", default="32,128", help="calibration sample counts of the sweep (each --seq-len tokens)")
    p.add_argument("--out", default="benchmarks/results/cost.json")
    return p.parse_args()


def run_once(args: argparse.Namespace, hidden: int, intermediate: int, heads: int, samples: int, seq_len: int) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    build_on = args.device if args.device.startswith("cuda") else "cpu"
    model = llama_model(args.layers, dtype, build_on, hidden_size=hidden, intermediate_size=intermediate,
                        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=args.vocab).to("cpu")
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(3, args.vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    config = ODLLMConfig(
        ratio=args.ratio, progressive=not args.no_progressive, rank_multiple=args.rank_multiple,
        num_calibration_samples=samples, calibration_seq_len=seq_len, calibration_batch_size=args.batch_size,
        covariance_dtype=args.cov_dtype, solver_dtype=args.solver_dtype, svd_driver=args.svd_driver,
        refine_steps=args.refine_steps, refine_lr=args.refine_lr,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    compressor = ODLLMCompressor(model, config)
    compressor.compress(ids, device=args.device)
    wall = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # CPU time of this process (all threads): robust to a shared box
    report = compressor.report
    row: dict[str, Any] = {
        "layers": args.layers, "hidden": hidden, "intermediate": intermediate, "samples": samples, "seq_len": seq_len,
        "tokens": samples * seq_len, "wall_s": wall, "process_cpu_s": cpu_seconds, **{f"{k}_s": v for k, v in sorted(report.stage_seconds.items())},
        "kept_ratio": report.kept_ratio, "params_before": report.params_before, "params_after": report.params_after,
        "jittered_modules": sum(1 for m in report.modules if m.jitter > 0),
    }
    if args.device.startswith("cuda"):
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def gesvda_check(device: str) -> dict[str, Any]:
    """Accuracy and time of the gesvda driver against the default one on a whitened-looking 4096^2 matrix."""
    from common import median_time

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(4096, 4096, device=device, generator=g) @ torch.diag(torch.logspace(0, -4, 4096, device=device))
    out: dict[str, Any] = {}
    ref = torch.linalg.svdvals(a.double())
    for driver in (None, "gesvda", "gesvdj"):
        kwargs = {"driver": driver} if driver else {}
        t = median_time(lambda: torch.linalg.svd(a, full_matrices=False, **kwargs), warmup=1, repeat=3)
        u, s, vh = torch.linalg.svd(a, full_matrices=False, **kwargs)
        err_top = float(((s[:1024].double() - ref[:1024]).abs() / ref[:1024]).max())
        rank_err = float(((u[:, :1024] * s[:1024]) @ vh[:1024] - a).norm() / a.norm())
        out[driver or "default"] = {"seconds": t, "max_rel_err_top1024_sigma": err_top, "rank1024_residual": rank_err}
    return out


def main() -> None:
    args = parse_args()
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "runs": []}
    if args.sweep:
        hiddens = [int(h) for h in args.sweep_hidden.split(",") if h]
        counts = [int(s) for s in args.sweep_samples.split(",") if s]
        grid = [(h, int(h * 2.6875) // 8 * 8, max(2, h // 64), s, args.seq_len) for h in hiddens for s in counts]
    else:
        grid = [(args.hidden, args.intermediate, args.heads, args.samples, args.seq_len)]
    for hidden, intermediate, heads, samples, seq_len in grid:
        row = run_once(args, hidden, intermediate, heads, samples, seq_len)
        results["runs"].append(row)
        print(row, flush=True)
        write_json(args.out, results)
    if args.check_gesvda and args.device.startswith("cuda"):
        results["gesvda"] = gesvda_check(args.device)
        print("gesvda", results["gesvda"])
    cols = ["layers", "hidden", "tokens", "wall_s", "process_cpu_s", "capture_s", "statistics_s", "cholesky_s", "alignment_s", "svd_s", "solve_s", "refine_s", "propagate_s", "peak_gpu_gib", "kept_ratio"]
    print(markdown_table(results["runs"], cols))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
