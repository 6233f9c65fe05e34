"""Runs several ``relaxtune`` commands in one torchrun launch (tests: one start-up for several commands).

    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_driver.py '[["finetune", ...], [...]]'

The process group is created here, once, as a program embedding relaxtune would; the commands join it.
"""

import json
import sys

import torch.distributed as dist

from relaxtune.cli import main

if __name__ == "__main__":
    commands = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    for argv in commands:
        sys.argv = ["relaxtune", *argv]
        main()
    dist.destroy_process_group()
