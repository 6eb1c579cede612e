"""How predictable are an item index's codes from the previous item's? A model-free probe of semantic IDs.

For each kind of item embedding (text, co-occurrence, both), build the RQ-VAE index the recipes use (3 levels x 64
codes), count first-order transitions of code prefixes (1 and 2 levels) in the users' *training* sequences, and
score each validation user's target prefix given the last history item's prefix: top-1 accuracy of the most
frequent successor and the mean log-likelihood (add-0.1 smoothing). Codes whose prefixes follow each other
predictably are easier for the language model to generate in beam search; text codes group similar titles.

    python benchmarks/item_code_probe.py --out benchmarks/results/item_code_probe.json
"""

from __future__ import annotations

import argparse
import math
from collections import Counter, defaultdict

from common import machine_info, markdown_table, write_json  # also puts the repository on sys.path

from optimum_odllm.recsys import build_item_index, leave_one_out, load_movielens_100k  # noqa: E402


def prefix_predictability(codes, train, examples, levels: int, codebook_size: int) -> dict[str, float]:
    """Top-1 accuracy and mean log-likelihood of the target's ``levels``-code prefix given the last item's."""
    transitions: dict[tuple, Counter] = defaultdict(Counter)
    for seq in train.values():
        for a, b in zip(seq, seq[1:]):
            transitions[codes[a][:levels]][codes[b][:levels]] += 1
    hits, loglik = 0, 0.0
    for ex in examples:
        successors = transitions[codes[ex.history[-1]][:levels]]
        target = codes[ex.target][:levels]
        total = sum(successors.values())
        loglik += math.log((successors[target] + 0.1) / (total + 0.1 * codebook_size ** levels))
        hits += bool(successors) and successors.most_common(1)[0][0] == target
    return {"top1": hits / len(examples), "loglik": loglik / len(examples),
            "uniform_loglik": -levels * math.log(codebook_size)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="offline,collaborative,hybrid")
    p.add_argument("--codebook-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/item_code_probe.json")
    args = p.parse_args(argv)
    data = load_movielens_100k()
    split = leave_one_out(data.sequences, history=20)
    rows = []
    for backend in args.backends.split(","):
        index = build_item_index(data.item_text, data.item_ids, levels=3, codebook_size=args.codebook_size, steps=1500,
                                 seed=args.seed, backend=backend, sequences=split.train.values())
        for levels in (1, 2):
            rows.append({"item_embeddings": backend, "prefix_levels": levels,
                         **prefix_predictability(index.codes, split.train, split.valid, levels, args.codebook_size)})
    table = markdown_table(rows, ["item_embeddings", "prefix_levels", "top1", "loglik", "uniform_loglik"])
    print(table)
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "validation_users": len(split.valid),
                          "rows": rows})


if __name__ == "__main__":
    main()
