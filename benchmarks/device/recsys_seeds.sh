#!/bin/bash
# Issues 12+14 device run 2: three candidate recipes x 3 seeds trained, the recipe chosen by mean VALIDATION
# NDCG@10, then every variant of the chosen recipe's 3 models (split over processes that load the same saved model).
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/s1 /tmp/s2
train() {  # name seed layers hidden heads epochs lr
  timeout 270 python3 $B --train-only --seeds $2 --layers $3 --hidden-size $4 --heads $5 --epochs $6 --lr $7 --threads 1 \
    --out-dir /tmp/s1/$1 --json /tmp/s1/$1_s$2.json > /tmp/s1/$1_s$2.log 2>&1; echo "$1 s$2 rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/log
}
for s in 0 1 2; do
  train L2H256e6 $s 2 256 4 6 2e-3 &
  train L2H256e4 $s 2 256 4 4 2e-3 &
  train L4H256e4 $s 4 256 4 4 1e-3 &
done
wait
BEST=$(python3 benchmarks/device/best_by_validation.py '/tmp/s1/*.json' | tee -a $OUT/log | tail -1)
echo "chosen by validation: $BEST, t=$(( $(date +%s) - T0 ))" | tee -a $OUT/log
LEFT=$(( 560 - ($(date +%s) - T0) ))
part() {  # seed part variants ratios
  timeout $LEFT python3 $B --seeds $1 --out-dir /tmp/s1/$BEST --variants "$3" --ratios $4 --rtn-ratios 0.5 \
    --unmasked "${5:-none}" --threads 1 --json /tmp/s2/${BEST}_s$1_p$2.json > /tmp/s2/${BEST}_s$1_p$2.log 2>&1
  echo "s$1 p$2 rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/log
}
for s in 0 1 2; do
  part $s 1 "odllm,no_progressive" "0.3 0.5" "dense,odllm@0.5,odllm@0.3,no_progressive@0.5" &
  part $s 2 "odllm,odllm+int8 gptq" "0.4 0.6 0.7" &
  part $s 3 "odllm+int8 gptq,odllm+int4 gptq,odllm+int8 rtn,odllm+int4 rtn" "0.3 0.5" &
  part $s 4 "odllm+int4 gptq,gptq-w4,gptq-w3" "0.4 0.6 0.7" &
done
wait
python3 $B --merge /tmp/s2/*.json --json $OUT/recsys_seeds_h200.json 2>&1 | tee -a $OUT/log
cd /tmp && tar czf $OUT/runs.tgz s1/*.json s1/*.log s2/*.json s2/*.log
echo "done t=$(( $(date +%s) - T0 ))" >> $OUT/log
