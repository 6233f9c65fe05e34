"""Experiment driver: the default recipe with a different energy weight (per-atom units; 65^2 = total eV^2)."""
import sys, torch
from relaxtune.cli.finetune_cmd import resolve_data
from relaxtune.train.config import TrainConfig
from relaxtune.train.finetune import finetune
out, ew = sys.argv[1], float(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
torch.set_num_threads(1)
train, val, note = resolve_data("builtin:si-defects-mini", None)
print(note, flush=True)
print(finetune(TrainConfig(energy_weight=ew, seed=seed), train, val, out, progress=False, log=print))
