#!/bin/bash
# one seed of the crystals case: the default recipe on builtin:crystals' train split, then its test split
s=$1
export PYTHONPATH=/tmp/wt_replay/src
R=/work/main/.venv/bin/relaxtune
$R finetune builtin:crystals --out /tmp/cry/seed$s --seed $s --threads 1 --no-progress > /tmp/cry/seed$s.log 2>&1
for ck in best last; do
  $R evaluate builtin:crystals --split test --model /tmp/cry/seed$s/$ck.pt --threads 1 --json /tmp/cry/seed$s/test_$ck.json > /dev/null 2>>/tmp/cry/seed$s.log
done
