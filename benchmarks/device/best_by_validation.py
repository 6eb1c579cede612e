"""Print each dense recipe's validation NDCG@10 (per seed and mean) from ``quantized_recsys.py --train-only``
JSON files named ``RECIPE_sSEED.json``, then, on the last line, the recipe with the best mean over all seeds.

    python3 benchmarks/device/best_by_validation.py '/tmp/s1/*.json' --seeds 3
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pattern", help="glob of the training runs' JSON files")
    parser.add_argument("--seeds", type=int, default=3, help="only recipes with this many seeds can be chosen")
    args = parser.parse_args()
    scores: dict[str, list[float]] = {}
    for path in sorted(glob.glob(args.pattern)):
        recipe = path.rsplit("/", 1)[-1].rsplit("_s", 1)[0]
        for run in json.load(open(path))["per_seed"].values():
            scores.setdefault(recipe, []).append(run["dense"]["validation"]["NDCG@10"][0])
    for recipe, values in sorted(scores.items()):
        print("validation dense", recipe, [round(v, 4) for v in values], round(statistics.fmean(values), 4))
    complete = [r for r in scores if len(scores[r]) == args.seeds]
    if not complete:
        raise SystemExit(f"no recipe has {args.seeds} seeds in {args.pattern}")
    print(max(complete, key=lambda r: statistics.fmean(scores[r])))


if __name__ == "__main__":
    main()
