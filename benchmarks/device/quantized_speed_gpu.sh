#!/bin/bash
# Issue 12's GPU goal: Llama-7B shape, decode batch 1, bf16 dense vs OD-LLM 0.5 + int8/int4 factors vs dense int4,
# (a) one layer's seven projections captured in CUDA graphs, (b) generate with static cache + torch.compile.
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/log
timeout 90 python3 -m pytest -q tests/test_quantized_factors.py 2>&1 | tail -3 | tee -a $OUT/log
timeout 150 python3 benchmarks/quantized_speed.py --device cuda --shapes llama-7b --model-shapes none --tokens 1,16,64 \
    --cuda-graphs --rounds 7 --out $OUT/quantized_speed_gpu_h200.json 2>&1 | tail -40 | tee -a $OUT/log
timeout 330 python3 benchmarks/speed.py --device cuda --layers 32 --variants dense,int4,dense_int4,int8,kernels \
    --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --repeat 6 \
    --out $OUT/speed_gpu_h200_quantized.json 2>&1 | grep -v "^decode {" | tail -20 | tee -a $OUT/log
