"""Training throughput: one epoch of the default fine-tuning recipe, its wall time split into parts.

Trains the default ``TrainConfig`` (CHGNet, ``builtin:si-defects-mini``: train split, its val split validates)
for ``--epochs`` epochs and reports, for the epochs after the setup (epoch 0: pretrained validation and the
pretrained Dq scale), where the time goes:

* ``relax forward``  the training relaxations (no graph in ``implicit`` mode);
* ``relax backward`` the gradient through them (implicit CG / unrolled backward, and the Dq loss);
* ``frames``         the DFT-frame energy/force terms, forward and double backward;
* ``keep pretrained`` self-distillation on bulk crystals and the L2-SP anchor;
* ``validation``     relaxing the validation structures;
* ``other``          everything else (optimizer step, checkpoints, logging).

Each part also counts model calls (``EnergyModel.energy`` invocations and the atoms they covered). It prints a
table and writes JSON. ``--against`` compares with another commit in the same run (each side in a fresh
process, alternating over ``--repeats``; the ratio of structures/s per repeat and their median):

    python benchmarks/train_throughput.py --out bench.json                       # this checkout
    python benchmarks/train_throughput.py --src /tmp/base/src --out base.json    # another checkout's src/
    git worktree add /tmp/base START_COMMIT
    python benchmarks/train_throughput.py --against /tmp/base/src --epochs 3 --out compare.json

The instrumentation wraps the trainer's methods by name; names a commit lacks are reported as 0 (their time
lands in ``other``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


PARTS = ("relax forward", "relax backward", "frames", "keep pretrained", "validation", "other")


class Clock:
    """Wall time and model calls per part, attributed to the innermost active part."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.seconds = {p: 0.0 for p in PARTS}
        self.calls = {p: 0 for p in PARTS}
        self.atoms = {p: 0 for p in PARTS}

    @contextmanager
    def part(self, name: str):
        self.stack.append(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self.stack.pop()
            self.seconds[name] += elapsed
            if self.stack:  # the enclosing part does not count this one's time
                self.seconds[self.stack[-1]] -= elapsed

    def count_call(self, n_atoms: int) -> None:
        name = self.stack[-1] if self.stack else "other"
        self.calls[name] += 1
        self.atoms[name] += n_atoms


def _wrap(owner, attr: str, clock: Clock, part: str) -> bool:
    original = getattr(owner, attr, None)
    if original is None:
        return False

    def wrapped(*args, **kwargs):
        with clock.part(part):
            return original(*args, **kwargs)

    setattr(owner, attr, wrapped)
    return True


#: (owner attribute, part) pairs of the trainer before its split into modules, innermost last; a name a commit
#: lacks is skipped, so that ``--against`` can time an older commit too
TARGETS = (
    ("Trainer._combined_loss", "frames"),  # minus the structure part nested in it: the frame terms
    ("Trainer._frame_loss", "frames"),
    ("Trainer._structure_loss", "relax backward"),  # minus the forward nested in it: backward and the loss
    ("relax_for_training", "relax forward"),
    ("Trainer._keep_pretrained", "keep pretrained"),  # self-distillation and the L2-SP anchor
    ("Trainer.validate", "validation"),
    ("Trainer._measure_dq_scale", "validation"),
)


def _instrument_split_trainer(clock: Clock) -> list[str]:
    """The trainer split into objectives: the objective yields loss pieces that the trainer backpropagates. The
    structure piece comes first (its forward relaxation nested as ``relax forward``, the rest of it and its
    backward: ``relax backward``); every later piece is a chunk of DFT frames (``frames``)."""
    import relaxtune.train.finetune as finetune
    import relaxtune.train.objectives as objectives
    from relaxtune.train.keep_pretrained import KeepPretrained

    wrapped = []
    if _wrap(objectives, "relax_for_training", clock, "relax forward"):
        wrapped.append("relaxtune.train.objectives.relax_for_training")
    if _wrap(KeepPretrained, "add_gradients", clock, "keep pretrained"):
        wrapped.append("KeepPretrained.add_gradients")
    for name in ("validate", "_measure_dq_scale"):
        if _wrap(finetune.Trainer, name, clock, "validation"):
            wrapped.append(f"Trainer.{name}")

    def timed(parts, part):
        """The objective's loss pieces, each one's computation and the trainer's backward of it (done while this
        generator waits at ``yield``) timed as ``part``; the structure piece first, frame chunks after it."""
        while True:
            with clock.part(part):
                try:
                    piece = next(parts)
                except StopIteration as done:
                    return done.value
                yield piece
            part = "frames"

    original_loss = objectives.Objectives.loss

    def loss(self, pairs, epoch):
        first = "frames" if self.config.objective == "forces" else "relax backward"
        return timed(original_loss(self, pairs, epoch), first)

    objectives.Objectives.loss = loss
    wrapped.append("Objectives.loss")
    return wrapped


def instrument(clock: Clock) -> list[str]:
    """Wrap the trainer's pieces and count model calls; returns what could be wrapped."""
    import relaxtune.relax.implicit as implicit
    import relaxtune.train.finetune as finetune
    from relaxtune.potentials.base import EnergyModel

    try:
        wrapped = _instrument_split_trainer(clock)
    except ImportError:  # a commit before the trainer's split: its methods by name
        wrapped = []
        for target, part in TARGETS:
            if target.startswith("Trainer."):
                if _wrap(finetune.Trainer, target.split(".", 1)[1], clock, part):
                    wrapped.append(target)
            else:
                for module in (implicit, finetune):  # wherever the trainer imports it from
                    if _wrap(module, target, clock, part):
                        wrapped.append(f"{module.__name__}.{target}")
    for cls in _subclasses(EnergyModel):
        if "energy" not in vars(cls):
            continue
        original_energy = cls.energy

        def energy(self, batch, prepared, _orig=original_energy):
            clock.count_call(int(batch.positions.shape[0]))
            return _orig(self, batch, prepared)

        cls.energy = energy
    return wrapped


def _subclasses(cls) -> list[type]:
    import relaxtune.potentials.chgnet  # noqa: F401  (register the adapter)

    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    clock = Clock()
    wrapped = instrument(clock)
    from relaxtune.data import load_pairs
    from relaxtune.train.config import TrainConfig
    from relaxtune.train.finetune import Trainer

    pairs = load_pairs(args.data)
    train = [p for p in pairs if p.split == "train"]
    val = [p for p in pairs if p.split == "val"]
    config = TrainConfig(seed=args.seed)  # the default recipe; the run stops after --epochs
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, train, val, tmp, progress=False, log=lambda m: print(m, file=sys.stderr))
        t_setup = time.perf_counter()
        trainer.run(stop_after_epoch=0)
        setup_s = time.perf_counter() - t_setup
        setup = {"seconds": dict(clock.seconds), "calls": dict(clock.calls)}
        clock.seconds = {p: 0.0 for p in PARTS}
        clock.calls = {p: 0 for p in PARTS}
        clock.atoms = {p: 0 for p in PARTS}
        t0 = time.perf_counter()
        trainer.run(resume=True, stop_after_epoch=args.epochs)
        total = time.perf_counter() - t0
        history = trainer.state.history.rows if hasattr(trainer, "state") else trainer.history
        rows = [row for row in history if row["epoch"] > 0]
        epoch_times = [row["time_s"] for row in rows]
    known = sum(v for k, v in clock.seconds.items() if k != "other")
    clock.seconds["other"] = max(total - known, 0.0)
    structures = len(train) * args.epochs
    return {
        "commit": _commit(args.src),
        "data": args.data,
        "threads": args.threads,
        "epochs": args.epochs,
        "n_train": len(train),
        "n_val": len(val),
        "setup_s": round(setup_s, 2),
        "setup_parts": setup,
        "epoch_s": [round(t, 2) for t in epoch_times],
        "seconds": {k: round(v, 2) for k, v in clock.seconds.items()},
        "model_calls": clock.calls,
        "model_atoms": clock.atoms,
        "total_s": round(total, 2),
        "structures_per_s": structures / total,
        "cg_iterations": [row.get("cg_iterations") for row in rows],
        "train_steps_mean": [row.get("train_steps_mean") for row in rows],
        "val_steps_mean": [row.get("val_steps_mean") for row in rows],
        "val_dq_mean": [row.get("val_dq_mean") for row in rows],
        "wrapped": wrapped,
        "config": config.to_dict(),
    }


def _commit(src: str | None) -> str:
    where = Path(src).resolve().parent if src else Path(__file__).resolve().parent
    try:
        return subprocess.check_output(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(result: dict) -> str:
    total = result["total_s"]
    lines = [f"commit {result['commit']}  {result['n_train']} train / {result['n_val']} val structures, "
             f"{result['epochs']} epoch(s), {result['threads']} thread(s); setup (epoch 0) {result['setup_s']:.1f} s",
             f"{'part':<16}{'seconds':>10}{'share':>8}{'model calls':>13}{'atoms/call':>12}"]
    for part in PARTS:
        s = result["seconds"][part]
        calls = result["model_calls"][part]
        per = result["model_atoms"][part] / calls if calls else 0
        lines.append(f"{part:<16}{s:>10.1f}{s / total:>8.0%}{calls:>13d}{per:>12.0f}")
    lines.append(f"{'total':<16}{total:>10.1f}{'':>8}{sum(result['model_calls'].values()):>13d}")
    lines.append(f"structures/s: {result['structures_per_s']:.4f}  (epoch wall: {result['epoch_s']})")
    lines.append(f"per epoch: training relaxation steps (mean) {result.get('train_steps_mean')}, "
                 f"CG iterations {result.get('cg_iterations')}, validation steps (mean) {result.get('val_steps_mean')}")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> None:
    """Both sides in fresh processes, alternating; per-repeat ratios of structures/s and their median."""
    import statistics

    sides = {"this": args.src, "against": args.against}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, src in sides.items():
                out = Path(tmp) / f"{name}{repeat}.json"
                cmd = [sys.executable, __file__, "--data", args.data, "--epochs", str(args.epochs), "--threads",
                       str(args.threads), "--seed", str(args.seed), "--out", str(out)]
                if src:
                    cmd += ["--src", src]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[name].append(json.loads(out.read_text()))
                print(table(runs[name][-1]) + "\n", flush=True)
    ratios = [a["structures_per_s"] / b["structures_per_s"] for a, b in zip(runs["this"], runs["against"])]
    steady = [statistics.median(a["epoch_s"][1:] or a["epoch_s"]) for a in runs["this"]]
    steady_base = [statistics.median(b["epoch_s"][1:] or b["epoch_s"]) for b in runs["against"]]
    summary = {"ratios": ratios, "median_ratio": statistics.median(ratios),
               "steady_epoch_ratios": [b / a for a, b in zip(steady, steady_base)],
               "this": runs["this"], "against": runs["against"]}
    print(f"structures/s, this / against: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {summary['median_ratio']:.2f}); epochs after the first: "
          f"{', '.join(f'{r:.2f}' for r in summary['steady_epoch_ratios'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin:si-defects-mini")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--src", default=None, help="a checkout's src/ to import relaxtune from (another commit)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--against", default=None, help="another checkout's src/: run both, print the ratio")
    parser.add_argument("--repeats", type=int, default=1, help="with --against: runs of each side")
    args = parser.parse_args()
    if args.against:
        compare(args)
        return
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    result = run(args)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
