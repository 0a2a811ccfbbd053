"""Data-parallel set-up for training: who am I, how many are we, where is rank 0.

The three launchers we support describe the job in the environment:

    launcher            rank                  world                  local rank
    torchrun            RANK                  WORLD_SIZE             LOCAL_RANK
    mpirun (Open MPI)   OMPI_COMM_WORLD_RANK  OMPI_COMM_WORLD_SIZE   OMPI_COMM_WORLD_LOCAL_RANK
    mpirun (MPICH/IMPI) PMI_RANK              PMI_SIZE               MPI_LOCALRANKID
    srun (Slurm step)   SLURM_PROCID          SLURM_STEP_NUM_TASKS   SLURM_LOCALID

checked in that order (torchrun under srun, or mpirun inside an allocation, must win
over the allocation's own SLURM_* variables). The Slurm row is used only inside a job
step (SLURM_STEP_ID set): a batch script's own shell also carries SLURM_PROCID=0 and
SLURM_NTASKS, and must not think it is one of many.

torch.distributed's env:// rendezvous needs MASTER_ADDR and MASTER_PORT. torchrun
sets them; for mpirun / srun they default to

    MASTER_ADDR   the first host of SLURM_NODELIST (`scontrol show hostnames`), else
                  127.0.0.1 (single node)
    MASTER_PORT   the ``master_port`` argument (config ``distributed.master_port``),
                  else 20000 + SLURM_JOB_ID mod 20000 inside a Slurm job (two jobs
                  sharing a node do not collide), else 29500.

Backends: gloo on CPU, nccl on CUDA; on CUDA the device is cuda:<local rank>.
This module never imports mpi4py: ranks meet through torch.distributed only.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500

# (rank, world, local rank) variable names per launcher, in order of precedence
LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str      # "single", "torchrun", "openmpi", "pmi", "slurm"
    rank: int
    world: int
    local_rank: int


def launch_info(env=None) -> LaunchInfo:
    """Rank, world size and local rank from the launcher's environment variables."""
    env = os.environ if env is None else env
    for name, r, w, lr in LAUNCHERS:
        if name == "slurm" and "SLURM_STEP_ID" not in env:
            continue
        if r in env and w in env:
            rank, world = int(env[r]), int(env[w])
            if not 0 <= rank < world:
                raise RuntimeError(f"{name}: rank {rank} not in [0, {world}) ({r}, {w})")
            return LaunchInfo(name, rank, world, int(env.get(lr, "0") or 0))
    return LaunchInfo("single", 0, 1, 0)


def expand_nodelist(nodelist: str) -> List[str]:
    """Host names of a Slurm node list without scontrol: "n[01-03,7],gpu1" ->
    [n01, n02, n03, n7, gpu1] (one bracket group per name, zero padding kept)."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def first_slurm_host(nodelist: str) -> Optional[str]:
    """First host of a Slurm node list ("node[01-04],gpu7" -> "node01"): from
    `scontrol show hostnames`, or expand_nodelist where scontrol is missing or fails."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        hosts = out.stdout.split() if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        hosts = []
    if not hosts:
        hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else None


def rendezvous(master_port: Optional[int] = None, env=None) -> Tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) after the defaults of the module docstring; the
    environment's values win."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = (first_slurm_host(nodelist) if nodelist else None) or "127.0.0.1"
    port = env.get("MASTER_PORT")
    if port:
        port = int(port)
    elif master_port:
        port = int(master_port)
    elif env.get("SLURM_JOB_ID"):
        port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        port = DEFAULT_PORT
    return addr, port


def resolve_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """cpu, or cuda:<local rank>; ``device`` None picks cuda when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False "
                               "(CPU build of torch, or no visible GPU)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(backend: Optional[str] = None, device: Optional[str] = None,
                     master_port: Optional[int] = None,
                     timeout_s: float = 1800.0) -> Tuple[int, int, int, torch.device]:
    """Join the job's process group; returns (rank, world, local_rank, device).

    One process (no launcher, or a world of one): no process group is created.
    ``backend`` None: nccl for CUDA devices, gloo otherwise. Idempotent."""
    info = launch_info()
    dev = resolve_device(device, info.local_rank)
    if info.world == 1:
        return 0, 1, 0, dev
    import torch.distributed as dist
    if not dist.is_initialized():
        addr, port = rendezvous(master_port)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        from datetime import timedelta
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world,
                                timeout=timedelta(seconds=timeout_s), **kw)
        log.info("rank %d/%d (local %d, %s) joined %s at %s:%d on %s", info.rank, info.world,
                 info.local_rank, info.launcher, backend, addr, port, dev)
    return info.rank, info.world, info.local_rank, dev


def is_distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        import torch.distributed as dist
        dist.barrier()


def shutdown():
    """Leave the process group (no-op without one)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
