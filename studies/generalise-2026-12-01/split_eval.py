"""Split one `relaxtune evaluate --json` file over the held-out sets of the generalisation study
(hot, r2b, new, h3 as pretrained CHGNet's files hold them; x = every other structure) and write
eval/RUN_SET_ini.json for each: ``python split_eval.py EVAL.json RUN [OUT_DIR]``."""
import json, sys
from pathlib import Path
from relaxtune.evaluate import summarize
EVAL = Path(__file__).resolve().parent / "eval"
# the sets as pretrained CHGNet's evaluation files hold them (tables.py reads the same files)
SETS = {name: [r["name"] for r in json.loads((EVAL / f"PRE_{name}_ini.json").read_text())["rows"]]
        for name in ("hot", "r2b", "new", "h3")}
src, run = Path(sys.argv[1]), sys.argv[2]
out = Path(sys.argv[3]) if len(sys.argv) > 3 else EVAL
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
