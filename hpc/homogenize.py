"""python -m hpc.homogenize cell.h5: the effective stiffness C^H of a periodic cell.

Runs serially, or distributed under mpirun / srun with the same flags (each rank
reads and solves its own block; rank 0 prints and writes the result).

Exit status: 0 converged; 2 bad input or arguments (one line on stderr, nothing
written); 3 not converged within --maxiter (the result is written, marked
converged = False); 1 any other failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_UNCONVERGED = 0, 1, 2, 3
log = logging.getLogger("hpc.homogenize")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc.homogenize",
        description="Effective (homogenized) elasticity tensor C^H of a periodic voxel cell.",
        epilog="Input: HDF5 cell (/phases, /materials/E, /materials/nu; see README 'Files') or a "
               ".npy phase array with --E/--nu. Output: <input stem>.result.h5 next to the input "
               "unless -o. Exit status: 0 converged, 2 bad input, 3 not converged, 1 other failure.")
    p.add_argument("cell", help="cell file (.h5 / .hdf5 or .npy)")
    p.add_argument("-o", "--output", help="result file (default: <cell stem>.result.h5 beside the cell)")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative residual per load case (default 1e-6)")
    p.add_argument("--ctol", type=float, default=None,
                   help="also stop a load case when the estimated relative error of its C^H_ii is below "
                        "this (a conservative estimate from the CG energy decrements, after 3 iterations "
                        "at least; the result reports the plain estimate)")
    p.add_argument("--maxiter", type=int, default=20000, help="PCG iteration limit (default 20000)")
    p.add_argument("--precision", choices=["float64", "float32"], default="float64",
                   help="storage precision of the solve (default float64); reductions and C^H are float64")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--solver", default="pcg", choices=["pcg", "petsc", "cgins"],
                   help="pcg: our matrix-free PCG (default); petsc: the assembled PETSc reference "
                        "(CG + --petsc-pc); cgins: PCG started from a trained CGINS network (--model)")
    p.add_argument("--preconditioner", "--pc", default="multigrid", choices=["jacobi", "multigrid"],
                   help="PCG preconditioner for --solver pcg/cgins (default multigrid)")
    p.add_argument("--petsc-pc", default="gamg", choices=["gamg", "jacobi"],
                   help="PETSc preconditioner for --solver petsc (default gamg)")
    p.add_argument("--petsc-options", default="",
                   help="extra PETSc options for --solver petsc, e.g. \"-ksp_monitor -pc_gamg_threshold 0.01\" "
                        "(applied under the prefix homog_; a single option needs the = form: "
                        "--petsc-options=-ksp_monitor)")
    p.add_argument("--model", default=None,
                   help="CGINS checkpoint for --solver cgins (default: models/cgins_default.pt)")
    p.add_argument("--baseline", action="store_true",
                   help="--solver cgins: also solve from a zero start (same solver, same tolerance) and "
                        "record the iterations and time the network saved (or cost)")
    p.add_argument("--symmetries", type=int, default=1, metavar="K",
                   help="--solver cgins: average the network's start over K point symmetries of the grid "
                        "(axis permutations and reflections, at most 48 on a cube grid) before its embedded "
                        "PCG steps; K forward passes (default 1: off)")
    p.add_argument("--groups", type=int, default=1, choices=[1, 2, 3, 6],
                   help="solve the 6 load cases in this many groups (less memory; default 1)")
    p.add_argument("--soft", type=float, default=1e-6, help="void stiffness as a fraction of max E (default 1e-6)")
    p.add_argument("--E", type=float, nargs="+", help="Young's moduli per phase (.npy input)")
    p.add_argument("--nu", type=float, nargs="+", help="Poisson ratios per phase (.npy input)")
    p.add_argument("--size", type=float, nargs=3, default=None,
                   help="cell size (default: the file's; 1 1 1 for .npy input)")
    p.add_argument("--fields", action="store_true",
                   help="also write the displacement fields (+ .xdmf sidecar for ParaView)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (also when not on a terminal)")
    return p


class InputError(Exception):
    pass


def default_output(cell_path: str) -> str:
    stem = os.path.splitext(cell_path)[0]
    return stem + ".result.h5"


def check_output(path):
    """InputError unless ``path`` can be written (checked before the solve, so that no
    work is lost to a typo)."""
    from microstructures.atomic import unwritable
    why = unwritable(path)
    if why:
        raise InputError(f"-o: {why}")


def check_device(device):
    """InputError unless ``device`` is cpu or an available CUDA device."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device}: not a torch device (cpu, cuda, cuda:1 ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _world():
    """(rank, size) of the launcher, without importing MPI for serial runs."""
    launched = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))
    if launched or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        from mpi4py import MPI
        return MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    return 0, 1


def load(args, rank_size):
    """(domain, local cell, full-cell info) for this process."""
    from microstructures.cell import CellError
    from microstructures.io import read_cell
    if not os.path.exists(args.cell):
        raise InputError(f"{args.cell}: no such file")
    try:
        if rank_size[1] > 1:
            from hpc.parallel import setup_parallel
            domain, cell = setup_parallel(args.cell, E=args.E, nu=args.nu, size=args.size)
        else:
            cell = read_cell(args.cell, E=args.E, nu=args.nu)
            if args.size is not None:
                cell.size = tuple(args.size)
            cell.validate()
            domain = None
    except CellError as exc:
        msg = str(exc)
        raise InputError(msg if args.cell in msg else f"{args.cell}: {msg}") from None
    return domain, cell


def petsc_input(args, cell, nranks):
    """What solver.petsc_ref.petsc_homogenize gets: the validated cell in one process;
    under MPI the file's path (each rank reads only its block), or the whole cell on
    every rank when the file alone does not say it all (.npy phases, or --E / --nu /
    --size overriding the file's values)."""
    if nranks == 1:
        return cell
    if args.cell.endswith(".npy") or args.E or args.nu or args.size:
        from microstructures.io import read_cell
        full = read_cell(args.cell, E=args.E, nu=args.nu)
        if args.size is not None:
            full.size = tuple(args.size)
        return full.validate()
    return args.cell


class Progress:
    """Live convergence line on a terminal; periodic log lines otherwise (-v)."""

    def __init__(self, enabled: bool, tty: bool):
        self.enabled, self.tty = enabled, tty
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, k, rel, est, x=None):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        e = float(est.max())
        line = (f"it {k:6d}  max rel residual {float(rel.max()):.3e}  "
                f"C^H err est {e:.2e}  {now - self.t0:7.1f} s" if math.isfinite(e) else
                f"it {k:6d}  max rel residual {float(rel.max()):.3e}  {now - self.t0:7.1f} s")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            log.info(line)

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "models", "cgins_default.pt")


class _CGINSWarmStart:
    """x0(op) for solver.homogenize from a trained CGINS checkpoint. The network sees the
    whole cell: under MPI the Lame fields are gathered on rank 0, which predicts (with the
    network's embedded PCG on a serial operator of the same cell) and sends every rank its
    block; the solve itself stays distributed."""

    def __init__(self, path, device, symmetries: int = 1):
        from model.train import load_model
        self.net = load_model(path, device=device)
        self.symmetries = int(symmetries)
        self.provenance = {"model": os.path.basename(path), "model_sha256": self.net.sha256,
                           "model_symmetries": self.symmetries}

    def __call__(self, op):
        from model.train import warm_start
        dom = op.domain
        if getattr(dom, "size", 1) == 1:
            return warm_start(self.net, op, symmetries=self.symmetries).to(op.dtype)
        from hpc.parallel import gather_field, scatter_field
        from solver.operator import ElasticityOperator
        lam, mu = gather_field(dom, op.lam), gather_field(dom, op.mu)
        full = None
        if dom.rank == 0:
            whole = ElasticityOperator(lam.to(op.device), mu.to(op.device), op.h)
            full = warm_start(self.net, whole, symmetries=self.symmetries).to(op.dtype).cpu().numpy()
        return scatter_field(dom, full, (6, 3), op.dtype, op.device)


def cgins_warm_start(args):
    path = args.model or DEFAULT_MODEL
    if not os.path.exists(path):
        raise InputError(f"--model {path}: no such checkpoint (train one with python -m hpc.train)")
    if args.preconditioner is None:
        args.preconditioner = "multigrid"
    try:
        return _CGINSWarmStart(path, args.device, args.symmetries)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, KeyError ...
        raise InputError(f"--model {path}: not a CGINS checkpoint ({str(exc).splitlines()[0]})") from None


def format_report(res) -> str:
    names = ["11", "22", "33", "23", "13", "12"]
    method = (f"PETSc {res.extra.get('ksp_type', 'cg').upper()} + {res.preconditioner}" if res.solver == "petsc"
              else f"{res.preconditioner}-PCG")
    if res.solver.startswith("cgins"):
        method = f"CGINS warm start + {method}"
    lines = [f"C^H (Voigt {','.join(names)}, engineering shear), {res.shape[0]}x{res.shape[1]}x{res.shape[2]}, "
             f"{res.precision}, {method}:"]
    lines.append("      " + "".join(f"{n:>15s}" for n in names))
    for i in range(6):
        lines.append(f"  {names[i]:>4s}" + "".join(f"{res.C[i, j]:15.6e}" for j in range(6)))
    eng = res.engineering
    lines.append("engineering constants:")
    lines.append("  " + "  ".join(f"{k}={eng[k]:.6g}" for k in ("E1", "E2", "E3")))
    lines.append("  " + "  ".join(f"{k}={eng[k]:.6g}" for k in ("G23", "G13", "G12")))
    lines.append("  " + "  ".join(f"{k}={eng[k]:.6g}" for k in ("nu12", "nu13", "nu23")))
    lines.append(f"  bulk modulus={eng['bulk_modulus']:.6g}  Zener ratio={eng['zener_ratio']:.6g}")
    lines.append(f"iterations per load case: {res.iterations}; max rel residual "
                 f"{max(res.residuals):.2e}; est. rel C^H error {res.error_estimate:.1e}; "
                 f"{res.domain.get('ranks', 1)} rank(s); "
                 f"{'converged' if res.converged else 'NOT CONVERGED'}")
    lines.append(f"time: setup {res.times['setup']:.2f} s, solve {res.times['solve']:.2f} s, "
                 f"total {res.times['total']:.2f} s")
    if "model" in res.extra:
        lines.append(f"CGINS model {res.extra['model']} (sha256 {res.extra['model_sha256'][:12]}), "
                     f"inference {res.extra['time_inference']:.2f} s (in the total)")
    if "iterations_saved" in res.extra:
        lines.append(f"zero start: iterations {res.extra['iterations_zero_start']}, total "
                     f"{res.extra['time_zero_start']:.2f} s; saved by the network: iterations "
                     f"{res.extra['iterations_saved']}, time {res.extra['time_saved']:+.2f} s")
    return "\n".join(lines)


def zero_start_baseline(res, base) -> dict:
    """What the result of ``--solver cgins --baseline`` records of the zero-start solve
    ``base`` next to the warm-started ``res``: its iterations per load case, the
    iterations saved (zero start minus warm start, per case: negative where the network
    cost iterations), the zero start's total time, and the time saved (its total minus
    the warm start's total, inference included: negative where the network does not pay
    for itself), with the relative C^H difference of the two answers (both within the
    tolerance of the same reference, so of the order of the tolerance)."""
    C, C0 = np.asarray(res.C), np.asarray(base.C)
    return {"iterations_zero_start": list(base.iterations),
            "iterations_saved": [int(b) - int(n) for b, n in zip(base.iterations, res.iterations)],
            "time_zero_start": float(base.times["total"]),
            "time_saved": float(base.times["total"] - res.times["total"]),
            "zero_start_converged": bool(base.converged),
            "zero_start_chom_rel_diff": float(np.linalg.norm(C - C0) / np.linalg.norm(C0))}


def result_json(res, out_path) -> dict:
    from hpc.allocator import active_allocator
    return {"C": np.asarray(res.C).tolist(), "engineering": res.engineering,
            "iterations": res.iterations, "residuals": res.residuals, "converged": res.converged,
            "chom_error_estimate": res.error_estimate, "precision": res.precision,
            "preconditioner": res.preconditioner, "times": res.times, "shape": list(res.shape),
            "solver": res.solver, "ranks": res.domain.get("ranks", 1), "allocator": active_allocator(),
            "operator_apply": res.extra.get("operator_apply"), "output": out_path,
            **{k: res.extra[k] for k in ("model", "model_sha256", "time_inference", "iterations_zero_start",
                                         "iterations_saved", "time_zero_start", "time_saved", "ksp_type",
                                         "pc_type", "options", "converged_reason") if k in res.extra}}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank, size = _world()
    logging.basicConfig(level=logging.INFO if (args.verbose and rank == 0) else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    out_path = args.output or default_output(args.cell)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise InputError(f"--threads must be >= 1, got {args.threads}")
            import torch
            torch.set_num_threads(args.threads)
        for name in ("rtol", "ctol", "soft"):
            v = getattr(args, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise InputError(f"--{name} must be a positive number, got {v}")
            if name in ("rtol", "ctol") and v is not None and v >= 1:
                raise InputError(f"--{name} {v:g} asks for no accuracy at all (a relative tolerance below 1, "
                                 "e.g. 1e-6)")
        if args.maxiter < 1:
            raise InputError(f"--maxiter must be >= 1, got {args.maxiter}")
        if not 1 <= args.symmetries <= 48:
            raise InputError(f"--symmetries must be in 1..48, got {args.symmetries}")
        if args.symmetries > 1 and args.solver != "cgins":
            raise InputError(f"--symmetries averages the network's start: it needs --solver cgins, "
                             f"not {args.solver}")
        if args.baseline and args.solver != "cgins":
            raise InputError(f"--baseline compares the network's start with a zero start: it needs "
                             f"--solver cgins, not {args.solver}")
        if os.path.abspath(out_path) == os.path.abspath(args.cell):
            raise InputError("the output file would overwrite the input")
        check_output(out_path)
        check_device(args.device)
        domain, cell = load(args, (rank, size))
        shape = tuple(domain.global_shape) if domain is not None else np.shape(cell.phases)
        if args.solver == "petsc" and min(shape) < 3:
            raise InputError(f"--solver petsc needs at least 3 voxels per axis (a periodic box stencil), the cell "
                             f"is {'x'.join(map(str, shape))}: use --solver pcg")
    except InputError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT

    from solver.homogenize import homogenize
    warm = None
    if args.solver == "cgins":
        try:
            warm = cgins_warm_start(args)
            shape = tuple(domain.global_shape) if domain is not None else np.shape(cell.phases)
            div = 1 << warm.net.cfg.depth
            if any(s % div for s in shape):
                raise InputError(f"--solver cgins: the model needs a grid divisible by 2^depth = {div}, "
                                 f"the cell is {'x'.join(map(str, shape))}")
            if args.symmetries > 1:
                from model.symmetry import grid_symmetries
                h = tuple(float(a) / n for a, n in zip(cell.size, shape))
                n_sym = len(grid_symmetries(shape, h))
                if args.symmetries > n_sym:
                    raise InputError(f"--symmetries {args.symmetries}: this grid ({'x'.join(map(str, shape))}, "
                                     f"voxel {'x'.join(f'{v:g}' for v in h)}) has {n_sym} point symmetries")
        except InputError as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_INPUT
    if rank == 0 and domain is None:
        try:
            from microstructures.percolation import connectivity
            perc, span = connectivity(cell)
            bad = [ax for ax, ok in zip("xyz", perc) if not ok]
            if bad:
                print(f"warning: the solid does not percolate along {', '.join(bad)} "
                      f"through face-connected voxels: C^H there rests on the soft void, or on voxels "
                      f"that touch only at edges or corners (hinges that depend on the grid)", file=sys.stderr)
            elif span < 3:
                print("warning: no single solid cluster spans three directions (separate rods or "
                      "plates): some modes of C^H will be near the soft-void stiffness", file=sys.stderr)
        except ImportError:
            pass
    progress = Progress(enabled=(rank == 0 and not args.quiet and (sys.stderr.isatty() or args.verbose)),
                        tty=sys.stderr.isatty())
    if args.solver == "petsc":
        from solver.petsc_ref import PetscSolveError, petsc_homogenize
        try:
            res = petsc_homogenize(petsc_input(args, cell, size), rtol=args.rtol, pc=args.petsc_pc,
                                   options=args.petsc_options.split() or None, soft=args.soft,
                                   maxiter=args.maxiter, keep_fields=args.fields)
        except PetscSolveError as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAIL
    else:
        res = homogenize(cell, rtol=args.rtol, ctol=args.ctol, maxiter=args.maxiter,
                         precision=args.precision, device=args.device,
                         preconditioner=args.preconditioner, soft=args.soft, domain=domain,
                         callback=progress, keep_fields=args.fields, x0=warm, groups=args.groups)
        if warm is not None:
            res.solver = "cgins+pcg"
            res.extra.update(warm.provenance)
            res.extra["time_inference"] = res.times.get("warm_start", 0.0)
            if args.baseline:
                res.extra.update(zero_start_baseline(res, homogenize(
                    cell, rtol=args.rtol, ctol=args.ctol, maxiter=args.maxiter, precision=args.precision,
                    device=args.device, preconditioner=args.preconditioner, soft=args.soft, domain=domain,
                    groups=args.groups)))
    progress.close()
    disp = phases = None
    if args.fields:
        import torch
        chi, phases = res.chi, cell.phases
        if domain is not None:
            from hpc.parallel import gather_field
            if args.solver != "petsc":          # PETSc gathers its fields on rank 0 itself
                chi = gather_field(domain, chi)
            phases = gather_field(domain, torch.from_numpy(np.ascontiguousarray(cell.phases)))
        if rank == 0:
            from hpc.results import total_displacement
            disp = total_displacement(np.asarray(chi.cpu() if torch.is_tensor(chi) else chi), cell.size)
            phases = np.asarray(phases)
    if rank == 0:
        from hpc.results import sha256_of, write_result
        write_result(out_path, res, input_path=args.cell, input_sha=sha256_of(args.cell),
                     displacement=disp, phases=phases, size=cell.size, materials=(cell.E, cell.nu))
        if args.json:
            print(json.dumps(result_json(res, out_path)))
        else:
            print(format_report(res))
            print(f"result written to {out_path}")
        if res.converged and max(res.residuals) > res.rtol and res.ctol is None:
            print(f"note: the true residual {max(res.residuals):.2e} is above --rtol {res.rtol:g} "
                  f"(the recursive one met it; {res.precision} rounding)", file=sys.stderr)
        if not res.converged:
            print(f"error: not converged within --maxiter {args.maxiter} "
                  f"(max rel residual {max(res.residuals):.2e})", file=sys.stderr)
    return EXIT_OK if res.converged else EXIT_UNCONVERGED


def cli(argv=None) -> int:
    """main() under MPI: an exception on any rank aborts all ranks with that rank's
    message (no rank left waiting in a collective). The command line runs on tcmalloc
    where installed (hpc.allocator; before MPI is initialised)."""
    if argv is None:
        from hpc.allocator import reexec_with_tcmalloc
        reexec_with_tcmalloc(["-m", "hpc.homogenize", *sys.argv[1:]])
    if _world()[1] > 1:
        from hpc.parallel import run_collectively
        return run_collectively(main, argv)
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
