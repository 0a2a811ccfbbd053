"""Test-time symmetry averaging probe: average the network's t=0 start over cube
symmetries / periodic shifts of the cell (each mapped back), then t embedded PCG steps.
  python out/s30/tta.py MODEL REPORT.json K [NMAX] [--check]
"""
import itertools, json, sys, time
import numpy as np, torch
sys.path.insert(0, '/work/main')
from hpc.evaluate import open_dataset, field_metrics
from model.network import embedded_steps
from model.train import load_model, cell_operator
from model.embedded_pcg import embedded_pcg
from microstructures.cell import Cell

torch.set_num_threads(2)
VOIGT = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


def transforms(K, n, seed=0):
    """K transforms (perm, flips, shift); the identity first; --noshift: shift 0,
    distinct (perm, flips) pairs; --shiftonly: identity perm/flips."""
    rng = np.random.default_rng(seed)
    if '--noshift' in sys.argv:
        allg = [(p, fl, (0, 0, 0)) for p in itertools.permutations(range(3))
                for fl in itertools.product([False, True], repeat=3)][1:]
        idx = rng.permutation(len(allg))[:K - 1]
        return [((0, 1, 2), (False, False, False), (0, 0, 0))] + [allg[i] for i in idx]
    out = [((0, 1, 2), (False, False, False), (0, 0, 0))]
    perms = list(itertools.permutations(range(3)))
    while len(out) < K:
        p = perms[rng.integers(6)] if '--shiftonly' not in sys.argv else (0, 1, 2)
        fl = tuple(bool(b) for b in rng.integers(0, 2, 3)) if '--shiftonly' not in sys.argv else (False,) * 3
        sh = tuple(int(s) for s in rng.integers(0, n, 3))
        out.append((p, fl, sh))
    return out


def R_of(perm, flips):
    """new axis i = old axis perm[i], sign -1 where flipped: y_i = s_i x_perm[i]."""
    R = np.zeros((3, 3))
    for i in range(3):
        R[i, perm[i]] = -1.0 if flips[i] else 1.0
    return R


def voxel_fwd(a, perm, flips, shift):
    """phases P'(y) = P(R^T y): a (n,n,n) voxel array -> transformed."""
    b = np.transpose(a, perm)
    for i in range(3):
        if flips[i]:
            b = np.flip(b, i)
    return np.roll(b, shift, axis=(0, 1, 2)).copy()


def node_bwd(u, perm, flips, shift):
    """node field u' (..., n,n,n) on the transformed grid -> pulled back: f(x) = f'(Rx)."""
    d = u.dim() - 3
    v = torch.roll(u, tuple(-s for s in shift), dims=tuple(range(d, d + 3)))
    for i in range(3):
        if flips[i]:   # node j -> (-j) mod n
            v = torch.roll(torch.flip(v, (d + i,)), 1, d + i)
    inv = np.argsort(perm)
    return v.permute(*range(d), *(d + int(k) for k in inv))


def case_map(R):
    """for each case k: (pi(k), sign) with R E_k R^T = sign E_pi(k)."""
    out = []
    for (i, j) in VOIGT:
        E = np.zeros((3, 3)); E[i, j] = E[j, i] = 1
        E2 = R @ E @ R.T
        for m, (a, b) in enumerate(VOIGT):
            if abs(E2[a, b]) > 0.5:
                out.append((m, float(np.sign(E2[a, b])))); break
    return out


def map_back(up, perm, flips, shift):
    """network/solver field u' (6,3,...) of the transformed cell -> field of the original."""
    R = torch.tensor(R_of(perm, flips), dtype=up.dtype)
    cm = case_map(R_of(perm, flips))
    res = []
    for k in range(6):
        m, s = cm[k]
        f = node_bwd(up[m], perm, flips, shift)          # (3, n,n,n), components in y frame
        f = torch.einsum('ji,j...->i...', R, f)          # R^T f
        res.append(s * f)
    return torch.stack(res)


def main():
    model, report, K = sys.argv[1], sys.argv[2], int(sys.argv[3])
    nmax = int(sys.argv[4]) if len(sys.argv) > 4 and not sys.argv[4].startswith('-') else 10**9
    check = '--check' in sys.argv
    rep = json.load(open(report))
    ds, _ = open_dataset('data/heldout32')
    net = load_model(model)
    rows = [c for c in rep['cells']][:nmax]
    ks = sorted(set([1, 2, 4, K]))
    acc = {k: [] for k in ks}
    for c in rows:
        cell = ds.cell(c['row'])
        C_ref = np.asarray(c['C_ref'])
        n = cell.phases.shape[0]
        op = cell_operator(cell, torch.float64)
        f = op.rhs()
        T = transforms(K, n, seed=c['row'])
        us = []
        t0 = time.perf_counter()
        for (p, fl, sh) in T:
            cell2 = Cell(voxel_fwd(cell.phases, p, fl, sh), cell.E, cell.nu)
            op2 = cell_operator(cell2, torch.float64)
            if check:
                from solver.pcg import pcg
                from solver.homogenize import _default_preconditioner
                x2, _ = pcg(op2, op2.rhs(), precond=_default_preconditioner(op2, 'multigrid'), rtol=1e-10)
                x1, _ = pcg(op, f, precond=_default_preconditioner(op, 'multigrid'), rtol=1e-10)
                xb = map_back(x2, p, fl, sh)
                print('check', p, fl, sh, 'field rel', float((xb - x1).norm() / x1.norm()),
                      'C rel', float((op.chom(xb) - op.chom(x1)).norm() / op.chom(x1).norm()), flush=True)
                continue
            with torch.no_grad(), embedded_steps(net, 0):
                u2 = net([op2]).u_net[0].detach().to(torch.float64)
            us.append(map_back(u2, p, fl, sh))
        if check:
            continue
        rec = {'id': c['id']}
        with torch.no_grad():
            for k in ks:
                u0 = torch.stack(us[:k]).mean(0)
                u10 = embedded_pcg(op, f, u0, 10, project=True)
                rec[f'k{k}_t0'] = field_metrics(op, u0, C_ref)['delta']
                rec[f'k{k}_t10'] = field_metrics(op, u10, C_ref)['delta']
                acc[k].append(rec[f'k{k}_t10'])
            # single non-identity transform
            if len(us) > 1:
                rec['single_t10'] = field_metrics(op, embedded_pcg(op, f, us[1], 10, project=True), C_ref)['delta']
        rec['s'] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)
    if not check:
        print('MEAN', {k: float(np.mean(v)) for k, v in acc.items()}, 'n', len(acc[1]))


main()
