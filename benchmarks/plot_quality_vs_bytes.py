"""Quality vs bytes from a ``quantized_recsys.py`` result: one curve per variant over its ratios, GPTQ baselines
as points; y = NDCG@10 kept vs dense (mean over seeds ± standard error over seeds), x = decoder-linear bytes
relative to 16-bit dense.

    python benchmarks/plot_quality_vs_bytes.py benchmarks/results/recsys_seeds_h200.json \
        --png benchmarks/results/quality_vs_bytes_h200.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from common import markdown_table


def points(result: dict, aliases: dict[str, str] | None = None) -> dict[str, list[tuple[float, float, float, str]]]:
    """``{variant: [(bytes, kept mean, kept s.e. over seeds, label), ...]}`` sorted by bytes; ``aliases`` maps a
    variant name onto another one's curve (runs that named the same settings differently)."""
    aliases = aliases or {}
    per_seed = result["per_seed"]
    seeds = sorted(per_seed)
    curves: dict[str, list] = defaultdict(list)
    for label, first in per_seed[seeds[0]].items():
        if label in ("dense", "per_user") or any("kept" not in per_seed[s].get(label, {}) for s in seeds):
            continue
        kept = [per_seed[s][label]["kept"] for s in seeds]
        se = statistics.stdev(kept) / math.sqrt(len(kept)) if len(kept) > 1 else 0.0
        variant = first.get("variant", label)
        curves[aliases.get(variant, variant)].append((first["bytes_vs_bf16"], statistics.fmean(kept), se, label))
    return {k: sorted(v) for k, v in curves.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("result")
    p.add_argument("--png", default=None)
    p.add_argument("--variants", default="odllm,odllm+int8 gptq,odllm+int4 gptq,gptq-w4,gptq-w3")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=CURVE",
                   help="plot variant NAME on CURVE's line, e.g. odllm+refine=odllm when --refine-steps/--refine-lr "
                        "were the library defaults")
    args = p.parse_args(argv)
    result = json.loads(Path(args.result).read_text())
    if any("=" not in a for a in args.alias):
        p.error("--alias needs NAME=CURVE, e.g. --alias odllm+refine=odllm")
    aliases = dict(a.split("=", 1) for a in args.alias)
    curves = {k: v for k, v in points(result, aliases).items() if k in args.variants.split(",")}
    rows = [{"variant": k, "label": lab, "bytes vs 16-bit": f"{b:.3f}", "NDCG@10 kept": f"{m:.1%} ± {se:.1%}"}
            for k, pts in curves.items() for b, m, se, lab in pts]
    print(markdown_table(sorted(rows, key=lambda r: float(r["bytes vs 16-bit"])), list(rows[0])))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, pts in curves.items():
            xs, ys, es = [q[0] for q in pts], [100 * q[1] for q in pts], [100 * q[2] for q in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o" if len(pts) > 1 else "s", capsize=3, label=name,
                        linestyle="-" if len(pts) > 1 else "none")
        ax.axhline(100, color="grey", linewidth=0.8)
        seeds = len(result["per_seed"])
        ax.set_xlabel("decoder-linear bytes / 16-bit dense")
        ax.set_ylabel(f"NDCG@10 kept vs dense, % (mean ± s.e. over {seeds} seeds)")
        ax.set_title(f"ML-100K recommender, {result['eval_users']} test users, seen items excluded", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
