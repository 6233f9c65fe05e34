"""Tables of docs/results.md ("Update, 2026-11-30 (21:50-00:15 UTC): a recipe that fits") from eval/ next to
this file: ``python tables.py [RUN ...]`` prints, for every structure set and start, Dq per structure, the mean,
the geometric mean of the ratio to pretrained (``PRE``) and how many structures got better."""
import json
import math
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parent / "eval"
SETS = {"hot": "unseen defect types (val + test, seeds 1-2)", "r2b": "new rattles (seed 2) of the training types",
        "ho2": "unseen types as of X4-X7 (sub_P included)", "r2": "new rattles as of X4-X7"}
STARTS = {"ini": "Dq from the initial structure", "rel": "offset of the model's own minimum (from DFT's)"}


def load(run: str, which: str, start: str) -> dict[str, float]:
    path = EVAL / f"{run}_{which}_{start}.json"
    if not path.exists():
        return {}
    return {r["name"]: r["dq"] for r in json.loads(path.read_text())["rows"]}


def main(runs: list[str]) -> None:
    for which, what in SETS.items():
        for start, how in STARTS.items():
            tab = {r: load(r, which, start) for r in ["PRE", *runs]}
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
                names = [n for n in base if n in v]
                means.append(f"{sum(v[n] for n in names) / len(names):.3f}")
                ratios.append(f"{math.exp(sum(math.log(v[n] / base[n]) for n in names) / len(names)):.3f}")
                better.append(f"{sum(v[n] < base[n] for n in names)}/{len(names)}")
            print("| **mean** | " + " | ".join(means) + " |")
            print("| geo-mean ratio to PRE | " + " | ".join(ratios) + " |")
            print("| better than PRE | " + " | ".join(better) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["X5", "X4", "X6", "M1", "M1L"])
