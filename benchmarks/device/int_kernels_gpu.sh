#!/bin/bash
# Issue 12 on the GPU with the Triton kernel for integer factors: its tests, then the Llama-7B shape at batch 1:
# (a) one layer's seven projections in CUDA graphs (Triton at <= 16 tokens, aten above),
# (b) generate with static cache + torch.compile: bf16 dense, OD-LLM 0.5 + int8/int4 factors, dense int4 with
#     aten's tinygemm kernel (the GPTQ W4 stand-in) and with the Triton kernel, plus a profile of each.
# The aten-only layer table (ODLLM_INT_KERNEL_MAX_TOKENS=0) is from the call before (same script, loop over 16 0).
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
timeout 100 python3 -m pytest -q -x tests/test_quantized_factors.py -k "int_kernel or int_factors or cuda or int_weight" \
    2>&1 | tail -2 | tee $OUT/log
timeout 80 python3 benchmarks/quantized_speed.py --device cuda --shapes llama-7b --model-shapes none --tokens 1,16,64 \
    --cuda-graphs --rounds 5 --skip-kernels --out $OUT/quantized_speed_gpu_h200_triton.json 2>&1 | tail -8 | tee -a $OUT/log
timeout 320 python3 benchmarks/speed.py --device cuda --layers 32 --variants dense,int8,int4,dense_int4_aten,dense_int4 \
    --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --repeat 6 --profile-compiled \
    --out $OUT/speed_gpu_h200_int_kernels.json 2>&1 | grep -v "^decode {" | tail -4 | tee -a $OUT/log
