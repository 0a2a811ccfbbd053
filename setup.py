from setuptools import setup, find_packages

setup(
    name="homogenize",
    version="0.1.0",
    description="Computational homogenization of periodic voxel microstructures",
    packages=find_packages(include=["microstructures*", "solver*", "model*", "hpc*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "scipy", "h5py", "torch==2.13.0", "pyyaml", "tqdm"],
    extras_require={"mpi": ["mpi4py"], "petsc": ["petsc4py"],
                    "batch": ["dask[distributed]", "dask-jobqueue"]},
)
