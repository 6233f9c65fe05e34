"""Does torch's DistributedDataParallel give the right gradient through a relaxation (forces with
create_graph=True, i.e. a double backward; implicit fixed-point backward with Hessian-vector products;
torch.utils.checkpoint)? Compares DDP's averaged gradients with an explicit all-reduce of per-rank gradients.

    python benchmarks/ddp_double_backward_check.py        # 2 CPU ranks, gloo, 127.0.0.1

Result (torch 2.13.0+cpu, Stillinger-Weber, float64, GD 60 steps, 2 structures per rank): max relative
difference 0.0 for grad full, checkpoint, implicit and the forces (double backward) objective. DDP is still
not used by the trainer (relaxtune/train/distributed.py says why): it needs one forward and one synchronised
backward per step on every rank, which the trainer's chunked forces objective, empty shares, blow-up retries
and global loss weighting do not give.
"""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from swdata import make_sw_pairs

    from relaxtune.potentials.base import energy_and_forces
    from relaxtune.potentials.classical import StillingerWeber
    from relaxtune.relax import RelaxConfig
    from relaxtune.relax.implicit import relax_for_training
    from relaxtune.state import Batch
    from relaxtune import metrics

    pairs = make_sw_pairs(2 * world)[rank::world]
    cfg = RelaxConfig(optimizer="gd", fmax=1e-3, max_steps=60)

    class Objective(torch.nn.Module):
        """The whole step as one forward: relax (or forces) and the loss."""

        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, mode: str) -> torch.Tensor:
            b = Batch.from_atoms([p.initial for p in pairs], dtype=torch.float64)
            ref = torch.tensor(np.concatenate([p.final.positions for p in pairs]), dtype=torch.float64)
            if mode == "forces":
                ef = energy_and_forces(self.m, b, self.m.prepare(b), create_graph=True)
                return (ef.forces ** 2).mean()
            out = relax_for_training(self.m, b, cfg, grad_mode=mode, checkpoint_every=5)
            return metrics.dq(out.result.batch, ref).mean()

    for mode in ("full", "checkpoint", "implicit", "forces"):
        plain = StillingerWeber().double()
        Objective(plain)(mode).backward()
        g = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
        dist.all_reduce(g)
        g /= world
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(Objective(StillingerWeber().double()))
            ddp(mode).backward()
            gd = torch.cat([p.grad.reshape(-1) for p in ddp.module.m.parameters()])
            res = f"max relative difference {float((gd - g).abs().max() / g.abs().max()):.2e}"
        except Exception as exc:  # what DDP does not support shows up here
            res = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if rank == 0:
            print(f"{mode:10s} DDP vs explicit all-reduce: {res}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    print(f"torch {torch.__version__}")
    mp.spawn(worker, args=(2, free), nprocs=2)
