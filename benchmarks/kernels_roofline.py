"""Roofline of the low-rank kernels: GB/s achieved per shape, Triton vs cuBLAS, and the crossover in tokens.

For every projection group of one Llama-shaped decoder layer at ``--ratio`` (q/k/v and gate/up share
their input, o and down stand alone) and every token count, times (replays of a CUDA graph,
mean over replays, each cycling over 4 weight copies so HBM is read, not L2):

* ``down``: the stacked ``down`` product, Triton split-K (``torch.ops.odllm.lowrank_down``) vs
  ``F.linear`` (cuBLAS);
* ``up``: the group's ``up`` products, one grouped Triton launch vs one ``F.linear`` per member;
* ``dense``: the dense projections the group replaces (cuBLAS), for the end-to-end ratio.

Bytes = weights + activations read + outputs written, once each; GB/s = bytes / time, against the
device-to-device copy bandwidth measured in the same run and the datasheet (H100 SXM: 3.35 TB/s).
The smallest token count where cuBLAS wins is the crossover that ``ODLLM_KERNEL_MAX_TOKENS`` encodes.

    python benchmarks/kernels_roofline.py --out benchmarks/results/kernels_roofline_h100.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from common import machine_info, markdown_table, write_json
from optimum_odllm import kernels

if kernels.HAS_TRITON:
    from optimum_odllm.kernels import triton_lowrank as TL
    from optimum_odllm.kernels.triton_lowrank import CUBLAS, graph_time_ms
from optimum_odllm.ranks import ModuleShape, allocate_ranks


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--kv-hidden", type=int, default=None, help="k/v output width (GQA); default = hidden")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rank-multiple", type=int, default=128)
    p.add_argument("--tokens", default="1,2,4,8,16,32,64")
    p.add_argument("--datasheet-gbps", type=float, default=3350.0)
    p.add_argument("--out", default="benchmarks/results/kernels_roofline.json")
    return p.parse_args()


def layer_groups(hidden: int, intermediate: int, kv: int, ratio: float, multiple: int) -> dict[str, list[tuple[int, int, int]]]:
    """``{group: [(out, in, rank), ...]}`` for one decoder layer, ranks exactly as OD-LLM allocates them."""
    shapes = {
        "q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
        "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate),
    }
    ranks = allocate_ranks([ModuleShape(n, i, o) for n, (o, i) in shapes.items()], ratio, multiple)
    groups = {"qkv": ["q", "k", "v"], "o": ["o"], "gate_up": ["gate", "up"], "down_proj": ["down"]}
    return {g: [(shapes[n][0], shapes[n][1], ranks[n]) for n in names] for g, names in groups.items()}


def copy_bandwidth_gbps() -> float:
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src), calls=5)
    return 2 * src.numel() * 2 / ms / 1e6


def best(timings: dict) -> tuple[object, float]:
    config = min((c for c in timings if c != CUBLAS), key=timings.get)
    return config, timings[config]


def measure(group: str, members: list[tuple[int, int, int]], tokens: int, copy_gbps: float, sheet: float) -> dict[str, Any]:
    """Times of every candidate (CUDA-graph replays over 4 weight copies, so HBM is read, not L2)."""
    dev, dt, sets = "cuda", torch.bfloat16, 4
    in_features = members[0][1]
    rank = sum(r for _, _, r in members)
    downs = [torch.randn(rank, in_features, device=dev, dtype=dt) / in_features**0.5 for _ in range(sets)]
    ups = [[torch.randn(o, r, device=dev, dtype=dt) / r**0.5 for o, _, r in members] for _ in range(sets)]
    denses = [[torch.randn(o, in_features, device=dev, dtype=dt) for o, _, _ in members] for _ in range(sets)]
    x = torch.randn(tokens, in_features, device=dev, dtype=dt)
    t = torch.randn(tokens, rank, device=dev, dtype=dt)
    out_total = sum(o for o, _, _ in members)
    b_down = 2 * (rank * in_features + tokens * in_features + tokens * rank)
    b_up = 2 * (sum(o * r for o, _, r in members) + tokens * rank + tokens * out_total)
    b_dense = 2 * (out_total * in_features + tokens * in_features + tokens * out_total)

    def per_call(run) -> float:  # microseconds per call, cycling over the weight copies inside the graph
        return 1e3 * graph_time_ms(lambda: [run(i) for i in range(sets)], calls=4) / sets

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with torch.no_grad():
        down_t = {c: per_call(lambda i, c=c: TL.down_with(x, downs[i], c)) for c in TL.down_candidates(tokens, rank, in_features, sms)}
        up_t = {c: per_call(lambda i, c=c: TL.grouped_up_with(t, ups[i], [], c)) for c in TL.up_candidates()}
        dense_us = per_call(lambda i: [F.linear(x, w) for w in denses[i]])
    down_cfg, down_us = best(down_t)
    up_cfg, up_us = best(up_t)
    row: dict[str, Any] = {"group": group, "tokens": tokens, "rank": rank, "in": in_features, "out": out_total,
                           "down_triton_us": down_us, "down_config": str(down_cfg), "down_cublas_us": down_t[CUBLAS],
                           "up_triton_us": up_us, "up_config": str(up_cfg), "up_cublas_us": up_t[CUBLAS],
                           "dense_cublas_us": dense_us}
    for name, nbytes in (("down_triton", b_down), ("down_cublas", b_down), ("up_triton", b_up), ("up_cublas", b_up), ("dense_cublas", b_dense)):
        row[f"{name}_gbps"] = nbytes / (row[f"{name}_us"] * 1e-6) / 1e9
    row["down_pct_sheet"] = 100 * row["down_triton_gbps"] / sheet
    row["up_pct_sheet"] = 100 * row["up_triton_gbps"] / sheet
    row["down_pct_copy"] = 100 * row["down_triton_gbps"] / copy_gbps
    row["up_pct_copy"] = 100 * row["up_triton_gbps"] / copy_gbps
    row["lowrank_tuned_us"] = min(down_t.values()) + min(up_t.values())
    row["speedup_tuned_vs_dense"] = dense_us / row["lowrank_tuned_us"]
    row["speedup_cublas_vs_dense"] = dense_us / (down_t[CUBLAS] + up_t[CUBLAS])
    row["down_rel_error"] = rel_error(TL.down_with(x, downs[0], down_cfg), x.double() @ downs[0].double().T)
    return row


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite kernel output")
    return float((out.double() - ref).norm() / ref.norm())


def main() -> None:
    args = parse_args()
    if not kernels.HAS_TRITON:
        raise SystemExit("kernels_roofline.py needs a CUDA GPU and Triton (the kernels do not exist elsewhere).")
    groups = layer_groups(args.hidden, args.intermediate, args.kv_hidden or args.hidden, args.ratio, args.rank_multiple)
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "groups": groups}
    results["copy_gbps"] = copy_bandwidth_gbps()
    print(f"device-to-device copy: {results['copy_gbps']:.0f} GB/s (read + write)")
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for group, members in groups.items():
            row = measure(group, members, tokens, results["copy_gbps"], args.datasheet_gbps)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
            results["rows"] = rows
            write_json(args.out, results)
    crossover = {}
    for name in ("down", "up"):
        wins = {f"{r['group']}@{r['tokens']}": r[f"{name}_triton_us"] < r[f"{name}_cublas_us"] for r in rows}
        crossover[name] = sorted(k for k, v in wins.items() if v)
    results["triton_faster_than_cublas"] = crossover
    write_json(args.out, results)
    cols = ["group", "tokens", "rank", "down_triton_us", "down_cublas_us", "down_triton_gbps", "down_cublas_gbps",
            "down_pct_sheet", "up_triton_us", "up_cublas_us", "up_triton_gbps", "up_cublas_gbps", "up_pct_sheet",
            "dense_cublas_us", "dense_cublas_gbps", "speedup_tuned_vs_dense", "speedup_cublas_vs_dense"]
    print(markdown_table(rows, cols))
    print("shapes where the best Triton config beats cuBLAS:", crossover)


if __name__ == "__main__":
    main()
