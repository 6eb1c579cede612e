#!/bin/bash
cd /work/main
while kill -0 17910 2>/dev/null; do sleep 3; done
export TQDM_DISABLE=1 GPTQMODEL_CPU_WORKERS=2
date -u
.venv/bin/python benchmarks/quality_vs_size.py --model-dir runs/ml100k/dense --max-eval-users 500 --resume --baselines "" --ratios 0.5,0.3,0.7,0.2,0.9,0.4,0.6,0.8
date -u
