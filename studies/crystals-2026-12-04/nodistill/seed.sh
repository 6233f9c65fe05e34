#!/bin/bash
# one seed of the crystals case without self-distillation, then its test split
# ran from a git worktree of bc68602 at /tmp/wt
s=$1
export PYTHONPATH=/tmp/wt/src OMP_NUM_THREADS=1
R=/work/main/.venv/bin/relaxtune
$R finetune builtin:crystals --out /tmp/cry0/seed$s --seed $s --threads 1 --no-progress --distill-weight 0 > /tmp/cry0/seed$s.log 2>&1
for ck in best last; do
  $R evaluate builtin:crystals --split test --model /tmp/cry0/seed$s/$ck.pt --threads 1 --json /tmp/cry0/seed$s/test_$ck.json > /dev/null 2>>/tmp/cry0/seed$s.log
done
