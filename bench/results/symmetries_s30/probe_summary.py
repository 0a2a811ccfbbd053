import json, sys, numpy as np
rows=[json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
print(sys.argv[1], len(rows))
for fam in ('tpms','lattice','shell','all'):
    r=[x for x in rows if fam in x['id'] or fam=='all']
    print(f"{fam:8s} {len(r):3d}", "  ".join(f"{k} {100*np.mean([x[k] for x in r]):.3f}" for k in ('k1_t0','k8_t0','k1_t10','k2_t10','k4_t10','k8_t10','single_t10')))
