#!/bin/bash
cd /work/main
QP=$(cat logs/bench/quality_py.pid)
until grep -q '"fwsvd@0.3"' benchmarks/results/quality_vs_size.json; do sleep 2; done
sleep 1
kill $QP; kill 18331 2>/dev/null
sleep 2
export TQDM_DISABLE=1
date -u
.venv/bin/python benchmarks/quality_vs_size.py --model-dir runs/ml100k/dense --max-eval-users 500 --resume --baselines "" --ratios 0.2,0.7,0.9,0.4,0.6,0.8
date -u
