"""A single-node Slurm on localhost for the test suite (munge, slurmctld, slurmd from
Debian's slurm-wlm), everything under one temporary directory, stopped afterwards.

    with LocalSlurm(tmpdir) as slurm:
        slurm.sbatch(["slurm/homogenize.sbatch", "cell.h5"], wait=True)

Runs as root (as CI does); jobs run as the submitting user. MpiDefault=pmix so that a
plain `srun python ...` starts Open MPI ranks, as on a production cluster.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
INSTALL_HINT = "apt-get install slurm-wlm munge (Debian) — run scripts/setup_env.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list:
    found = []
    for tool in REQUIRED:
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            found.append(tool)
    return found


class LocalSlurm:
    def __init__(self, root: str, cpus: int | None = None):
        self.root = os.path.abspath(root)
        self.cpus = cpus or os.cpu_count() or 2
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.sock = os.path.join(self.root, "munge", "munge.socket")
        self.env = dict(os.environ, SLURM_CONF=self.conf, OMPI_ALLOW_RUN_AS_ROOT="1",
                        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")

    def _sbin(self, tool):
        return shutil.which(tool) or f"/usr/sbin/{tool}"

    def start(self, timeout: float = 60.0):
        miss = missing_tools()
        if miss:
            raise RuntimeError(f"Slurm is not installed (missing {', '.join(miss)}): {INSTALL_HINT}")
        for d in ("munge", "state", "spool", "log", "run"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        key = "/etc/munge/munge.key"
        if not os.path.exists(key):
            subprocess.run(["mungekey", "--create", "--keyfile", key], check=True)
        subprocess.run([self._sbin("munged"), "--force", f"--socket={self.sock}",
                        f"--pid-file={self.root}/munge/munged.pid",
                        f"--log-file={self.root}/munge/munged.log",
                        f"--seed-file={self.root}/munge/seed", f"--key-file={key}"],
                       check=True, capture_output=True)
        r = self.root
        with open(self.conf, "w") as fh:
            fh.write(f"""ClusterName=localtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.sock}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
ReturnToService=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        subprocess.run([self._sbin("slurmctld"), "-i"], env=self.env, check=True)
        subprocess.run([self._sbin("slurmd")], env=self.env, check=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"local Slurm did not come up in {timeout:.0f} s (logs in {self.root}/log)")

    def sbatch(self, args, wait: bool = True, cwd=None, timeout: float = 600.0):
        cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + list(args)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=cwd, timeout=timeout)

    def stop(self):
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for pidfile in ("run/slurmd.pid", "run/slurmctld.pid"):
            p = os.path.join(self.root, pidfile)
            if os.path.exists(p):
                try:
                    os.kill(int(open(p).read().strip()), 15)
                except (ValueError, ProcessLookupError):
                    pass
        subprocess.run([self._sbin("munged"), "--stop", f"--socket={self.sock}"], capture_output=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
