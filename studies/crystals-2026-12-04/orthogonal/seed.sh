#!/bin/bash
# one seed of the crystals case with the default recipe (orthogonal updates on), then its test split
# ran from a git worktree of 68282b9 at /tmp/wt2
s=$1
export PYTHONPATH=/tmp/wt2/src OMP_NUM_THREADS=1
R=/work/main/.venv/bin/relaxtune
$R finetune builtin:crystals --out /tmp/cryo/seed$s --seed $s --threads 1 --no-progress > /tmp/cryo/seed$s.log 2>&1
for ck in best last; do
  $R evaluate builtin:crystals --split test --model /tmp/cryo/seed$s/$ck.pt --threads 1 --json /tmp/cryo/seed$s/test_$ck.json > /dev/null 2>>/tmp/cryo/seed$s.log
done
