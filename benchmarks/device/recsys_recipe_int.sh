#!/bin/bash
# Fourth device run for issue 14 and the three-seed run for issue 12 (2026-12-02, fifth session).
# (A) Dense recipes around the chosen one (4 x 256, 4 epochs, LR 1e-3, attention dropout 0.2 = D2), seeds 0-2,
#     scored on VALIDATION users: dropout 0.3 (D3), dropout 0.3 for 6 epochs (D3E6), dropout 0.2 with weight
#     decay 0.1 (D2WD). (B) Issue 12 on the D2 models' TEST users: refined OD-LLM 0.5 + int8 / int4 factors (GPTQ
#     rounding, the defaults) and GPTQ W4 / W3 on the dense weights. (C) If another recipe beats D2 on
#     validation: its dense test rows and the default OD-LLM at 0.5 / 0.3 on its test users.
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/a /tmp/c
log() { echo "$* t=$(( $(date +%s) - T0 ))" >> $OUT/log; }
train() {  # name seed epochs dropout weight-decay
  timeout 240 python3 $B --train-only --seeds $2 --layers 4 --hidden-size 256 --heads 4 --epochs $3 --lr 1e-3 \
    --attention-dropout $4 --weight-decay $5 --threads 1 --out-dir /tmp/a/$1 --json /tmp/a/$1_s$2.json > /tmp/a/$1_s$2.log 2>&1
  log "train $1 s$2 rc=$?"
}
for s in 0 1 2; do
  train D2 $s 4 0.2 0.01 &
  train D3 $s 4 0.3 0.01 &
  train D3E6 $s 6 0.3 0.01 &
  train D2WD $s 4 0.2 0.1 &
done
wait
DENSE=$(python3 benchmarks/device/best_by_validation.py '/tmp/a/*.json' 2>>$OUT/log | tee -a $OUT/log | tail -1)
log "dense recipe chosen on validation: $DENSE"
LEFT=$(( 575 - ($(date +%s) - T0) ))
testrun() {  # dir seed part variants ratios unmasked
  timeout $LEFT python3 $B --seeds $2 --out-dir /tmp/a/$1 --variants "$4" --ratios $5 --unmasked "$6" --threads 1 \
    --json /tmp/c/$1_s$2_p$3.json > /tmp/c/$1_s$2_p$3.log 2>&1
  log "test $1 s$2 p$3 rc=$?"
}
for s in 0 1 2; do
  testrun D2 $s q1 "odllm+int8 gptq,odllm+int4 gptq" 0.5 none &
  testrun D2 $s q2 "gptq-w4,gptq-w3" 0.5 none &
  if [ "$DENSE" != D2 ]; then
    testrun $DENSE $s 1 "odllm" 0.5 dense &
    testrun $DENSE $s 2 "odllm" 0.3 none &
  fi
done
wait
python3 $B --merge /tmp/c/D2_*.json --json $OUT/recsys_int_test_h200.json 2>&1 | tee -a $OUT/log
if [ "$DENSE" != D2 ]; then
  python3 $B --merge /tmp/c/${DENSE}_*.json --json $OUT/recsys_recipe_test_h200.json 2>&1 | tee -a $OUT/log
fi
cd /tmp && tar czf $OUT/runs.tgz a/*.json a/*.log c/*.json c/*.log
log done
