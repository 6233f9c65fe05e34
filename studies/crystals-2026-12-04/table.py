import json, os, statistics, sys
run = sys.argv[1] if len(sys.argv) > 1 else 'studies/crystals-2026-12-04'  # a folder of seed0..seed2
def load(p):
    d = json.load(open(p))
    rows = {r['name']: r for r in d['rows']}
    return d, rows
pre, prow = load('studies/crystals-2026-12-04/pretrained_test.json')
groups = sorted({n.rsplit('_', 1)[0] for n in prow})
def line(label, d, rows):
    g = {k: statistics.mean(abs(rows[n]['volume_error']) for n in rows if n.rsplit('_', 1)[0] == k) for k in groups}
    closer = sum(abs(rows[n]['volume_error']) < abs(prow[n]['volume_error']) for n in rows)
    print(f"| {label} | {100*d['volume_error_abs_mean']:.2f}% | " + " | ".join(f"{100*g[k]:.2f}%" for k in groups)
          + f" | {closer} of {len(rows)} | {d['dq_mean']:.4f} |")
print("| run | mean |V/V_DFT-1| | " + " | ".join(groups) + " | closer in volume | Dq |")
line('pretrained', pre, prow)
for s in (0, 1, 2):
    for ck in ('best', 'last'):
        p = f'{run}/seed{s}/test_{ck}.json'
        if os.path.exists(p):
            line(f'seed {s} {ck}.pt', *load(p))
for s in (0, 1, 2):
    p = f'{run}/seed{s}/summary.json'
    if os.path.exists(p):
        sm = json.load(open(p))
        print(s, 'best epoch', sm['best_epoch'], 'retention', sm['retention']['counts'], 'time', round(sm.get('time_s', 0)))
