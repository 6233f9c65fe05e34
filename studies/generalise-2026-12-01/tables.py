"""Tables of docs/results.md ("Update, 2026-12-01: what generalises to unseen defect types") from eval/ next to
this file: ``python tables.py [RUN ...]`` prints Dq per structure, the mean, the geometric mean of the ratio to
pretrained CHGNet (``PRE``) and how many structures got better, for each structure set; ``--groups`` prints
the summary table (per-set means and geo-mean ratios) and the data-efficiency table; ``--procedures`` the
same summary with the models relaxed by gradient descent (``eval/RUN_SET_gd.json``) instead of FIRE;
``--crystals`` the crystal tables: zero-shot volume errors (``eval/RUN_cr_ini.json``) and the crystal split
(``eval/crystals/RUN_WHICH.json``, ``relaxtune evaluate builtin:crystals:test``, cell free), and the same split
at 87 crystals (``eval/crystals87/``: per test group, with how many test crystals each run relaxes closer in
volume than pretrained CHGNet)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaltables import compare, load, print_tables  # noqa: E402

EVAL = Path(__file__).resolve().parent / "eval"
SETS = {"hot": "unseen defect types (val + test, seeds 1-2)", "r2b": "new rattles (seed 2) of the training types",
        "new": "structures that arrived after M1 (vacancy_3, sub_B_3, sub_P_3: training types; sub_Sb_2: test)"}
RUNS = ["M1", "M1s1", "M1s2", "F2", "SF", "SFs1", "SFs2", "SFst0", "SFst1", "RGD", "RHY", "E2", "C1", "C2", "W0.5",
        "SOUP", "D5n", "D2n", "SFx", "D2sfL", "FULL"]
ZERO_SHOT = ["PRE", "SF", "SFs1", "SFs2", "SFst0", "SFst1", "M1", "F2"]
CRYSTAL_RUNS = ["PRE", "CR_best", "CR_last", "CRs1_best", "CRs1_last", "CRs2_best", "CRs2_last", "CRF_best", "CRF_last",
                "CRFs1_best", "CRFs1_last", "CRFs2_best", "CRFs2_last", "CRsw_best", "CRsw_last", "CRlr_best", "CRlr_last"]
TEST = ("sub_As", "sub_Ge", "int_P", "sub_Ga", "sub_Sb")
D2_TYPES = ("vacancy", "sub_B")
D5_TYPES = ("vacancy", "sub_B", "int_T", "int_split110", "sub_Al")


def rows(run: str, start: str = "ini") -> dict[str, float]:
    out: dict[str, float] = {}
    for which in SETS:
        out.update(load(EVAL, run, which, start))
    return out


def group(names: list[str], run: dict[str, float], base: dict[str, float]) -> str:
    names = [n for n in names if n in run]
    if not names:
        return "–"
    mean, geo, better, n = compare(run, base, names)
    ref = compare(base, base, names)[0]
    return f"{mean:.3f} ({100 * (mean / ref - 1):+.1f}%), geo {geo:.3f}, {better}/{n}"


def groups(runs: list[str], start: str = "ini", efficiency: bool = True) -> None:
    base = rows("PRE", start)
    kind = lambda n: n.rsplit("_", 1)[0]  # noqa: E731
    seen = [n for n in base if kind(n) not in ("int_H", "As_V") + TEST]
    unseen = [n for n in base if n not in seen]
    test = [n for n in unseen if kind(n) in TEST]
    print("| run | new structures of training types (" + str(len(seen)) + ") | unseen types (" + str(len(unseen))
          + ") | test types only (" + str(len(test)) + ") |")
    print("|---|---|---|---|")
    for r in runs:
        v = rows(r, start)
        if v:
            print(f"| {r} | {group(seen, v, base)} | {group(unseen, v, base)} | {group(test, v, base)} |")
    if not efficiency:
        return
    print("\n| run | trained types | their new structures: mean Dq (change), geo-mean ratio | same structures, M1 |")
    print("|---|---|---|---|")
    m1 = rows("M1")
    for r, types in (("D2n", D2_TYPES), ("D5n", D5_TYPES)):
        names = [n for n in seen if kind(n) in types]
        print(f"| {r} | {', '.join(types)} | {group(names, rows(r), base)} | {group(names, m1, base)} |")
    names = [n for n in seen if kind(n) in D2_TYPES]
    print("\n| run (default recipe) | training structures | vacancy and sub_B new structures (4) | unseen types |")
    print("|---|---|---|---|")
    for r, n_train in (("D2sfL", 2), ("SF", 10), ("SFs1", 10), ("SFs2", 10), ("FULL", 23)):
        v = rows(r)
        if v:
            print(f"| {r} | {n_train} | {group(names, v, base)} | {group(unseen, v, base)} |")


def rows_by_name(path: Path) -> dict[str, dict]:
    """The per-structure rows of one ``relaxtune evaluate --json`` file, by structure name."""
    return {x["name"]: x for x in json.loads(path.read_text())["rows"]}


def crystals() -> None:
    """Volume error per crystal (cell free), zero-shot and on the crystal split's test crystals."""
    for title, paths in (("zero-shot (models fine-tuned on Si defects)", {r: EVAL / f"{r}_cr_ini.json" for r in ZERO_SHOT}),
                         ("crystal split, test crystals", {r: EVAL / "crystals" / f"{r}.json" for r in CRYSTAL_RUNS})):
        tab = {r: rows_by_name(p) for r, p in paths.items() if p.exists()}
        if not tab:
            continue
        names = sorted(next(iter(tab.values())))
        print(f"\n### {title}: V_model / V_DFT - 1, then mean |dV/V| and mean Dq (fractional, DFT cell)\n")
        print("| run | " + " | ".join(names) + " | mean abs. | mean Dq |")
        print("|---" * (len(names) + 3) + "|")
        for r, rows in tab.items():
            vol = [rows[n]["volume_error"] for n in names]
            dq = sum(rows[n]["dq"] for n in names) / len(names)
            print(f"| {r} | " + " | ".join(f"{100 * v:+.2f}%" for v in vol)
                  + f" | {100 * sum(map(abs, vol)) / len(vol):.2f}% | {dq:.3f} |")


SPLIT87_RUNS = ["PRE"] + [f"{r}_{w}" for r in ("CR87", "CR87s1", "CR87s2", "CRF87") for w in ("best", "last")]


def crystal_split87() -> None:
    """The crystal split at 87 crystals (50 train, 13 val, 24 test): volume error and Dq per test group."""
    tab = {r: rows_by_name(p) for r in SPLIT87_RUNS if (p := EVAL / "crystals87" / f"{r}.json").exists()}
    if "PRE" not in tab:
        return
    base = tab["PRE"]
    groups_ = sorted({x["group"] for x in base.values()})
    print("\n### crystal split at 87 crystals, 24 test crystals: mean |V_model / V_DFT - 1| per test group, "
          "overall, crystals closer in volume than PRE, mean Dq (fractional, DFT cell)\n")
    print("| run | " + " | ".join(f"{g} ({sum(x['group'] == g for x in base.values())})" for g in groups_)
          + " | mean abs. | closer than PRE | mean Dq |")
    print("|---" * (len(groups_) + 4) + "|")
    for r, rows in tab.items():
        per = [[abs(x["volume_error"]) for x in rows.values() if x["group"] == g] for g in groups_]
        vol = [abs(x["volume_error"]) for x in rows.values()]
        closer = sum(abs(rows[n]["volume_error"]) < abs(base[n]["volume_error"]) for n in rows)
        dq = sum(x["dq"] for x in rows.values()) / len(rows)
        print(f"| {r} | " + " | ".join(f"{100 * sum(v) / len(v):.2f}%" for v in per)
              + f" | {100 * sum(vol) / len(vol):.2f}% | {closer}/{len(rows)} | {dq:.4f} |")


if __name__ == "__main__":
    named = [r for r in sys.argv[1:] if not r.startswith("--")]
    if "--crystals" in sys.argv:
        crystals()
        crystal_split87()
    elif "--groups" in sys.argv:
        groups(named or RUNS)
    elif "--procedures" in sys.argv:
        for start, how in (("ini", "FIRE (the default)"), ("gd", "gradient descent")):
            print(f"\nrelaxed with {how}, fmax 0.02, against pretrained CHGNet relaxed the same way\n")
            groups(named or ["SF", "SFs1"], start, efficiency=False)
    else:
        print_tables(EVAL, {**SETS, "h3": "int_H_3 (unseen type, arrived after the runs)"}, named or RUNS)
