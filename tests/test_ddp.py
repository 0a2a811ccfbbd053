"""Data-parallel training (issue 5 item 5): 2 ranks (gloo) launched by torchrun, by
Open MPI's mpirun and by srun in slurm/train.sbatch hold identical parameters after k
steps, equal to one process with the same global batch (1e-6); rank r trains on its
share (global batch 4, 2 cells per rank).

The comparison runs with float64 weights: the two runs differ only in the order of
the gradient sums (DDP's allreduce vs one backward over both cells), and in float32
Adam's normalisation m / sqrt(v) turns that rounding into O(lr) differences along
near-null directions of the loss (the output biases of a mean-free field), so a
float32 comparison would test Adam, not DDP. The launcher-environment parsing is
tested without launching anything.

torchrun, mpirun and Slurm are required: without them these tests fail with what to
install, they never skip."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from hpc import distributed
from hpc import train as hpc_train
from model.train import load_checkpoint
from test_train_cli import ROOT, clean_env, read_log, single_process_env, tiny_config

STEPS = 4
DUMP = os.path.join(ROOT, "tests", "ddp", "train_dump.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(path):
    # global batch 4 = 2 cells per rank (a sum instead of a mean per rank would show in
    # grad_norm); float64 weights (see the module docstring)
    return tiny_config(path, per_family=2, steps=STEPS, batch_size=4, checkpoint_every=2, model_dtype="float64")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same config and global batch: (parameters, log rows)."""
    d = tmp_path_factory.mktemp("ref")
    cfg = _cfg(d / "tiny.yaml")
    with single_process_env():
        model, row, rank, world = hpc_train.run(hpc_train.build_parser().parse_args([cfg, "--out", str(d / "out")]))
    assert (rank, world, row["step"]) == (0, 1, STEPS)
    return model.state_dict(), read_log(d / "out" / "cgins_tiny.csv")


def _check_against_reference(reference, out_dir, dumps=None):
    ref, ref_log = reference
    ck = load_checkpoint(os.path.join(out_dir, "cgins_tiny.pt"))
    assert ck["step"] == STEPS
    params = [ck["model"]]
    if dumps is not None:
        ranks = [torch.load(os.path.join(dumps, f"rank{r}.pt"), weights_only=True) for r in range(2)]
        assert [(d["rank"], d["world"]) for d in ranks] == [(0, 2), (1, 2)]
        for k in ranks[0]["params"]:                       # the ranks agree exactly
            assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
            assert torch.equal(ranks[0]["params"][k], ck["model"][k]), k
        params += [d["params"] for d in ranks]
    for p in params:
        for k, a in ref.items():
            assert a.dtype == torch.float64
            err = float((p[k] - a).abs().max())
            assert err <= 1e-6 * max(1.0, float(a.abs().max())), (k, err)
    # rank 0's log holds the global-batch loss, and the norm of the averaged gradient
    # (before clipping): the same as the single process. Adam is blind to a scale of the
    # gradient, grad_norm is not: it catches a per-rank sum instead of a mean.
    log = read_log(os.path.join(out_dir, "cgins_tiny.csv"))
    assert len(log) == len(ref_log) == STEPS
    for a, b in zip(log, ref_log):
        for key in ("loss", "energy_0", "energy_1", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-8, abs=1e-10), (a["step"], key)


def _run(cmd, env, timeout=300):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_torchrun_two_ranks_equal_one_process(reference, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        DUMP, str(tmp_path / "dumps"), _cfg(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out")]
    _run(cmd, clean_env())
    _check_against_reference(reference, str(tmp_path / "out"), str(tmp_path / "dumps"))


def test_mpirun_two_ranks_equal_one_process(reference, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install Open MPI (apt-get install openmpi-bin)"
    env = clean_env(MASTER_PORT=str(_free_port()), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS",
           "-x", "PYTHONPATH", sys.executable, DUMP, str(tmp_path / "dumps"), _cfg(tmp_path / "tiny.yaml"),
           "--out", str(tmp_path / "out")]
    r = _run(cmd, env)
    assert "openmpi) joined gloo" in r.stderr        # the ranks came from OMPI_COMM_WORLD_*
    _check_against_reference(reference, str(tmp_path / "out"), str(tmp_path / "dumps"))


def _wait_for_job(slurm, job_id: str, timeout: float = 300.0) -> str:
    """Final JobState of a job, polled every 0.5 s (sbatch --wait polls far slower)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = subprocess.run(["scontrol", "show", "job", job_id], env=slurm.env, capture_output=True, text=True)
        state = next((w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("JobState=")), "")
        if state and state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    return f"still not finished after {timeout:.0f} s"


def test_sbatch_two_tasks(reference, tmp_path):
    from slurm_local import LocalSlurm
    with LocalSlurm(str(tmp_path / "slurm")) as slurm:
        job_out = str(tmp_path / "job.out")
        r = slurm.sbatch(["--ntasks=2", "--ntasks-per-node=2", f"--output={job_out}", "--export=ALL",
                          os.path.join(ROOT, "slurm", "train.sbatch"), _cfg(tmp_path / "tiny.yaml"),
                          str(tmp_path / "out")], cwd=ROOT, wait=False)
        assert r.returncode == 0, r.stderr
        state = _wait_for_job(slurm, r.stdout.strip().split(";")[0])
    log = open(job_out).read() if os.path.exists(job_out) else "(no job output)"
    assert state == "COMPLETED", state + "\n" + log
    assert "2 rank(s)" in log and "slurm) joined gloo" in log, log
    _check_against_reference(reference, str(tmp_path / "out"))


# -- the launcher environment (no processes) ---------------------------------------------
@pytest.mark.parametrize("env, expect", [
    ({}, ("single", 0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ("torchrun", 3, 4, 1)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     ("openmpi", 1, 2, 1)),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_NTASKS": "8"}, ("slurm", 5, 8, 1)),
    # a batch script's own shell: SLURM_PROCID/NTASKS of the allocation, but no job step
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "17"}, ("single", 0, 1, 0)),
    # mpirun inside an allocation, torchrun under srun: the inner launcher wins
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1",
      "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}, ("openmpi", 2, 4, 0)),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
      "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}, ("torchrun", 6, 8, 2)),
])
def test_launch_info(env, expect):
    info = distributed.launch_info(env)
    assert (info.launcher, info.rank, info.world, info.local_rank) == expect


def test_launch_info_rejects_rank_outside_world():
    with pytest.raises(RuntimeError, match="rank 2"):
        distributed.launch_info({"RANK": "2", "WORLD_SIZE": "2"})


def test_rendezvous_defaults():
    assert distributed.rendezvous(None, {}) == ("127.0.0.1", distributed.DEFAULT_PORT)
    assert distributed.rendezvous(1234, {}) == ("127.0.0.1", 1234)
    assert distributed.rendezvous(1234, {"MASTER_ADDR": "h", "MASTER_PORT": "99"}) == ("h", 99)
    env = {"SLURM_JOB_ID": "20017", "SLURM_JOB_NODELIST": "cn[007-009,12],gpu1"}
    assert distributed.rendezvous(None, env) == ("cn007", 20017)
    assert distributed.expand_nodelist("cn[007-009,12],gpu1") == ["cn007", "cn008", "cn009", "cn12", "gpu1"]
    assert distributed.expand_nodelist("a,b[1-2]-ib") == ["a", "b1-ib", "b2-ib"]
