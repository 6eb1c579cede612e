#!/bin/bash
# Issue 14 device run 1: which dense recommender (size, epochs, LR) to use, chosen by VALIDATION NDCG@10;
# seed 0, each config in its own process, OD-LLM / no-progressive at 0.3 and 0.5 for retention by size.
set -o pipefail
cd "$(dirname "$0")/../.." || exit 1  # the repository root
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/log
mkdir -p /tmp/sw
run() {  # name layers hidden heads epochs lr
  timeout ${T:-540} python3 benchmarks/quantized_recsys.py --seeds 0 --layers $2 --hidden-size $3 --heads $4 --epochs $5 --lr $6 \
    --variants "odllm,no_progressive" --ratios 0.3 0.5 --unmasked "dense" --threads 2 --out-dir /tmp/sw/$1 \
    --json /tmp/sw/$1.json > /tmp/sw/$1.log 2>&1
  echo "$1 rc=$?" >> $OUT/log
}
run L2H256e6 2 256 4 6 2e-3 &
run L4H256e12 4 256 4 12 1e-3 &
run L4H256e25 4 256 4 25 1e-3 &
run L4H384e10 4 384 6 10 1e-3 &
run L6H384e15 6 384 6 15 1e-3 &
run L8H256e12 8 256 4 12 1e-3 &
run L8H512e8 8 512 8 8 5e-4 &
run L8H512e15 8 512 8 15 5e-4 &
wait
cd /tmp/sw && grep -h "seed 0\|trained" *.log | tee -a $OUT/log
tar czf $OUT/sweep.tgz *.json *.log
