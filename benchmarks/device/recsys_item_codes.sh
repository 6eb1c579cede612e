#!/bin/bash
# Fifth device run for issue 14 (2026-12-02, sixth session): semantic IDs built from the training interactions.
# (A) The chosen recipe D2WD (4 x 256, 4 epochs, LR 1e-3, attention dropout 0.2, weight decay 0.1), seeds 0-2,
#     with item codes from item text (T, today's index; the control), from item co-occurrence in the training
#     sequences (C, --item-embeddings collaborative), from both (H, hybrid), and C trained 6 epochs (C6); scored on
#     VALIDATION users only. (B) The recipe with the best validation mean, on the TEST users: dense, the default
#     OD-LLM at 0.5 / 0.3, + int8 / int4 factors at 0.5 (issue 12) and GPTQ W4 / W3 on the dense weights.
#     If T wins, only its missing GPTQ rows run.
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/a /tmp/c
log() { echo "$* t=$(( $(date +%s) - T0 ))" >> $OUT/log; }
train() {  # name seed epochs item-embeddings
  timeout 300 python3 $B --train-only --seeds $2 --layers 4 --hidden-size 256 --heads 4 --epochs $3 --lr 1e-3 \
    --attention-dropout 0.2 --weight-decay 0.1 --item-embeddings $4 --threads 1 --out-dir /tmp/a/$1 \
    --json /tmp/a/$1_s$2.json > /tmp/a/$1_s$2.log 2>&1
  log "train $1 s$2 rc=$?"
}
for s in 0 1 2; do
  train T $s 4 offline &
  train C $s 4 collaborative &
  train H $s 4 hybrid &
  train C6 $s 6 collaborative &
done
wait
BEST=$(python3 benchmarks/device/best_by_validation.py '/tmp/a/*.json' 2>>$OUT/log | tee -a $OUT/log | tail -1)
log "recipe chosen on validation: $BEST"
LEFT=$(( 580 - ($(date +%s) - T0) ))
testrun() {  # dir seed part variants ratios unmasked
  timeout $LEFT python3 $B --seeds $2 --out-dir /tmp/a/$1 --variants "$4" --ratios $5 --unmasked "$6" --threads 1 \
    --json /tmp/c/$1_s$2_p$3.json > /tmp/c/$1_s$2_p$3.log 2>&1
  log "test $1 s$2 p$3 rc=$?"
}
for s in 0 1 2; do
  testrun $BEST $s 4 "gptq-w4,gptq-w3" 0.5 none &
  if [ "$BEST" != T ]; then
    testrun $BEST $s 1 "odllm" 0.5 dense &
    testrun $BEST $s 2 "odllm" 0.3 none &
    testrun $BEST $s 3 "odllm+int8 gptq,odllm+int4 gptq" 0.5 none &
  fi
done
wait
python3 $B --merge /tmp/c/${BEST}_*.json --json $OUT/recsys_item_codes_test_h200.json 2>&1 | tee -a $OUT/log
cd /tmp && tar czf $OUT/runs.tgz a/*.json a/*.log c/*.json c/*.log
log done
