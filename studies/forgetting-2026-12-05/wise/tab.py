import json, sys
from pathlib import Path
sys.path.insert(0, "/tmp/wt/benchmarks")
import accuracy as acc
pre = json.loads(Path("/tmp/acc/pretrained.json").read_text())
def row(folder):
    h = json.loads((folder / "heldout.json").read_text()); r = json.loads((folder / "retention.json").read_text())
    c = [acc.compare(h[v], pre[v])["change"] * 100 for v in acc.VIEWS]
    s = acc.retention_summary(r)
    worst = max((i for i in r["items"] if i["item"].startswith("relax ")), key=lambda i: i["change_vs_pretrained"] or -9)
    return f"{c[0]:+6.1f}% {c[1]:+6.1f}%  Si lat {100*s['si_lattice_vs_pretrained']:+.2f}%  worst {100*s['worst_volume_change']:+.2f}pp ({worst['item'][:22]})  worse {s['worse']}/{s['items']}"
runs = {s: Path(f"/tmp/acc/frames2/seed{s}") for s in (0, 1, 2)} | {s: Path(f"/tmp/acc/frames2s345/seed{s}") for s in (3, 4, 5)}
for s, f in runs.items():
    print(f"seed {s} a=1.0  ", row(f))
    for a in sys.argv[1:]:
        g = Path(f"/tmp/wise/a{a}/seed{s}")
        if (g / "retention.json").exists():
            print(f"seed {s} a={a}  ", row(g))
