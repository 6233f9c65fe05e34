import time, numpy as np, torch
torch.set_num_threads(1)
from relaxtune.data import load_pairs
from relaxtune.potentials import load_model
from relaxtune.potentials.base import energy_and_forces
from relaxtune.relax.loop import relax
from relaxtune.relax.config import RelaxConfig
from relaxtune.state import Batch
torch.manual_seed(0)
model = load_model("chgnet", dtype=torch.float64)
pairs = [p for p in load_pairs("builtin:si-defects-mini") if p.split == "train"][:4]
out = {}
for p in pairs:
    b = Batch.from_atoms([p.initial], dtype=torch.float64)
    with torch.no_grad():
        r = relax(model, b, RelaxConfig(optimizer="lbfgs", fmax=0.01))
    star = r.batch
    topo = model.prepare(star)
    x = star.positions.detach().clone().requires_grad_(True)
    ef = energy_and_forces(model, star.replace(positions=x), topo, create_graph=True)
    n = x.numel()
    t0 = time.time()
    H = np.zeros((n, n))
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64); e[i] = 1
        (h,) = torch.autograd.grad(ef.forces, x, grad_outputs=-e.view_as(x), retain_graph=True)
        H[i] = h.flatten().numpy()
    t = (time.time() - t0) / n
    xs = star.positions.detach().numpy(); xd = p.final.positions
    d = xs - xd
    cell = p.final.cell.array
    frac = d @ np.linalg.inv(cell); frac -= np.round(frac); d = frac @ cell
    m = p.final.get_masses()
    g = (m[:, None] * d).flatten()
    out[p.name] = dict(H=H, g=g, pos=xs, cell=cell, numbers=p.final.numbers)
    print(p.name, len(m), f"hvp {t*1e3:.1f} ms (float64)", flush=True)
np.save("/tmp/precon/hess.npy", out, allow_pickle=True)
