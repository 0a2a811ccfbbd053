"""Periodic voxel elasticity: materials, hex8 element, matrix-free operator, PCG, C^H."""
from .domain import SerialDomain
from .homogenize import HomogenizationResult, homogenize
from .materials import engineering_constants, isotropic_voigt
from .operator import ElasticityOperator
from .pcg import pcg

__all__ = ["SerialDomain", "ElasticityOperator", "pcg", "homogenize", "HomogenizationResult",
           "isotropic_voigt", "engineering_constants"]
