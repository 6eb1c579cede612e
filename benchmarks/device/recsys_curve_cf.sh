#!/bin/bash
# Sixth device run (2026-12-02, sixth session): issue 12's quality-vs-bytes curve on the recipe chosen by
# recsys_item_codes.sh on validation users: C6 = 4 x 256, 6 epochs, LR 1e-3, attention dropout 0.2, weight decay
# 0.1, semantic IDs from training co-occurrence (--item-embeddings collaborative); seeds 0-2 (GPU training is
# bit-reproducible: the same models; their validation scores are logged to check it). On the TEST users: the default
# (refined) OD-LLM, float and + int8 / int4 factors (GPTQ rounding), at ratios 0.3, 0.4, 0.6 and 0.7 (0.5 and
# GPTQ W4 / W3 came from recsys_item_codes.sh).
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/a /tmp/c
log() { echo "$* t=$(( $(date +%s) - T0 ))" >> $OUT/log; }
for s in 0 1 2; do
  ( timeout 300 python3 $B --train-only --seeds $s --layers 4 --hidden-size 256 --heads 4 --epochs 6 --lr 1e-3 \
      --attention-dropout 0.2 --weight-decay 0.1 --item-embeddings collaborative --threads 1 --out-dir /tmp/a/C6 \
      --json /tmp/a/C6_s$s.json > /tmp/a/C6_s$s.log 2>&1; log "train C6 s$s rc=$?" ) &
done
wait
python3 benchmarks/device/best_by_validation.py '/tmp/a/*.json' 2>&1 | tee -a $OUT/log
LEFT=$(( 580 - ($(date +%s) - T0) ))
curve() {  # ratio seed variants
  timeout $LEFT python3 $B --seeds $2 --out-dir /tmp/a/C6 --variants "$3" --ratios $1 --unmasked none --threads 1 \
    --json /tmp/c/C6_r$1_s$2.json > /tmp/c/C6_r$1_s$2.log 2>&1
  log "curve $1 s$2 rc=$?"
}
for s in 0 1 2; do
  curve 0.3 $s "odllm+int8 gptq,odllm+int4 gptq" &
  curve 0.4 $s "odllm,odllm+int8 gptq,odllm+int4 gptq" &
  curve 0.6 $s "odllm,odllm+int8 gptq,odllm+int4 gptq" &
  curve 0.7 $s "odllm,odllm+int8 gptq,odllm+int4 gptq" &
done
wait
python3 $B --merge /tmp/c/*.json --json $OUT/recsys_curve_cf_test_h200.json 2>&1 | tee -a $OUT/log
cd /tmp && tar czf $OUT/runs.tgz a/*.json a/*.log c/*.json c/*.log
log done
