"""CGINS: the PCG-informed neural solver (issue 5; docs/DESIGN.md s.3, s.6).

    inputs on the active voxels          C^b(E, nu) per voxel + Fourier features of x
    encoder                              2 x SparseConv3d(3) + activation
    U-Net                                depth D = len(channels) - 1; SparseDown /
                                         SparseUp (kernel 2, stride 2), skip connections;
                                         optional input pyramid (the inputs average-pooled
                                         onto each coarse active set, concatenated);
                                         optional residual blocks per level (res_blocks:
                                         h <- h + conv(act(conv(h))), the second conv
                                         zero-initialised) after the level's down block
    decoder                              2 x SparseConv3d(3) -> 18 = 6 load cases x 3
    multilevel prediction (L levels)     heads on the U-Net up path at levels l = 1..L-1
                                         give coarse nodal fields u^l on the n / 2^l grid;
                                         u~^{L-1} = u^{L-1}, u~^l = P u~^{l+1} + u^l
                                         (P trilinear, model/transfer.py)
    global displacement constraint       u~ <- u~ - mean(u~) per case and component
                                         (or, for the WO-GD ablation, u~ <- u~ - u~(anchor))
    embedded PCG                         t Jacobi-PCG steps on the true K (model/embedded_pcg.py)

Node (i, j, k) of the output is the (-,-,-) corner of voxel (i, j, k); the network
predicts on active voxels (solid + one layer of soft padding), inactive nodes are zero
before the constraint. The output is the periodic fluctuation chi scaled by the cell
length (the network predicts a dimensionless field).

Every component is switchable (CGINSConfig) for the ablations: use_pcg / t (WO-CS),
mean_constraint (WO-GD: anchor node), soft_voxels (WO-SV), periodic (WO-PM: zero
padding maps instead of periodic), levels 1/2/3, position_features.

Shift equivariance: with position features off the network commutes with periodic
shifts by multiples of 2^D (D the U-Net depth, >= levels - 1).

The network runs on one process per cell batch (a SerialDomain per operator); DDP
parallelises over cells, not over the grid.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .embedded_pcg import embedded_pcg, mean_free
from .inputs import (fourier_features, fourier_matrix, material_features, modulus_scale,
                     n_material_features, periodic_dilation, solid_mask)
from .sparse_conv import (SparseConv3d, SparseDown, SparseGrid, SparseTensor, SparseUp,
                          sparse_avg_pool)
from .transfer import prolongate

log = logging.getLogger(__name__)

N_OUT = 18  # 6 load cases x 3 displacement components


@dataclasses.dataclass
class CGINSConfig:
    """Architecture and ablation switches (YAML: configs/cgins_*.yaml, key ``model``)."""

    channels: Tuple[int, ...] = (16, 32, 64)   # per U-Net level; depth D = len - 1
    levels: int = 2                            # multilevel prediction, 1 <= levels <= D + 1
    material_features: str = "lame"            # "lame" (2) or "mandel21" (21)
    position_features: bool = True
    fourier_mode: str = "axis"                 # "axis" or "random"
    fourier_freqs: int = 2
    fourier_scale: float = 2.0                 # sigma of the random integer frequencies
    fourier_seed: int = 0
    soft_voxels: bool = True                   # one layer of soft padding (WO-SV: off)
    periodic: bool = True                      # periodic neighbour maps (WO-PM: zero padding)
    mean_constraint: bool = True               # mean-free output (WO-GD: anchor node)
    use_pcg: bool = True                       # embedded PCG (WO-CS: off)
    t: int = 4                                 # PCG steps (paper: 4 TPMS, 8 shell, 10 truss)
    input_pyramid: bool = True
    activation: str = "gelu"                   # "gelu", "relu", "silu", "tanh"
    solid_threshold: float = 1e-3              # solid = mu > threshold * max(mu)
    res_blocks: Tuple[int, ...] = ()           # residual blocks per U-Net level (D + 1 counts; () = none)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        D = len(self.channels) - 1
        if not 1 <= self.levels <= D + 1:
            raise ValueError(f"levels must be in 1..{D + 1} for channels {self.channels}, got {self.levels}")
        n_material_features(self.material_features)
        rb = tuple(int(r) for r in (self.res_blocks or ()))
        if rb and (len(rb) != D + 1 or min(rb) < 0):
            raise ValueError(f"res_blocks must give {D + 1} counts >= 0 (one per level of channels "
                             f"{list(self.channels)}), got {list(rb)}")
        self.res_blocks = rb if any(rb) else ()

    def n_res_blocks(self, level: int) -> int:
        return self.res_blocks[level] if self.res_blocks else 0

    @property
    def depth(self) -> int:
        return len(self.channels) - 1

    @classmethod
    def from_dict(cls, d: dict) -> "CGINSConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CGINS config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain dict (YAML / checkpoint); ``res_blocks`` only when there are any, so a
        network without them has the config dict it had before the option existed."""
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        if self.res_blocks:
            d["res_blocks"] = list(self.res_blocks)
        else:
            del d["res_blocks"]
        return d


@dataclasses.dataclass
class CGINSOutput:
    u: torch.Tensor               # (B, 6, 3, n_x, n_y, n_z) after the embedded PCG
    u_net: torch.Tensor           # the constrained network prediction (PCG start)
    levels: List[torch.Tensor]    # P^l u~^l for l = 1..L-1 on the fine grid (constrained)
    grid: SparseGrid              # the active set


_ACT = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class SparseResBlock(nn.Module):
    """h + conv_b(act(conv_a(h))) on one level's active set, conv_b zero-initialised:
    a new block is the identity, so blocks can be added to a trained network without
    changing its function (network.deepen_state_dict) and a fresh one starts shallow."""

    def __init__(self, c: int, act: nn.Module, periodic: bool = True):
        super().__init__()
        self.conv_a = SparseConv3d(c, c, periodic=periodic)
        self.conv_b = SparseConv3d(c, c, periodic=periodic)
        self.act = act
        with torch.no_grad():
            self.conv_b.weight.zero_()
            self.conv_b.bias.zero_()

    def forward(self, h: SparseTensor) -> SparseTensor:
        r = self.conv_b(h.replace(self.act(self.conv_a(h).features)))
        return h.replace(h.features + r.features)


class CGINS(nn.Module):
    def __init__(self, cfg: Optional[CGINSConfig] = None):
        super().__init__()
        cfg = cfg or CGINSConfig()
        self.cfg = cfg
        c, D, p = cfg.channels, cfg.depth, cfg.periodic
        if cfg.position_features:
            self.register_buffer("fourier_B", fourier_matrix(cfg.fourier_mode, cfg.fourier_freqs,
                                                             cfg.fourier_scale, cfg.fourier_seed))
            n_pos = 2 * self.fourier_B.shape[0]
        else:
            self.fourier_B = None
            n_pos = 0
        self.in_channels = n_material_features(cfg.material_features) + n_pos
        self.act = _ACT[cfg.activation]()
        self.enc = nn.ModuleList([SparseConv3d(self.in_channels, c[0], periodic=p),
                                  SparseConv3d(c[0], c[0], periodic=p)])
        extra = self.in_channels if cfg.input_pyramid else 0
        self.down = nn.ModuleList([SparseDown(c[d - 1], c[d]) for d in range(1, D + 1)])
        self.down_block = nn.ModuleList([SparseConv3d(c[d] + extra, c[d], periodic=p) for d in range(1, D + 1)])
        self.up = nn.ModuleList([SparseUp(c[d], c[d - 1]) for d in range(1, D + 1)])
        self.fuse = nn.ModuleList([SparseConv3d(2 * c[d - 1], c[d - 1], periodic=p) for d in range(1, D + 1)])
        self.dec = nn.ModuleList([SparseConv3d(c[0], c[0], periodic=p),
                                  SparseConv3d(c[0], N_OUT, periodic=p)])
        self.heads = nn.ModuleList([SparseConv3d(c[l], N_OUT, kernel=1) for l in range(1, cfg.levels)])
        self.res = nn.ModuleList([nn.ModuleList([SparseResBlock(c[d], self.act, periodic=p)
                                                 for _ in range(cfg.n_res_blocks(d))])
                                  for d in range(D + 1)])

    def extra_repr(self) -> str:
        n = sum(q.numel() for q in self.parameters())
        return f"{self.cfg} | {n} weights"

    # -- pieces ------------------------------------------------------------------
    def active_set(self, mu: torch.Tensor, solid: Optional[torch.Tensor] = None) -> SparseGrid:
        """Solid voxels (plus one layer of soft padding if cfg.soft_voxels)."""
        if solid is None:
            solid = solid_mask(mu, self.cfg.solid_threshold)
        act = periodic_dilation(solid) if self.cfg.soft_voxels else solid
        return SparseGrid.from_mask(act)

    def features(self, grid: SparseGrid, lam: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Input features (N, C_in) on the active voxels."""
        idx = grid.linear_index()
        scale = modulus_scale(lam, mu)[grid.batch]
        x = material_features(lam.reshape(-1)[idx], mu.reshape(-1)[idx], scale, self.cfg.material_features)
        if self.fourier_B is not None:
            x = torch.cat([x, fourier_features(self.fourier_B, grid.coords, grid.shape).to(x.dtype)], dim=1)
        return x

    def trunk(self, x: SparseTensor) -> List[SparseTensor]:
        """Encoder - U-Net - decoder; returns the 18-channel predictions per level
        [fine, level 1, ..., level L-1] (sparse, on each level's active set)."""
        cfg = self.cfg
        h = x
        for conv in self.enc:
            h = h.replace(self.act(conv(h).features))
        for blk in self.res[0]:
            h = blk(h)
        skips, inp = [h], x
        for d in range(cfg.depth):
            h = self.down[d](h)
            h = h.replace(self.act(h.features))
            if cfg.input_pyramid:
                inp = sparse_avg_pool(inp)
                h = h.cat(inp)
            h = h.replace(self.act(self.down_block[d](h).features))
            for blk in self.res[d + 1]:
                h = blk(h)
            skips.append(h)
        preds = [None] * cfg.levels
        for d in range(cfg.depth, 0, -1):
            if d < cfg.levels:
                preds[d] = self.heads[d - 1](h)
            fine = skips[d - 1]
            h = self.up[d - 1](h, fine.grid)
            h = h.replace(self.act(h.features)).cat(fine)
            h = h.replace(self.act(self.fuse[d - 1](h).features))
        h = h.replace(self.act(self.dec[0](h).features))
        preds[0] = self.dec[1](h)
        return preds

    def constrain(self, op, u: torch.Tensor, anchor: int) -> torch.Tensor:
        """Global displacement constraint on (6, 3, ...) of one cell."""
        if self.cfg.mean_constraint:
            return mean_free(op, u)
        return u - u.reshape(*u.shape[:2], -1)[:, :, anchor][..., None, None, None]

    # -- forward -------------------------------------------------------------------
    def forward(self, ops: Sequence, solid: Optional[torch.Tensor] = None) -> CGINSOutput:
        """Predict the six fluctuation fields of a batch of cells.

        ``ops``: ElasticityOperator per cell (same grid shape, SerialDomain); the
        network reads their (lambda, mu) and h, the PCG applies them.
        ``solid``: optional (B, n_x, n_y, n_z) bool mask (default from mu)."""
        cfg = self.cfg
        shape = tuple(ops[0].domain.global_shape)
        if any(tuple(op.domain.global_shape) != shape for op in ops):
            raise ValueError("all cells of a batch must have the same grid shape")
        if any(getattr(op.domain, "size", 1) != 1 for op in ops):
            raise ValueError("CGINS runs on whole cells (SerialDomain operators)")
        if any(s % (1 << cfg.depth) for s in shape):
            raise ValueError(f"grid {shape} must be divisible by 2^depth = {1 << cfg.depth}")
        wdt = self.enc[0].weight.dtype
        lam = torch.stack([op.lam for op in ops]).to(wdt)
        mu = torch.stack([op.mu for op in ops]).to(wdt)
        grid = self.active_set(mu, solid)
        x = SparseTensor(self.features(grid, lam, mu), grid)
        preds = self.trunk(x)
        # dense nodal fields per level, coarsest first, cumulative: u~^l = P u~^{l+1} + u^l
        coarse_grids = [grid]
        for _ in range(cfg.levels - 1):
            coarse_grids.append(coarse_grids[-1].coarsen()[0])
        B = len(ops)
        cum = None
        level_fields = [None] * cfg.levels
        for l in range(cfg.levels - 1, -1, -1):
            g = coarse_grids[l]
            dense = g.to_dense(preds[l].features).reshape(B, 6, 3, *g.shape)
            cum = dense if cum is None else prolongate(cum) + dense
            level_fields[l] = cum
        anchors = [int(k) for k in _first_active(grid, B)]
        L_cell = torch.tensor([max(h * n for h, n in zip(op.h, shape)) for op in ops])
        u_out, u_net, lev = [], [], [[] for _ in range(cfg.levels - 1)]
        for b, op in enumerate(ops):
            s = float(L_cell[b])
            u0 = self.constrain(op, (s * level_fields[0][b]).to(op.dtype), anchors[b])
            for l in range(1, cfg.levels):
                lev[l - 1].append(self.constrain(op, (s * prolongate(level_fields[l][b], l)).to(op.dtype),
                                                 anchors[b]))
            u_net.append(u0)
            if cfg.use_pcg and cfg.t > 0:
                u_out.append(embedded_pcg(op, op.rhs(), u0, cfg.t, project=cfg.mean_constraint))
            else:
                u_out.append(u0)
        return CGINSOutput(u=torch.stack(u_out), u_net=torch.stack(u_net),
                           levels=[torch.stack(v) for v in lev], grid=grid)


def _first_active(grid: SparseGrid, B: int) -> List[int]:
    """Flat node index (within its cell) of the first active voxel of each cell: the
    anchor node of the WO-GD ablation."""
    nvox = grid.shape[0] * grid.shape[1] * grid.shape[2]
    big = torch.full((B,), torch.iinfo(torch.long).max, dtype=torch.long, device=grid.device)
    first = big.scatter_reduce(0, grid.batch, grid.keys, reduce="amin")
    return (first - torch.arange(B, device=grid.device) * nvox).tolist()


def widens(old: Sequence[int], new: Sequence[int]) -> bool:
    """True if the channels ``new`` widen ``old``: same depth, each level at least as wide."""
    return len(old) == len(new) and all(int(n) >= int(o) for o, n in zip(old, new))


def _channel_map(old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Index in the widened layout of each channel of the old one, for a feature vector
    made of blocks (the old block sizes ``old``, their new sizes ``new``): old channel
    j of block b goes to the same position j of block b (new channels at each block's end)."""
    idx, start = [], 0
    for o, n in zip(old, new):
        idx.extend(range(start, start + o))
        start += n
    return torch.tensor(idx, dtype=torch.long)


def widen_state_dict(old_sd: dict, old_cfg: CGINSConfig, new: CGINS) -> dict:
    """The weights of ``new`` (same config as ``old_cfg`` except wider channels, same
    depth) that compute exactly the function of the old network (Net2Net-style widening
    with zero fan-out): every old weight is copied to its place; the weights INTO the new
    channels keep ``new``'s random initialisation, the weights OUT of them into old
    channels are zero. The new channels then change nothing until training moves their
    fan-out, which gets a non-zero gradient at the first step.

    Raises ValueError if ``new`` is not a widening of ``old_cfg``."""
    oc, nc = tuple(old_cfg.channels), tuple(new.cfg.channels)
    if not widens(oc, nc):
        raise ValueError(f"channels {list(nc)} do not widen {list(oc)} (same depth, each level at least as wide)")
    cin = new.in_channels
    extra = cin if new.cfg.input_pyramid else 0
    # (input blocks old / new, output blocks old / new) per layer
    blocks = {"enc.0": ((cin,), (cin,), oc[0], nc[0]), "enc.1": ((oc[0],), (nc[0],), oc[0], nc[0]),
              "dec.0": ((oc[0],), (nc[0],), oc[0], nc[0]), "dec.1": ((oc[0],), (nc[0],), N_OUT, N_OUT)}
    for d in range(1, len(oc)):
        blocks[f"down.{d - 1}"] = ((oc[d - 1],), (nc[d - 1],), oc[d], nc[d])
        blocks[f"down_block.{d - 1}"] = ((oc[d], extra), (nc[d], extra), oc[d], nc[d])
        blocks[f"up.{d - 1}"] = ((oc[d],), (nc[d],), oc[d - 1], nc[d - 1])
        blocks[f"fuse.{d - 1}"] = ((oc[d - 1],) * 2, (nc[d - 1],) * 2, oc[d - 1], nc[d - 1])
    for l in range(1, new.cfg.levels):
        blocks[f"heads.{l - 1}"] = ((oc[l],), (nc[l],), N_OUT, N_OUT)
    sd = {k: v.detach().clone() for k, v in new.state_dict().items()}
    done = set()
    for name, (bi_o, bi_n, co_o, co_n) in blocks.items():
        w_old, w = old_sd[name + ".weight"], sd[name + ".weight"]
        imap = _channel_map(bi_o, bi_n)
        if w_old.shape != (w.shape[0], len(imap), co_o):
            raise ValueError(f"{name}.weight: shape {tuple(w_old.shape)} does not match the old config")
        new_in = torch.ones(w.shape[1], dtype=torch.bool)
        new_in[imap] = False
        w[:, new_in, :co_o] = 0                       # new channels -> old outputs: zero
        w[:, imap, :co_o] = w_old.to(w.dtype)         # old -> old: copied
        if name + ".bias" in old_sd:
            sd[name + ".bias"][:co_o] = old_sd[name + ".bias"].to(w.dtype)
            done.add(name + ".bias")
        done.add(name + ".weight")
    rest = set(old_sd) - done
    for k in rest:                                     # buffers (Fourier matrix)
        if sd[k].shape != old_sd[k].shape:
            raise ValueError(f"{k}: shape {tuple(old_sd[k].shape)} does not match the old config")
        sd[k] = old_sd[k].to(sd[k].dtype).clone()
    return sd


def deepens(old: CGINSConfig, new: CGINSConfig) -> bool:
    """True if ``new`` has at least ``old``'s residual blocks on every level (same channels)."""
    return (tuple(old.channels) == tuple(new.channels)
            and all(new.n_res_blocks(d) >= old.n_res_blocks(d) for d in range(old.depth + 1)))


def deepen_state_dict(old_sd: dict, old_cfg: CGINSConfig, new: CGINS) -> dict:
    """The weights of ``new`` (same config as ``old_cfg`` except more residual blocks)
    that compute exactly the function of the old network: every old weight is copied,
    the added blocks keep ``new``'s initialisation, whose second convolution is zero
    (SparseResBlock), so each added block is the identity until training moves it.

    Raises ValueError if ``new`` does not deepen ``old_cfg``."""
    if not deepens(old_cfg, new.cfg):
        raise ValueError(f"res_blocks {list(new.cfg.res_blocks)} do not deepen {list(old_cfg.res_blocks)} "
                         f"(same channels, at least as many blocks per level)")
    sd = {k: v.detach().clone() for k, v in new.state_dict().items()}
    unknown = set(old_sd) - set(sd)
    if unknown:
        raise ValueError(f"weights {sorted(unknown)[:3]} of the old network have no place in the new one")
    for k, v in old_sd.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the new config")
        sd[k] = v.to(sd[k].dtype).clone()
    return sd


@contextlib.contextmanager
def embedded_steps(net: "CGINS", t: int):
    """The network with its embedded PCG set to t steps (t = 0: none) for the duration."""
    old = net.cfg
    net.cfg = dataclasses.replace(old, t=int(t), use_pcg=int(t) > 0)
    try:
        yield net
    finally:
        net.cfg = old
