"""Does moving rank to the modules with slowly decaying whitened spectra help? (an issue-14 probe, not wired)

Uniform allocation (the library's ``allocate_ranks``: every module keeps ``ratio`` of its own parameters) against a
spectrum-aware one under the same budget: each module starts at half its uniform rank, then aligned rank steps go,
greedily, to the module whose step restores the largest fraction of its own whitened output energy
(``svdvals(W chol(X^T X))**2`` on the dense model's calibration inputs) per parameter. Both are then compressed by the
default pipeline (progressive alignment) and ranked on all test users (seen items excluded); the paired difference
per user is reported.

    python benchmarks/rank_allocation.py --model-dir runs/l4h256/seed0/dense --out benchmarks/results/rank_allocation_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import heapq
from typing import Sequence

import torch

from common import machine_info, mean_se, write_json  # also puts the repository on sys.path
from recsys_common import calibration_ids, decoder_linears, input_covariances, load_recommender, load_split

import optimum_odllm.compressor as compressor_module  # noqa: E402
from optimum_odllm import ODLLMCompressor, ODLLMConfig  # noqa: E402
from optimum_odllm.linalg import max_useful_rank  # noqa: E402
from optimum_odllm.ranks import ModuleShape, allocate_ranks, effective_multiple, kept_parameters  # noqa: E402
from optimum_odllm.recsys import PACKED_SEQREC_TEMPLATE, InstructionEncoder  # noqa: E402
from optimum_odllm.recsys.evaluation import evaluate_per_user  # noqa: E402


@torch.no_grad()
def whitened_energies(model, calibration: Sequence[Sequence[int]]) -> dict[str, list[float]]:
    """Squared singular values of ``W chol(X^T X)`` per decoder linear, from one pass over the dense model."""
    linears = decoder_linears(model)
    cov = input_covariances(model, linears, (torch.tensor([list(ids)]) for ids in calibration))
    out = {}
    for name, module in linears.items():
        c = cov[name] + 1e-8 * cov[name].diagonal().mean() * torch.eye(cov[name].shape[0], dtype=torch.float64)
        out[name] = (torch.linalg.svdvals(module.weight.double() @ torch.linalg.cholesky(c)) ** 2).tolist()
    return out


def allocate_by_spectrum(shapes: list[ModuleShape], energies: dict[str, list[float]], ratio: float,
                         rank_multiple: int, floor: float = 0.5) -> dict[str, int | None]:
    """Same budget as the uniform allocation; steps go where they restore the most relative energy per parameter."""
    uniform = allocate_ranks(shapes, ratio, rank_multiple)
    budget = int(ratio * sum(s.dense_params for s in shapes))
    by_name = {s.name: s for s in shapes}
    ranks: dict[str, int | None] = {n: None for n in uniform}
    steps = {}
    for s in shapes:
        if uniform[s.name] is not None:
            steps[s.name] = effective_multiple(ratio * s.dense_params / (s.in_features + s.out_features), rank_multiple)
            ranks[s.name] = max(steps[s.name], int(floor * uniform[s.name]) // steps[s.name] * steps[s.name])
    spent = kept_parameters(shapes, ranks)
    heap: list[tuple[float, str]] = []

    def offer(name: str) -> None:
        shape, rank, step = by_name[name], ranks[name], steps[name]
        if rank + step <= max_useful_rank(shape.in_features, shape.out_features):
            gain = sum(energies[name][rank:rank + step]) / (sum(energies[name]) or 1.0)
            heapq.heappush(heap, (-gain / shape.lowrank_params(step), name))

    for name in steps:
        offer(name)
    while heap:
        _, name = heapq.heappop(heap)
        cost = by_name[name].lowrank_params(steps[name])
        if spent + cost <= budget:
            ranks[name] += steps[name]
            spent += cost
            offer(name)
    return ranks



def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/rank_allocation_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, index = load_recommender(args.model_dir)
    data, split = load_split()
    encoder = InstructionEncoder(tokenizer, index, data.item_text)
    calibration = calibration_ids(encoder, split, args.calibration_samples, seed=0)
    energies = whitened_energies(model, calibration)

    def ndcg(m) -> list[float]:
        return evaluate_per_user(m, encoder, split.test, PACKED_SEQREC_TEMPLATE, num_beams=20, progress=False,
                                 train=split.train, exclude_history=True)["NDCG@10"]

    dense = ndcg(model)
    result = {"machine": machine_info(), "args": vars(args), "dense_NDCG@10": mean_se(dense), "rows": []}
    uniform_plan = compressor_module.plan_ranks
    for ratio in args.ratios:
        per_user, plans = {}, {}
        for mode in ("uniform", "spectrum"):
            def spectrum_plan(shapes, cfg):
                ranks = allocate_by_spectrum(shapes, energies, cfg.ratio, cfg.rank_multiple)
                return {n: None if r is not None and s.lowrank_params(r) >= s.dense_params else r
                        for s in shapes for n, r in [(s.name, ranks[s.name])]}

            def recorded(shapes, cfg, plan=spectrum_plan if mode == "spectrum" else uniform_plan, mode=mode):
                plans[mode] = plan(shapes, cfg)  # what the compressor used, saved with the scores
                return plans[mode]
            compressor_module.plan_ranks = recorded
            try:
                cfg = ODLLMConfig(ratio=ratio, rank_multiple=8, num_calibration_samples=args.calibration_samples,
                                  min_calibration_tokens=16, refine_steps=0)  # closed form, as measured
                compressed = ODLLMCompressor.from_pretrained(copy.deepcopy(model), config=cfg,
                                                             tokenizer=tokenizer).compress(calibration)
            finally:
                compressor_module.plan_ranks = uniform_plan
            per_user[mode] = ndcg(compressed)
        diff = [a - b for a, b in zip(per_user["spectrum"], per_user["uniform"])]
        row = {"ratio": ratio, **{f"{m}_NDCG@10": mean_se(v) for m, v in per_user.items()},
               "spectrum_minus_uniform_paired": mean_se(diff), "ranks": plans}
        result["rows"].append(row)
        print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
