# Issue 12 on the H200 (2026-12-03): compiled batch-1 decode of bf16 dense, OD-LLM 0.5 + int8 / int4 factors and
# dense int4 (tinygemm, the GPTQ W4 stand-in), timed round-robin (speed.py --rounds): the sequential runs of
# 2026-12-02 (int_kernels_gpu.sh) swung 1.7x between calls.
# Usage: bash benchmarks/device/quantized_interleaved.sh [plain|host]
#   plain (default): the 00:48 UTC run of session 9;
#   host: session 10, after the eager fast path of QuantizedFactor: the GPU tests of the quantized factors first,
#         then the same comparison with a profile per variant (GPU kernel time, host stages).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if [ "${1:-plain}" = host ]; then
  timeout 200 python -m pytest -q -m gpu tests/test_quantized_factors.py tests/test_kernels.py 2>&1 | tail -3 \
      | tee "$OUT/gpu_tests_fastpath.log"
  timeout 330 python benchmarks/speed.py --device cuda --layers 32 --variants dense,int8,int4,dense_int4 \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --rounds 3 \
      --profile-compiled --out "$OUT/speed_gpu_h200_quantized_host.json" 2>&1 | grep -v Warning \
      | grep -E "^decode|host" | cut -c1-300
else
  timeout 300 python benchmarks/speed.py --device cuda --layers 32 --variants dense,int8,int4,dense_int4 \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --rounds 5 \
      --out "$OUT/speed_gpu_h200_quantized_interleaved.json" 2>&1 | grep -v Warning | tail -5
fi
echo "elapsed $(( $(date +%s) - T0 )) s"
