import sys, numpy as np
from ase import Atoms
from ase.optimize.precon.precon import Exp

def proj(u):
    u = u.reshape(-1, 3); return (u - u.mean(0)).flatten()

def pcg(H, g, minv=None, tol=1e-2, lam=1e-3, x0=None, pairs_out=None, maxit=500):
    A = lambda u: proj(H @ u + lam * u)
    b = proj(g); M = (lambda r: proj(minv(r))) if minv else (lambda r: r)
    x = np.zeros_like(b) if x0 is None else proj(x0)
    r = b - A(x) if x0 is not None else b.copy()
    z = M(r); p = z.copy(); rz = r @ z; bn = np.linalg.norm(b)
    for it in range(1, maxit + 1):
        ap = A(p); pap = p @ ap
        if pap <= 0: return x, it, "neg"
        if pairs_out is not None: pairs_out.append((p.copy(), ap.copy()))
        a = rz / pap; x = x + a * p; r = r - a * ap
        if np.linalg.norm(r) <= tol * bn: return x, it, "ok"
        z = M(r); rz2 = r @ z; p = z + rz2 / rz * p; rz = rz2
    return x, maxit, "max"

def lbfgs_inverse(pairs, m=None):
    pairs = [(s, y) for s, y in pairs if s @ y > 0]
    if m: pairs = pairs[-m:]
    def apply(q):
        q = q.copy(); al = []
        for s, y in reversed(pairs):
            rho = 1 / (y @ s); a = rho * (s @ q); q -= a * y; al.append((a, rho, s, y))
        s, y = pairs[-1]; q *= (s @ y) / (y @ y)
        for a, rho, s, y in reversed(al):
            bta = rho * (y @ q); q += (a - bta) * s
        return q
    return apply

pre = np.load("/tmp/precon/hess.npy", allow_pickle=True).item()
ft = np.load("/tmp/precon/hess_ft.npy", allow_pickle=True).item() if len(sys.argv) > 1 else None
for name, d in pre.items():
    H = 0.5 * (d["H"] + d["H"].T); g = d["g"]
    ev = np.linalg.eigvalsh(H); 
    atoms = Atoms(numbers=d["numbers"], positions=d["pos"], cell=d["cell"], pbc=True)
    row = [name, f"eig {ev[3]:.3f}..{ev[-1]:.1f}"]
    row.append(f"none {pcg(H, g)[1]}")
    # block Jacobi (exact 3x3 blocks)
    n = len(g) // 3
    blocks = [np.linalg.inv(H[3*i:3*i+3, 3*i:3*i+3] + 1e-3 * np.eye(3)) for i in range(n)]
    bj = lambda r: np.concatenate([blocks[i] @ r[3*i:3*i+3] for i in range(n)])
    row.append(f"blockjacobi {pcg(H, g, bj)[1]}")
    for cst in (0.1, 1.0):
        pc = Exp(A=3.0, mu=1.0, c_stab=cst); pc.make_precon(atoms)
        P = pc.P.toarray()
        Pi = np.linalg.inv(P)
        row.append(f"exp(c={cst}) {pcg(H, g, lambda r: Pi @ r)[1]}")
    if ft is not None:
        Hf = 0.5 * (ft[name]["H"] + ft[name]["H"].T); gf = ft[name]["g"]
        pairs = []; xpre, it0, _ = pcg(H, g, pairs_out=pairs)
        row.append(f"| ft none {pcg(Hf, gf)[1]}, warm {pcg(Hf, gf, x0=xpre)[1]}")
        row.append(f"lbfgs-prev {pcg(Hf, gf, lbfgs_inverse(pairs))[1]}, +warm {pcg(Hf, gf, lbfgs_inverse(pairs), x0=xpre)[1]}")
        pairs_same = []; pcg(Hf, g, pairs_out=pairs_same)
        row.append(f"(sameH pairs {pcg(Hf, gf, lbfgs_inverse(pairs_same))[1]})")
    print("  ".join(row))
