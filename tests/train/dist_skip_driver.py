"""A fine-tuning whose training set holds a structure with NaN coordinates (its relaxation raises), on one
process or, under torchrun, on every rank (tests/train/test_distributed.py):

    python tests/train/dist_skip_driver.py OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_skip_driver.py OUT

In batches of 2 on 2 ranks the broken structure is one rank's whole share: that rank raises, and every rank
must skip the batch, as one process does, rather than wait for the rank that raised.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for swdata

from swdata import make_sw_pairs  # noqa: E402

from relaxtune.train import distributed  # noqa: E402
from relaxtune.train.config import TrainConfig  # noqa: E402
from relaxtune.train.finetune import finetune  # noqa: E402

CONFIG = TrainConfig(model="sw", dtype="float64", optimizer="gd", steps=300, fmax=1e-3, grad="full", epochs=2,
                     batch_size=2, lr=3e-3, eval_fmax=1e-3, objective="structure", start="initial",
                     val_start="initial", dq_scale="absolute", distill_weight=0.0, retention_check=False)

if __name__ == "__main__":
    pairs = make_sw_pairs(6)
    nan = pairs[0].initial.copy()
    nan.positions[2] = np.nan
    train = [type(pairs[0])(name="nan", group="x", initial=nan, final=pairs[0].final)] + pairs[1:4]
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    ctx = distributed.init_from_env()
    if ctx.active:
        distributed.finetune_distributed(CONFIG, train, pairs[4:], sys.argv[1], ctx, progress=False, log=log)
    else:
        finetune(CONFIG, train, pairs[4:], sys.argv[1], progress=False, log=log)
    distributed.shutdown(ctx)
