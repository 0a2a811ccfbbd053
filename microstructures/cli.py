"""``python -m microstructures``: generate, inspect and convert cells.

    python -m microstructures tpms gyroid --form sheet --vf 0.2 -n 64 -o gyroid.h5
    python -m microstructures lattice octet --vf 0.15 -n 64 -o octet.h5
    python -m microstructures lattice --list
    python -m microstructures shell kelvin --vf 0.1 -n 64 -o kelvin_shell.h5
    python -m microstructures laminate --axis z --fractions 0.4 0.6 --E 1 10 --nu 0.3 0.3 -o lam.h5
    python -m microstructures inclusions --vf 0.2 --radius 0.1 --gap 0.04 --E 1 10 --nu 0.3 0.2 -o comp.h5
    python -m microstructures voronoi --grains 30 --E 1 5 20 --nu 0.3 0.3 0.25 -o poly.h5
    python -m microstructures info cell.h5
    python -m microstructures convert scan.npy --E 0 1 --nu 0.3 0.3 -o scan.h5   (or -o scan.vti)

Exit status: 0 done; 2 bad arguments or generator parameters (one line on stderr,
nothing written); 1 an input file that cannot be used (one line on stderr).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from . import generators
from .atomic import unwritable
from .cell import Cell, CellError
from .io import read_cell, write_cell
from .percolation import connectivity
from .vti import write_vti

log = logging.getLogger(__name__)

EXIT_INPUT, EXIT_USAGE = 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _UsageError(Exception):
    """A bad argument found after parsing: one line, exit status 2."""


def _grid(values) -> tuple:
    if len(values) not in (1, 3):
        raise _UsageError(f"-n takes 1 or 3 integers, got {len(values)}")
    return values[0] if len(values) == 1 else tuple(values)


def _add_common(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("-n", type=int, nargs="+", default=[32], metavar="N",
                   help="voxels per axis: one value or three (n_x n_y n_z); default 32")
    p.add_argument("--size", type=float, nargs="+", default=[1.0], metavar="L",
                   help="physical cell size, one value or three; default 1")
    p.add_argument("--name", default=None, help="cell name stored in the file")
    if output:
        p.add_argument("-o", "--output", required=True, metavar="OUT.h5", help="cell file to write (HDF5)")
        p.add_argument("--vti", metavar="OUT.vti", help="also write a ParaView .vti file")


def _add_solid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--E", type=float, default=1.0, help="Young's modulus of the solid; default 1")
    p.add_argument("--nu", type=float, default=0.3, help="Poisson's ratio of the solid; default 0.3")


def _add_tol(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tol", type=float, default=generators.VF_TOL,
                   help=f"allowed |voxel volume fraction - target|; default {generators.VF_TOL}")


def _add_periods(p: argparse.ArgumentParser) -> None:
    p.add_argument("--periods", type=int, nargs="+", default=[1], metavar="P",
                   help="unit cells per cell axis, one value or three; default 1")


def _add_strut_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("topology", nargs="?", help="topology name (see --list) or 'random'")
    p.add_argument("--list", action="store_true", help="list the topologies and exit")
    p.add_argument("--vf", type=float, default=None, help="target solid volume fraction")
    p.add_argument("--node-ratio", type=float, default=None,
                   help="add node spheres of this times the strut radius")
    p.add_argument("--flat", action="store_true", help="flat strut ends instead of hemispherical caps")
    p.add_argument("--nodes", type=int, default=16, help="random topology: number of nodes; default 16")
    p.add_argument("--k", type=int, default=4, help="random topology: nearest neighbours joined; default 4")
    p.add_argument("--seed", type=int, default=0, help="random topology: seed; default 0")
    _add_periods(p)
    _add_solid(p)
    _add_tol(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m microstructures",
                     description="Generate, inspect and convert periodic voxel cells (HDF5: /phases, "
                                 "/materials/E, /materials/nu; E = 0 marks void).",
                     epilog="Exit status: 0 done, 2 bad arguments (nothing written), 1 unusable input file.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("tpms", help="TPMS network or sheet solid",
                       description="TPMS solid from the level-set function T of a surface: network T <= c, "
                                   "sheet |T| <= c, the level c solved for the volume fraction.")
    p.add_argument("surface", help="P, G (gyroid), D (diamond), IWP or FRD")
    p.add_argument("--form", choices=generators.FORMS, default="network",
                   help="network (T <= c) or sheet (|T| <= c); default network")
    p.add_argument("--vf", type=float, required=True, help="target solid volume fraction")
    _add_periods(p)
    _add_solid(p)
    _add_tol(p)
    _add_common(p)

    p = sub.add_parser("lattice", help="strut lattice", description="Strut lattice (cylinders with "
                       "spherical caps) on a periodic topology, the strut radius solved for the volume fraction.")
    _add_strut_options(p)
    _add_common(p, output=False)
    p.add_argument("-o", "--output", metavar="OUT.h5", help="cell file to write (HDF5); required unless --list")
    p.add_argument("--vti", metavar="OUT.vti", help="also write a ParaView .vti file")

    p = sub.add_parser("shell", help="hollow-strut (shell) lattice", description="Hollow struts on a periodic "
                       "topology, the wall thickness solved for the volume fraction.")
    _add_strut_options(p)
    p.add_argument("--outer-radius", type=float, default=None,
                   help="outer tube radius; default: that of a solid lattice of volume fraction min(2 vf, (1+vf)/2)")
    _add_common(p, output=False)
    p.add_argument("-o", "--output", metavar="OUT.h5", help="cell file to write (HDF5); required unless --list")
    p.add_argument("--vti", metavar="OUT.vti", help="also write a ParaView .vti file")

    p = sub.add_parser("laminate", help="layered composite", description="Layers normal to an axis, "
                       "layer k of thickness fraction k and material (E_k, nu_k).")
    p.add_argument("--axis", default="z", choices=["x", "y", "z"], help="layer normal; default z")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.5], help="layer thickness fractions")
    p.add_argument("--E", type=float, nargs="+", default=[1.0, 10.0], help="Young's modulus per layer (0 = void)")
    p.add_argument("--nu", type=float, nargs="+", default=[0.3, 0.3], help="Poisson's ratio per layer")
    p.add_argument("--periods", type=int, default=1, help="repeats of the layer stack; default 1")
    _add_common(p)

    p = sub.add_parser("inclusions", help="spherical / ellipsoidal inclusions or pores",
                       description="Non-overlapping periodic inclusions (phase 1) in a matrix (phase 0) by "
                                   "random sequential addition; their size fine-tuned for the volume fraction.")
    p.add_argument("--vf", type=float, required=True, help="target inclusion volume fraction")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--radius", type=float, default=None, help="equivalent sphere radius; default 0.1 cell")
    size.add_argument("--count", type=int, default=None, help="number of inclusions (instead of --radius)")
    p.add_argument("--shape", choices=["sphere", "ellipsoid"], default="sphere", help="default sphere")
    p.add_argument("--axes", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("A", "B", "C"),
                   help="ellipsoid semi-axis ratios")
    p.add_argument("--aligned", action="store_true", help="ellipsoids aligned with x, y, z (default random)")
    p.add_argument("--pores", action="store_true", help="make the inclusions void (E = 0)")
    p.add_argument("--E", type=float, nargs=2, default=[1.0, 10.0], metavar=("E_MATRIX", "E_INCL"),
                   help="Young's moduli of matrix and inclusions (0 = void)")
    p.add_argument("--nu", type=float, nargs=2, default=[0.3, 0.3], metavar=("NU_MATRIX", "NU_INCL"),
                   help="Poisson's ratios of matrix and inclusions")
    p.add_argument("--gap", type=float, default=0.0,
                   help="least clearance between inclusions (cell units); default 0, where inclusions closer "
                        "than a voxel may touch in the voxel image (a warning says so): a gap of a voxel or two "
                        "keeps them apart")
    p.add_argument("--seed", type=int, default=0, help="random seed; default 0")
    _add_tol(p)
    _add_common(p)

    p = sub.add_parser("voronoi", help="multi-phase periodic Voronoi polycrystal",
                       description="Periodic Voronoi grains around random seeds; grains assigned to the phases "
                                   "given by --E/--nu in proportion to --fractions.")
    p.add_argument("--grains", type=int, default=16, help="number of grains; default 16")
    p.add_argument("--E", type=float, nargs="+", default=[1.0, 10.0], help="Young's modulus per phase (0 = void)")
    p.add_argument("--nu", type=float, nargs="+", default=[0.3, 0.3], help="Poisson's ratio per phase")
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="share of grains per phase")
    p.add_argument("--seed", type=int, default=0, help="random seed; default 0")
    _add_common(p)

    p = sub.add_parser("info", help="describe a cell file",
                       description="Shape, phases, materials, volume fraction and percolation of a cell.")
    p.add_argument("path", help="cell file (.h5, or .npy with --E and --nu)")
    p.add_argument("--E", type=float, nargs="+", default=None, help="materials for .npy phases")
    p.add_argument("--nu", type=float, nargs="+", default=None, help="materials for .npy phases")

    p = sub.add_parser("convert", help="convert .npy/.h5 to .h5 or .vti",
                       description="Read a cell (.h5, or .npy phases with --E and --nu) and write it as HDF5, "
                                   "or as ParaView .vti when OUT ends in .vti.")
    p.add_argument("path", help="input cell (.h5 or .npy)")
    p.add_argument("-o", "--output", required=True, help="output .h5 or .vti")
    p.add_argument("--E", type=float, nargs="+", default=None, help="Young's modulus per phase (0 = void)")
    p.add_argument("--nu", type=float, nargs="+", default=None, help="Poisson's ratio per phase")
    p.add_argument("--ascii", action="store_true", help=".vti: ASCII instead of base64 binary")
    return parser


# -- commands ------------------------------------------------------------------------------

def _triple_or_scalar(values, name):
    if len(values) not in (1, 3):
        raise _UsageError(f"{name} takes 1 or 3 values, got {len(values)}")
    return values[0] if len(values) == 1 else tuple(values)


_NOT_HDF5 = (".npy", ".npz", ".vti", ".vtk", ".vtu", ".xdmf", ".xmf", ".raw", ".tif", ".tiff")


def _check_output(path, what: str = "-o", formats: str = "hdf5") -> None:
    """A writable output path whose extension names the format written: HDF5 for a cell
    file (a .npy or .vti name would hold HDF5 that no other tool reads), .vti for --vti."""
    if path is None:
        raise _UsageError("-o/--output is required")
    why = unwritable(path)
    if why:
        raise _UsageError(why)
    ext = os.path.splitext(path)[1].lower()
    if formats == "hdf5" and ext in _NOT_HDF5:
        raise _UsageError(f"{what} {path}: a cell file is HDF5, not {ext}: name it .h5"
                          + (" (and use --vti for ParaView)" if ext in (".vti", ".vtk", ".vtu") else ""))
    if formats == "vti" and ext != ".vti":
        raise _UsageError(f"{what} {path}: a ParaView image file must end in .vti")
    if formats == "hdf5|vti" and ext in _NOT_HDF5 and ext != ".vti":
        raise _UsageError(f"{what} {path}: convert writes HDF5 (.h5) or ParaView (.vti), not {ext}")


def _strut_topology(args):
    if args.topology is None:
        raise _UsageError("give a topology (see --list)")
    return args.topology


def _generate(args) -> tuple[Cell, str]:
    """Run the generator of ``args.command``; return the cell and what was solved for."""
    common = dict(n=_grid(args.n), size=_triple_or_scalar(args.size, "--size"), name=args.name)
    c = args.command
    if c == "tpms":
        cell = generators.tpms(args.surface, form=args.form, vf=args.vf, E=args.E, nu=args.nu,
                               periods=_triple_or_scalar(args.periods, "--periods"), tol=args.tol, **common)
        return cell, f"level c = {cell.params['level']:.6g}"
    if c in ("lattice", "shell"):
        topo = _strut_topology(args)
        if args.vf is None:
            raise _UsageError("--vf is required")
        opts = dict(vf=args.vf, periods=_triple_or_scalar(args.periods, "--periods"), E=args.E, nu=args.nu,
                    node_ratio=args.node_ratio, caps=not args.flat, tol=args.tol, nodes=args.nodes, k=args.k,
                    seed=args.seed, **common)
        if c == "lattice":
            cell = generators.lattice(topo, **opts)
            return cell, f"strut radius r = {cell.params['radius']:.6g}"
        cell = generators.shell_lattice(topo, outer_radius=args.outer_radius, **opts)
        return cell, (f"outer radius {cell.params['outer_radius']:.6g}, "
                      f"wall thickness {cell.params['thickness']:.6g}")
    if c == "laminate":
        cell = generators.laminate(args.fractions, E=args.E, nu=args.nu, axis=args.axis, periods=args.periods,
                                   **common)
        got = ", ".join(f"{v:.4f}" for v in cell.params["fractions_achieved"])
        return cell, f"layer fractions {got}"
    if c == "inclusions":
        E = [args.E[0], 0.0] if args.pores else args.E
        cell = generators.inclusions(vf=args.vf, radius=args.radius, count=args.count, shape=args.shape,
                                     axes=args.axes, aligned=args.aligned, E=E, nu=args.nu, seed=args.seed,
                                     gap=args.gap, tol=args.tol, **common)
        p = cell.params
        apart = "" if p["clusters"] >= p["count"] else f" ({p['clusters']} separate in the voxel image)"
        return cell, (f"{p['count']} {p['shape']}(s){apart}, radius {p['radius']:.6g}, "
                      f"inclusion fraction {p['vf_achieved']:.4f}")
    if c == "voronoi":
        cell = generators.voronoi(args.grains, E=args.E, nu=args.nu, fractions=args.fractions, seed=args.seed,
                                  **common)
        got = ", ".join(f"{v:.4f}" for v in cell.params["phase_fractions"])
        return cell, f"phase fractions {got}"
    raise _UsageError(f"unknown command {c}")


def _warn_percolation(cell: Cell, conn=None) -> tuple[bool, bool, bool]:
    perc, rank = conn if conn is not None else connectivity(cell)
    missing = [ax for ax, ok in zip("xyz", perc) if not ok]
    if missing:
        print(f"warning: the solid does not connect opposite faces in {', '.join(missing)} "
              "through face-connected voxels: the stiffness there rests on the soft void, or on voxels "
              "that touch only at edges or corners (hinges that depend on the grid)", file=sys.stderr)
    elif rank < 3:
        print("warning: no single solid cluster spans three directions (separate rods or plates): "
              "some modes of the stiffness are those of the soft void material", file=sys.stderr)
    return perc


def _cmd_generate(args) -> int:
    if args.command in ("lattice", "shell") and args.list:
        for name in generators.topology_names():
            print(f"{name:22s} {generators.topology(name).description}")
        print(f"{'random':22s} random periodic k-nearest-neighbour graph (--nodes, --k, --seed)")
        return 0
    if args.command in ("lattice", "shell"):
        _strut_topology(args)
    _check_output(args.output)
    if args.vti:
        _check_output(args.vti, "--vti", "vti")
        if os.path.abspath(args.vti) == os.path.abspath(args.output):
            raise _UsageError(f"--vti {args.vti} is the -o file: give the .vti its own name")
    cell, solved = _generate(args)
    cell.validate()                             # before anything is written (or an old .vti removed)
    if args.vti:                                # both or neither: the .vti first, removed if the cell fails
        write_vti(cell, args.vti)
        try:
            write_cell(cell, args.output)
        except BaseException:
            os.unlink(args.vti)
            raise
    else:
        write_cell(cell, args.output)
    shape = "x".join(map(str, cell.shape))
    print(f"{args.output}: {cell.generator} {shape}, volume fraction {cell.volume_fraction:.4f}, {solved}")
    _warn_percolation(cell)
    return 0


def _cmd_info(args) -> int:
    cell = read_cell(args.path, E=args.E, nu=args.nu)
    counts = [int(c) for c in np.bincount(cell.phases.ravel(), minlength=cell.n_phases)]
    total = cell.phases.size
    print(f"{args.path}: {cell.name or '(unnamed)'}")
    print(f"  shape      {' x '.join(map(str, cell.shape))} voxels, size {' x '.join(f'{s:g}' for s in cell.size)}")
    print(f"  phases     {cell.n_phases}")
    for p in range(cell.n_phases):
        kind = "void" if cell.E[p] == 0 else f"E = {cell.E[p]:g}, nu = {cell.nu[p]:g}"
        print(f"    {p:3d}  {kind:32s} {counts[p] / total:8.4%} of voxels")
    print(f"  volume fraction (solid) {cell.volume_fraction:.4f}")
    perc, rank = connectivity(cell)
    print("  percolates " + ", ".join(f"{ax} {'yes' if ok else 'no'}" for ax, ok in zip("xyz", perc))
          + f"; one cluster spans {rank} direction{'s' if rank != 1 else ''}")
    if cell.generator:
        print(f"  generator  {cell.generator} {cell.params_json()}")
    if not all(perc) or rank < 3:
        _warn_percolation(cell, (perc, rank))
    return 0


def _cmd_convert(args) -> int:
    _check_output(args.output, formats="hdf5|vti")
    if os.path.exists(args.output) and os.path.exists(args.path) and os.path.samefile(args.output, args.path):
        raise _UsageError(f"-o {args.output} is the input file: give the output its own name")
    try:
        cell = read_cell(args.path, E=args.E, nu=args.nu)
    except CellError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if args.output.lower().endswith(".vti"):
        write_vti(cell, args.output, binary=not args.ascii)
    else:
        write_cell(cell, args.output)
    print(f"{args.output}: {cell.summary()}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(name)s: %(message)s")
    try:
        if args.command == "info":
            try:
                return _cmd_info(args)
            except CellError as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_INPUT
        if args.command == "convert":
            return _cmd_convert(args)
        return _cmd_generate(args)
    except (_UsageError, CellError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"{parser.prog} {args.command}: error: out of memory: the grid is too large for this machine "
              "(-n)", file=sys.stderr)
        return EXIT_USAGE
