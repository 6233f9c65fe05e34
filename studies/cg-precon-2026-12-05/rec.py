import numpy as np
exec(open("/tmp/precon/analyse.py").read().split("pre = np.load")[0])
a = np.load("/tmp/precon/hess_09.npy", allow_pickle=True).item(); b = np.load("/tmp/precon/hess_ft.npy", allow_pickle=True).item()
for name in a:
    if name not in b: continue
    H0 = 0.5*(a[name]["H"]+a[name]["H"].T); H1 = 0.5*(b[name]["H"]+b[name]["H"].T)
    pairs=[]; x0,_,_ = pcg(H0, a[name]["g"], pairs_out=pairs)
    print(name, "cold", pcg(H1, b[name]["g"])[1], "warm", pcg(H1, b[name]["g"], x0=x0)[1], "recycled", pcg(H1, b[name]["g"], lbfgs_inverse(pairs))[1], "both", pcg(H1, b[name]["g"], lbfgs_inverse(pairs), x0=x0)[1])
