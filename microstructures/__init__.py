"""Periodic voxel microstructures: the Cell, its files, and generators.

    Cell, CellError                 cell.py         phases + per-phase isotropic materials
    read_cell, write_cell, ...      io.py           HDF5 / .npy I/O, periodic block reads
    percolates, spanning_rank, ...  percolation.py  solid connectivity across the period
    write_vti                       vti.py          ParaView export
    tpms, lattice, ...              generators/     TPMS, strut and shell lattices, laminates,
                                                    inclusions, Voronoi polycrystals
    python -m microstructures ...   cli.py          generate, inspect and convert cells
"""
from .cell import Cell, CellError
from .generators import (inclusions, laminate, lattice, random_graph, shell_lattice, topology,
                         topology_names, tpms, voronoi)
from .io import read_cell, read_header, read_phases_block, write_cell
from .percolation import connectivity, percolates, spanning_rank
from .vti import write_vti

__all__ = ["Cell", "CellError", "read_cell", "write_cell", "read_header", "read_phases_block", "percolates",
           "spanning_rank", "connectivity",
           "write_vti", "default_cell", "tpms", "lattice", "shell_lattice", "laminate", "inclusions", "voronoi",
           "topology", "topology_names", "random_graph"]


def default_cell() -> Cell:
    """The bundled example: gyroid sheet, solid volume fraction 0.2, 32^3, E = 1, nu = 0.3, void phase 0.

    Generated on each call (a few milliseconds), deterministic, so no binary file is shipped.
    """
    return tpms("gyroid", form="sheet", vf=0.2, n=32, E=1.0, nu=0.3, name="default-gyroid-sheet-vf0.2-n32")
