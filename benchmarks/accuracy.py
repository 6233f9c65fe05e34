"""Accuracy check: train a recipe with several seeds and compare its held-out Dq with pretrained CHGNet's.

Trains ``TrainConfig`` (the default recipe, or with ``--set FIELD=VALUE`` changes) on
``builtin:si-defects-mini`` (train split; its val split picks best.pt) once per seed, then relaxes the shipped
held-out views from their initial structures with best.pt and with pretrained CHGNet (FIRE to fmax 0.02, as
``relaxtune evaluate``):

* ``builtin:si-defects-heldout-trained``: new structures (other rattles) of the trained defect types;
* ``builtin:si-defects-heldout-unseen``:  every structure of the defect types it never trains on.

Per view it prints the change in mean Dq against pretrained (mean ± standard deviation over seeds), the
geometric mean of the per-structure ratio, structures in DFT's basin, and each seed's training wall time; the
JSON holds every row. Every finished piece is written to ``--out`` as it finishes, and a rerun skips it, so a
killed check resumes. Seeds run in parallel processes, one torch thread each.

    python benchmarks/accuracy.py --out runs/accuracy --seeds 0 1 2
    python benchmarks/accuracy.py --out runs/accuracy --label allframes --set frames_per_structure=0
    python benchmarks/accuracy.py --out runs/accuracy --seeds 3 4 5 --also-last   # also the final epoch's weights
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from relaxtune.atomic import atomic_write_text

VIEWS = ("si-defects-heldout-trained", "si-defects-heldout-unseen")
TRAIN = "builtin:si-defects-mini"


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _write_json(obj, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def evaluate_views(model_spec: str, path: Path) -> dict:
    """Held-out rows of one model (a checkpoint path or ``chgnet``), written to ``path``."""
    _one_thread()
    from relaxtune.data import load_pairs
    from relaxtune.evaluate import evaluate
    from relaxtune.potentials import load_model

    model = load_model(model_spec)
    out = {}
    for view in VIEWS:
        result = evaluate(model, load_pairs(f"builtin:{view}"), fmax=0.02, max_steps=500)
        out[view] = result.rows
    _write_json(out, path)
    return out


def views_of(checkpoint: Path, path: Path) -> dict:
    """The held-out rows of ``checkpoint``: those already written to ``path``, else evaluated now."""
    return json.loads(path.read_text()) if path.exists() else evaluate_views(str(checkpoint), path)


def train_and_evaluate(changes: dict, seed: int, folder: Path, also_last: bool = False) -> dict:
    """Fine-tune one seed into ``folder`` (resuming a killed run) and evaluate its best.pt (and its last.pt,
    the weights after the final epoch, under ``"last"``)."""
    _one_thread()
    from relaxtune.data import load_pairs
    from relaxtune.train.config import TrainConfig
    from relaxtune.train.finetune import finetune

    pairs = load_pairs(TRAIN)
    train = [p for p in pairs if p.split == "train"]
    val = [p for p in pairs if p.split == "val"]
    config = TrainConfig(**{**changes, "seed": seed})
    done = folder / "summary.json"
    if not done.exists():
        t0 = time.time()
        finetune(config, train, val, folder, resume=(folder / "last.pt").exists(), progress=False,
                 log=lambda m: print(f"[seed {seed}] {m}", file=sys.stderr, flush=True))
        print(f"[seed {seed}] trained in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    best = views_of(folder / "best.pt", folder / "heldout.json")
    last = {"last": views_of(folder / "last.pt", folder / "heldout_last.json")} if also_last else {}
    retention_path = folder / "retention.json"
    if not retention_path.exists():
        summary = json.loads(done.read_text())
        _write_json(summary.get("retention") or check_retention(folder, val), retention_path)
    return {**best, **last, "retention": json.loads(retention_path.read_text())}


def check_retention(folder: Path, val: list) -> dict:
    """The retention suite of a run whose summary predates it (best.pt against pretrained CHGNet)."""
    from relaxtune.potentials import load_model
    from relaxtune.retention import retention
    from relaxtune.data.pairs import dft_frames

    best = load_model(str(folder / "best.pt"))
    return retention(best, load_model("chgnet"), best.train_species,
                     extra_frames={"validation": [f for p in val for f in dft_frames(p)]})


def retention_summary(result: dict) -> dict:
    """The figures the issue's targets name: bulk Si's lattice constant against pretrained, the worst change of
    one crystal's |volume error|, force RMSE change on held-out DFT frames, items worse."""
    items = {i["item"]: i for i in result["items"]}
    si = next((i for name, i in items.items() if name.startswith("eos Si:")), None)
    volume = [i["change_vs_pretrained"] for name, i in items.items() if name.startswith("relax ")]
    forces = {name.split(":")[0].removeprefix("frames "): i["change_vs_pretrained"] for name, i in items.items()
              if name.startswith("frames ") and "force" in name}
    return {"si_lattice_vs_pretrained": si["change_vs_pretrained"] if si else None,
            "worst_volume_change": max(v for v in volume if v is not None) if volume else None,
            "force_rmse_change": forces, "worse": result["counts"]["worse"], "items": len(result["items"])}


def parse_changes(items: list[str]) -> dict:
    """``FIELD=VALUE`` pairs typed by the TrainConfig field's default."""
    from relaxtune.train.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        name, _, text = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {item}: {name!r} is not a TrainConfig field")
        default = fields[name].default
        if isinstance(default, bool):
            value = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            value = int(text)
        elif isinstance(default, float):
            value = float(text)
        elif default is None:  # optional: a number where it reads as one (1e-4, 0.5), else the text
            try:
                value = float(text)
            except ValueError:
                value = text
        else:
            value = text
        out[name] = value
    return out


def compare(rows: list[dict], base: list[dict]) -> dict:
    """Change in mean Dq against ``base`` on the structures both relaxed, geometric mean ratio, basins."""
    b = {r["name"]: r for r in base if r["dq"] is not None}
    pairs = [(r, b[r["name"]]) for r in rows if r["dq"] is not None and r["name"] in b]
    mean, ref = (sum(x["dq"] for x, _ in pairs) / len(pairs), sum(y["dq"] for _, y in pairs) / len(pairs))
    geo = math.exp(sum(math.log(max(x["dq"], 1e-9) / max(y["dq"], 1e-9)) for x, y in pairs) / len(pairs))
    return {"n": len(pairs), "dq_mean": mean, "dq_mean_pretrained": ref, "change": mean / ref - 1,
            "geomean_ratio": geo, "basins": sum(bool(x["basin_match"]) for x, _ in pairs),
            "basins_pretrained": sum(bool(y["basin_match"]) for _, y in pairs),
            "blew_up": sum(1 for r in rows if r["dq"] is None)}


def table(label: str, seeds: list[int], per_seed: dict[int, dict], walls: dict[int, float]) -> str:
    lines = [f"recipe {label!r}, seeds {seeds}: change in mean Dq against pretrained CHGNet (mean ± std over seeds)",
             "| view | n | pretrained mean Dq | mean Dq | change | geometric mean ratio | in DFT's basin |",
             "|---|---|---|---|---|---|---|"]
    for view in VIEWS:
        stats = [per_seed[s][view] for s in seeds]
        changes = [100 * st["change"] for st in stats]
        spread = f" ± {statistics.stdev(changes):.1f}" if len(changes) > 1 else ""
        lines.append(
            f"| {view} | {stats[0]['n']} | {stats[0]['dq_mean_pretrained']:.3f} | "
            f"{statistics.mean(st['dq_mean'] for st in stats):.3f} | {statistics.mean(changes):+.1f}{spread}% "
            f"({', '.join(f'{c:+.1f}' for c in changes)}) | "
            f"{statistics.mean(st['geomean_ratio'] for st in stats):.2f} | "
            f"{'/'.join(str(st['basins']) for st in stats)} (pretrained {stats[0]['basins_pretrained']}) |")
    wall = [walls[s] for s in seeds if walls.get(s) is not None]
    if wall:
        lines.append(f"training wall time per seed (one thread, {len(seeds)} seeds sharing the machine): "
                     + ", ".join(f"{w / 60:.1f} min" for w in wall))
    return "\n".join(lines)


def retention_table(seeds: list[int], retained: dict[int, dict]) -> str:
    """Per seed: bulk Si lattice constant against pretrained, worst |volume error| change of one crystal (pp),
    force RMSE change on the crystals' and the validation structures' DFT frames, retention items worse."""
    lines = ["| seed | Si lattice vs pretrained | worst crystal volume change | force RMSE crystals | "
             "force RMSE validation | items worse |", "|---|---|---|---|---|---|"]
    for s in seeds:
        r = retained[s]
        f = r["force_rmse_change"]
        lines.append(f"| {s} | {100 * r['si_lattice_vs_pretrained']:+.2f}% | {100 * r['worst_volume_change']:+.2f} pp | "
                     f"{100 * f.get('crystals', float('nan')):+.1f}% | {100 * f.get('validation', float('nan')):+.1f}% "
                     f"| {r['worse']}/{r['items']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for runs, evaluations and the summary")
    parser.add_argument("--label", default="default", help="name of this recipe's row (a subfolder of --out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a TrainConfig field (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (one thread each)")
    parser.add_argument("--also-last", action="store_true",
                        help="also evaluate last.pt (the final epoch's weights), to judge best.pt's selection")
    args = parser.parse_args()
    changes = parse_changes(args.changes)
    out = Path(args.out)
    (out / args.label).mkdir(parents=True, exist_ok=True)
    pretrained_path = out / "pretrained.json"
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        pre = None if pretrained_path.exists() else pool.submit(evaluate_views, "chgnet", pretrained_path)
        futures = {s: pool.submit(train_and_evaluate, changes, s, out / args.label / f"seed{s}", args.also_last)
                   for s in args.seeds}
        results = {s: f.result() for s, f in futures.items()}
        if pre is not None:
            pre.result()
    pretrained = json.loads(pretrained_path.read_text())
    per_seed, walls = {}, {}
    for s in args.seeds:
        per_seed[s] = {v: compare(results[s][v], pretrained[v]) for v in VIEWS}
        summary = json.loads((out / args.label / f"seed{s}" / "summary.json").read_text())
        walls[s] = summary.get("time_s")
    retained = {s: retention_summary(results[s]["retention"]) for s in args.seeds}
    text = table(args.label, args.seeds, per_seed, walls) + "\n" + retention_table(args.seeds, retained)
    per_seed_last = {}
    if args.also_last:
        per_seed_last = {s: {v: compare(results[s]["last"][v], pretrained[v]) for v in VIEWS} for s in args.seeds}
        text += "\n" + table(f"{args.label}, last.pt", args.seeds, per_seed_last, walls)
    print(text)
    _write_json({"label": args.label, "changes": changes, "seeds": args.seeds, "per_seed": per_seed,
                 **({"per_seed_last": per_seed_last} if args.also_last else {}), "retention": retained,
                 "train_time_s": walls, "wall_s": time.time() - t0, "table": text},
                out / args.label / "accuracy.json")


if __name__ == "__main__":
    main()
