#!/usr/bin/env bash
# Build the two baseline venvs (pinned) and run the recommender benchmarks of issue 5 on this CPU box.
#   bash benchmarks/run_baselines.sh            # venvs (if missing) + quality sweep + CPU speed
#   SKIP_QUALITY=1 bash benchmarks/run_baselines.sh   # only the speed table
# Why two venvs: llmcompressor 0.14.0.1 (SparseGPT, also GPTQ) pins transformers<=5.17, the main venv has 5.23;
# gptqmodel 7.6.0 (GPTQ with a real int4 CPU kernel) works with 5.23 but downgrades numpy, so it stays out of the main venv.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${MODEL_DIR:-runs/ml100k/dense}
GPTQ_VENV=${GPTQ_VENV:-/tmp/venv-gptqm}
LLMC_VENV=${LLMC_VENV:-/tmp/venv-baselines}
CPU_TORCH="--extra-index-url https://download.pytorch.org/whl/cpu"
if [ ! -x "$GPTQ_VENV/bin/python" ]; then
  python3 -m venv "$GPTQ_VENV"
  "$GPTQ_VENV/bin/pip" install $CPU_TORCH torch==2.13.0 transformers==5.23.0 optimum==2.3.0 gptqmodel==7.6.0 datasets tqdm
fi
if [ ! -x "$LLMC_VENV/bin/python" ]; then
  python3 -m venv "$LLMC_VENV"
  "$LLMC_VENV/bin/pip" install $CPU_TORCH torch==2.13.0 llmcompressor==0.14.0.1   # pulls transformers 5.17.0, compressed-tensors 0.19.0
fi
export GPTQMODEL_CPU_WORKERS=2 TQDM_DISABLE=1
DATA=$(.venv/bin/python -c "from optimum_odllm.recsys.data import find_recbole_ml100k as f; print(f())")
if [ -z "${SKIP_QUALITY:-}" ]; then
  .venv/bin/python benchmarks/quality_vs_size.py --model-dir "$MODEL_DIR" --gptq-python "$GPTQ_VENV/bin/python" \
      --llmc-python "$LLMC_VENV/bin/python" --baseline-dir runs/bench_baselines ${QUALITY_ARGS:-}
fi
"$GPTQ_VENV/bin/python" benchmarks/recsys_speed.py --model-dir "$MODEL_DIR" --data-path "$DATA" \
    --gptq-dir runs/bench_baselines/gptq-w4 --sparsegpt-dir runs/bench_baselines/sparsegpt-50 --bf16 \
    --out benchmarks/results/recsys_speed_cpu.json ${SPEED_ARGS:-}
