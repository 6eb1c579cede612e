#!/bin/bash
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
timeout 140 python3 benchmarks/cuda_int_kernels_probe.py --graph --out $OUT/cuda_int_kernels_probe_graph_h200.json 2>&1 | tee $OUT/log
