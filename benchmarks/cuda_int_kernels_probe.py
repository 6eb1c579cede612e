"""Which integer kernel crashes on CUDA, and at which shape: every (bits, out, in, tokens) case of the Llama-7B
low-rank and dense layer runs in its own subprocess (an illegal memory access poisons the CUDA context), against
the dequantized float reference.

    python benchmarks/cuda_int_kernels_probe.py --out probe.json [--graph]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CASE = r"""
import sys, torch
sys.path.insert(0, '.')
from optimum_odllm.quantization import QuantizedFactor, quantize_weight
bits, out_f, in_f, tokens, graph = map(int, sys.argv[1:6])
torch.manual_seed(0)
w = torch.randn(out_f, in_f) * 0.02
f = QuantizedFactor.from_quantized(quantize_weight(w, None, bits, 128, 'rtn')).cuda()
x = torch.randn(tokens, in_f, device='cuda', dtype=torch.bfloat16)
y = f(x); torch.cuda.synchronize()
if graph:  # the same call captured in a CUDA graph (what torch.compile's cudagraphs and the benchmark do)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            f(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = f(x)
    g.replay(); g.replay(); torch.cuda.synchronize()
ref = x.float() @ f.dequantized_weight(torch.float32).T
err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
print(f.prepared(x.device, torch.bfloat16).kernel, err)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="cuda_int_kernels_probe.json")
    p.add_argument("--graph", action="store_true", help="also capture each call in a CUDA graph and replay it")
    args = p.parse_args()
    # Llama-7B projections at ratio 0.5 / rank multiple 128: dense shapes and the factors' shapes
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (4096, 1024), (1408, 11008), (4096, 1408),
              (1408, 4096), (11008, 1408)]
    cases = [(bits, o, i, t, int(args.graph)) for bits in (8, 4) for o, i in shapes for t in (1, 16)]

    def run(case: tuple[int, int, int, int]) -> dict:
        r = subprocess.run([sys.executable, "-c", CASE, *map(str, case)], capture_output=True, text=True, timeout=180)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        err = r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip() else ""
        row = dict(zip(("bits", "out", "in", "tokens", "graph"), case), rc=r.returncode, result=last, error=err[-300:])
        print(row, flush=True)
        return row

    with ThreadPoolExecutor(6) as pool:
        rows = list(pool.map(run, cases))
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
