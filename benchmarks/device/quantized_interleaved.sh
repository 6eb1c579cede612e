# Issue 12 on the H200 (2026-12-03): compiled batch-1 decode of bf16 dense, OD-LLM 0.5 + int8 / int4 factors and
# dense int4 (tinygemm, the GPTQ W4 stand-in), timed round-robin (speed.py --rounds): the sequential runs of
# 2026-12-02 (int_kernels_gpu.sh) swung 1.7x between calls. Usage: bash benchmarks/device/quantized_interleaved.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
timeout 300 python benchmarks/speed.py --device cuda --layers 32 --variants dense,int8,int4,dense_int4 \
    --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --rounds 5 \
    --out "$OUT/speed_gpu_h200_quantized_interleaved.json" 2>&1 | grep -v Warning | tail -5
echo "elapsed $(( $(date +%s) - T0 )) s"
