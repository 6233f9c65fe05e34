"""Per-structure Dq tables from a study folder's ``eval/RUN_SET_START.json`` files (``relaxtune evaluate``
output): for every structure set and start, Dq per structure, the mean, the geometric mean of the ratio to the
pretrained model (run ``PRE``) and how many structures got better. Used by each study's ``tables.py``."""
import json
import math
from pathlib import Path

STARTS = {"ini": "Dq from the initial structure", "rel": "offset of the model's own minimum (from DFT's)"}


def load(eval_dir: Path, run: str, which: str, start: str) -> dict[str, float]:
    path = eval_dir / f"{run}_{which}_{start}.json"
    if not path.exists():
        return {}
    return {r["name"]: r["dq"] for r in json.loads(path.read_text())["rows"]}


def compare(run: dict[str, float], base: dict[str, float], names: list[str]) -> tuple[float, float, int, int]:
    """Over ``names`` present in ``run``: mean Dq, geometric mean of the ratio to ``base``, how many are lower
    than ``base``, and how many there are."""
    names = [n for n in names if n in run]
    mean = sum(run[n] for n in names) / len(names)
    geo = math.exp(sum(math.log(run[n] / base[n]) for n in names) / len(names))
    return mean, geo, sum(run[n] < base[n] for n in names), len(names)


def print_tables(eval_dir: Path, sets: dict[str, str], runs: list[str]) -> None:
    for which, what in sets.items():
        for start, how in STARTS.items():
            tab = {r: load(eval_dir, r, which, start) for r in ["PRE", *runs]}
            tab = {r: v for r, v in tab.items() if v}
            if len(tab) < 2 or "PRE" not in tab:
                continue
            base = tab["PRE"]
            print(f"\n### {what}: {how}\n")
            print("| structure | " + " | ".join(tab) + " |")
            print("|---" * (len(tab) + 1) + "|")
            for name in sorted(base):
                print(f"| {name} | " + " | ".join(f"{v[name]:.3f}" if name in v else "–" for v in tab.values()) + " |")
            means, ratios, better = [], [], []
            for v in tab.values():
                mean, geo, n_better, n = compare(v, base, list(base))
                means.append(f"{mean:.3f}")
                ratios.append(f"{geo:.3f}")
                better.append(f"{n_better}/{n}")
            print("| **mean** | " + " | ".join(means) + " |")
            print("| geo-mean ratio to PRE | " + " | ".join(ratios) + " |")
            print("| better than PRE | " + " | ".join(better) + " |")
