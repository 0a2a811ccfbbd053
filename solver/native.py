"""The fused hex8 applies in C (solver/native/hex8.c), built on first use, loaded with ctypes.

Fine level (``hex8_apply``): f_e = mu_e K0 u_e for every voxel (one Poisson ratio:
K0 = K_mu + r K_lambda, 24 x 24), gathered, multiplied and added into the nodes in one
pass per voxel row, the voxels of a row in the SIMD lanes; no temporary beyond a
ghosted window of u. Coarse levels (``hex8_coarse_apply``): K_E u_E with a 24 x 24
matrix per voxel (the multigrid's Lame-weight level and its shared / own matrices),
in the scatter form. Both run on PyTorch's own OpenMP threads (the library links
libgomp.so.1, which resolves to the copy torch loaded). On the project's 2-core VM the
fine apply is ~2x the convolution form and the first coarse level's ~2x its PyTorch
path (BENCHMARKS.md, "Operator apply"). They serve CPU operators in float32 and
float64; CUDA, two Poisson ratios and autograd keep the PyTorch paths.

The library is compiled with the system C compiler (``cc``, or ``$CC``; ``make setup``
installs gcc) with ``-O3 -march=native -fopenmp`` into ``$HOMOG_CACHE`` (default
``~/.cache/homog``), keyed by the source, the flags and the CPU, written atomically
(several MPI ranks may build it at once). ``HOMOG_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("native")
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=gnu11"]
_lib = None
_error: Optional[str] = None


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "".join(lines)


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found: install gcc (apt-get install gcc) or set CC")
    srcs = sorted(_SRC.glob("*.[ch]"))
    h = hashlib.sha256()
    for s in srcs:
        h.update(s.read_bytes())
    h.update(" ".join(_FLAGS).encode())
    h.update(_cpu_key().encode())
    h.update(platform.machine().encode())
    cache = Path(os.environ.get("HOMOG_CACHE", Path.home() / ".cache" / "homog"))
    name = f"hex8-{h.hexdigest()[:16]}.so"
    if (cache / name).exists():
        return cache / name
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise OSError(f"{cache} is not writable")
    except OSError:             # a read-only home (some cluster nodes): a per-user temp dir
        cache = Path(tempfile.gettempdir()) / f"homog-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
        if (cache / name).exists():
            return cache / name
    lib = cache / name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_FLAGS, str(_SRC / "hex8.c"), "-o", tmp],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed to build solver/native/hex8.c: {r.stderr.strip()[:500]}")
        os.replace(tmp, lib)             # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def library():
    """The loaded library, or None (with ``error()`` saying why) where it cannot be built."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    if os.environ.get("HOMOG_NATIVE", "1") == "0":
        _error = "turned off by HOMOG_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        P, I64, D, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
        for name in ("hex8_apply_f32", "hex8_apply_f64"):
            fn = getattr(lib, name)
            fn.argtypes = [P, P, P, P, P, P, P, I64, I64, I64, I64, D, I, I, I]
            fn.restype = I
        for name in ("hex8_coarse_apply_f32", "hex8_coarse_apply_f64"):
            fn = getattr(lib, name)
            fn.argtypes = [P, P, P, P, I64, I64, I64, I64, I, I, P, P, P, P, P, P, P, P, I]
            fn.restype = I
        _lib = lib
    except (RuntimeError, OSError) as e:
        _error = str(e)
        log.warning("the fused C operator apply is unavailable (%s): using the slower convolution "
                    "form; install gcc (apt-get install gcc libc6-dev) or set HOMOG_NATIVE=0", _error)
    return _lib


def error() -> Optional[str]:
    library()
    return _error


def available() -> bool:
    return library() is not None


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * t.dim())(*t.stride())


def hex8_apply(uw: torch.Tensor, mu_w: torch.Tensor, y: torch.Tensor, K0: torch.Tensor,
               sign: float = 1.0, assign: bool = True, zwrap: bool = False,
               threads: Optional[int] = None) -> None:
    """y (B, 3, L, ny, nz) = (or +=) sign * sum_e mu_e K0 u_e over the window.

    uw: (B, 3, L+2, ny+2, nz+2) nodes -1 .. L of the slab (a ghosted window);
    mu_w: (L+1, ny+1, nz+1) voxels -1 .. L-1; K0: (24, 24) contiguous, symmetric;
    all CPU tensors of one dtype (float32 or float64), any strides (channels-last
    is the fast one for y). ``zwrap``: the window's z axis is the whole periodic axis
    (its ghost nodes are copies of its own): each row's nz voxels are made once and the
    contribution to node nz folds onto node 0. ``threads``: default
    torch.get_num_threads()."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native hex8 apply unavailable: {_error}")
    dt = uw.dtype
    if not (mu_w.dtype == y.dtype == K0.dtype == dt) or dt not in (torch.float32, torch.float64):
        raise TypeError("hex8_apply: u, mu, y and K0 must share dtype float32 or float64")
    B, c, Lw, nyw, nzw = uw.shape
    L, ny, nz = Lw - 2, nyw - 2, nzw - 2
    if c != 3 or tuple(y.shape) != (B, 3, L, ny, nz) or tuple(mu_w.shape) != (L + 1, ny + 1, nz + 1):
        raise ValueError(f"hex8_apply: shapes u {tuple(uw.shape)}, mu {tuple(mu_w.shape)}, y {tuple(y.shape)}")
    if not K0.is_contiguous() or tuple(K0.shape) != (24, 24):
        raise ValueError("hex8_apply: K0 must be a contiguous (24, 24) tensor")
    fn = lib.hex8_apply_f32 if dt == torch.float32 else lib.hex8_apply_f64
    rc = fn(uw.data_ptr(), _strides(uw), mu_w.data_ptr(), _strides(mu_w), y.data_ptr(), _strides(y),
            K0.data_ptr(), B, L, ny, nz, float(sign), int(bool(assign)), int(bool(zwrap)),
            int(threads or torch.get_num_threads()))
    if rc != 0:
        raise RuntimeError(f"hex8_apply failed (code {rc})")


def _ptr(t: Optional[torch.Tensor], dtype=None, shape_tail=None) -> int:
    if t is None:
        return 0
    if not t.is_contiguous() or (dtype is not None and t.dtype != dtype) or t.device.type != "cpu":
        raise ValueError(f"hex8_coarse_apply: per-voxel data must be contiguous CPU tensors of {dtype}")
    if shape_tail is not None and tuple(t.shape[-len(shape_tail):]) != tuple(shape_tail):
        raise ValueError(f"hex8_coarse_apply: per-voxel data of shape {tuple(t.shape)}")
    return t.data_ptr()


def hex8_coarse_apply(ug: torch.Tensor, yg: torch.Tensor, *, coef=None, kind=None, bases=None, sums=None,
                      code=None, row=None, shared=None, km=None, center: bool = True,
                      threads: Optional[int] = None) -> None:
    """yg = sum_E scatter(K_E u_E) for a coarse level, every node of yg written.

    ug, yg: (B, 3, l_x + 1, l_y + 1, l_z + 1), the owned nodes and one high ghost layer
    (Domain.ghost(u, hi=1); fold yg with Domain.accumulate(yg, hi=1)). The voxels'
    matrices, one of:
      coef (l_x, l_y, l_z, 8), kind uint8 (l_x, l_y, l_z), bases (kinds, 8, 24, 24),
        sums (kinds, 24, 24): K_E = coef_0 sums[kind] where the 8 weights are equal,
        else sum_j coef_j bases[kind, j] (GalerkinCoefficientOperator, one Poisson ratio);
      code int16 and row int32 (l_x, l_y, l_z), shared (S, 24, 24), km (M, 24, 24):
        K_E = shared[code] where code >= 0, else km[row] (ElementMatrixOperator).
    Every K_E symmetric; ``center``: every K_E annihilates translations (Galerkin
    matrices do), and u_E minus one of its node values is multiplied (fewer digits lost
    to cancellation)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native hex8 apply unavailable: {_error}")
    dt = ug.dtype
    if yg.dtype != dt or dt not in (torch.float32, torch.float64):
        raise TypeError("hex8_coarse_apply: u and y must share dtype float32 or float64")
    B, c, X, Y, Z = ug.shape
    if c != 3 or tuple(yg.shape) != tuple(ug.shape):
        raise ValueError(f"hex8_coarse_apply: shapes u {tuple(ug.shape)}, y {tuple(yg.shape)}")
    vox = (X - 1, Y - 1, Z - 1)
    if coef is not None:
        mode = 1
        args = [_ptr(coef, dt, vox + (8,)), _ptr(kind, torch.uint8, vox), _ptr(bases, dt, (8, 24, 24)),
                _ptr(sums, dt, (24, 24)), 0, 0, 0, 0]
    else:
        mode = 2
        args = [0, 0, 0, 0, _ptr(code, torch.int16, vox), _ptr(row, torch.int32, vox),
                _ptr(shared, dt, (24, 24)) if shared.shape[0] else 0, _ptr(km, dt, (24, 24)) if km.shape[0] else 0]
    fn = lib.hex8_coarse_apply_f32 if dt == torch.float32 else lib.hex8_coarse_apply_f64
    rc = fn(ug.data_ptr(), _strides(ug), yg.data_ptr(), _strides(yg), B, *vox, mode, int(bool(center)), *args,
            int(threads or torch.get_num_threads()))
    if rc != 0:
        raise RuntimeError(f"hex8_coarse_apply failed (code {rc})")
