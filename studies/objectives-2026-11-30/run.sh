#!/usr/bin/env bash
# usage: run.sh NAME [finetune options...]  -> gen/exp/NAME/{run/, eval_best.json, eval_last.json}
set -u
cd /work/main; . .venv/bin/activate
export OMP_NUM_THREADS=1
name=$1; shift
d=gen/exp/$name; mkdir -p $d
start=$(date +%s)
relaxtune finetune builtin:si-defects-mini:train --val builtin:si-defects-mini:val --out $d/run "$@" > $d/train.log 2>&1
for m in best last; do
  relaxtune evaluate builtin:si-defects-mini:test --model $d/run/$m.pt --json $d/eval_test_$m.json > $d/eval_$m.log 2>&1
done
echo "$name done in $(( $(date +%s) - start )) s" >> gen/exp/done.log
