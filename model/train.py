"""CGINS training loop (single process; DDP-ready): label-free, minimum potential energy.

    for step in range(max_steps):
        cells = batch(step)                  # a seeded permutation per epoch
        out = model(ops(cells)); loss = cgins_loss(...)   (model/loss.py)
        loss.backward(); clip; optimizer.step()
        every k steps: atomic checkpoint (torch.save to a temp file, os.replace)

Reproducibility: the batch order is a function of (seed, epoch) only, the model is
initialised from ``seed``, and a checkpoint holds the model, the optimizer and the
step, so stopping at any checkpoint and resuming gives the same weights as an
uninterrupted run (CPU: bitwise). Checkpoints hold only tensors and plain Python
values and are read with ``torch.load(..., weights_only=True)``.

Distributed data parallel: the caller (hpc.train) wraps the model in DDP and passes
``rank`` / ``world``; each rank takes the cells ``rank::world`` of the global batch
(global batch = batch_size, divisible by world), DDP averages the gradients, and
only rank 0 writes checkpoints and the log.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import os
import tempfile
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from microstructures.atomic import chmod_like_open
from solver.operator import ElasticityOperator

from .loss import LossConfig, cgins_loss
from .network import CGINS, CGINSConfig, deepen_state_dict, deepens, widen_state_dict, widens

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_min_factor: float = 0.05          # cosine decay to lr * lr_min_factor
    checkpoint: str = "runs/cgins/cgins.pt"
    checkpoint_every: int = 50
    log_file: str = ""                   # CSV; default: checkpoint path with .csv
    model_dtype: str = "float32"         # network weights
    solver_dtype: str = "float64"        # operator / PCG / loss storage
    soft: float = 1e-6
    device: str = "cpu"
    init_from: str = ""                  # start a fresh run from this checkpoint's weights (fine-tuning)
    operator_cache: int = 256            # cells whose assembled operators are kept between steps (LRU); 0: none

    def __post_init__(self):
        c = self.operator_cache
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"train.operator_cache must be a whole number >= 0 (cells kept), got {c!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def cell_operator(cell, dtype=torch.float64, device="cpu", soft: float = 1e-6) -> ElasticityOperator:
    """The stiffness operator of a Cell (phases, E, nu, size) on a SerialDomain."""
    shape = np.asarray(cell.phases).shape
    h = tuple(float(s) / n for s, n in zip(cell.size, shape))
    return ElasticityOperator.from_phases(cell.phases, cell.E, cell.nu, h, soft=soft, dtype=dtype, device=device)


def batch_indices(n_cells: int, batch_size: int, step: int, seed: int) -> List[int]:
    """Cells of global step ``step``: consecutive slices of a permutation drawn from
    (seed, epoch); the last partial batch of an epoch is dropped."""
    per_epoch = max(1, n_cells // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    perm = torch.randperm(n_cells, generator=g).tolist()
    if n_cells < batch_size:
        return [perm[i % n_cells] for i in range(batch_size)]
    return perm[k * batch_size:(k + 1) * batch_size]


def save_checkpoint(path: str, state: dict):
    """Atomic torch.save: write a temp file in the same directory, fsync, os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        chmod_like_open(tmp)                    # not mkstemp's 0600: checkpoints are shared
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def read_cgins_checkpoint(path: str, what: str, device="cpu") -> dict:
    """load_checkpoint(path), or ValueError "<what>: not a CGINS checkpoint (...)" in one
    line when it is not a dict with the model and its config."""
    try:
        ck = load_checkpoint(path, map_location=device)
        if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
            raise KeyError("model" if isinstance(ck, dict) and "model_config" in ck else "model_config")
    except Exception as exc:  # OSError, UnpicklingError, RuntimeError, KeyError ...
        msg = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{what}: not a CGINS checkpoint ({type(exc).__name__}: {msg})") from None
    return ck


def config_diff(theirs: dict, ours: dict, ignore=()) -> list:
    """The model-config keys whose values differ (sorted), except ``ignore``."""
    return sorted(k for k in set(theirs) | set(ours) if k not in ignore and theirs.get(k) != ours.get(k))


def check_resumable(ck: dict, path: str, model_cfg: CGINSConfig):
    """ValueError (one line) unless checkpoint ``ck`` (read from ``path``) can continue a
    run of ``model_cfg``: the same model config, and an optimizer state (an exported,
    weights-only checkpoint cannot be resumed, only fine-tuned from)."""
    diff = config_diff(ck.get("model_config") or {}, model_cfg.to_dict())
    if diff:
        raise ValueError(f"checkpoint {path} has another model config (differs in {', '.join(diff)}): "
                         "resume it with its own config, or start elsewhere (--out) or afresh (--no-resume)")
    if "optimizer" not in ck:
        raise ValueError(f"checkpoint {path} holds weights only (exported): it cannot be resumed; "
                         f"start a new run from it with --init-from {path}")


def export_weights(src: str, dst: str) -> dict:
    """Write checkpoint ``src`` without its optimizer state to ``dst`` (atomically): what a
    trained model ships as (about 1/3 of the size with AdamW). Everything else is kept
    (model, configs, step, loss log, init_from); ``exported_from`` records the sha256
    of ``src``. The result loads with load_model and starts runs (train.init_from), but
    does not resume. Returns ``exported_from``."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{dst}: the export must not overwrite its source")
    ck = read_cgins_checkpoint(src, src)
    out = {k: v for k, v in ck.items() if k != "optimizer"}
    out["exported_from"] = {"sha256": _sha256(src), "step": int(ck.get("step", 0)),
                            "dropped": ["optimizer"] if "optimizer" in ck else []}
    save_checkpoint(dst, out)
    return out["exported_from"]


# model-config keys that change no weight: a checkpoint trained with other values of
# these can initialise a run (fine-tuning with more embedded PCG steps, say)
WEIGHTLESS_KEYS = ("t", "use_pcg")


def init_checkpoint(path: str, model_cfg: CGINSConfig, device="cpu") -> dict:
    """The checkpoint ``path`` that initialises a fresh run (train.init_from), checked:
    a CGINS checkpoint whose model config equals ``model_cfg`` up to WEIGHTLESS_KEYS,
    or up to those and wider ``channels`` (same depth, each level at least as wide: the
    run starts from the function-preserving widening, network.widen_state_dict), or up
    to those and more residual blocks per level (``res_blocks``, same channels: the
    function-preserving deepening, network.deepen_state_dict).
    ValueError with a one-line reason otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"train.init_from {path}: no such checkpoint file")
    ck = read_cgins_checkpoint(path, f"train.init_from {path}", device)
    theirs, ours = dict(ck["model_config"]), model_cfg.to_dict()
    diff = config_diff(theirs, ours, WEIGHTLESS_KEYS)
    if diff == ["channels"] and widens(theirs["channels"], ours["channels"]):
        diff = []
    elif diff == ["res_blocks"] and deepens(CGINSConfig.from_dict(theirs), model_cfg):
        diff = []
    if diff:
        raise ValueError(f"train.init_from {path}: its model config differs in "
                         + ", ".join(f"{k} ({theirs.get(k)!r} there, {ours.get(k)!r} here)" for k in diff)
                         + f"; only {', '.join(WEIGHTLESS_KEYS)} may differ, channels may widen "
                         "(same depth, each level at least as wide), or res_blocks may grow (same channels)")
    return ck



def init_weights_from(core: CGINS, path: str, model_cfg: CGINSConfig, device="cpu") -> dict:
    """Load the weights of checkpoint ``path`` into ``core`` (a fresh run that fine-tunes
    them; see init_checkpoint). Returns what the new checkpoint records of its start:
    path, sha256 of the file, step."""
    ck = init_checkpoint(path, model_cfg, device)
    theirs = list(ck["model_config"]["channels"])
    old_cfg = CGINSConfig.from_dict(dict(ck["model_config"]))
    info = {}
    if theirs != list(core.cfg.channels):
        core.load_state_dict(widen_state_dict(ck["model"], old_cfg, core))
        info["widened_from"] = theirs
    elif old_cfg.res_blocks != core.cfg.res_blocks:
        core.load_state_dict(deepen_state_dict(ck["model"], old_cfg, core))
        info["deepened_from"] = list(old_cfg.res_blocks)
    else:
        core.load_state_dict(ck["model"])
    return {"path": path, "sha256": _sha256(path), "step": int(ck.get("step", 0)), **info}


def build_model(model_cfg: CGINSConfig, train_cfg: TrainConfig) -> CGINS:
    torch.manual_seed(train_cfg.seed)
    return CGINS(model_cfg).to(dtype=DTYPES[train_cfg.model_dtype], device=train_cfg.device)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    frac = min(1.0, step / max(1, cfg.steps))
    return cfg.lr * (cfg.lr_min_factor + (1 - cfg.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * frac)))


def _write_log(path: str, rows: List[dict]):
    if not rows:
        return
    keys = list(rows[0].keys())
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(",".join(keys) + "\n")
        for r in rows:
            fh.write(",".join(f"{r.get(k, float('nan')):.10g}" if isinstance(r.get(k), float) else str(r.get(k))
                              for k in keys) + "\n")
    os.replace(tmp, path)


def _mean_over_ranks(parts: dict, world: int, device) -> dict:
    """Average the loss parts over the ranks: each rank's parts are means over its
    equal share of the global batch, so the log holds global-batch means whatever the
    number of ranks (DDP averages the gradients the same way)."""
    import torch.distributed as dist

    keys = list(parts)
    t = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _check_same_step(step: int, device):
    """Every rank must start from the same step (the same checkpoint); a rank that
    sees another file (no shared file system) would silently train another model."""
    import torch.distributed as dist

    t = torch.tensor([step, -step], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"ranks start from different steps ({-int(t[1])}..{int(t[0])}): is the "
                           "checkpoint directory on a file system every rank sees?")


def train(model: torch.nn.Module, cells: Sequence, model_cfg: CGINSConfig, cfg: TrainConfig,
          loss_cfg: Optional[LossConfig] = None, rank: int = 0, world: int = 1,
          resume: bool = True, stop_after: Optional[int] = None,
          progress: Optional[Callable[[int, dict], None]] = None, data_id: Optional[str] = None) -> dict:
    """Train ``model`` (a CGINS, or DDP around one) on ``cells``; returns the last
    log row. ``stop_after`` ends the run after that many steps of this call (a
    stand-in for being killed; the checkpoint cadence is unchanged).
    ``progress(step, row)`` is called after every step (progress bar, console log).
    ``data_id`` (hpc.train's fingerprint of the cells) is stored in the checkpoint."""
    loss_cfg = loss_cfg or LossConfig()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world {world}")
    core = getattr(model, "module", model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, rows = 0, []
    log_file = cfg.log_file or os.path.splitext(cfg.checkpoint)[0] + ".csv"
    if resume and os.path.exists(cfg.checkpoint):
        ck = load_checkpoint(cfg.checkpoint, map_location=cfg.device)
        check_resumable(ck, cfg.checkpoint, model_cfg)
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, rows = int(ck["step"]), list(ck["log"])
        log.info("resumed %s at step %d", cfg.checkpoint, step)
        init = ck.get("init_from")
    elif cfg.init_from:
        init = init_weights_from(core, cfg.init_from, model_cfg, cfg.device)
        how = ""
        if "widened_from" in init:
            how = " widened from channels %s to %s" % (init["widened_from"], list(model_cfg.channels))
        elif "deepened_from" in init:
            how = " deepened from res_blocks %s to %s" % (init["deepened_from"] or "none",
                                                          list(model_cfg.res_blocks))
        log.info("fresh run from the weights of %s (step %d, sha256 %s)%s", init["path"], init["step"],
                 init["sha256"][:12], how)
    else:
        init = None
    if world > 1:
        _check_same_step(step, cfg.device)
    sdt = DTYPES[cfg.solver_dtype]
    # A repeated cell is assembled once, but only the cfg.operator_cache most recently used
    # cells are kept: an unbounded cache grew with every distinct cell drawn (0.8 MB of
    # tensors each at 32^3 in float32 once used: 3.2 MB a step at batch 4, for the whole run).
    # The operators are deterministic, so the bound changes memory, never the result.
    ops_cache = collections.OrderedDict()
    source = getattr(cells, "source_index", lambda i: i)

    def ops_of(idx):
        out = []
        for i in idx:
            key = source(i)
            op = ops_cache.pop(key, None)
            if op is None:
                op = cell_operator(cells[i], sdt, cfg.device, cfg.soft)
            if cfg.operator_cache:
                ops_cache[key] = op
                while len(ops_cache) > cfg.operator_cache:
                    ops_cache.popitem(last=False)
            out.append(op)
        return out

    row = rows[-1] if rows else {}
    done_here = 0
    while step < cfg.steps and (stop_after is None or done_here < stop_after):
        idx = batch_indices(len(cells), cfg.batch_size, step, cfg.seed)[rank::world]
        ops = ops_of(idx)
        for gr in opt.param_groups:
            gr["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        out = model(ops)
        loss, parts = cgins_loss(ops, out, loss_cfg)
        loss.backward()
        if world > 1:
            parts = _mean_over_ranks(parts, world, cfg.device)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if cfg.grad_clip else 0.0
        opt.step()
        step += 1
        done_here += 1
        row = {"step": step, "lr": float(opt.param_groups[0]["lr"]), "grad_norm": gnorm, **parts}
        rows.append(row)
        if progress is not None:
            progress(step, row)
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(cfg.checkpoint, {
                "model": core.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "model_config": model_cfg.to_dict(), "train_config": dataclasses.asdict(cfg),
                "loss_config": loss_cfg.to_dict(),
                "log": rows, **({"init_from": init} if init else {}),
                **({"data_id": data_id} if data_id else {})})
            _write_log(log_file, rows)
    if rank == 0 and rows and done_here == 0:
        _write_log(log_file, rows)      # a re-run of a finished run: the log as the checkpoint has it
    return row


def load_config(path: str):
    """Read a configs/cgins_*.yaml: sections ``model`` (CGINSConfig), ``loss``
    (LossConfig), ``train`` (TrainConfig); other top-level sections (e.g. ``data``)
    are returned untouched. Returns (model_cfg, loss_cfg, train_cfg, rest)."""
    from .data import read_yaml_mapping
    d = read_yaml_mapping(path)
    rest = {k: v for k, v in d.items() if k not in ("model", "loss", "train")}
    return (CGINSConfig.from_dict(d.get("model", {})), LossConfig.from_dict(d.get("loss", {})),
            TrainConfig.from_dict(d.get("train", {})), rest)


def load_model(path: str, device="cpu") -> CGINS:
    """A trained CGINS from a checkpoint (eval mode). ``model.sha256`` is the hash of
    the checkpoint file, for the result file's provenance."""
    ck = load_checkpoint(path, map_location=device)
    dt = DTYPES[ck.get("train_config", {}).get("model_dtype", "float32")]
    net = CGINS(CGINSConfig.from_dict(ck["model_config"])).to(dtype=dt, device=device)
    net.load_state_dict(ck["model"])
    net.eval()
    net.sha256 = _sha256(path)
    return net


@torch.no_grad()
def warm_start(net: CGINS, op, solid=None, symmetries: int = 1) -> torch.Tensor:
    """Initial guess (6, 3, n_x, n_y, n_z) for solver.pcg from a trained network: the
    network prediction followed by its embedded PCG steps, in op's dtype. The solver
    then iterates to its own tolerance from there (the answer does not depend on it).
    ``symmetries`` > 1 averages the prediction over that many point symmetries of the
    grid before the PCG steps (model.symmetry; serial op, no ``solid``)."""
    if symmetries > 1:
        from .symmetry import symmetrized_output
        return symmetrized_output(net, op, symmetries).detach()
    return net([op], None if solid is None else solid[None]).u[0].detach()
