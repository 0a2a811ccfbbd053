"""CGINS: periodic sparse convolution, multilevel U-Net, embedded PCG, energy loss."""
from .embedded_pcg import embedded_pcg, mean_free
from .loss import LossConfig, cgins_loss, potential_energy
from .network import CGINS, CGINSConfig, CGINSOutput
from .sparse_conv import SparseConv3d, SparseDown, SparseGrid, SparseTensor, SparseUp

__all__ = ["CGINS", "CGINSConfig", "CGINSOutput", "LossConfig", "cgins_loss", "potential_energy",
           "embedded_pcg", "mean_free", "SparseGrid", "SparseTensor", "SparseConv3d", "SparseDown",
           "SparseUp"]
