"""Weight-space interpolation (WiSE-FT) of the default recipe's best.pt toward pretrained CHGNet:
theta = theta0 + alpha (theta_ft - theta0); held-out Dq views and the retention suite for each alpha."""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/tmp/wt/benchmarks")
import accuracy as acc
from relaxtune.potentials import load_model
from relaxtune.data import load_pairs

out = Path("/tmp/wise")
runs = {s: Path(f"/tmp/acc/frames2/seed{s}") for s in (0, 1, 2)} | {s: Path(f"/tmp/acc/frames2s345/seed{s}") for s in (3, 4, 5)}
alphas = [float(a) for a in sys.argv[1].split(",")]
seeds = [int(s) for s in sys.argv[2].split(",")]
base = {k: v.clone() for k, v in load_model("chgnet").state_dict().items()}
val = [p for p in load_pairs(acc.TRAIN) if p.split == "val"]
for alpha in alphas:
    for s in seeds:
        folder = out / f"a{alpha:g}" / f"seed{s}"
        folder.mkdir(parents=True, exist_ok=True)
        ck = torch.load(runs[s] / "best.pt", weights_only=True)
        sd = ck["state_dict"]
        missing = [k for k in sd if k not in base]
        assert not missing, missing[:5]
        ck["state_dict"] = type(sd)((k, (base[k] + alpha * (v - base[k])) if v.is_floating_point() else v) for k, v in sd.items())
        torch.save(ck, folder / "best.pt")
        t0 = time.time()
        acc.views_of(folder / "best.pt", folder / "heldout.json")
        rp = folder / "retention.json"
        if not rp.exists():
            acc._write_json(acc.check_retention(folder, val), rp)
        print(f"alpha {alpha} seed {s} done in {time.time()-t0:.0f} s", flush=True)
