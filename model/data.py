"""CGINS training and held-out sets: generated cells in sharded HDF5 (issue 5 item 4).

Three families, each from ``microstructures.generators``:

    tpms      tpms(surface, form, vf, n): surfaces P G D IWP FRD, forms network / sheet
    lattice   lattice(topology, vf, n): a named topology (topology_names()) or, with
              probability ``random_fraction``, a random periodic k-nearest-neighbour graph
    shell     shell_lattice(topology, vf, n): hollow struts on the same topologies

Every sample has a solid of E = ``E`` (1) and nu ~ U[nu_range] (0.2, 0.4) and void
elsewhere; the target volume fraction is vf ~ U[vf_range] (0.1, 0.4) and the generator
meets it to within its tolerance (0.005 absolute).

Reproducibility: sample i of a data set is family ``families[i % F]`` (so every shard
mixes the families) with its parameters drawn from ``np.random.default_rng([seed, i])``;
a shard is samples [s * shard_size, (s + 1) * shard_size). Any shard can therefore be
regenerated on its own, and the data do not depend on how many workers made them. When
the generator cannot meet a draw (CellError), or (``require_percolation``, the default)
its solid does not percolate along all three axes (microstructures.percolates: a
face-connected solid cluster that wraps around the period) or no single cluster spans
three independent directions (``spanning_rank`` < 3: separate rods or plates that
percolate along every axis between them), the parameters are drawn
again from ``default_rng([seed, i, attempt])``, attempt = 1, 2, ... up to
``max_redraws``; the rejected draws and their reasons are recorded in the sample's
params. A cell whose solid does not span the period has a C^H at the level of the soft
void (1e-6 E): it carries no load, and its relative errors mean nothing.

Shard file ``<out_dir>/<name>-<shard:05d>.h5``, written atomically (temporary file, rename)::

    /phases   uint8 (N, n, n, n)   0 void, 1 solid (gzip, one chunk per sample)
    /E        float64 (N,)         solid Young's modulus
    /nu       float64 (N,)         solid Poisson ratio
    /vf       float64 (N,)         achieved solid volume fraction
    /index    int64 (N,)           global sample index i
    /family   str (N,)             tpms / lattice / shell
    /params   str (N,)             JSON: generator name and arguments, draw, redraws
    attrs     name, split, seed, shard, n_shards, n, config (JSON), config_hash, version

Generation runs one dask task per shard (``generate``); ``ShardedDataset`` reads the
shards lazily (an h5py handle per process, so DataLoader workers each open their own).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import time
from typing import Optional, Sequence

import h5py
import numpy as np

log = logging.getLogger(__name__)

FAMILIES = ("tpms", "lattice", "shell")
FORMAT_VERSION = 1
# The acceptance rules of make_sample (2: percolation along x, y, z and one cluster that
# spans three directions). Part of the content hash, so shards made under other rules
# are not taken as current and get regenerated.
SAMPLING_VERSION = 2


@dataclasses.dataclass
class DataConfig:
    """What a data set holds; a YAML file (configs/data_<name>.yaml) sets these fields."""
    name: str = "cgins"
    split: str = "train"                     # a label: train / heldout / ...
    seed: int = 0
    n: int = 32
    samples_per_family: int = 200
    shard_size: int = 64
    families: Sequence[str] = FAMILIES
    vf_range: Sequence[float] = (0.1, 0.4)
    nu_range: Sequence[float] = (0.2, 0.4)
    E: float = 1.0
    surfaces: Sequence[str] = ("P", "G", "D", "IWP", "FRD")
    forms: Sequence[str] = ("network", "sheet")
    topologies: Optional[Sequence[str]] = None    # None: all of topology_names()
    random_fraction: float = 0.3                  # share of lattice / shell on random graphs
    random_nodes: Sequence[int] = (6, 12)         # inclusive range of random-graph nodes
    random_k: Sequence[int] = (3, 4)              # inclusive range of neighbours per node
    max_redraws: int = 16
    require_percolation: bool = True              # redraw cells whose solid does not span x, y, z
    out_dir: Optional[str] = None                 # default data/<name>

    def __post_init__(self):
        self.families = tuple(self.families)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"unknown families {bad}; choose from {FAMILIES}")
        for key in ("vf_range", "nu_range", "random_nodes", "random_k"):
            lo, hi = getattr(self, key)
            if not lo <= hi:
                raise ValueError(f"{key} must be (low, high), got {getattr(self, key)}")
            cast = int if key.startswith("random") else float
            setattr(self, key, (cast(lo), cast(hi)))
        if not (0 < self.vf_range[0] and self.vf_range[1] < 1):
            raise ValueError(f"vf_range must lie in (0, 1), got {self.vf_range}")
        if not (-1 < self.nu_range[0] and self.nu_range[1] < 0.5):
            raise ValueError(f"nu_range must lie in (-1, 0.5), got {self.nu_range}")
        if self.n < 4 or self.samples_per_family < 1 or self.shard_size < 1:
            raise ValueError("n >= 4, samples_per_family >= 1 and shard_size >= 1 are required")
        self.surfaces, self.forms = tuple(self.surfaces), tuple(self.forms)
        if self.topologies is not None:
            self.topologies = tuple(self.topologies)
        if self.out_dir is None:
            self.out_dir = os.path.join("data", self.name)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown data config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> "DataConfig":
        d = read_yaml_mapping(path)
        d = d.get("data", d)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: the data section must be a mapping of DataConfig fields")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def content_hash(self) -> str:
        """Hash of everything that determines the samples (not out_dir, name or split)."""
        d = self.to_dict()
        for k in ("out_dir", "name", "split"):
            d.pop(k)
        d["sampling_version"] = SAMPLING_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def total(self) -> int:
        return self.samples_per_family * len(self.families)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.total / self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.total))

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.out_dir, f"{self.name}-{shard:05d}.h5")


# --------------------------------------------------------------------------- sampling

def _topologies(cfg: DataConfig) -> tuple:
    if cfg.topologies is not None:
        return cfg.topologies
    from microstructures.generators import topology_names
    return tuple(topology_names())


def draw_params(cfg: DataConfig, index: int, attempt: int = 0) -> dict:
    """The generator call of sample ``index`` (attempt > 0: a redraw), from
    default_rng([seed, index]) or default_rng([seed, index, attempt])."""
    family = cfg.families[index % len(cfg.families)]
    key = [cfg.seed, index] if attempt == 0 else [cfg.seed, index, attempt]
    rng = np.random.default_rng(key)
    vf = float(rng.uniform(*cfg.vf_range))
    nu = float(rng.uniform(*cfg.nu_range))
    p = {"family": family, "vf": vf, "nu": nu, "E": float(cfg.E), "n": int(cfg.n)}
    if family == "tpms":
        p.update(generator="tpms", surface=str(rng.choice(cfg.surfaces)), form=str(rng.choice(cfg.forms)))
    else:
        p["generator"] = "lattice" if family == "lattice" else "shell_lattice"
        if rng.random() < cfg.random_fraction:
            p.update(topology="random", nodes=int(rng.integers(cfg.random_nodes[0], cfg.random_nodes[1] + 1)),
                     k=int(rng.integers(cfg.random_k[0], cfg.random_k[1] + 1)),
                     seed=int(rng.integers(0, 2 ** 31 - 1)))
        else:
            p["topology"] = str(rng.choice(_topologies(cfg)))
    return p


def build_cell(p: dict):
    """The Cell of a parameter draw (raises CellError when the target cannot be met)."""
    from microstructures import generators as g
    common = dict(vf=p["vf"], n=p["n"], E=p["E"], nu=p["nu"])
    if p["generator"] == "tpms":
        return g.tpms(p["surface"], p["form"], **common)
    fn = g.lattice if p["generator"] == "lattice" else g.shell_lattice
    extra = {k: p[k] for k in ("nodes", "k", "seed") if k in p}
    return fn(p["topology"], **common, **extra)


def make_sample(cfg: DataConfig, index: int) -> tuple:
    """(phases uint8 (n, n, n), params dict) of sample ``index``, redrawing
    deterministically on CellError; the params record the rejected draws."""
    from microstructures.cell import CellError
    from microstructures.percolation import connectivity
    rejected = []
    for attempt in range(cfg.max_redraws + 1):
        p = draw_params(cfg, index, attempt)
        try:
            cell = build_cell(p)
        except CellError as e:
            rejected.append({"attempt": attempt, "error": " ".join(str(e).split())})
            continue
        if cfg.require_percolation:
            perc, rank = connectivity(cell)
            if not all(perc):
                axes = ", ".join(ax for ax, ok in zip("xyz", perc) if not ok)
                rejected.append({"attempt": attempt, "error": f"the solid does not percolate along {axes}"})
                continue
            if rank < 3:
                rejected.append({"attempt": attempt, "error": f"no single solid cluster spans three directions "
                                                              f"(at most {rank})"})
                continue
        phases = (np.asarray(cell.phases) > 0).astype(np.uint8)   # 0 void, 1 solid
        p.update(attempt=attempt, rejected=rejected, vf_achieved=float(phases.mean()),
                 cell_params=cell.params)
        return phases, p
    raise RuntimeError(f"sample {index}: no valid cell in {cfg.max_redraws + 1} draws; last: {rejected[-1]}")


def read_yaml_mapping(path) -> dict:
    """The YAML file ``path`` as a dict ({} when empty); ValueError with one line for text
    that is not YAML or not a mapping (what the configs of make_dataset and train must be)."""
    import yaml
    with open(path) as fh:
        try:
            d = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ValueError(f"the configuration must be a mapping, got a {type(d).__name__}")
    return d

# --------------------------------------------------------------------------- shards

def make_shard(cfg_dict: dict, shard: int, overwrite: bool = False) -> dict:
    """Generate and atomically write shard ``shard``; returns a summary dict.
    An existing shard with the same config hash is kept unless ``overwrite``."""
    from microstructures.atomic import atomic_output
    cfg = DataConfig.from_dict(cfg_dict)
    path = cfg.shard_path(shard)
    if not overwrite and shard_is_current(path, cfg, shard):
        return {"shard": shard, "path": path, "skipped": True, "samples": len(cfg.shard_range(shard))}
    t0 = time.perf_counter()
    idx = cfg.shard_range(shard)
    n = cfg.n
    phases = np.empty((len(idx), n, n, n), np.uint8)
    params = []
    for j, i in enumerate(idx):
        phases[j], p = make_sample(cfg, i)
        params.append(p)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.create_dataset("phases", data=phases, chunks=(1, n, n, n), compression="gzip",
                             compression_opts=1, shuffle=False)
            f.create_dataset("E", data=np.array([p["E"] for p in params], np.float64))
            f.create_dataset("nu", data=np.array([p["nu"] for p in params], np.float64))
            f.create_dataset("vf", data=np.array([p["vf_achieved"] for p in params], np.float64))
            f.create_dataset("index", data=np.array(list(idx), np.int64))
            f.create_dataset("family", data=np.array([p["family"] for p in params], dtype=object),
                             dtype=h5py.string_dtype())
            f.create_dataset("params", data=np.array([json.dumps(p, sort_keys=True) for p in params], dtype=object),
                             dtype=h5py.string_dtype())
            f.attrs.update(name=cfg.name, split=cfg.split, seed=cfg.seed, shard=shard, n_shards=cfg.n_shards,
                           n=n, config=json.dumps(cfg.to_dict(), sort_keys=True),
                           config_hash=cfg.content_hash(), version=FORMAT_VERSION)
    redraws = sum(p["attempt"] for p in params)
    return {"shard": shard, "path": path, "skipped": False, "samples": len(idx), "redraws": redraws,
            "seconds": time.perf_counter() - t0}


def shard_is_current(path: str, cfg: DataConfig, shard: int) -> bool:
    """The shard at ``path`` holds exactly what ``cfg`` would write there (the same
    samples, and the same name and split labels)."""
    if not os.path.exists(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return (f.attrs.get("config_hash") == cfg.content_hash() and int(f.attrs["shard"]) == shard
                    and f.attrs.get("name") == cfg.name and f.attrs.get("split") == cfg.split
                    and f["phases"].shape[0] == len(cfg.shard_range(shard)))
    except (OSError, KeyError):
        return False


def generate(cfg: DataConfig, client=None, workers: int = 0, shards: Optional[Sequence[int]] = None,
             overwrite: bool = False, progress: bool = False) -> list:
    """Write the data set's shards; one dask task per shard.

    ``client``: a dask Client to use; else ``workers`` > 0 starts a LocalCluster of that
    many single-threaded processes, and ``workers`` = 0 generates in this process.
    ``shards``: only these (default all). Returns the per-shard summaries, in shard order.
    """
    whole = shards is None
    shards = list(range(cfg.n_shards)) if whole else [int(s) for s in shards]
    cfg_dict = cfg.to_dict()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(shards), unit="shard", desc=f"generate {cfg.name}")
    out = {}
    try:
        if client is None and workers <= 0:
            for s in shards:
                out[s] = make_shard(cfg_dict, s, overwrite)
                if bar is not None:
                    bar.update(1)
        else:
            from distributed import Client, LocalCluster, as_completed
            own = client is None
            if own:
                import dask
                # distributed's default MALLOC_TRIM_THRESHOLD_=65536 for its workers makes the
                # generators ~2x slower (many mid-sized numpy temporaries); 128 MiB does not
                with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 128 << 20}):
                    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
                client = Client(cluster)
            try:
                futs = {client.submit(make_shard, cfg_dict, s, overwrite, key=f"shard-{cfg.name}-{s}", pure=False): s
                        for s in shards}
                for fut in as_completed(list(futs)):
                    out[futs[fut]] = fut.result()
                    if bar is not None:
                        bar.update(1)
            finally:
                if own:
                    client.close()
                    cluster.close()
    finally:
        if bar is not None:
            bar.close()
    if whole:
        for path in stale_shards(cfg):
            os.unlink(path)
            log.info("removed %s: a shard of an earlier configuration of %s beyond its %d shards",
                     path, cfg.name, cfg.n_shards)
    return [out[s] for s in shards if s in out]


def stale_shards(cfg: DataConfig) -> list:
    """Shard files of data set ``cfg.name`` in ``cfg.out_dir`` numbered at or beyond
    ``cfg.n_shards``: left by an earlier, larger configuration (more samples, smaller
    shards). Read with the current shards they would add cells, or repeat some."""
    out = []
    for path in glob.glob(os.path.join(glob.escape(cfg.out_dir), f"{glob.escape(cfg.name)}-*.h5")):
        stem = os.path.basename(path)[len(cfg.name) + 1:-3]
        if stem.isdigit() and int(stem) >= cfg.n_shards:
            out.append(path)
    return sorted(out)


def shard_files(root) -> list:
    """Shard files of a directory, a glob pattern, a file, or a list of those, sorted."""
    if isinstance(root, (list, tuple)):
        files = {f for r in root for f in (shard_files(r) if os.path.isdir(str(r)) or glob.has_magic(str(r))
                                           else [str(r)])}
        return sorted(files)
    if os.path.isdir(root):
        files = glob.glob(os.path.join(root, "*.h5"))
    else:
        files = glob.glob(str(root))
    return sorted(files)


# --------------------------------------------------------------------------- dataset

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a project dependency
    _TorchDataset = object


def _check_consistent(seen: dict, path: str, attrs) -> None:
    """ValueError if shard ``path`` and those read before it mix two configurations of one
    data set in one directory (stale shards of an earlier make_dataset run) or hold the
    same shard twice (a copy in another directory)."""
    name, digest = str(attrs.get("name")), str(attrs.get("config_hash"))
    hashes = seen.setdefault(("hash", os.path.dirname(os.path.abspath(path)), name), {})
    hashes.setdefault(digest, path)
    if len(hashes) > 1:
        a, b = list(hashes.values())[:2]
        raise ValueError(f"data set {name!r} mixes shards of two configurations ({a} and {b}): regenerate it "
                         "with python -m hpc.make_dataset (which removes shards beyond the current ones)")
    key = ("shard", name, digest, int(attrs.get("shard", -1)))
    if key in seen:
        raise ValueError(f"shard {attrs.get('shard')} of data set {name!r} is read twice ({seen[key]} and {path})")
    seen[key] = path


class ShardedDataset(_TorchDataset):
    """The samples of sharded HDF5 data sets, read lazily.

    ``root``: a directory, glob or list of shard files (several data sets may be mixed);
    ``split``: keep only shards whose ``split`` attribute matches (e.g. 'train',
    'heldout'); ``families``: keep only those families; ``seed``: keep only shards made
    with that seed. Item k is (phases uint8 tensor (n, n, n), E, nu) as float64 tensors;
    ``cell(k)`` is the same sample as a microstructures Cell (phase 0 void, 1 solid).
    An h5py handle per shard is opened on first use in each process (DataLoader workers
    open their own; handles are not pickled).
    """

    def __init__(self, root, split: Optional[str] = None, families: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None):
        self.files, self.hashes = [], []
        rows = []          # (file number, row in file)
        fam, E, nu, vf, gidx = [], [], [], [], []
        seen = {}         # data-set name -> {config_hash: first file}, and (name, shard) -> file
        for path in shard_files(root):
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise ValueError(f"{path}: not a readable HDF5 data-set shard ({' '.join(str(e).split())})") from None
            with f:
                if not {"phases", "family", "E", "nu", "vf", "index"} <= set(f) or "config_hash" not in f.attrs:
                    raise ValueError(f"{path}: not a data-set shard of python -m hpc.make_dataset "
                                     "(no /phases, /family ... or config_hash)")
                _check_consistent(seen, path, f.attrs)
                if split is not None and f.attrs.get("split") != split:
                    continue
                if seed is not None and int(f.attrs.get("seed")) != int(seed):
                    continue
                names = [s.decode() if isinstance(s, bytes) else str(s) for s in f["family"][()]]
                keep = [j for j, name in enumerate(names) if families is None or name in families]
                if not keep:
                    continue
                fi = len(self.files)
                self.files.append(os.path.abspath(path))
                self.hashes.append(str(f.attrs.get("config_hash")))
                e, v, a, g = f["E"][()], f["nu"][()], f["vf"][()], f["index"][()]
                for j in keep:
                    rows.append((fi, j))
                    fam.append(names[j])
                    E.append(e[j])
                    nu.append(v[j])
                    vf.append(a[j])
                    gidx.append(g[j])
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 2)
        self.families = np.array(fam, dtype=object)
        self.E = np.array(E, dtype=np.float64)
        self.nu = np.array(nu, dtype=np.float64)
        self.vf = np.array(vf, dtype=np.float64)
        self.index = np.array(gidx, dtype=np.int64)
        self._handles, self._pid = {}, None
        log.info("ShardedDataset: %d samples from %d shards", len(self), len(self.files))

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _file(self, fi: int) -> h5py.File:
        if self._pid != os.getpid():          # a forked DataLoader worker: fresh handles
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(fi)
        if h is None:
            h = self._handles[fi] = h5py.File(self.files[fi], "r")
        return h

    def identity(self) -> list:
        """[(config hash, sample index)] in order: which samples these are, wherever the
        shards lie (a run's data fingerprint, hpc.train)."""
        return [[self.hashes[int(fi)], int(i)] for (fi, _), i in zip(self.rows, self.index)]

    def grid(self, k: int) -> tuple:
        """The grid (n_x, n_y, n_z) of sample k, from its shard's header (nothing decompressed)."""
        return tuple(int(v) for v in self._file(int(self.rows[k][0]))["phases"].shape[1:])

    def phases(self, k: int) -> np.ndarray:
        if not -len(self) <= k < len(self):
            raise IndexError(f"sample {k} out of range for {len(self)} samples")
        fi, j = self.rows[k]
        return self._file(int(fi))["phases"][int(j)]

    def params(self, k: int) -> dict:
        fi, j = self.rows[k]
        raw = self._file(int(fi))["params"][int(j)]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def __getitem__(self, k: int):
        import torch
        ph = self.phases(k)
        return torch.from_numpy(ph), torch.tensor(self.E[k], dtype=torch.float64), \
            torch.tensor(self.nu[k], dtype=torch.float64)

    def cell(self, k: int):
        from microstructures.cell import Cell
        return Cell(self.phases(k), E=[0.0, float(self.E[k])], nu=[float(self.nu[k])] * 2,
                    name=f"{self.families[k]}-{int(self.index[k])}", generator="model.data")

    def close(self):
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, None
        return d

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
