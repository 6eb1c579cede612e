# Issue 11, eager path on the H200 (2026-12-03): shared-input fusion with batched `up` products (`fused`) against
# the earlier fusion (`fused_down`: shared `down` GEMM, one `up` GEMM per projection), unfused factors and dense,
# Llama-7B shape, bf16, ratio 0.5; then the GPU tests. Usage: bash benchmarks/device/eager_fused.sh [eager|compiled|final|interleaved|lean|guards|host|host32]
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if [ "${1:-eager}" = eager ]; then
  timeout 420 python benchmarks/speed.py --device cuda --layers 32 --variants dense,lowrank,fused,fused_down \
      --micro-tokens "" --prefill 1x128,1x2048,32x128 --decode-batches 1,32 --decode-tokens 32 --repeat 6 \
      --no-compile --out "$OUT/speed_gpu_h200_eager_fused.json" 2>&1 | grep -v Warning | tail -12
  timeout 150 python -m pytest -q -m gpu tests/test_kernels.py tests/test_quantized_factors.py tests/test_fused.py \
      2>&1 | tail -3 | tee "$OUT/gpu_tests_eager_fused.log"
elif [ "$1" = final ]; then  # after batched ups became graph-only: fused timed FIRST (order check), then eager
  timeout 380 python benchmarks/speed.py --device cuda --layers 32 --variants fused,dense,fused_down,kernels \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1,32 --decode-tokens 32 --repeat 6 \
      --out "$OUT/speed_gpu_h200_compiled_final.json" 2>&1 | grep -v Warning | tail -6
  timeout 110 python benchmarks/speed.py --device cuda --layers 32 --variants fused,dense --micro-tokens "" \
      --prefill 1x128 --decode-batches 1,32 --decode-tokens 32 --repeat 6 --no-compile \
      --out "$OUT/speed_gpu_h200_eager_final.json" 2>&1 | grep -v Warning | tail -9
  timeout 80 python -m pytest -q -m gpu tests/test_fused.py 2>&1 | tail -2
elif [ "$1" = interleaved ]; then  # the same comparisons timed round-robin (speed.py --rounds): no order effects
  timeout 160 python benchmarks/speed.py --device cuda --layers 32 --variants dense,lowrank,fused --micro-tokens "" \
      --prefill "" --decode-batches 1,32 --decode-tokens 32 --rounds 5 --no-compile \
      --out "$OUT/speed_gpu_h200_eager_interleaved.json" 2>&1 | grep -v Warning | tail -5
  timeout 400 python benchmarks/speed.py --device cuda --layers 32 --variants dense,fused,fused_down,kernels \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1,32 --decode-tokens 32 --rounds 5 \
      --out "$OUT/speed_gpu_h200_compiled_interleaved.json" 2>&1 | grep -v Warning | tail -5
elif [ "$1" = lean ]; then  # session 8: the group checks once per forward; fused_eager batches ups eagerly too;
  # prefill also round-robin; then the GPU tests and compiled batch-32 decode with the Triton kernels at 32 tokens
  timeout 260 python benchmarks/speed.py --device cuda --layers 32 --variants dense,lowrank,fused,fused_eager \
      --micro-tokens "" --prefill 1x128,1x2048,32x128 --decode-batches 1,32 --decode-tokens 32 --rounds 5 --repeat 6 \
      --no-compile --out "$OUT/speed_gpu_h200_eager_lean.json" 2>&1 | grep -v Warning | tail -12
  timeout 110 python -m pytest -q -m gpu tests/test_kernels.py tests/test_quantized_factors.py tests/test_fused.py \
      2>&1 | tail -3 | tee "$OUT/gpu_tests_lean.log"
  ODLLM_KERNEL_MAX_TOKENS=32 timeout 190 python benchmarks/speed.py --device cuda --layers 32 --variants dense,kernels \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 32 --decode-tokens 32 --rounds 4 \
      --out "$OUT/speed_gpu_h200_kernels32_interleaved.json" 2>&1 | grep -v Warning | tail -5
elif [ "$1" = guards ]; then  # compiled batch 1: fused vs unfused factors (run 04:38 UTC; a second command, timing
  # without dynamo's nn.Module guards through a speed.py flag, failed and the flag was removed: benchmarks/README.md 4g)
  timeout 260 python benchmarks/speed.py --device cuda --layers 32 --variants dense,lowrank,fused,kernels \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --rounds 4 \
      --out "$OUT/speed_gpu_h200_compiled_unfused.json" 2>&1 | grep -v Warning | tail -3
elif [ "$1" = host ]; then  # session 9: compiled decode at batch 1 round-robin with a profile per variant (GPU
  # kernel time, host stages, Python hotspots), then the GPU tests (the two CPU-only fixes of session 8).
  # A first version (06:29 UTC) ran the tests first with a 110 s limit (cut after 30 passed) and batches 1,32 (cut at 32)
  timeout 330 python benchmarks/speed.py --device cuda --layers 32 --variants dense,lowrank,fused,kernels,int8 \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 1 --decode-tokens 32 --rounds 3 \
      --profile-compiled --out "$OUT/speed_gpu_h200_host2.json" 2>&1 | grep -v Warning | grep -E "^decode|python|host" | cut -c1-200
  timeout 200 python -m pytest -q -m gpu tests/test_kernels.py tests/test_quantized_factors.py tests/test_fused.py \
      2>&1 | tail -3 | tee "$OUT/gpu_tests_host.log"
elif [ "$1" = host32 ]; then  # the same profile at batch 32 (integer factors left out for time)
  timeout 360 python benchmarks/speed.py --device cuda --layers 32 --variants dense,lowrank,fused,kernels \
      --micro-tokens "" --prefill "" --no-eager-decode --decode-batches 32 --decode-tokens 32 --rounds 3 \
      --profile-compiled --out "$OUT/speed_gpu_h200_host32.json" 2>&1 | grep -v Warning | grep -E "^decode|host" | cut -c1-300
else  # compiled decode (static cache + torch.compile): batched ups must also work inside the graphs
  timeout 560 python benchmarks/speed.py --device cuda --layers 32 --variants dense,kernels,fused --micro-tokens "" \
      --prefill "" --no-eager-decode --decode-batches 1,32 --decode-tokens 32 --repeat 6 \
      --out "$OUT/speed_gpu_h200_compiled_fused.json" 2>&1 | grep -v Warning | tail -10
fi
echo "elapsed $(( $(date +%s) - T0 )) s"
