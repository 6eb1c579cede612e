#!/bin/bash
# As run on 2026-12-02 13:03 UTC: 11 of the 12 sweep processes hit their 240 s limit, and the choice step below then
# crashed on the incomplete sweep (max() of nothing), so no test rows came out; recsys_final.sh did the test run.
# Issue 14, second device run: (A) the 4 x 256 recipe's three models again (seeds 0-2; the run before this one
# reproduced its earlier numbers bit for bit) and three dropout recipes; (B) block refinement settings
# (refine_steps x refine_lr) chosen on the VALIDATION users, all three seeds, ratios 0.5 and 0.3; (C) the chosen
# refinement on the TEST users (OD-LLM and no-progressive, with and without refinement), and the dense test rows
# of the best dropout recipe if it beats the plain recipe on validation.
source "$(dirname "$0")/setup.sh"
mkdir -p /tmp/a /tmp/b /tmp/c
log() { echo "$* t=$(( $(date +%s) - T0 ))" >> $OUT/log; }
train() {  # name seed layers hidden epochs dropout
  timeout 200 python3 $B --train-only --seeds $2 --layers $3 --hidden-size $4 --heads 4 --epochs $5 --lr 1e-3 \
    --attention-dropout $6 --threads 1 --out-dir /tmp/a/$1 --json /tmp/a/$1_s$2.json > /tmp/a/$1_s$2.log 2>&1
  log "train $1 s$2 rc=$?"
}
for s in 0 1 2; do
  train H20 $s 4 256 4 0 &
  train D4 $s 4 256 4 0.1 &
  train D6 $s 4 256 6 0.1 &
  train W384D6 $s 4 384 6 0.1 &
done
wait
sweep() {  # seed steps lr extra-variants
  timeout 240 python3 $B --seeds $1 --out-dir /tmp/a/H20 --score-validation --variants "odllm+refine$4" --ratios 0.5 0.3 \
    --refine-steps $2 --refine-lr $3 --unmasked none --threads 1 --json /tmp/b/r$2_$3_s$1.json > /tmp/b/r$2_$3_s$1.log 2>&1
  log "sweep s$1 steps=$2 lr=$3 rc=$?"
}
for s in 0 1 2; do
  sweep $s 256 1e-4 ",odllm" &
  sweep $s 256 5e-4 &
  sweep $s 1024 1e-4 &
  sweep $s 1024 5e-4 &
done
wait
read STEPS LR DENSE <<< $(python3 - <<'PY' 2>>$OUT/log | tee -a $OUT/log | tail -1
import glob, json, statistics
scores, dense = {}, {}
for f in glob.glob('/tmp/b/r*.json'):
    steps, lr, _ = f.split('/')[-1][1:-5].split('_')
    for seed, v in json.load(open(f))['per_seed'].items():
        for label, row in v.items():
            if label.startswith('odllm+refine'):
                scores.setdefault((steps, lr), []).append(row['NDCG@10'])
            elif label.startswith('odllm@'):
                scores.setdefault(('0', 'closed-form'), []).append(row['NDCG@10'])
for key, vals in sorted(scores.items()):
    print('validation refine', key, len(vals), round(statistics.fmean(vals), 4))
best = max((k for k in scores if k[0] != '0' and len(scores[k]) == 6), key=lambda k: statistics.fmean(scores[k]))
for f in glob.glob('/tmp/a/*.json'):
    name = f.split('/')[-1].rsplit('_s', 1)[0]
    for seed, v in json.load(open(f))['per_seed'].items():
        dense.setdefault(name, []).append(v['dense']['validation']['NDCG@10'][0])
for name, vals in sorted(dense.items()):
    print('validation dense', name, [round(x, 4) for x in vals], round(statistics.fmean(vals), 4))
best_dense = max((n for n in dense if len(dense[n]) == 3), key=lambda n: statistics.fmean(dense[n]))
print(best[0], best[1], best_dense)
PY
)
log "chosen on validation: refine_steps=$STEPS refine_lr=$LR, dense recipe $DENSE"
LEFT=$(( 575 - ($(date +%s) - T0) ))
testrun() {  # dir seed part variants ratios unmasked
  timeout $LEFT python3 $B --seeds $2 --out-dir /tmp/a/$1 --variants "$4" --ratios $5 --refine-steps $STEPS \
    --refine-lr $LR --unmasked "$6" --threads 1 --json /tmp/c/$1_s$2_p$3.json > /tmp/c/$1_s$2_p$3.log 2>&1
  log "test $1 s$2 p$3 rc=$?"
}
for s in 0 1 2; do
  testrun H20 $s 1 "odllm,odllm+refine" "0.5" "odllm+refine@0.5" &
  testrun H20 $s 2 "odllm,odllm+refine" "0.3" "none" &
  testrun H20 $s 3 "no_progressive,no_progressive+refine" "0.5 0.3" "none" &
  [ "$DENSE" != H20 ] && testrun $DENSE $s 1 "odllm,odllm+refine" "0.5 0.3" "dense" &
done
wait
python3 $B --merge /tmp/c/H20_*.json --json $OUT/recsys_refine_test_h200.json 2>&1 | tee -a $OUT/log
[ "$DENSE" != H20 ] && python3 $B --merge /tmp/c/${DENSE}_*.json --json $OUT/recsys_dropout_test_h200.json 2>&1 | tee -a $OUT/log
cd /tmp && tar czf $OUT/runs.tgz a/*.json a/*.log b/*.json b/*.log c/*.json c/*.log
log done
