"""Render the benchmark JSON files as the markdown tables of benchmarks/README.md (no measurement here).

    python benchmarks/render_tables.py                       # every known results file that exists
    python benchmarks/render_tables.py benchmarks/results/speed_gpu_h100_run1.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine_line(d: dict) -> str:
    m = d.get("machine", {})
    parts = [m.get("gpu") or f"CPU {m.get('cpu')}", f"{m.get('cpu_threads')} threads", f"torch {m.get('torch')}",
             f"transformers {m.get('transformers')}", f"python {m.get('python')}", m.get("date", "")]
    return "Machine: " + ", ".join(p for p in parts if p) + "."


def speed_tables(d: dict) -> str:
    has_fused = any("fused_ms" in r for r in d.get("prefill", []))
    out = [machine_line(d), "", f"Params: {d['params']}", "", "Per-layer projections (micro):", "",
           markdown_table(d["micro"], ["tokens", "dense_ms", "lowrank_ms", "speedup", "rel_error"]), "", "Prefill:", ""]
    cols = ["batch", "length", "dense_ms", "lowrank_ms"] + (["fused_ms"] if has_fused else []) + ["speedup"] + (["fused_speedup"] if has_fused else [])
    cols += ["dense_peak_gib", "lowrank_peak_gib"]
    out += [markdown_table(d["prefill"], cols), "", "Decode (ms per token):", ""]
    cols = ["mode", "batch", "dense_ms_per_token", "lowrank_ms_per_token"] + (["fused_ms_per_token"] if has_fused else []) + ["speedup"] + (["fused_speedup"] if has_fused else [])
    cols += ["dense_peak_gib", "lowrank_peak_gib"]
    out += [markdown_table(d["decode"], cols)]
    return "\n".join(out)


def cost_tables(d: dict) -> str:
    cols = ["layers", "hidden", "intermediate", "samples", "seq_len", "tokens", "wall_s", "process_cpu_s", "capture_s", "statistics_s",
            "cholesky_s", "alignment_s", "svd_s", "propagate_s", "peak_gpu_gib", "kept_ratio"]
    cols = [c for c in cols if any(c in r for r in d["runs"])]
    out = [machine_line(d), "", markdown_table(d["runs"], cols)]
    if "gesvda" in d:
        rows = [{"driver": k, **v} for k, v in d["gesvda"].items()]
        out += ["", "SVD drivers on a 4096x4096 matrix:", "", markdown_table(rows, ["driver", "seconds", "max_rel_err_top1024_sigma", "rank1024_residual"])]
    return "\n".join(out)


def recsys_speed_tables(d: dict) -> str:
    rows = d.get("table") or [{"variant": k, **v} for k, v in d["variants"].items()]
    b = d["args"]["batches"].split(",")
    cols = ["variant", "weights_mib", "peak_rss_mib", "peak_gpu_mib", "users_per_s", "speedup_users_per_s"]
    for x in b:
        cols += [f"prefill_ms_b{x}", f"speedup_prefill_ms_b{x}", f"decode_ms_per_token_b{x}", f"speedup_decode_ms_per_token_b{x}"]
    cols = [c for c in cols if any(c in r for r in rows)]
    return "\n".join([machine_line(d), f"{d['eval_users']} users, beam {d['args']['beams']}, prompt length {d['prompt_len']} tokens.",
                      "", markdown_table(rows, cols)])


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    if "micro" in d:
        body = speed_tables(d)
    elif "runs" in d:
        body = cost_tables(d)
    elif "variants" in d:
        body = recsys_speed_tables(d)
    elif "points" in d:
        md = path.with_suffix(".md")
        body = machine_line(d) + "\n\n" + (md.read_text() if md.is_file() else "")
    else:
        body = json.dumps(d)[:2000]
    return f"<!-- rendered from {path.name} -->\n{body}\n"


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(RESULTS.glob("*.json"))
    for p in paths:
        print(f"### {p.name}\n")
        print(render(p))


if __name__ == "__main__":
    main()
