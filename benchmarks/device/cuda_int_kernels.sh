#!/bin/bash
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
timeout 150 python3 benchmarks/cuda_int_kernels_probe.py --out $OUT/cuda_int_kernels_probe_h200.json 2>&1 | tee $OUT/log
CUDA_LAUNCH_BLOCKING=1 timeout 200 python3 benchmarks/quantized_speed.py --device cuda --shapes llama-7b --model-shapes none \
  --tokens 1,16 --cuda-graphs --rounds 5 --out $OUT/quantized_speed_gpu_h200.json 2>&1 | tee -a $OUT/log
