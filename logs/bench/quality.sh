#!/bin/bash
cd /work/main
while [ ! -f runs/ml100k/dense/item_index.json ]; do sleep 10; done
sleep 5
export TQDM_DISABLE=1 GPTQMODEL_CPU_WORKERS=2
date -u
.venv/bin/python benchmarks/quality_vs_size.py --model-dir runs/ml100k/dense --max-eval-users 500 --methods "" --baselines gptq,sparsegpt
date -u
.venv/bin/python benchmarks/quality_vs_size.py --model-dir runs/ml100k/dense --max-eval-users 500 --resume --baselines "" --ratios 0.5,0.2,0.3,0.4,0.6,0.7,0.8,0.9
date -u
