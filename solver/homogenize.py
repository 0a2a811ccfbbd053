"""solver.homogenize(cell) -> HomogenizationResult: the single-process API.

The same function runs distributed when given an MPI Domain (hpc.domain): the cell
then holds only the rank's block of phases (plus nothing else: the operator asks the
Domain for ghosts).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from .domain import SerialDomain
from .materials import engineering_constants
from .operator import ElasticityOperator, EnergyCH
from .pcg import PCGInfo, pcg

log = logging.getLogger(__name__)

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def release_free_memory() -> str:
    """Hand the allocator's free pages back to the operating system, between phases
    of a solve: tcmalloc (the command-line tools run on it, hpc.allocator) keeps the
    spans of freed fields, and a later phase whose temporaries have other sizes (the
    setup's, the float64 C^H pass's) maps new pages next to them, which raises the
    peak resident set. Once per phase it costs a few ms (the pages are touched again
    when reused); on every free it would cost the solve twice over (BENCHMARKS.md,
    TCMALLOC_AGGRESSIVE_DECOMMIT). Returns what was called: 'tcmalloc', 'glibc' or ''."""
    import ctypes
    try:
        lib = ctypes.CDLL(None)
    except OSError:                                  # pragma: no cover - not on Linux
        return ""
    for name, tag in (("MallocExtension_ReleaseFreeMemory", "tcmalloc"), ("malloc_trim", "glibc")):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        if tag == "glibc":
            fn.argtypes = [ctypes.c_size_t]
            fn(0)
        else:
            fn()
        return tag
    return ""


@dataclasses.dataclass
class HomogenizationResult:
    C: np.ndarray                       # (6, 6) Voigt, engineering shear
    iterations: list                    # per load case
    residuals: list                     # true relative residual per load case
    converged: bool
    error_estimate: float               # estimated ||C - C*||_F / ||C||_F
    error_estimate_cases: list          # estimated relative error of C_ii per case
    precision: str
    solver: str
    preconditioner: str
    rtol: float
    ctol: Optional[float]
    times: dict
    shape: tuple
    device: str
    domain: dict
    soft: float
    chi: Optional[torch.Tensor] = None  # (6, 3, l_x, l_y, l_z) fluctuations, if kept
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def engineering(self) -> dict:
        return engineering_constants(self.C)


def _default_preconditioner(op, name: str):
    if name == "jacobi":
        dinv = 1.0 / op.diagonal(cache=False)
        return lambda r: r * dinv
    if name in ("multigrid", "mg"):
        try:
            from .multigrid import build_multigrid
        except ImportError as exc:  # pragma: no cover - until the multigrid lands
            raise ValueError(f"preconditioner {name!r} is not available: {exc}") from None
        return build_multigrid(op)
    raise ValueError(f"unknown preconditioner {name!r} (choose jacobi or multigrid)")


def homogenize(cell, rtol: float = 1e-6, ctol: Optional[float] = None, maxiter: int = 20000,
               precision: str = "float64", device: str = "cpu", preconditioner: str = "jacobi",
               soft: float = 1e-6, domain=None, x0: Optional[torch.Tensor] = None,
               callback: Optional[Callable] = None, keep_fields: bool = False,
               groups: int = 1, flush_denormal: bool = True) -> HomogenizationResult:
    """Effective stiffness C^H of a periodic cell (docs/DESIGN.md section 2).

    ``cell`` has ``phases`` (the owned block when ``domain`` is distributed), ``E``,
    ``nu`` and ``size``. ``precision`` is the storage precision of the solve; all
    reductions and C^H itself are float64. ``ctol`` additionally stops on the
    estimated relative C^H error. ``callback(k, rel_res, est_err, x)`` each iteration
    (``x``: the current iterate of the load cases being solved; solver.pcg).
    ``x0`` is an initial guess (6, 3, l_x, l_y, l_z) or a callable ``x0(op)`` that makes
    one (e.g. a trained CGINS network: its time is reported as times['warm_start']);
    the answer does not depend on it, only the iteration count.
    ``groups`` > 1 solves the six load cases in that many groups one after another
    (the PCG vectors shrink to 6/groups cases; the operator and preconditioner are
    shared): for when memory is short. Finished groups are kept for C^H only as
    low-precision copies (EnergyCH): bfloat16, or float8 in float32 solves with rtol
    <= 1e-5 and no ctol, where their term is far below the tolerance.
    ``flush_denormal`` sets the CPU's flush-to-zero mode (torch.set_flush_denormal),
    process-wide: soft-void products underflow into denormal floats, which made the
    float32 apply 3x slower here (BENCHMARKS.md); values below 1.2e-38 become 0.
    """
    if groups not in (1, 2, 3, 6):
        raise ValueError(f"groups must be 1, 2, 3 or 6, got {groups}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    t0 = time.perf_counter()
    if flush_denormal:
        torch.set_flush_denormal(True)
    dtype = PRECISIONS[precision]
    dev = torch.device(device)
    phases = np.asarray(cell.phases)
    if domain is None:
        domain = SerialDomain(phases.shape)
    shape = domain.global_shape
    h = tuple(float(s) / n for s, n in zip(cell.size, shape))
    op = ElasticityOperator.from_phases(phases, cell.E, cell.nu, h, soft=soft, domain=domain,
                                        dtype=dtype, device=dev)
    size = 6 // groups
    # |f| is assembled one group at a time: six-case temporaries would set the peak
    # memory of a grouped solve
    fscale = torch.cat([op.dot(*(2 * (op.rhs(absolute=True, cases=range(g * size, (g + 1) * size)),)))
                        for g in range(groups)]).sqrt()
    energy0 = torch.diagonal(op.mean_stiffness()) * op.volume
    M = _default_preconditioner(op, preconditioner)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "cpu":
        release_free_memory()         # the setup's temporaries (peak RSS: see the function)
    t_setup = time.perf_counter() - t0
    t_warm = 0.0
    if callable(x0):
        tw = time.perf_counter()
        x0 = x0(op)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_warm = time.perf_counter() - tw
    chis, infos = [], []
    # a grouped solve that does not return its fields adds each group to C^H as soon as
    # it is solved and keeps it only as a half-size copy (EnergyCH): the last group's
    # fields are the only full-size ones left at the end
    stream = groups > 1 and not keep_fields
    # (finished cases kept as float8 where their term is far below the tolerance: EnergyCH)
    fp8 = dtype == torch.float32 and rtol <= 1e-5 and ctol is None
    acc = EnergyCH(op, store_dtype=torch.float8_e4m3fn if fp8 else None) if stream else None
    for g in range(groups):
        idx = slice(g * size, (g + 1) * size)
        cases = range(g * size, (g + 1) * size)
        xg = x0[idx] if (x0 is not None and groups > 1) else x0
        # the right-hand side as a callable: PCG keeps no copy of f while iterating
        xg, ig = pcg(op, lambda cases=cases: op.rhs(cases=cases), x0=xg, precond=M, rtol=rtol,
                     ctol=ctol, maxiter=maxiter, energy0=energy0[idx], callback=callback,
                     fscale=fscale[idx])
        if stream and g < groups - 1:
            if dev.type == "cpu":
                release_free_memory()     # the PCG's vectors, before the float64 C^H pass
            acc.add(xg, cases, keep="copy")
        else:
            chis.append(xg)
        infos.append(ig)
        del xg
    info = infos[0] if groups == 1 else PCGInfo(
        iterations=sum((i.iterations for i in infos), []),
        residuals=sum((i.residuals for i in infos), []),
        converged=sum((i.converged for i in infos), []),
        energy_error=sum((i.energy_error for i in infos), []),
        history=sum((i.history for i in infos), []))
    mg_summary = M.summary() if hasattr(M, "summary") else None
    # the hierarchy (Galerkin levels, smoother state) is not needed for C^H: free it
    # before chom's float64 temporaries
    del M
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_solve = time.perf_counter() - t0 - t_setup - t_warm      # (streamed: with C^H of all but the last group)
    if stream:                            # the last group, after the hierarchy is freed
        if dev.type == "cpu":
            release_free_memory()
        acc.add(chis.pop(), range((groups - 1) * size, 6), keep=None)
        C = acc.result().cpu().numpy()
    else:
        C = op.chom(chis).cpu().numpy()   # group by group: no six-case copy when grouped
    chi = None
    if keep_fields:
        chi = chis[0] if groups == 1 else torch.cat(chis).contiguous(memory_format=torch.channels_last_3d)
    del chis
    vol = op.volume
    diag = np.clip(np.diag(C), 1e-300, None)
    err_cases = [float(e / vol / d) if math.isfinite(e) else math.inf
                 for e, d in zip(info.energy_error, diag)]
    err_cases = [0.0 if info.residuals[b] == 0.0 else e for b, e in enumerate(err_cases)]
    finite = [e * d for e, d in zip(err_cases, diag)]
    err_F = float(sum(finite) / np.linalg.norm(C)) if all(map(math.isfinite, finite)) else math.inf
    t_total = time.perf_counter() - t0
    return HomogenizationResult(
        C=C, iterations=info.iterations, residuals=info.residuals,
        converged=info.all_converged, error_estimate=err_F, error_estimate_cases=err_cases,
        precision=precision, solver="pcg", preconditioner=preconditioner, rtol=rtol, ctol=ctol,
        times={"setup": t_setup, "warm_start": t_warm, "solve": t_solve, "total": t_total}, shape=tuple(shape),
        device=str(dev), domain=domain.describe(), soft=soft,
        chi=chi, extra={"history": info.history, "groups": groups, "operator_apply": op.apply_form(),
                        **({"multigrid": mg_summary} if mg_summary else {})})
