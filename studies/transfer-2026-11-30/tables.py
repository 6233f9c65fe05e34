"""Tables A-C of docs/results.md (2026-11-30 evening) from the evaluation JSONs in eval/ next to this file."""
import json, math, statistics as st
from pathlib import Path
EVAL = Path(__file__).resolve().parent / "eval"
def rows(label):
    try:
        return {r["name"]: r for r in json.loads((EVAL / f"{label}.json").read_text())["rows"]}
    except FileNotFoundError:
        return {}
def cell(r):
    return "–" if r is None or r["dq"] is None else f"{r['dq']:.3f}{'' if r['basin_match'] else '*'}"
def table(cols, suffix, names=None):
    data = [(lab, rows(key + suffix)) for lab, key in cols]
    names = names or sorted(data[0][1])
    out = ["| structure | " + " | ".join(l for l, _ in data) + " |", "|---" * (len(data) + 1) + "|"]
    for n in names:
        out.append(f"| {n} | " + " | ".join(cell(d.get(n)) for _, d in data) + " |")
    means = []
    for _, d in data:
        v = [d[n]["dq"] for n in names if n in d]
        means.append(f"{sum(v)/len(v):.3f}" if len(v) == len(names) else "–")
    out.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(out)
def summ(key, suffix, exclude=()):
    base, now = rows("pre" + suffix), rows(key + suffix)
    names = [n for n in now if n in base and n not in exclude]
    if not names:
        return float("nan"), float("nan"), float("nan"), 0, 0
    m, mb = st.mean(now[n]["dq"] for n in names), st.mean(base[n]["dq"] for n in names)
    g = math.exp(st.mean(math.log(now[n]["dq"] / base[n]["dq"]) for n in names))
    return m, mb, g, sum(now[n]["dq"] < base[n]["dq"] for n in names), len(names)
A = [("pretrained", "pre"), ("R6 best.pt", "R6best"), ("R6 last.pt", "R6last"), ("R6 seed 1 best", "R6s1best"),
     ("R6 seed 2 best", "R6s2best"), ("R6 seed 1 last", "R6s1last"), ("R6 seed 2 last", "R6s2last"), ("R3 forces best", "R3best"), ("R3 forces last", "R3last"),
     ("R1 best (12 train)", "R1best"), ("R1 last", "R1last"), ("R2 reference last", "R2last"), ("F1 last (+sub_P)", "F1last")]
print("TABLE_A"); print(table(A, "_ho"))
B = [("pretrained", "pre"), ("R6 best.pt", "R6best"), ("R6 last.pt", "R6last"), ("R6 seed 1 best", "R6s1best"),
     ("R6 seed 2 best", "R6s2best"), ("R6 seed 1 last", "R6s1last"), ("R6 seed 2 last", "R6s2last"), ("R3 forces best", "R3best"), ("R3 forces last", "R3last")]
print("TABLE_B"); print(table(B, "_seed2"))
print("TABLE_C")
print("| run | unseen types: mean Dq (pretrained) | geo-mean ratio | better | new rattles: mean Dq (pretrained) | geo-mean ratio | better |")
print("|---|---|---|---|---|---|---|")
for lab, key in A[1:]:
    m, mb, g, b, n = summ(key, "_ho", ("sub_P_1", "sub_P_2") if key.startswith("F1") else ())
    s2 = rows(key + "_seed2")
    if s2:
        m2, mb2, g2, b2, n2 = summ(key, "_seed2")
        tail = f"{m2:.3f} ({mb2:.3f}, {100*(m2/mb2-1):+.1f}%) | {g2:.3f} | {b2}/{n2}"
    else:
        tail = "– | – | –"
    print(f"| {lab} | {m:.3f} ({mb:.3f}, {100*(m/mb-1):+.1f}%) | {g:.3f} | {b}/{n} | {tail} |")
