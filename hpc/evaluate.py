"""``python -m hpc.evaluate DATA --models [LABEL=]PATH ...``: the paper-style evaluation
of the CGINS neural warm start on a held-out data set (issue 5 item 7).

    python -m hpc.evaluate configs/data_heldout.yaml                       # the shipped model
    python -m hpc.evaluate data/heldout32 --models full=models/ablation_full/ablation_full.pt \\
        WO-CS=models/ablation_wo_cs/ablation_wo_cs.pt ... --no-solve -o out/ablation.json

At scale (held-out set: configs/data_heldout.yaml, 200 cells per family, 32^3; the
ablations: configs/ablation_<label>.yaml, each into runs/ablation_<label>/; the shipped ones are in
models/ablation_<label>/):

    python -m hpc.make_dataset configs/data_heldout.yaml --workers 2
    for l in full wo_cs wo_gd wo_sv wo_pm levels1 levels3; do
        python -m hpc.train configs/ablation_$l.yaml --steps N; done
    python -m hpc.evaluate configs/data_heldout.yaml --preconditioners multigrid jacobi \\
        --solve-per-family 50 -o out/eval_default.json --markdown out/eval_default.md
    python -m hpc.evaluate configs/data_heldout.yaml --no-solve -o out/eval_ablation.json \\
        --markdown out/eval_ablation.md --models full=runs/ablation_full/ablation_full.pt \\
        WO-CS=runs/ablation_wo_cs/ablation_wo_cs.pt WO-GD=runs/ablation_wo_gd/ablation_wo_gd.pt \\
        WO-SV=runs/ablation_wo_sv/ablation_wo_sv.pt WO-PM=runs/ablation_wo_pm/ablation_wo_pm.pt \\
        L1=runs/ablation_levels1/ablation_levels1.pt L3=runs/ablation_levels3/ablation_levels3.pt

(the references are shared through out/references.h5: the second run solves none; models/
in place of runs/ evaluates the shipped ablations.)

DATA is a directory or glob of shards made by ``python -m hpc.make_dataset`` (model/data.py),
or a data YAML (configs/data_*.yaml: its ``out_dir`` shards are read; they are not
generated here). ``--split`` / ``--families`` / ``--per-family N`` select the cells.

For every cell:

1. Reference C^H_ref: multigrid PCG, float64, rtol 1e-9 (``--ref-rtol``), cached in an
   HDF5 file (default ``references.h5`` beside the JSON output, or ``--refs PATH``) keyed
   by the cell id and a sha256 of the phases, materials, cell size, soft-void fraction
   and reference settings; the file is rewritten atomically (temporary file + rename)
   after every new reference, so a rerun (or a run killed half way) does not solve again.
2. For each model and each t (``--t``, default 0 1 4 8 10, plus the model's own t): the
   network prediction followed by t embedded Jacobi-PCG steps (t overrides the config's
   embedded steps; t = 0: the bare constrained prediction; a model trained without them
   (WO-CS) gets t steps of the same PCG on its output). On that field u (float64 operator,
   ``--precision``):
       delta    = ||C^H(u) - C^H_ref||_F / ||C^H_ref||_F, C^H(u) the solver's energy form
                  (ElasticityOperator.chom, as in the loss);
       residual = ||f - K u|| / ||f||, the norms over all six load cases together
                  (``residual_max``: the largest per-case ratio);
       energy   = sum_i (1/2 u_i.K u_i - f_i.u_i) / |Omega| (what the training minimises;
                  trace C^H(u) = trace <C> + 2 energy).
   Aggregated per model and t over family x volume-fraction bin (``--vf-bins``, default
   edges 0.1 0.2 0.3 0.4; cells outside get a "<0.10" / ">0.40" bin, so the counts add
   up), per family, and over all cells: count, delta mean / max, residual mean, energy mean.
   Also per family and kind (``cell_kind``: TPMS sheet / network; lattice and shell on a
   named topology / on a random k-nearest-neighbour graph): named topologies recur
   between training and held-out cells at other radii, random graphs never do.
   Each cell records its kind and topology (or TPMS surface), whether its solid percolates along x, y, z and its spanning rank
   (microstructures.connectivity); the Markdown warns when some do not span all three (their C^H is at the soft-void level and their relative deltas mean nothing).
3. With several models (ablations, LABEL=PATH): one summary row per label at its own t
   (``t`` of its config, 0 when it has no embedded PCG) unless ``--t`` is given (then at
   each listed t), with the config switches that differ from the first model.
4. Solver comparison (``--solve``, default on, first model only; ``--solve-per-family N``
   limits it): per preconditioner (``--preconditioners``, default multigrid) the solver's
   PCG (solver.homogenize, ``--solve-precision`` float32, rtol 1e-6) from a zero start and
   from the network output (at the model's own t, or ``--solve-t``): iterations (max over
   the six load cases), total time (setup + warm start + solve), the warm start
   (inference) time on its own, and the iterations and time until delta <= 1%
   (``--delta-target``), the point from which delta stays at or below the target.
   How the last is measured: the timed run records a time stamp per PCG iteration (the
   callback: no extra work in the loop); a second, untimed run with the same inputs
   (deterministic on CPU: the same iterates) computes C^H(x_k) of every iterate x_k with
   the float64 energy form (solver.pcg passes x_k to the callback);
   k* is the first k with delta_k <= target for all later k, and the time is the timed
   run's stamp at iteration k* (k* = 0: setup + warm start). The untimed run stops
   computing C^H once trace(C^H(x_k) - C_ref) / ||C_ref||_F <= target: C^H(x) - C^H* is
   positive semidefinite (a Gram matrix of the error fields in the K inner product) and
   its diagonal, the energy-norm errors, does not grow along PCG, so every later delta
   stays below the target (up to rounding). Cost: one float64 operator application per
   iteration up to about the target, in the untimed run; exact, no re-runs.
5. Output: a JSON report (``-o``, default out/evaluate.json) with per-cell values,
   aggregates and provenance (model sha256, step and config; data path and shard
   attributes; git commit; torch version; machine; date; command line), and Markdown
   tables (stdout, and ``--markdown FILE``) to paste into BENCHMARKS.md. Both are written
   atomically at the end. A progress line per cell goes to stderr.

Exit status: 0 done; 2 bad input (missing data set, bad checkpoint, bad LABEL=PATH,
bad option values; one line on stderr, nothing written); 1 any other failure (the
references computed so far are kept, no report is written).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("hpc.evaluate")

EXIT_OK, EXIT_FAIL, EXIT_INPUT = 0, 1, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join("models", "cgins_default.pt")
DEFAULT_T = (0, 1, 4, 8, 10)
DEFAULT_BINS = (0.1, 0.2, 0.3, 0.4)
FAMILY_ORDER = ("tpms", "lattice", "shell")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
REFS_FORMAT = 1


class InputError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc.evaluate",
        description="Evaluate CGINS checkpoints on a held-out data set: delta = ||C_net - C_ref||_F / "
                    "||C_ref||_F and the residual of the network output per t, per family and volume-"
                    "fraction bin; ablation table; PCG iterations and time from zero vs from the network.",
        epilog="Output: a JSON report (-o) and Markdown tables (stdout, --markdown). Exit status: 0 done, "
               "2 bad input (nothing written), 1 other failure. See the module docstring for the details.")
    p.add_argument("data", help="held-out set: a directory or glob of shards (python -m hpc.make_dataset), "
                                "or a data YAML (configs/data_*.yaml) whose out_dir holds the shards")
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL], metavar="[LABEL=]PATH",
                   help="checkpoints, each PATH or LABEL=PATH (label: letters, digits, _ . + -; default: the "
                        "file name); the first is the primary model (t sweep, solver comparison) "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("-o", "--output", default=os.path.join("out", "evaluate.json"),
                   help="JSON report (default out/evaluate.json)")
    p.add_argument("--markdown", metavar="FILE", help="also write the Markdown tables to FILE")
    p.add_argument("--refs", metavar="PATH",
                   help="reference C^H cache (HDF5; default: references.h5 beside the JSON output)")
    p.add_argument("--t", type=int, nargs="+", metavar="T",
                   help=f"embedded PCG steps to evaluate every model at (default {' '.join(map(str, DEFAULT_T))} "
                        "plus each model's own t; the ablation table then uses each model's own t)")
    p.add_argument("--vf-bins", type=float, nargs="+", default=list(DEFAULT_BINS), metavar="EDGE",
                   help="volume-fraction bin edges, increasing (default 0.1 0.2 0.3 0.4)")
    p.add_argument("--split", help="only shards with this split attribute (train, heldout, ...)")
    p.add_argument("--families", nargs="+", help="only these families (tpms lattice shell)")
    p.add_argument("--per-family", type=int, metavar="N", help="the first N cells of each family (default all)")
    p.add_argument("--solve", action=argparse.BooleanOptionalAction, default=True,
                   help="solver comparison for the primary model (default on)")
    p.add_argument("--preconditioners", nargs="+", default=["multigrid"], choices=["multigrid", "jacobi"],
                   help="preconditioners of the solver comparison (default multigrid)")
    p.add_argument("--solve-per-family", type=int, metavar="N",
                   help="solver comparison on the first N selected cells of each family only (default all)")
    p.add_argument("--solve-precision", choices=["float32", "float64"], default="float32",
                   help="storage precision of the compared solves (default float32)")
    p.add_argument("--solve-rtol", type=float, default=1e-6, help="rtol of the compared solves (default 1e-6)")
    p.add_argument("--solve-t", type=int, help="embedded PCG steps of the warm start (default: the model's own t)")
    p.add_argument("--delta-target", type=float, default=0.01,
                   help="report iterations and time until delta <= this (default 0.01)")
    p.add_argument("--ref-rtol", type=float, default=1e-9, help="rtol of the reference solves (default 1e-9)")
    p.add_argument("--precision", choices=["float64", "float32"], default="float64",
                   help="operator / embedded PCG precision of the network evaluation (default float64)")
    p.add_argument("--soft", type=float, default=1e-6, help="void stiffness as a fraction of max E (default 1e-6)")
    p.add_argument("--symmetries", type=int, default=1, metavar="K",
                   help="average each network start over K point symmetries of the grid (axis "
                        "permutations and reflections, at most 48 on a cube grid; model/symmetry.py): "
                        "K forward passes a cell (default 1: off)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, no Markdown on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failures)")
    return p


# --------------------------------------------------------------------------- inputs

def parse_model_specs(specs: Sequence[str]) -> List[tuple]:
    """[(label, path)] from 'PATH' or 'LABEL=PATH' items; raises InputError."""
    out, seen = [], set()
    for s in specs:
        if "=" in s:
            label, path = s.split("=", 1)
            if not LABEL_RE.match(label) or not path:
                raise InputError(f"--models {s!r}: expected PATH or LABEL=PATH with a label of letters, "
                                 "digits, _ . + - (e.g. WO-CS=models/ablation_wo_cs/ablation_wo_cs.pt)")
        else:
            path = s
            label = os.path.splitext(os.path.basename(s))[0]
            if not LABEL_RE.match(label or ""):
                raise InputError(f"--models {s!r}: cannot make a label from the file name; use LABEL=PATH")
        if label in seen:
            raise InputError(f"--models: label {label!r} given twice")
        seen.add(label)
        out.append((label, path))
    return out


@dataclasses.dataclass
class EvalModel:
    label: str
    path: str
    net: object
    sha256: str
    config: dict
    step: int
    train_config: dict

    @property
    def own_t(self) -> int:
        return int(self.config["t"]) if self.config.get("use_pcg", True) else 0

    def provenance(self) -> dict:
        return {"label": self.label, "path": self.path, "sha256": self.sha256, "step": self.step,
                "own_t": self.own_t, "config": self.config,
                "train_config": {k: self.train_config.get(k) for k in
                                 ("seed", "steps", "batch_size", "lr", "model_dtype", "solver_dtype")
                                 if k in self.train_config}}


def load_eval_model(label: str, path: str, device: str = "cpu") -> EvalModel:
    """A checkpoint as an EvalModel (torch.load(weights_only=True) via model.train)."""
    from model.train import load_checkpoint, load_model
    if not os.path.isfile(path):
        raise InputError(f"--models {label}={path}: no such checkpoint file")
    try:
        net = load_model(path, device=device)
        ck = load_checkpoint(path, map_location="cpu")
        cfg = dict(ck["model_config"])
        step = int(ck.get("step", 0))
        tc = dict(ck.get("train_config", {}))
    except Exception as exc:  # UnpicklingError, RuntimeError, KeyError, ValueError ...
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"--models {label}={path}: not a CGINS checkpoint ({type(exc).__name__}: {msg})") from None
    return EvalModel(label, path, net, net.sha256, cfg, step, tc)


def open_dataset(spec: str, split: Optional[str] = None, families: Optional[Sequence[str]] = None):
    """(ShardedDataset, info dict) of a shard directory / glob or a data YAML."""
    import h5py

    from model.data import DataConfig, ShardedDataset, shard_files
    info = {"spec": spec}
    root = spec
    if spec.endswith((".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise InputError(f"data {spec}: no such file")
        try:
            cfg = DataConfig.from_yaml(spec)
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"data {spec}: {' '.join(str(e).split())}") from None
        root = cfg.out_dir
        info["config_hash"] = cfg.content_hash()
        if not shard_files(root):
            raise InputError(f"data {spec}: no shards in {root}; generate them with "
                             f"`python -m hpc.make_dataset {spec}`")
    elif not shard_files(root):
        raise InputError(f"data {spec}: no data-set shards (*.h5) there")
    try:
        ds = ShardedDataset(root, split=split, families=families)
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"data {spec}: {' '.join(str(e).split())}") from None
    if len(ds) == 0:
        raise InputError(f"data {spec}: no samples (split={split!r}, families={families!r})")
    shards = []
    for path in ds.files:
        with h5py.File(path, "r") as f:
            shards.append({k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()
                           if k in ("name", "split", "seed", "n", "shard", "n_shards", "config_hash", "version")})
    info.update(root=os.path.abspath(root) if os.path.isdir(root) else root, shards=len(ds.files),
                shard_attrs=shards[0] if shards else {},
                names=sorted({str(s.get("name")) for s in shards}),
                config_hashes=sorted({str(s.get("config_hash")) for s in shards}))
    return ds, info


def select_cells(ds, per_family: Optional[int]) -> List[int]:
    """Dataset rows to evaluate: all, or the first ``per_family`` of each family."""
    if per_family is None:
        return list(range(len(ds)))
    count: Dict[str, int] = {}
    out = []
    for k, fam in enumerate(ds.families):
        if count.get(fam, 0) < per_family:
            count[fam] = count.get(fam, 0) + 1
            out.append(k)
    return out


def vf_bin(vf: float, edges: Sequence[float]) -> str:
    """Bin label of a volume fraction: 'a-b' for edges a <= vf < b (the last bin closed),
    '<a' / '>b' outside."""
    if vf < edges[0]:
        return f"<{edges[0]:.2f}"
    if vf > edges[-1]:
        return f">{edges[-1]:.2f}"
    for lo, hi in zip(edges[:-1], edges[1:]):
        if vf < hi or hi == edges[-1]:
            return f"{lo:.2f}-{hi:.2f}"
    return f"{edges[-2]:.2f}-{edges[-1]:.2f}"  # pragma: no cover


def bin_labels(edges: Sequence[float]) -> List[str]:
    return ([f"<{edges[0]:.2f}"] + [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges[:-1], edges[1:])]
            + [f">{edges[-1]:.2f}"])


# --------------------------------------------------------------------------- references

def cell_hash(cell, soft: float, ref_settings: dict) -> str:
    """sha256 (16 hex) of what determines the reference C^H of a cell."""
    h = hashlib.sha256()
    ph = np.ascontiguousarray(np.asarray(cell.phases)).astype("<u2")
    h.update(repr(ph.shape).encode())
    h.update(ph.tobytes())
    h.update(json.dumps({"E": [float(e) for e in cell.E], "nu": [float(v) for v in cell.nu],
                         "size": [float(s) for s in cell.size], "soft": float(soft), **ref_settings},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


class ReferenceCache:
    """Reference C^H per (cell id, cell hash) in one HDF5 file, rewritten atomically.

        /cell_id  str (N,)     /key  str (N,)  (the cell hash)
        /C        float64 (N, 6, 6)   /iterations int64 (N, 6)   /residuals float64 (N, 6)
        /time     float64 (N,)        /converged  bool (N,)
        attrs     format, convention, solver
    """

    FIELDS = ("C", "iterations", "residuals", "time", "converged")

    def __init__(self, path: str):
        self.path = path
        self.entries: Dict[tuple, dict] = {}
        self.computed = 0
        self.cached = 0
        if os.path.exists(path):
            self._load()

    def _load(self):
        import h5py
        try:
            with h5py.File(self.path, "r") as f:
                ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["cell_id"][()]]
                keys = [s.decode() if isinstance(s, bytes) else str(s) for s in f["key"][()]]
                cols = {k: f[k][()] for k in self.FIELDS}
        except (OSError, KeyError) as e:
            raise InputError(f"--refs {self.path}: not a reference file of hpc.evaluate "
                             f"({' '.join(str(e).split())}); move it away or pass another --refs") from None
        for j, (cid, key) in enumerate(zip(ids, keys)):
            self.entries[(cid, key)] = {k: cols[k][j] for k in self.FIELDS}

    def get(self, cell_id: str, key: str) -> Optional[dict]:
        return self.entries.get((cell_id, key))

    def put(self, cell_id: str, key: str, entry: dict):
        self.entries[(cell_id, key)] = entry
        self.save()

    def save(self):
        import h5py

        from microstructures.atomic import atomic_output
        items = sorted(self.entries.items())
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_output(self.path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = REFS_FORMAT
                f.attrs["convention"] = "Voigt 11,22,33,23,13,12; engineering shear strains; C^H = energy form"
                f.attrs["writer"] = "hpc.evaluate"
                str_dt = h5py.string_dtype()
                f.create_dataset("cell_id", data=np.array([k[0] for k, _ in items], dtype=object), dtype=str_dt)
                f.create_dataset("key", data=np.array([k[1] for k, _ in items], dtype=object), dtype=str_dt)
                f.create_dataset("C", data=np.array([e["C"] for _, e in items], np.float64).reshape(-1, 6, 6))
                f.create_dataset("iterations", data=np.array([e["iterations"] for _, e in items],
                                                             np.int64).reshape(-1, 6))
                f.create_dataset("residuals", data=np.array([e["residuals"] for _, e in items],
                                                            np.float64).reshape(-1, 6))
                f.create_dataset("time", data=np.array([e["time"] for _, e in items], np.float64))
                f.create_dataset("converged", data=np.array([bool(e["converged"]) for _, e in items], bool))


def reference(cell, cache: ReferenceCache, cell_id: str, key: str, rtol: float, soft: float,
              device: str = "cpu") -> tuple:
    """(C_ref (6, 6), entry, cached) for a cell: from the cache or a multigrid PCG solve in
    float64 to ``rtol`` (then cached)."""
    e = cache.get(cell_id, key)
    if e is not None:
        cache.cached += 1
        return np.asarray(e["C"], np.float64), e, True
    from solver import homogenize
    res = homogenize(cell, rtol=rtol, precision="float64", preconditioner="multigrid", soft=soft, device=device)
    if not res.converged:
        log.warning("%s: the reference solve did not converge to rtol %g (residuals %s)", cell_id, rtol,
                    [f"{r:.1e}" for r in res.residuals])
    e = {"C": np.asarray(res.C, np.float64), "iterations": list(res.iterations),
         "residuals": list(res.residuals), "time": float(res.times["total"]), "converged": bool(res.converged)}
    cache.computed += 1
    cache.put(cell_id, key, e)
    return e["C"], e, False


# --------------------------------------------------------------------------- network outputs

def predict(net, op, t: int, symmetries: int = 1):
    """The network output (6, 3, ...) on op with t embedded PCG steps (in op's dtype);
    with symmetries > 1 the start is averaged over that many grid symmetries first
    (model.symmetry)."""
    import torch

    from model.network import embedded_steps
    if symmetries > 1:
        from model.symmetry import symmetrized_output
        with embedded_steps(net, t):
            return symmetrized_output(net, op, symmetries).detach()
    with torch.no_grad(), embedded_steps(net, t):
        return net([op]).u[0].detach()


def predictions(net, op, ts: Sequence[int], symmetries: int = 1) -> tuple:
    """({t: u} for every t in ts, inference seconds of the bare network): one forward
    pass (t = 0; ``symmetries`` passes averaged, model.symmetry), then
    model.embedded_pcg from its output for each t > 0 -- the same call CGINS.forward
    makes with cfg.t = t."""
    import torch

    from model.embedded_pcg import embedded_pcg
    t0 = time.perf_counter()
    u0 = predict(net, op, 0, symmetries)
    if u0.device.type == "cuda":
        torch.cuda.synchronize(u0.device)      # the queued end of the forward belongs to its time
    t_inf = time.perf_counter() - t0
    out = {}
    with torch.no_grad():
        f = op.rhs()
        for t in sorted(set(int(t) for t in ts)):
            out[t] = u0 if t == 0 else embedded_pcg(op, f, u0, t, project=net.cfg.mean_constraint)
    return out, t_inf


def field_metrics(op, u, C_ref: np.ndarray) -> dict:
    """delta, residual, residual_max and energy of a fluctuation field u (6, 3, ...)."""
    import torch
    u = u.to(op.dtype)
    C = op.chom(u).cpu().numpy()
    f = op.rhs()
    Ku = op.apply(u)
    r = f - Ku
    rr, ff = op.dot(r, r), op.dot(f, f)
    uKu, fu = op.dot(u, Ku), op.dot(f, u)
    ff_safe = torch.where(ff > 0, ff, torch.ones_like(ff))
    return {"delta": float(np.linalg.norm(C - C_ref) / np.linalg.norm(C_ref)),
            "residual": float(torch.sqrt(rr.sum() / ff.sum())),
            "residual_max": float(torch.sqrt(rr / ff_safe).max()),
            "energy": float((0.5 * uKu - fu).sum() / op.volume)}


# --------------------------------------------------------------------------- solver comparison

def track_deltas(cell, C_ref: np.ndarray, op64, x0=None, stop_below: Optional[float] = None,
                 **solve_kw) -> tuple:
    """Run solver.homogenize and return ([delta_k for k = 0, 1, ...], result): delta of
    the PCG iterates against C_ref (float64 energy form on op64). Untimed.

    ``stop_below``: stop computing deltas once trace(C^H(x_k) - C_ref) / ||C_ref||_F is at
    or below it. C^H(x) - C^H* = E^T K E / |Omega| (E: the six error fields) is positive
    semidefinite, so ||.||_F <= trace, and its diagonal (the energy-norm errors) does not
    grow along PCG: every later delta is then below ``stop_below`` too, and the list ends
    there (the solve itself runs on to its tolerance)."""
    from solver import homogenize
    nref = float(np.linalg.norm(C_ref))
    deltas: List[float] = []
    state = {"done": False}

    def record(C):
        deltas.append(float(np.linalg.norm(C - C_ref) / nref))
        if stop_below is not None and float(np.trace(C - C_ref)) / nref <= stop_below:
            state["done"] = True

    def cb(k, rel, est, x):
        if not state["done"]:
            record(op64.chom(x).cpu().numpy())

    if x0 is None:
        record(op64.mean_stiffness().cpu().numpy())        # C^H(0) = <C>
        res = homogenize(cell, callback=cb, **solve_kw)
    else:
        def x0_recorded(op):      # the start's delta, before the first iteration
            u = x0(op)
            record(op64.chom(u).cpu().numpy())
            return u
        res = homogenize(cell, x0=x0_recorded, callback=cb, **solve_kw)
    return deltas, res


def first_stay_below(values: Sequence[float], target: float) -> Optional[int]:
    """The first index k with values[j] <= target for all j >= k (None if the last is above)."""
    k = None
    for j in range(len(values) - 1, -1, -1):
        if values[j] <= target:
            k = j
        else:
            break
    return k


def solve_compare(cell, C_ref: np.ndarray, op64, warm, pc: str, precision: str, rtol: float,
                  target: float, soft: float, device: str) -> dict:
    """Zero start vs ``warm`` (x0(op) callable) for one preconditioner: see the module
    docstring. Returns {'zero': {...}, 'net': {...}}."""
    from solver import homogenize
    kw = dict(rtol=rtol, precision=precision, preconditioner=pc, soft=soft, device=device)
    nref = float(np.linalg.norm(C_ref))
    out = {}
    for start, x0 in (("zero", None), ("net", warm)):
        stamps: List[float] = []
        t_call = time.perf_counter()
        res = homogenize(cell, x0=x0, callback=lambda k, rel, est, x: stamps.append(time.perf_counter()), **kw)
        deltas, res_tr = track_deltas(cell, C_ref, op64, x0=x0, stop_below=target, **kw)
        if res_tr.iterations != res.iterations:
            log.warning("%s %s start: the tracking run took %s iterations, the timed run %s",
                        pc, start, res_tr.iterations, res.iterations)
        k = first_stay_below(deltas, target)
        if k is None or k > len(stamps):
            t_target = None
        elif k == 0:
            t_target = res.times["setup"] + res.times["warm_start"]
        else:
            t_target = stamps[k - 1] - t_call
        out[start] = {"iterations": int(max(res.iterations)), "iterations_per_case": list(res.iterations),
                      "converged": bool(res.converged), "time_total": float(res.times["total"]),
                      "time_setup": float(res.times["setup"]), "time_warm_start": float(res.times["warm_start"]),
                      "time_solve": float(res.times["solve"]),
                      "delta_start": deltas[0], "delta_final": float(np.linalg.norm(res.C - C_ref) / nref),
                      "iterations_to_target": k, "time_to_target": t_target, "tracked_iterations": len(deltas) - 1}
    return out


# --------------------------------------------------------------------------- aggregation

def _mean(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _median(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None


def _max(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    return float(np.max(v)) if v else None


def family_order(families) -> List[str]:
    fams = set(families)
    return [f for f in FAMILY_ORDER if f in fams] + sorted(fams - set(FAMILY_ORDER))


def aggregate(cells: List[dict], label: str, t: int, edges: Sequence[float]) -> List[dict]:
    """Rows (family, vf_bin) with count, delta mean / max, residual mean, energy mean of
    model ``label`` at ``t``: every family x bin that has cells, then each family over
    all bins ('all'), then all cells ('all', 'all')."""
    key = str(t)
    recs = [(c["family"], c["vf_bin"], c["models"][label][key]) for c in cells
            if label in c["models"] and key in c["models"][label]]
    rows = []

    def row(fam, b, sel):
        return {"label": label, "t": int(t), "family": fam, "vf_bin": b, "count": len(sel),
                "delta_mean": _mean([m["delta"] for m in sel]), "delta_max": _max([m["delta"] for m in sel]),
                "delta_median": _median([m["delta"] for m in sel]),
                "residual_mean": _mean([m["residual"] for m in sel]),
                "energy_mean": _mean([m["energy"] for m in sel])}

    fams = family_order([r[0] for r in recs])
    for fam in fams:
        for b in bin_labels(edges):
            sel = [m for f, bb, m in recs if f == fam and bb == b]
            if sel:
                rows.append(row(fam, b, sel))
    for fam in fams:
        rows.append(row(fam, "all", [m for f, _, m in recs if f == fam]))
    rows.append(row("all", "all", [m for _, _, m in recs]))
    return rows


def cell_kind(params: dict) -> tuple:
    """(kind, topology) of a data-set sample from its generator parameters: TPMS -> its form
    ('sheet' / 'network') and surface; lattice / shell -> 'random' (a random
    k-nearest-neighbour graph) or 'named' and the topology name; otherwise (None, None)."""
    fam = params.get("family")
    if fam == "tpms":
        return params.get("form"), params.get("surface")
    if fam in ("lattice", "shell"):
        topo = params.get("topology")
        return ("random" if topo == "random" else "named"), topo
    return None, None


def aggregate_kind(cells: List[dict], label: str, t: int) -> List[dict]:
    """Rows (family, kind) with count and delta mean / median / max of model ``label`` at
    ``t``, for the cells that record a kind, in family order then kind name."""
    key = str(t)
    recs = [(c["family"], c["kind"], c["models"][label][key]["delta"]) for c in cells
            if c.get("kind") and label in c["models"] and key in c["models"][label]]
    rows = []
    for fam in family_order([r[0] for r in recs]):
        for kind in sorted({k for f, k, _ in recs if f == fam}):
            d = [x for f, k, x in recs if f == fam and k == kind]
            rows.append({"label": label, "t": int(t), "family": fam, "kind": kind, "count": len(d),
                         "delta_mean": _mean(d), "delta_median": _median(d), "delta_max": _max(d)})
    return rows


def aggregate_solve(cells: List[dict], pcs: Sequence[str]) -> List[dict]:
    """Means per preconditioner and family (and 'all') of the solver comparison."""
    rows = []
    for pc in pcs:
        recs = [(c["family"], c["solve"][pc]) for c in cells if c.get("solve") and pc in c["solve"]]
        for fam in family_order([r[0] for r in recs]) + ["all"]:
            sel = [s for f, s in recs if fam == "all" or f == fam]
            if not sel:
                continue
            r = {"preconditioner": pc, "family": fam, "count": len(sel)}
            for start in ("zero", "net"):
                for k in ("iterations", "time_total", "iterations_to_target", "time_to_target"):
                    r[f"{k}_{start}"] = _mean([s[start][k] for s in sel])
                r[f"target_missed_{start}"] = sum(1 for s in sel if s[start]["time_to_target"] is None)
            r["time_warm_start"] = _mean([s["net"]["time_warm_start"] for s in sel])
            r["delta_start_net"] = _mean([s["net"]["delta_start"] for s in sel])
            rows.append(r)
    return rows


# --------------------------------------------------------------------------- report

def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def config_diff(cfg: dict, base: dict) -> str:
    keys = [k for k in cfg if k != "t" and cfg.get(k) != base.get(k)]
    return ", ".join(f"{k}={cfg[k]}" for k in keys) or "-"


def percolation_note(cells) -> Optional[str]:
    """A warning line when some cells' solid does not percolate along all three axes,
    or does so only through separate clusters (spanning rank < 3): their C^H, or some
    of its modes, sits at the soft-void level, so relative deltas on them mean nothing;
    data sets made with require_percolation, the default, have none."""
    bad = [c["id"] for c in cells if not all(c.get("percolates", (True,) * 3)) or c.get("spanning_rank", 3) < 3]
    if not bad:
        return None
    shown = ", ".join(f"`{b}`" for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    return (f"**Warning:** {len(bad)} of {len(cells)} cells have no single solid cluster that spans "
            f"x, y and z ({shown}): their C^H is at the soft-void level and their deltas, which these "
            "means include, mean nothing. Regenerate the set with require_percolation (the default).")


def render_markdown(report: dict) -> str:
    prov, st = report["provenance"], report["settings"]
    data, refs = report["data"], report["references"]
    m = prov["machine"]
    fams = ", ".join(f"{f} {n}" for f, n in data["cells_per_family"].items())
    lines = ["## CGINS evaluation (`python -m hpc.evaluate`)", "",
             f"Data: `{data['spec']}` ({fams}; {data['shape']}). Reference: multigrid PCG float64 rtol "
             f"{st['ref_rtol']:g} ({refs['computed']} solved, {refs['cached']} from `{refs['path']}`). "
             f"Network evaluated in {st['precision']}"
             + (f"; every start averaged over {st['symmetries']} grid symmetries (`--symmetries`)."
                if st.get("symmetries", 1) > 1 else "."),
             f"Machine: {prov['date']}; {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch "
             f"{m['torch']} ({m['torch_threads']} threads), {m['device']}; commit {prov['git_commit'][:10]}"
             f"{' (dirty)' if prov['git_dirty'] else ''}.",
             "Models: " + "; ".join(f"`{d['label']}` = `{d['path']}` (sha256 {d['sha256'][:12]}, step {d['step']}, "
                                    f"own t {d['own_t']})" for d in report["models"]) + ".",
             f"Command: `{prov['command']}`", "",
             "delta = ||C^H(u) - C^H_ref||_F / ||C^H_ref||_F of the network output u after t embedded "
             "Jacobi-PCG steps; res = ||f - K u|| / ||f|| (six load cases together); mean (max) over the cells."]
    note = percolation_note(report["cells"])
    if note:
        lines += ["", note]
    for md in report["models"]:
        label = md["label"]
        ts = report["t_per_model"][label]
        rows_by = {}
        for r in report["aggregates"]:
            if r["label"] == label:
                rows_by[(r["family"], r["vf_bin"], r["t"])] = r
        keys = []
        for r in report["aggregates"]:
            if r["label"] == label and (r["family"], r["vf_bin"]) not in keys:
                keys.append((r["family"], r["vf_bin"]))
        header = ["family", "VF", "n"]
        for t in ts:
            header += [f"delta t={t}", f"res t={t}"]
        body = []
        for fam, b in keys:
            first = rows_by[(fam, b, ts[0])]
            line = [f"**{fam}**" if fam == "all" else fam, b, first["count"]]
            for t in ts:
                r = rows_by[(fam, b, t)]
                line += [f"{_fmt(r['delta_mean'])} ({_fmt(r['delta_max'])})", _fmt(r["residual_mean"], ".2g")]
            body.append(line)
        lines += ["", f"### `{label}`: delta per family and volume fraction", "", markdown_table(header, body)]
        kinds = [r for r in report.get("aggregates_kind", []) if r["label"] == label]
        if kinds:
            rows_k = {(r["family"], r["kind"], r["t"]): r for r in kinds}
            keys_k = list(dict.fromkeys((r["family"], r["kind"]) for r in kinds))
            header = ["family", "kind", "n"] + [f"delta t={t} mean / median (max)" for t in ts]
            body = [[fam, kind, rows_k[(fam, kind, ts[0])]["count"]]
                    + [f"{_fmt(r['delta_mean'])} / {_fmt(r['delta_median'])} ({_fmt(r['delta_max'])})"
                       for r in (rows_k[(fam, kind, t)] for t in ts)] for fam, kind in keys_k]
            lines += ["", f"### `{label}`: delta per family and kind (random: a random k-nearest-neighbour "
                      "graph, drawn anew for every cell; named: a named topology)", "",
                      markdown_table(header, body)]
    if len(report["models"]) > 1:
        base = report["models"][0]["config"]
        fam_list = list(data["cells_per_family"])
        header = ["model", "differs from first", "t", "n"] + [f"delta {f}" for f in fam_list] + \
                 ["delta all", "delta max"] + [f"median {f}" for f in fam_list] + \
                 ["median all", "res all", "energy all"]
        body = []
        for r in report["ablation"]:
            md = next(d for d in report["models"] if d["label"] == r["label"])
            body.append([f"`{r['label']}`", config_diff(md["config"], base), r["t"], r["count"]]
                        + [_fmt(r["delta_mean_" + f]) for f in fam_list]
                        + [_fmt(r["delta_mean"]), _fmt(r["delta_max"])]
                        + [_fmt(r["delta_median_" + f]) for f in fam_list]
                        + [_fmt(r["delta_median"]), _fmt(r["residual_mean"], ".2g"),
                           _fmt(r["energy_mean"], ".5g")])
        lines += ["", "### Ablations (delta mean and median per family; energy: the training objective "
                  "per unit volume, mean over the cells, lower is better)", "", markdown_table(header, body)]
    if report.get("solve_aggregates"):
        s = st["solve"]
        tgt = f"delta<={s['delta_target']:g}"
        header = ["PC", "family", "n", "it. zero -> net", "total s zero -> net", "inference s",
                  f"it. to {tgt} zero -> net", f"s to {tgt} zero -> net"]
        body = []
        for r in report["solve_aggregates"]:
            miss = ""
            if r["target_missed_zero"] or r["target_missed_net"]:
                miss = f" (missed {r['target_missed_zero']} / {r['target_missed_net']})"
            body.append([r["preconditioner"], r["family"], r["count"],
                         f"{_fmt(r['iterations_zero'], '.1f')} -> {_fmt(r['iterations_net'], '.1f')}",
                         f"{_fmt(r['time_total_zero'], '.2f')} -> {_fmt(r['time_total_net'], '.2f')}",
                         _fmt(r["time_warm_start"], ".2f"),
                         f"{_fmt(r['iterations_to_target_zero'], '.1f')} -> "
                         f"{_fmt(r['iterations_to_target_net'], '.1f')}{miss}",
                         f"{_fmt(r['time_to_target_zero'], '.2f')} -> {_fmt(r['time_to_target_net'], '.2f')}"])
        lines += ["", f"### Solver from zero vs from `{report['models'][0]['label']}` (t = {s['t']}), "
                      f"{s['precision']}, rtol {s['rtol']:g}; means over the cells", "",
                  "Iterations: max over the six load cases. Total: setup + warm start (inference, also on "
                  f"its own) + PCG. To {tgt}: until delta stays at or below the target (k = 0: the start "
                  "itself), from the per-iteration C^H of an untimed identical run.", "",
                  markdown_table(header, body)]
    return "\n".join(lines) + "\n"


def ablation_rows(report_cells: List[dict], models: List[EvalModel], t_override: Optional[Sequence[int]],
                  fams: Sequence[str], edges) -> List[dict]:
    rows = []
    for md in models:
        for t in (t_override or [md.own_t]):
            agg = aggregate(report_cells, md.label, t, edges)
            tot = agg[-1]
            r = {"label": md.label, "t": int(t), "count": tot["count"], "delta_mean": tot["delta_mean"],
                 "delta_median": tot["delta_median"], "delta_max": tot["delta_max"], "residual_mean": tot["residual_mean"],
                 "energy_mean": tot["energy_mean"]}
            for f in fams:
                fr = [a for a in agg if a["family"] == f and a["vf_bin"] == "all"]
                r["delta_mean_" + f] = fr[0]["delta_mean"] if fr else None
                r["delta_median_" + f] = fr[0]["delta_median"] if fr else None
            rows.append(r)
    return rows


# --------------------------------------------------------------------------- provenance

def provenance(argv: Sequence[str], device: str) -> dict:
    import torch
    commit, dirty = "", False
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                timeout=30).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=ROOT, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    from hpc.results import cpu_model
    cpu = cpu_model()
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {"tool": "hpc.evaluate", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m hpc.evaluate " + shlex.join(argv), "git_commit": commit, "git_dirty": dirty,
            "machine": {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__, "torch_threads": torch.get_num_threads(), "device": dev}}


def _clean(x):
    """JSON-safe: numpy scalars / arrays to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _write_text_atomic(path: str, text: str):
    from microstructures.atomic import atomic_output
    with atomic_output(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


# --------------------------------------------------------------------------- the run

DEFAULT_REFS = "references.h5"


def refs_path(args) -> str:
    """The reference cache: --refs, else references.h5 beside -o."""
    return args.refs or os.path.join(os.path.dirname(os.path.abspath(args.output)), DEFAULT_REFS)


def validate(args):
    """Check the flags that need no I/O; raises InputError."""
    if args.t is not None and any(t < 0 for t in args.t):
        raise InputError(f"--t must be >= 0, got {args.t}")
    if not 1 <= args.symmetries <= 48:
        raise InputError(f"--symmetries must be in 1..48, got {args.symmetries}")
    if args.solve_t is not None and args.solve_t < 0:
        raise InputError(f"--solve-t must be >= 0, got {args.solve_t}")
    e = args.vf_bins
    if len(e) < 2 or any(b <= a for a, b in zip(e[:-1], e[1:])) or e[0] < 0 or e[-1] > 1:
        raise InputError(f"--vf-bins needs >= 2 increasing edges in [0, 1], got {e}")
    for name in ("per_family", "solve_per_family"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("ref_rtol", "solve_rtol", "delta_target", "soft"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    refs = refs_path(args)
    for name, path in (("-o", args.output), ("--markdown", args.markdown), ("--refs", refs)):
        if path and (os.path.isdir(path) or path.endswith(os.sep)):
            raise InputError(f"{name} {path}: is a directory")
    paths = [os.path.abspath(p) for p in (args.output, args.markdown, refs) if p]
    if len(set(paths)) < len(paths):
        raise InputError(f"-o, --markdown and the reference cache (--refs, default {DEFAULT_REFS} beside -o: "
                         f"{refs}) must name different files")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: CUDA is not available on this machine")


def run(args, argv: Sequence[str]) -> dict:
    """The evaluation after ``args`` (build_parser()); returns the report dict (also
    written to args.output). Raises InputError before any output on bad input."""
    import torch

    from microstructures import connectivity
    from model.train import DTYPES, cell_operator
    validate(args)
    specs = parse_model_specs(args.models)
    if args.models == [DEFAULT_MODEL] and not os.path.exists(DEFAULT_MODEL):
        specs = [(specs[0][0], os.path.join(ROOT, DEFAULT_MODEL))]      # run from outside the repository
    ds, data_info = open_dataset(args.data, args.split, args.families)
    models = [load_eval_model(label, path, args.device) for label, path in specs]
    rows = select_cells(ds, args.per_family)
    grids = sorted({ds.grid(k) for k in rows})            # every cell's, not only the first one's
    for md in models:
        div = 1 << md.net.cfg.depth
        for shape in grids:
            if any(s % div for s in shape):
                raise InputError(f"--models {md.label}: cells of {shape} are not divisible by 2^depth = {div}")
    cache = ReferenceCache(refs_path(args))
    if args.t is not None:
        t_per_model = {md.label: sorted(set(args.t)) for md in models}
    else:
        t_per_model = {md.label: sorted(set(DEFAULT_T) | {md.own_t}) for md in models}
    primary = models[0]
    solve_t = primary.own_t if args.solve_t is None else args.solve_t
    edges = [float(e) for e in args.vf_bins]
    ref_settings = {"rtol": float(args.ref_rtol), "precision": "float64", "preconditioner": "multigrid"}
    eval_dtype = DTYPES[args.precision]
    import h5py
    file_names = {}
    for fi, path in enumerate(ds.files):
        with h5py.File(path, "r") as f:
            file_names[fi] = str(f.attrs.get("name", os.path.splitext(os.path.basename(path))[0]))
    for d in (os.path.dirname(os.path.abspath(p)) for p in (args.output, args.markdown) if p):
        os.makedirs(d, exist_ok=True)

    report_cells = []
    solved_per_family: Dict[str, int] = {}
    n_sel = len(rows)
    t_run = time.perf_counter()
    for j, k in enumerate(rows):
        tc = time.perf_counter()
        cell = ds.cell(k)
        fam = str(ds.families[k])
        vf = float(ds.vf[k])
        cell_id = f"{file_names[int(ds.rows[k][0])]}:{fam}-{int(ds.index[k])}"
        key = cell_hash(cell, args.soft, ref_settings)
        C_ref, ref, cached = reference(cell, cache, cell_id, key, args.ref_rtol, args.soft, args.device)
        op = cell_operator(cell, dtype=eval_dtype, device=args.device, soft=args.soft)
        op64 = op if eval_dtype == torch.float64 else cell_operator(cell, torch.float64, args.device, args.soft)
        perc, srank = connectivity(cell)
        kind, topology = cell_kind(ds.params(k))
        rec = {"id": cell_id, "row": int(k), "index": int(ds.index[k]), "family": fam, "kind": kind,
               "topology": topology, "vf": vf,
               "vf_bin": vf_bin(vf, edges), "E": float(ds.E[k]), "nu": float(ds.nu[k]), "key": key,
               "percolates": list(perc), "spanning_rank": srank,
               "ref_cached": cached, "C_ref": C_ref, "ref_iterations": ref["iterations"],
               "ref_time": ref["time"], "models": {}, "inference_s": {}}
        if args.symmetries > 1:
            from model.symmetry import grid_symmetries
            n_sym = len(grid_symmetries(op.lam.shape, op.h))
            if args.symmetries > n_sym:
                raise InputError(f"--symmetries {args.symmetries}: {cell_id} "
                                 f"({'x'.join(map(str, op.lam.shape))}) has {n_sym} point symmetries")
        for md in models:
            us, t_inf = predictions(md.net, op, t_per_model[md.label], args.symmetries)
            rec["models"][md.label] = {str(t): field_metrics(op, u, C_ref) for t, u in us.items()}
            rec["inference_s"][md.label] = t_inf
        if args.solve and solved_per_family.get(fam, 0) < (args.solve_per_family or math.inf):
            solved_per_family[fam] = solved_per_family.get(fam, 0) + 1
            net = primary.net

            def warm(o, _t=solve_t):
                return predict(net, o, _t, args.symmetries).to(o.dtype)

            rec["solve"] = {pc: solve_compare(cell, C_ref, op64, warm, pc, args.solve_precision, args.solve_rtol,
                                              args.delta_target, args.soft, args.device)
                            for pc in args.preconditioners}
        report_cells.append(rec)
        if not args.quiet:
            pm = rec["models"][primary.label]
            tshow = [t for t in (0, primary.own_t) if str(t) in pm] or [t_per_model[primary.label][0]]
            line = (f"[{j + 1}/{n_sel}] {cell_id} vf {vf:.2f}: ref {'cached' if cached else 'solved'} | "
                    f"{primary.label} " + " ".join(f"t={t} delta {pm[str(t)]['delta']:.3g} "
                                                   f"res {pm[str(t)]['residual']:.2g}" for t in dict.fromkeys(tshow)))
            for pc, s in (rec.get("solve") or {}).items():
                line += (f" | {pc} it {s['zero']['iterations']} -> {s['net']['iterations']}, "
                         f"{s['zero']['time_total']:.2f} -> {s['net']['time_total']:.2f} s")
            print(line + f" | {time.perf_counter() - tc:.1f} s", file=sys.stderr, flush=True)

    fams = family_order([c["family"] for c in report_cells])
    aggregates = [r for md in models for t in t_per_model[md.label]
                  for r in aggregate(report_cells, md.label, t, edges)]
    report = {
        "provenance": provenance(argv, args.device),
        "data": {**data_info, "split": args.split, "families": args.families, "per_family": args.per_family,
                 "n_cells": len(report_cells), "shape": ", ".join("x".join(map(str, g)) for g in grids),
                 "cells_per_family": {f: sum(1 for c in report_cells if c["family"] == f) for f in fams}},
        "settings": {"t": args.t, "vf_bins": edges, "ref_rtol": args.ref_rtol, "reference": ref_settings,
                     "precision": args.precision, "soft": args.soft, "device": args.device,
                     "symmetries": args.symmetries,
                     "solve": ({"t": solve_t, "preconditioners": list(args.preconditioners),
                                "precision": args.solve_precision, "rtol": args.solve_rtol,
                                "delta_target": args.delta_target, "per_family": args.solve_per_family}
                               if args.solve else None)},
        "models": [md.provenance() for md in models],
        "t_per_model": t_per_model,
        "references": {"path": refs_path(args), "computed": cache.computed, "cached": cache.cached},
        "aggregates": aggregates,
        "aggregates_kind": [r for md in models for t in t_per_model[md.label]
                            for r in aggregate_kind(report_cells, md.label, t)],
        "ablation": ablation_rows(report_cells, models, args.t, fams, edges),
        "solve_aggregates": aggregate_solve(report_cells, args.preconditioners) if args.solve else [],
        "cells": report_cells,
        "wall_s": time.perf_counter() - t_run,
    }
    report = _clean(report)
    report["markdown"] = render_markdown(report)
    _write_text_atomic(args.output, json.dumps(report, indent=1) + "\n")
    if args.markdown:
        _write_text_atomic(args.markdown, report["markdown"])
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        report = run(args, argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:
        log.debug("evaluation failed", exc_info=True)
        print(f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}", file=sys.stderr)
        return EXIT_FAIL
    if not args.quiet:
        print(report["markdown"])
    log.info("report %s%s; references %s (%d solved, %d cached)", args.output,
             f", {args.markdown}" if args.markdown else "", report["references"]["path"],
             report["references"]["computed"], report["references"]["cached"])
    return EXIT_OK


if __name__ == "__main__":
    from hpc.allocator import reexec_with_tcmalloc
    reexec_with_tcmalloc(["-m", "hpc.evaluate", *sys.argv[1:]])
    sys.exit(main())
