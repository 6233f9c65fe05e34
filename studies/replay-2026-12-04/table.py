import json, sys, statistics
for label in sys.argv[1:]:
    d = json.load(open(f'studies/replay-2026-12-04/{label}/accuracy.json'))
    print('##', label, d['changes'])
    tr, un = [], []
    for s in d['seeds']:
        ps = d['per_seed'][str(s)]
        t, u = ps['si-defects-heldout-trained'], ps['si-defects-heldout-unseen']
        tr.append(100 * t['change']); un.append(100 * u['change'])
        ret = json.load(open(f'studies/replay-2026-12-04/{label}/seed{s}/summary.json'))['retention']
        items = {it['item']: it for it in ret['items']}
        vol = {k.split()[1][:-1] if False else k.split()[1].rstrip(':'): it for k, it in items.items() if k.startswith('relax ')}
        worst = max(vol.items(), key=lambda kv: kv[1]['change_vs_pretrained'])
        lat = items['eos Si: lattice constant vs DFT']
        bm = items['eos Si: bulk modulus (GPa)']
        fr = {k: it['change_vs_pretrained'] for k, it in items.items() if k.startswith('frames') and 'force' in k}
        print(f"seed {s}: trained {100*t['change']:+.1f} (geo {t['geomean_ratio']:.2f}, basins {t['basins']}) unseen {100*u['change']:+.1f} (geo {u['geomean_ratio']:.2f}, basins {u['basins']}) "
              f"| Si lattice vs DFT {100*lat['pretrained']:+.2f} -> {100*lat['finetuned']:+.2f} (vs pre {100*lat['change_vs_pretrained']:+.2f}) B {100*bm['change_vs_pretrained']:+.0f}% "
              f"| worst vol {worst[0]} {100*worst[1]['change_vs_pretrained']:+.2f} | AlP {100*vol['AlP']['pretrained']:.2f}->{100*vol['AlP']['finetuned']:.2f} "
              f"| vols " + ' '.join(f"{g}:{100*it['pretrained']:.2f}->{100*it['finetuned']:.2f}" for g, it in vol.items()) +
              f" | forces {', '.join(f'{100*v:+.1f}' for v in fr.values())} | worse {ret['counts']['worse']}/{len(ret['items'])}")
    print(f"trained {statistics.mean(tr):+.1f} ± {statistics.stdev(tr):.1f}; unseen {statistics.mean(un):+.1f} ± {statistics.stdev(un):.1f}")
