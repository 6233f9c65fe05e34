import numpy as np
exec(open("/tmp/precon/analyse.py").read().split("pre = np.load")[0])
pre = np.load("/tmp/precon/hess_ft.npy", allow_pickle=True).item()
for name, d in pre.items():
    H = 0.5 * (d["H"] + d["H"].T); g = proj(d["g"])
    lam = pcg(H, g, tol=1e-8)[0]
    cos = lambda a: a @ lam / np.linalg.norm(a) / np.linalg.norm(lam)
    rel = lambda a: np.linalg.norm(a - lam) / np.linalg.norm(lam)
    row = [name, f"JFB cos {cos(g):.3f}"]
    for k in (2, 4, 6, 8):
        x = pcg(H, g, tol=1e-12, maxit=k)[0]
        row.append(f"CG{k} cos {cos(x):.3f} relerr {rel(x):.2f}")
    for tol in (1e-1, 3e-2, 1e-2):
        x, it, _ = pcg(H, g, tol=tol)
        row.append(f"tol{tol:g}: {it} it relerr {rel(x):.3f}")
    print("  ".join(row))
