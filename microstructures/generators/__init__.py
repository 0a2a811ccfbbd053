"""Cell generators. Each returns a Cell with ``generator`` and ``params`` filled in,
is deterministic (given its seed where it draws random numbers) and periodic across the
cell faces.

    tpms           TPMS network / sheet solids (P, G, D, IWP, FRD)        minimal_surfaces.py
    lattice        strut lattices on named or random periodic topologies  lattices.py
    shell_lattice  hollow-strut lattices                                   lattices.py
    laminate       layered composites                                      laminates.py
    inclusions     spherical / ellipsoidal inclusions or pores (RSA)       particles.py
    voronoi        multi-phase periodic Voronoi polycrystals               polycrystals.py

Volume-fraction targets are met on the voxel grid to within ``tol`` = 0.005 absolute
(level.py explains how the level set is chosen), else CellError.
"""
from .grid import VF_TOL
from .laminates import laminate
from .lattices import lattice, shell_lattice
from .minimal_surfaces import FORMS, SURFACES, tpms, tpms_field
from .particles import inclusions
from .polycrystals import voronoi
from .topologies import Topology, random_graph, topology, topology_names

__all__ = ["VF_TOL", "tpms", "tpms_field", "SURFACES", "FORMS", "lattice", "shell_lattice", "Topology", "topology",
           "topology_names", "random_graph", "laminate", "inclusions", "voronoi"]
