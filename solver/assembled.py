"""Assembled scipy.sparse periodic stiffness matrix: the test oracle for small grids.

Global dof of node (i, j, k), component c: 3 * ((i * n_y + j) * n_z + k) + c.
Built independently of the matrix-free operator (explicit element loop over
corners with scipy COO assembly), so the two can check each other.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .element import CORNERS, affine_element_displacements, element_stiffness
from .materials import phase_lame, phases_present


def _element_dofs(shape) -> np.ndarray:
    """(n_vox, 24) global dof indices of each voxel's element dofs."""
    nx, ny, nz = shape
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    dofs = np.empty((nx * ny * nz, 24), dtype=np.int64)
    for a, (ax, ay, az) in enumerate(CORNERS):
        node = (((i + ax) % nx) * ny + (j + ay) % ny) * nz + (k + az) % nz
        for c in range(3):
            dofs[:, 3 * a + c] = 3 * node.ravel() + c
    return dofs


def assemble(phases, E, nu, h=(1.0, 1.0, 1.0), soft: float = 1e-6):
    """(K, F, ke_per_voxel_index) with K the (3N, 3N) CSR matrix and F (3N, 6) the
    right-hand sides of the six unit strains."""
    phases = np.asarray(phases)
    lam_p, mu_p = phase_lame(E, nu, soft, present=phases_present(phases, len(np.atleast_1d(E))))
    kes = np.stack([element_stiffness(l, m, h) for l, m in zip(lam_p, mu_p)])  # (P, 24, 24)
    U0 = affine_element_displacements(h)                                       # (6, 24)
    dofs = _element_dofs(phases.shape)
    pid = phases.ravel().astype(np.int64)
    ke = kes[pid]                                                              # (n_vox, 24, 24)
    rows = np.repeat(dofs, 24, axis=1).ravel()
    cols = np.tile(dofs, (1, 24)).ravel()
    n = 3 * phases.size
    K = sp.coo_matrix((ke.ravel(), (rows, cols)), shape=(n, n)).tocsr()
    fe = np.einsum("vab,ib->via", ke, U0)                                       # (n_vox, 6, 24)
    Fm = np.zeros((n, 6))
    for i in range(6):
        np.add.at(Fm[:, i], dofs.ravel(), fe[:, i, :].ravel())
    return K, Fm, (kes, pid, dofs, U0)


def direct_chom(phases, E, nu, size=(1.0, 1.0, 1.0), soft: float = 1e-6):
    """C^H by a direct sparse solve: fix the translation null space by adding the
    rank-3 term (mean constraint) K + c * T T^T, solve, project mean-free, then
    evaluate the energy form element by element. Returns (C (6,6), chi (6,3,nx,ny,nz))."""
    phases = np.asarray(phases)
    shape = phases.shape
    h = tuple(s / n for s, n in zip(size, shape))
    K, Fm, (kes, pid, dofs, U0) = assemble(phases, E, nu, h, soft)
    n = K.shape[0]
    if n > 3 * 20 ** 3:
        raise ValueError("direct_chom is meant for small grids (<= 20^3 voxels)")
    # Saddle-point system [[K, T], [T^T, 0]]: T's columns are the three rigid
    # translations, so the solution is the mean-free one (no pinned node).
    T = sp.csr_matrix((np.ones(n), (np.arange(n), np.arange(n) % 3)), shape=(n, 3))
    A = sp.bmat([[K, T], [T.T, None]]).tocsc()
    X = spla.splu(A).solve(np.vstack([Fm, np.zeros((3, 6))]))[:n]
    T = T.toarray()
    X -= T @ (T.T @ X) / (n // 3)
    vol = float(np.prod(size))
    C = np.zeros((6, 6))
    D = U0[None, :, :] - X[dofs].transpose(0, 2, 1)                       # (n_vox, 6, 24)
    C = np.einsum("via,vab,vjb->ij", D, kes[pid], D) / vol
    chi = X.T.reshape(6, shape[0], shape[1], shape[2], 3).transpose(0, 4, 1, 2, 3)
    return 0.5 * (C + C.T), np.ascontiguousarray(chi)
