#!/bin/bash
# Issue 14, dense LLM vs SASRec: SASRec (benchmarks/sasrec.py) reads the last 50 items of a user, the LLM recipe
# 20. Three recipes x 3 seeds scored on VALIDATION users: history 20 (the recipe so far), history 50, history 50
# with attention dropout 0.1 and 6 epochs; the best mean is then scored on the test users with OD-LLM 0.5 / 0.3
# (and the history-20 models' dense rows, side by side). First, the GPU tests (gpu marker) of the kernels.
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/s1 /tmp/s2
(timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/log) &
train() {  # name seed history epochs attention-dropout
  timeout 300 python3 $B --train-only --seeds $2 --layers 4 --hidden-size 256 --heads 4 --epochs $4 --lr 1e-3 \
    --history $3 --attention-dropout $5 --threads 1 --out-dir /tmp/s1/$1 --json /tmp/s1/$1_s$2.json > /tmp/s1/$1_s$2.log 2>&1
  echo "$1 s$2 rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/log
}
for s in 0 1 2; do
  train H20 $s 20 4 0 &
  train H50 $s 50 4 0 &
  train H50drop $s 50 6 0.1 &
done
wait
BEST=$(python3 benchmarks/device/best_by_validation.py '/tmp/s1/*.json' | tee -a $OUT/log | tail -1)
echo "chosen by validation: $BEST, t=$(( $(date +%s) - T0 ))" | tee -a $OUT/log
case $BEST in H20) H=20;; *) H=50;; esac
LEFT=$(( 570 - ($(date +%s) - T0) ))
part() {  # name history seed part variants ratios unmasked
  timeout $LEFT python3 $B --seeds $3 --out-dir /tmp/s1/$1 --history $2 --variants "$5" --ratios $6 \
    --unmasked "$7" --threads 1 --json /tmp/s2/$1_s$3_p$4.json > /tmp/s2/$1_s$3_p$4.log 2>&1
  echo "$1 s$3 p$4 rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/log
}
for s in 0 1 2; do
  part $BEST $H $s 1 "odllm" "0.5" "dense" &
  part $BEST $H $s 2 "odllm" "0.3" "none" &
  [ "$BEST" != H20 ] && part H20 20 $s 1 "" "0.5" "dense" &
done
wait
python3 $B --merge /tmp/s2/${BEST}_*.json --json $OUT/recsys_history_best_h200.json 2>&1 | tee -a $OUT/log
[ "$BEST" != H20 ] && python3 $B --merge /tmp/s2/H20_*.json --json $OUT/recsys_history_h20_h200.json 2>&1 | tail -3 | tee -a $OUT/log
cd /tmp && tar czf $OUT/runs.tgz s1/*.json s1/*.log s2/*.json s2/*.log
echo "done t=$(( $(date +%s) - T0 ))" >> $OUT/log
