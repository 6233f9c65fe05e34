"""Peak memory and time of one training step vs unroll length, for every gradient mode (CHGNet, 64-atom Si).

    python benchmarks/grad_memory.py                                   # k = 10 25 50 100 200, every mode
    python benchmarks/grad_memory.py --ks 10,25 --modes full,implicit  # a part of the table
    python benchmarks/grad_memory.py --json grad_memory.json           # also write every cell as JSON

One training step = relax one rattled 64-site Si defect cell (the shipped ``vacancy_1`` initial structure, or
``--structure FILE``) for exactly k FIRE steps with the graph the mode needs (``relax_for_training``; fmax is
set unreachably low so every mode takes the same k steps), Dq to the DFT-relaxed structure, backward into all
CHGNet weights. ``truncated`` keeps the last ``--truncate-steps`` steps, ``checkpoint`` recomputes blocks of
``--checkpoint-every`` steps, ``hybrid`` unrolls a head of ``--hybrid-steps`` steps then the implicit tail
(fixed-point gradient used at the end point even when not converged, so the CG cost is always counted),
``hybrid-ckpt`` is ``hybrid`` with the head checkpointed per step (the trainer's default head),
``implicit`` solves the CG at the end point (tolerance ``--cg-tol``).

Memory method. ``tracemalloc`` does not see torch's CPU allocations, so every cell runs in a fresh
subprocess and reads the kernel's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):
``base`` = peak after loading the model and one warm-up energy+forces with a graph, ``peak`` = peak after the
training step, and the table reports ``peak - base`` (MB): what the step itself added. The parent also
watches each child's current RSS (``/proc/PID/status`` VmRSS) and kills it above ``--max-rss-gb``; such
cells print as ``>LIMIT``. Times are wall-clock seconds of the step (relaxation + backward) and, for the
ratio, of the same k-step relaxation without a graph (grad_mode none; faster of two runs) in the same
process. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "truncated", "checkpoint", "implicit", "hybrid", "hybrid-ckpt")
ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_cell(args) -> dict:
    """One (mode, k) measurement in this (fresh) process."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from ase.io import read

    from relaxtune.potentials import load_model
    from relaxtune.potentials.base import energy_and_forces
    from relaxtune.relax import RelaxConfig, relax
    from relaxtune.relax.implicit import ImplicitConfig, relax_for_training
    from relaxtune.state import Batch
    from relaxtune.metrics import dq

    frames = read(args.structure, ":")
    initial, final = frames[0], frames[-1]
    model = load_model(args.model)
    batch = Batch.from_atoms([initial] * args.n_structures)
    reference = torch.tensor(np.concatenate([final.positions] * args.n_structures), dtype=batch.dtype)
    ef = energy_and_forces(model, batch, model.prepare(batch), create_graph=True)
    ef.forces.sum().backward()
    model.zero_grad(set_to_none=True)
    del ef
    config = RelaxConfig(optimizer="fire", fmax=1e-9, max_steps=args.k)
    t_forward = float("inf")
    for _ in range(2):  # the faster of two runs: the machine is shared
        t0 = time.perf_counter()
        relax(model, batch, config, grad_mode="none")
        t_forward = min(t_forward, time.perf_counter() - t0)
    base = _maxrss_mb()
    t0 = time.perf_counter()
    mode, head = (("hybrid", "checkpoint") if args.mode == "hybrid-ckpt" else (args.mode, "full"))
    out = relax_for_training(model, batch, config, grad_mode=mode, truncate_steps=args.truncate_steps,
                             checkpoint_every=args.checkpoint_every, hybrid_steps=args.hybrid_steps,
                             head_mode=head, fallback_unconverged=False,
                             implicit=ImplicitConfig(cg_tol=args.cg_tol, cg_max_iter=args.cg_max_iter))
    t_relax = time.perf_counter() - t0
    loss = dq(out.result.batch, reference).sum()
    loss.backward()
    t_step = time.perf_counter() - t0
    peak = _maxrss_mb()
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    return {
        "mode": args.mode, "k": args.k, "n_structures": args.n_structures, "steps_taken": out.result.n_steps.tolist(),
        "base_mb": round(base, 1), "peak_mb": round(peak, 1), "step_mb": round(max(0.0, peak - base), 1),
        "time_step_s": round(t_step, 3), "time_relax_s": round(t_relax, 3),
        "time_backward_s": round(t_step - t_relax, 3), "time_forward_relax_s": round(t_forward, 3),
        "ratio_to_forward": round(t_step / t_forward, 2), "loss": float(loss), "grad_norm": grad_norm,
        "cg_iterations": out.stats.cg_iterations if out.stats is not None else None,
    }


def _vmrss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def spawn(args, mode: str, k: int) -> dict:
    """Run one cell in a fresh interpreter, killing it above the RSS limit."""
    cmd = [sys.executable, __file__, "--cell", "--mode", mode, "--k", str(k), "--model", args.model,
           "--structure", str(args.structure), "--n-structures", str(args.n_structures),
           "--truncate-steps", str(args.truncate_steps), "--checkpoint-every", str(args.checkpoint_every),
           "--hybrid-steps", str(args.hybrid_steps), "--cg-tol", str(args.cg_tol),
           "--cg-max-iter", str(args.cg_max_iter)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    limit = args.max_rss_gb * 1024.0
    worst = 0.0
    killed = False
    start = time.time()
    while proc.poll() is None:
        rss = _vmrss_mb(proc.pid)
        worst = max(worst, rss)
        if rss > limit:
            proc.kill()
            killed = True
            break
        if time.time() - start > args.timeout:
            proc.kill()
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    if killed:
        return {"mode": mode, "k": k, "error": f">{args.max_rss_gb:g}GB", "rss_seen_mb": round(worst, 1)}
    if proc.returncode != 0:
        tail = (err or "").strip().splitlines()[-1:] or ["timeout" if time.time() - start > args.timeout else "?"]
        return {"mode": mode, "k": k, "error": tail[0][:120]}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"mode": mode, "k": k, "error": "no output"}


def table(cells: list[dict], ks: list[int], modes: list[str]) -> str:
    by = {(c["mode"], c["k"]): c for c in cells}

    def fmt(c):
        if c is None:
            return "-"
        if "error" in c:
            return c["error"]
        return f"{c['step_mb']:.0f} MB {c['time_step_s']:.1f}s x{c['ratio_to_forward']:.1f}"

    width = 26
    lines = ["peak memory added by one training step (MB), its time (s), and time / forward relaxation",
             "k".rjust(5) + "".join(m.rjust(width) for m in modes)]
    for k in ks:
        lines.append(str(k).rjust(5) + "".join(fmt(by.get((m, k))).rjust(width) for m in modes))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="10,25,50,100,200")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default="chgnet")
    p.add_argument("--structure", type=Path,
                   default=ROOT / "src/relaxtune/data/builtin/si-defects/vacancy_1.extxyz")
    p.add_argument("--n-structures", type=int, default=1)
    p.add_argument("--truncate-steps", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--hybrid-steps", type=int, default=10)
    p.add_argument("--cg-tol", type=float, default=1e-3)
    p.add_argument("--cg-max-iter", type=int, default=100)
    p.add_argument("--max-rss-gb", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path, default=None, help="append every cell as one JSON line")
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args)), flush=True)
        return
    ks = [int(x) for x in args.ks.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (choose from {', '.join(MODES)})")
    cells = []
    for k in ks:
        for m in modes:
            c = spawn(args, m, k)
            cells.append(c)
            print(json.dumps(c), file=sys.stderr, flush=True)
            if args.json is not None:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(c) + "\n")
    print(table(cells, ks, modes))


if __name__ == "__main__":
    main()
