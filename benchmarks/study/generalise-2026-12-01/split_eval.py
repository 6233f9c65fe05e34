"""Split one `relaxtune evaluate --json` file over the held-out sets of the generalisation study
(hot, r2b, new, h3 as before; x = every other structure) and write eval/RUN_SET_ini.json for each."""
import json, sys
from pathlib import Path
from relaxtune.evaluate import summarize
SETS = {
    "hot": ["As_V_1", "int_H_1", "int_H_2", "int_P_1", "int_P_2", "sub_As_1", "sub_As_2", "sub_Ga_1", "sub_Ge_1",
            "sub_Ge_2", "sub_Sb_1"],
    "r2b": ["P_V_2", "int_B_2", "int_T_2", "int_split110_2", "sub_Al_2", "sub_B_2", "sub_C_2", "sub_N_2", "sub_P_2",
            "vacancy_2"],
    "new": ["sub_B_3", "sub_P_3", "sub_Sb_2", "vacancy_3"],
    "h3": ["int_H_3"],
}
src, run = Path(sys.argv[1]), sys.argv[2]
out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parent / "eval"
d = json.loads(src.read_text())
listed = {n for v in SETS.values() for n in v}
sets = {**SETS, "x": sorted(r["name"] for r in d["rows"] if r["name"] not in listed)}
meta = {k: d[k] for k in ("fmax", "optimizer", "max_steps", "start", "model") if k in d}
for name, members in sets.items():
    rows = [r for r in d["rows"] if r["name"] in members]
    if not rows:
        continue
    rec = {**summarize(rows), **meta, "data": f"{d.get('data')} ({name} subset)", "split": None, "rows": rows}
    (out / f"{run}_{name}_ini.json").write_text(json.dumps(rec, indent=1))
    print(run, name, len(rows), round(rec["dq_mean"], 3))
