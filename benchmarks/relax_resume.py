"""Many structures through ``relaxtune relax``: results stream to the output, a SIGKILL keeps what finished, and
``--resume`` completes the file without relaxing a finished structure again.

Builds ``--count`` small crystals (default 1,000) from the initial structures of ``builtin:crystals`` (each
copy strained isotropically by up to ±2% and rattled 0.03 Å with its own seed), then runs the real command line
three times on them, one torch thread each (``--cell``, L-BFGS, CHGNet unless ``--model``):

1. uninterrupted, to ``reference.extxyz``: wall time and structures/s;
2. the same command to ``out.extxyz``, killed with SIGKILL (no warning, no cleanup) after ``--kill-fraction`` of
   the uninterrupted wall time: the complete frames it left, and whether they are the first inputs in order;
3. ``--resume`` on ``out.extxyz``: its wall time, how many structures it says it kept, and the largest position
   and cell difference of the completed file from the uninterrupted one (per structure, same input order).

"Not relaxed again" shows twice: the resume reports the kept count, and its wall time against the uninterrupted
run's is close to the unfinished fraction (start-up included). Prints a table and writes JSON.

    python benchmarks/relax_resume.py --out /tmp/relax_resume --json relax_resume.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase.io import read, write

from relaxtune.atomic import atomic_write_text
from relaxtune.cli.relax_cmd import complete_frames
from relaxtune.data import load_pairs, minimum_image_displacement


def build_inputs(count: int, strain: float = 0.02, stdev: float = 0.03):
    """``count`` crystals: the initial structures of ``builtin:crystals`` in turn, each copy strained and
    rattled with its own seed."""
    bases = [pair.initial for pair in load_pairs("builtin:crystals")]
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        atoms = bases[i % len(bases)].copy()
        atoms.info = {"name": f"{bases[i % len(bases)].info.get('name', 'crystal')}-{i}"}
        atoms.calc = None
        atoms.set_cell(atoms.cell * (1.0 + rng.uniform(-strain, strain)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, stdev, atoms.positions.shape)
        out.append(atoms)
    return out


def command(inputs: Path, output: Path, model: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "relaxtune", "relax", str(inputs), "-o", str(output), "-m", model, "--cell",
            "--optimizer", "lbfgs", "--threads", "1", "--no-progress", *extra]


def run_to_end(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Run ``cmd``; its wall time and stderr (raises on a non-zero exit)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return wall, proc.stderr


def run_and_kill(cmd: list[str], cwd: Path, after_s: float) -> float:
    """Start ``cmd`` and SIGKILL it after ``after_s`` seconds; the seconds it ran."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        proc.wait(timeout=after_s)
        raise SystemExit("the run finished before the kill: lower --kill-fraction")
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - t0


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def largest_differences(frames, reference) -> tuple[float, float]:
    """The largest per-atom position difference (Å, nearest image) and cell difference (Å) over pairs of
    frames."""
    dx = dc = 0.0
    for atoms, ref in zip(frames, reference):
        dx = max(dx, float(np.linalg.norm(minimum_image_displacement(ref, atoms), axis=1).max()))
        dc = max(dc, float(np.abs(atoms.cell.array - ref.cell.array).max()))
    return dx, dc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (inputs and outputs)")
    parser.add_argument("--count", type=int, default=1000, help="crystals to relax")
    parser.add_argument("--model", default="chgnet")
    parser.add_argument("--kill-fraction", type=float, default=0.5,
                        help="kill the second run after this fraction of the uninterrupted wall time")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = args.out / "inputs.extxyz"
    write(inputs, build_inputs(args.count), format="extxyz")
    reference_path, out_path = args.out / "reference.extxyz", args.out / "out.extxyz"

    full_s, _ = run_to_end(command(inputs, reference_path, args.model, []), args.out)
    reference = read(reference_path, ":", format="extxyz")
    killed_after = run_and_kill(command(inputs, out_path, args.model, []), args.out, args.kill_fraction * full_s)
    kept_text = complete_frames(out_path.read_text()) if out_path.exists() else ""
    kept = read(io.StringIO(kept_text), ":", format="extxyz") if kept_text.strip() else []
    kept_dx, kept_dc = largest_differences(kept, reference[:len(kept)])
    resume_s, stderr = run_to_end(command(inputs, out_path, args.model, ["--resume"]), args.out)
    said = re.search(r"resuming: (\d+) of (\d+)", stderr)
    final = read(out_path, ":", format="extxyz")
    dx, dc = largest_differences(final, reference)
    figures = {
        "count": args.count, "model": args.model, "atoms": int(sum(len(a) for a in reference)),
        "uninterrupted_s": round(full_s, 2), "structures_per_s": round(args.count / full_s, 2),
        "converged": int(sum(bool(a.info.get("converged")) for a in reference)),
        "killed_after_s": round(killed_after, 2), "kept_after_kill": len(kept),
        "kept_match_uninterrupted_dx_A": kept_dx, "kept_match_uninterrupted_dcell_A": kept_dc,
        "resume_said_kept": int(said.group(1)) if said else None, "resume_s": round(resume_s, 2),
        "resume_over_uninterrupted": round(resume_s / full_s, 3),
        "unfinished_fraction": round(1 - len(kept) / args.count, 3),
        "final_frames": len(final), "final_dx_A": dx, "final_dcell_A": dc,
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        atomic_write_text(json.dumps(figures, indent=2) + "\n", args.json)
    return figures


if __name__ == "__main__":
    main()
