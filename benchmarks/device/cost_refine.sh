#!/bin/bash
# What block refinement costs at the Llama-7B shape: two decoder layers (bf16, 256 x 2048 calibration tokens,
# the settings of the 32-layer cost run), closed form vs --refine-steps 64 side by side (64, not the default
# 256, to fit the session's last device minutes: the step time is what is measured, the rest extrapolates).
# First, the refinement's GPU test.
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
timeout 60 python3 -m pytest -q -m gpu tests/test_refinement.py -p no:cacheprovider 2>&1 | tail -2 | tee $OUT/log
C="python3 benchmarks/compression_cost.py --device cuda --layers 2 --samples 256 --seq-len 2048 --solver-dtype float32 --svd-driver gesvda"
timeout 60 $C --out $OUT/cost_closed_2layers_h200.json 2>&1 | tail -3 | tee -a $OUT/log
timeout 140 $C --refine-steps 64 --out $OUT/cost_refine64_2layers_h200.json 2>&1 | tail -3 | tee -a $OUT/log
