#!/bin/bash
# Last device run of 2026-12-02 (fifth session): (1) cost_refine.sh (the refinement's GPU test, then two
# Llama-7B-shaped layers, closed form vs 64 refinement steps); (2) issue 12's 0.5 + int8 / int4 factors on the
# three models of the recipe chosen on validation users for issue 14 (D2WD: attention dropout 0.2, weight decay 0.1;
# GPU training is bit-reproducible, so these are the models of recsys_recipe_int.sh), test users.
bash "$(dirname "$0")/cost_refine.sh"
source "$(dirname "$0")/setup.sh"
log() { echo "$* t=$(( $(date +%s) - T0 ))" >> $OUT/log; }
mkdir -p /tmp/q
for s in 0 1 2; do
  (timeout 150 python3 $B --train-only --seeds $s --layers 4 --hidden-size 256 --heads 4 --epochs 4 --lr 1e-3 \
    --attention-dropout 0.2 --weight-decay 0.1 --threads 1 --out-dir /tmp/q/D2WD --json /tmp/q/train_s$s.json \
    > /tmp/q/train_s$s.log 2>&1; log "train D2WD s$s rc=$?") &
done
wait
LEFT=$(( ${BUDGET:-250} - ($(date +%s) - T0) ))
for s in 0 1 2; do
  for v in "odllm+int8 gptq" "odllm+int4 gptq"; do
    n=${v:6:4}
    (timeout $LEFT python3 $B --seeds $s --out-dir /tmp/q/D2WD --variants "$v" --ratios 0.5 --unmasked none --threads 1 \
      --json /tmp/q/${n}_s$s.json > /tmp/q/${n}_s$s.log 2>&1; log "test D2WD $n s$s rc=$?") &
  done
done
wait
python3 $B --merge /tmp/q/int*_s*.json --json $OUT/recsys_int_d2wd_test_h200.json 2>&1 | tee -a $OUT/log
cd /tmp && tar czf $OUT/int_runs.tgz q/*.json q/*.log
log done
