#!/bin/bash
# Fifth device run (2026-12-02, fifth session). Dense recipes of recsys_recipe_int.sh (GPU training is
# bit-reproducible, so these are the same models): D2 (4 x 256, 4 epochs, LR 1e-3, attention dropout 0.2) and D2WD
# (the same with weight decay 0.1, chosen on validation users there), seeds 0-2, and three more recipes scored on
# VALIDATION users only: weight decay 0.3 (WD3), dropout 0.3 + weight decay 0.1 (D3WD), batch 32 + weight decay
# 0.1 (WDB32). (A) Issue 12's quality-vs-bytes curve on D2's TEST users: default (refined) OD-LLM + int8 / int4
# factors at 0.3 and 0.7, and float OD-LLM at 0.7 (0.5 + int8/int4 and GPTQ W4/W3 came from recsys_recipe_int.sh,
# float 0.5 / 0.3 from recsys_final.sh). (B) Issue 14, on D2WD's VALIDATION users only: the default at 0.5 / 0.3
# against 1024 calibration sequences instead of 256.
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/a /tmp/c /tmp/v
log() { echo "$* t=$(( $(date +%s) - T0 ))" >> $OUT/log; }
train() {  # name seed dropout weight-decay batch
  timeout 280 python3 $B --train-only --seeds $2 --layers 4 --hidden-size 256 --heads 4 --epochs 4 --lr 1e-3 \
    --attention-dropout $3 --weight-decay $4 --batch-size $5 --threads 1 --out-dir /tmp/a/$1 --json /tmp/a/$1_s$2.json \
    > /tmp/a/$1_s$2.log 2>&1
  log "train $1 s$2 rc=$?"
}
for s in 0 1 2; do
  train D2 $s 0.2 0.01 64 &
  train D2WD $s 0.2 0.1 64 &
  train WD3 $s 0.2 0.3 64 &
  train D3WD $s 0.3 0.1 64 &
  train WDB32 $s 0.2 0.1 32 &
done
wait
python3 benchmarks/device/best_by_validation.py '/tmp/a/*.json' 2>&1 | tee -a $OUT/log
LEFT=$(( 575 - ($(date +%s) - T0) ))
run() {  # dir-of-json recipe name seed variants ratios extra-args...
  local dir=$1 recipe=$2 name=$3 seed=$4 variants=$5 ratios=$6; shift 6
  timeout $LEFT python3 $B --seeds $seed --out-dir /tmp/a/$recipe --variants "$variants" --ratios $ratios --unmasked none \
    --threads 1 --json /tmp/$dir/${name}_s$seed.json "$@" > /tmp/$dir/${name}_s$seed.log 2>&1
  log "$dir $name s$seed rc=$?"
}
for s in 0 1 2; do
  run c D2 int03 $s "odllm+int8 gptq,odllm+int4 gptq" 0.3 &
  run c D2 r07 $s "odllm,odllm+int8 gptq,odllm+int4 gptq" 0.7 &
  run v D2WD default $s "odllm" "0.5 0.3" --score-validation &
  run v D2WD calib1024 $s "odllm" "0.5 0.3" --score-validation --calibration-samples 1024 &
done
wait
python3 $B --merge /tmp/c/*.json --json $OUT/recsys_curve_test_h200.json 2>&1 | tee -a $OUT/log
for n in default calib1024; do
  python3 $B --merge /tmp/v/${n}_*.json --json $OUT/recsys_validation_$n.json 2>&1 | tail -12 | tee -a $OUT/log
done
cd /tmp && tar czf $OUT/runs.tgz a/*.json a/*.log c/*.json c/*.log v/*.json v/*.log
log done
