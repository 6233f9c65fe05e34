"""Tables of docs/results.md, "Update, 2026-12-02 (07:00-10:00 UTC)": the robustness, baseline-seed and
data-efficiency cells of issue 5 with the default recipe. ``python tables.py`` prints them from
``eval/RUN.json`` next to this file (``relaxtune evaluate`` over the 30 held-out Si-defect structures, Dq from
the initial structures) and, for runs of earlier sessions, from ``../generalise-2026-12-01/eval``. Every row
compares a run with pretrained CHGNet (``PRE``) on the same structures: mean Dq (change), geometric mean of
the per-structure ratio, structures better, structures in DFT's basin (max displacement < 0.1 Å)."""
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EARLIER = HERE.parent / "generalise-2026-12-01"
EARLIER_SETS = ("hot", "r2b", "new", "h3", "x")
#: an evaluation named differently from its run folder (D2sfL is D2sf's last.pt)
RUN_FOLDER = {"D2sfL": "D2sf", **{f"{r}_{c}": r for r in ("SE4225", "SE4225s1", "SEt03", "SEt01", "S7def")
                                   for c in ("best", "last")}}
#: the pretrained model each run is compared with, where it is not CHGNet (PRE)
PRETRAINED = {"S7def_best": "SPRE", "S7def_last": "SPRE"}
UNSEEN_TYPES = ("int_H", "As_V", "sub_As", "sub_Ge", "int_P", "sub_Ga", "sub_Sb")
TEST_TYPES = UNSEEN_TYPES[2:]


def kind(name: str) -> str:
    return name.rsplit("_", 1)[0]


def evaluation(run: str, earlier: bool | None = None) -> dict[str, dict]:
    """Per-structure rows of a run's evaluation, by structure name ({} when there is none): this session's
    file, else (or with ``earlier=True``) the earlier study's files."""
    path = HERE / "eval" / f"{run}.json"
    if earlier is None:
        earlier = not path.exists()
    files = [EARLIER / "eval" / f"{run}_{s}_ini.json" for s in EARLIER_SETS] if earlier else [path]
    return {r["name"]: r for f in files if f.exists() for r in json.loads(f.read_text())["rows"]}


def split_cap(run: str) -> tuple[str, str]:
    """``RUN_sK`` (an evaluation with every relaxation capped at K steps) -> (``RUN``, ``"_sK"``); else (run, "")."""
    head, sep, cap = run.rpartition("_s")
    return (head, sep + cap) if sep else (run, "")


def baseline(run: str) -> dict[str, dict]:
    """Pretrained CHGNet from the same evaluation as ``run`` (capped the same way for ``RUN_sK``): FIRE in batches
    of 4 follows slightly different paths for different batch-mates (float32), and int_P_2 ends 0.24 apart
    (6.41 / 6.65) between them."""
    if run in PRETRAINED:
        return evaluation(PRETRAINED[run])
    cap = split_cap(run)[1]
    if cap:
        return evaluation("PRE" + cap)
    return evaluation("PRE", earlier=not (HERE / "eval" / f"{run}.json").exists())


def summary(run: str) -> dict:
    folder = RUN_FOLDER.get(run, split_cap(run)[0])
    for base in (HERE, EARLIER):
        if (base / folder / "summary.json").exists():
            return json.loads((base / folder / "summary.json").read_text())
    return {}


def dq_stats(run: dict[str, dict], base: dict[str, dict], names: list[str]) -> tuple[float, float, float]:
    """(mean Dq of ``run``, mean Dq of ``base``, geometric mean of the per-structure ratio) over ``names``."""
    mean = sum(run[n]["dq"] for n in names) / len(names)
    ref = sum(base[n]["dq"] for n in names) / len(names)
    geo = math.exp(sum(math.log(run[n]["dq"] / base[n]["dq"]) for n in names) / len(names))
    return mean, ref, geo


def compare(run: dict[str, dict], base: dict[str, dict], names: list[str]) -> str:
    if not names:
        return "–"
    mean, ref, geo = dq_stats(run, base, names)
    better = sum(run[n]["dq"] < base[n]["dq"] for n in names)
    basins = sum(run[n]["max_disp"] < 0.1 for n in names)
    return (f"{mean:.3f} ({100 * (mean / ref - 1):+.1f}%), geo {geo:.3f}, {better}/{len(names)} better, "
            f"{basins}/{len(names)} basins")


def table(title: str, runs: list[str], own_types: bool = True) -> None:
    """One row per run: its own types' new structures (every one it was evaluated on), the unseen types and the
    test types alone (those every listed run, and PRE, was evaluated on, so that the rows are comparable)."""
    evals = {r: evaluation(r) for r in runs}
    evals = {r: v for r, v in evals.items() if v}
    common = set(evaluation("PRE")).intersection(*evals.values()) if evals else set()
    print(f"\n### {title}\n")
    head = ["run", "trained on"]
    head += ["new structures of its training types"] if own_types else []
    head += ["unseen types", "test types only"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for run, rows in evals.items():
        base = baseline(run)
        trained = summary(run).get("train_names", [])
        own = sorted(n for n in set(rows) & set(base) if kind(n) in {kind(t) for t in trained} and n not in trained)
        unseen = sorted(n for n in common if kind(n) in UNSEEN_TYPES)
        test = [n for n in unseen if kind(n) in TEST_TYPES]
        cells = [run, f"{len(trained)} structures" if trained else "?"]
        cells += [compare(rows, base, own)] if own_types else []
        cells += [compare(rows, base, unseen), compare(rows, base, test)]
        print("| " + " | ".join(cells) + " |")


def common_heldout(title: str, runs: list[str], names: list[str], full: str = "FULL") -> None:
    """Every run on the same structures, held out by all of them: mean Dq (change against pretrained from the
    run's own evaluation), geometric mean of the ratio, and the share of ``full``'s gain in mean Dq it keeps."""
    print(f"\n### {title}\n")
    print("| run | trained on | " + " | ".join(names) + " | mean (change) | geo | share of " + full + "'s gain |")
    print("|---" * (len(names) + 5) + "|")
    gains = {}
    for run in [full] + [r for r in runs if r != full]:
        rows, base = evaluation(run), baseline(run)
        if not all(n in rows for n in names):
            continue
        mean, ref, geo = dq_stats(rows, base, names)
        gains[run] = ref - mean
        cells = [run, f"{len(summary(run).get('train_names', []))} structures"]
        cells += [f"{rows[n]['dq']:.3f}" for n in names]
        cells += [f"{mean:.3f} ({100 * (mean / ref - 1):+.1f}%)", f"{geo:.3f}"]
        cells += [f"{100 * gains[run] / gains[full]:.0f}%" if gains[full] > 0 else "– (no gain)"]
        print("| " + " | ".join(cells) + " |")


def seeds(groups: dict[str, list[str]], reference: str = "SF") -> None:
    """Mean ± standard deviation over seeds of the change in mean Dq against pretrained, on the structures
    ``reference`` was evaluated on: the new structures of its training types, and the unseen types."""
    rows = evaluation(reference)
    trained = set(summary(reference).get("train_names", []))
    sets = {"new structures of the training types": sorted(n for n in rows if kind(n) not in UNSEEN_TYPES
                                                           and n not in trained),
            "unseen types": sorted(n for n in rows if kind(n) in UNSEEN_TYPES)}
    print("\n### Seeds: change in mean Dq against pretrained, mean ± standard deviation over seeds\n")
    print("| recipe | seeds | " + " | ".join(f"{k} ({len(v)})" for k, v in sets.items()) + " |\n|---|---|---|---|")
    for recipe, runs in groups.items():
        cells = []
        for names in sets.values():
            changes = []
            for run in runs:
                mean, ref, _ = dq_stats(evaluation(run), baseline(run), names)
                changes.append(100 * (mean / ref - 1))
            spread = f" ± {statistics.stdev(changes):.1f}%" if len(changes) > 1 else "% (one seed)"
            cells.append(f"{statistics.mean(changes):+.1f}{spread} ({', '.join(f'{c:+.1f}' for c in changes)})")
        print(f"| {recipe} | {', '.join(runs)} | " + " | ".join(cells) + " |")


def movement(runs: list[str]) -> None:
    print("\n### Who moved (relative change ||θ−θ₀||/||θ₀|| per parameter group)\n")
    print("| run | model weights | relaxation step | best epoch | epochs | wall s |\n|---|---|---|---|---|---|")
    for run in runs:
        s = summary(run)
        if not s:
            continue
        mv = s.get("parameter_movement", {})
        step = mv.get("relax", mv.get("step", {}))
        step_txt = f"{step['relative']:.3g}" if isinstance(step, dict) and "relative" in step else "–"
        print(f"| {run} | {mv.get('model', {}).get('relative', float('nan')):.3g} | {step_txt} | "
              f"{s.get('best_epoch')} | {s.get('epochs_run')} | {s.get('time_s')} |")


def main(argv: list[str]) -> None:
    table("Robustness: step size, unroll length, gradient mode, learnable step (the default recipe on vacancy_1 "
          "and sub_B_1, 20 epochs, last.pt)", ["D2sfL", "D2e05", "D2e2", "D2k10", "D2k25", "D2ck", "D2ckL", "D2hy"])
    table("The reference method: training relaxations from the initial structure through every step (`--start "
          "initial --grad checkpoint`), unroll k = 10 / 25 / 50 / 150 with FIRE, and k = 50 with gradient descent (the "
          "paper's relaxation) with and without a learnable step, against D2ck (the same from the DFT structure)",
          ["D2ck", "R2k10", "R2k25", "R2k50", "R2k150", "R2gd50", "R2gd50L"])
    table("The reference method's own protocol: every held-out relaxation capped at the training unroll k "
          "(`relaxtune evaluate --max-steps k`), against pretrained CHGNet capped the same way",
          ["R2k10_s10", "R2k25_s25", "R2k50_s50", "R2gd50_s50gd", "R2gd50L_s50gd"])
    table("Conventional force/energy fine-tuning, 3 seeds (10 structures of si-defects-mini, same optimizer and "
          "budget; best.pt)", ["SF", "SFs1", "SFs2", "F2", "F2s1", "F2s2"])
    seeds({"default (structure+forces)": ["SF", "SFs1", "SFs2"], "forces (conventional)": ["F2", "F2s1", "F2s2"]})
    table("Data efficiency with the default recipe", ["D2sfL", "D5sf", "SF", "SFs1", "SFs2", "D20", "FULL"])
    common_heldout("Data efficiency on the rattles no run trained on (the seed-3 structures that every evaluation has)",
                   ["D2sfL", "D5sf", "SF", "SFs1", "SFs2", "D20", "FULL", "F2", "F2s1", "F2s2"],
                   ["vacancy_3", "sub_B_3", "sub_P_3"])
    common_heldout("The same with the two seed-3 rattles that arrived later (runs evaluated this session or the last)",
                   ["D2sfL", "D5sf", "D20", "FULL", "F2s1", "F2s2"],
                   ["vacancy_3", "sub_B_3", "sub_P_3", "int_T_3", "sub_Al_3"])
    table("Relative energies in total eV (`--energy-scale total`, energy weight 1 per eV²) against per atom (the "
          "default recipe's SF seeds), 10 structures of si-defects-mini", ["SF", "SFs1", "SFs2", "SE4225_best",
          "SE4225_last", "SE4225s1_best", "SE4225s1_last"])
    seeds({"default (per-atom energies)": ["SF", "SFs1", "SFs2"], "total eV, best.pt": ["SE4225_best", "SE4225s1_best"],
           "total eV, last.pt": ["SE4225_last", "SE4225s1_last"]})
    table("Relative energies in total eV on two training structures (vacancy_1, sub_B_1; no interstitial): "
          "`--energy-scale total --energy-weight 1` (D2te1) and `0.1` (D2te01) against the default (D2sfL), last.pt",
          ["D2sfL", "D2te1", "D2te01"])
    common_heldout("Relative energies in total eV on the seed-3 rattles and the T-site interstitials",
                   ["D20", "FULL", "F2s2", "SE4225_best", "SE4225_last", "SE4225s1_best", "SE4225s1_last"],
                   ["vacancy_3", "sub_B_3", "sub_P_3", "int_T_2", "int_T_3", "sub_Al_3"])
    table("Relative energies in total eV at weights 0.3 (SEt03) and 0.1 (SEt01, the default since 2026-12-03), "
          "si-defects-mini, seed 0", ["SF", "SFs1", "SFs2", "SEt03_best", "SEt03_last", "SEt01_best", "SEt01_last"])
    seeds({"per atom, weight 1 (SF seeds)": ["SF", "SFs1", "SFs2"], "total eV, weight 1": ["SE4225_best", "SE4225s1_best"],
           "total eV, weight 0.3": ["SEt03_best"], "total eV, weight 0.1": ["SEt01_best"]})
    table("SevenNet-0 with the structure+forces recipe (per-atom energies, 2 epochs, best.pt), against pretrained "
          "SevenNet-0 (SPRE)", ["S7def_best"])
    movement(["SEt03", "SEt01", "S7def", "SE4225", "SE4225s1", "SF", "F2s1", "F2s2", "D2sfL", "D2e05", "D2e2", "D2k10", "D2k25", "D2ck", "D2ckL", "D2hy", "R2k10",
              "R2k25", "R2k50", "R2k150", "R2gd50", "R2gd50L", "D5sf", "D20", "FULL"])


if __name__ == "__main__":
    main(sys.argv[1:])
