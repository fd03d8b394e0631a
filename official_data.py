"""The official benchmark data: NAS-Bench-360 and PDEBench in their own file formats, downloads and caches.

data.py is what a reader of a method needs (the Task type, the registry with each task's official hyperparameters,
splits and checks, the offline and user tasks, the source data); this module is the I/O underneath it. Each loader
reads the files the official code reads (ORCA src/data_loaders.py; orca_pare_reference.md section 4), with the same
preprocessing, from --data_dir laid out as the official ./datasets, downloaded on first use where a public URL exists
(`fetch`: one attempt, checksum, atomic rename). Large arrays are prepared once into <data_dir>/cache/ and
memory-mapped afterwards (`cached`). A loader returns make_task's arguments as a dict; data.get_task makes the Task.

Official bugs fixed here (marked `FIX:` below; docs/data.md lists them): PSICOV MAE@8 on each protein's own length
and no MSE broadcasting; Cosmic test images without a random sky level (AUROC on scores and metrics on the whole
evaluation set are in metrics.compute_metric); PDE-Burgers sequence length from the real length 1024; PDE-RD target =
the final step, not step 29; PDE-RD2D maps (u, v) to (u, v), not u to v; PDE-1DCFD targets with their own
normaliser and the metric in physical units; one download attempt instead of ORCA's endless retry loop.

Imports: this module depends on errors.py only; data.py imports it (no cycle).
"""
import functools
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from errors import UserError

LOADERS = {}  # task name -> load(name, data_dir) -> dict of make_task arguments; data.TASKS picks these up


def loader(*names):
    """Register a function load(name, data_dir) -> dict of arrays (data.make_task arguments)."""
    def register(fn):
        for name in names:
            LOADERS[name] = fn
        return fn
    return register


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


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that rebuilds numpy arrays and plain containers only. A pickle runs whatever callable it
    names while it loads (os.system, eval, ...); the official files name nothing but these, so any other name is
    refused before it is called."""
    ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str",
                                         "int", "float", "complex", "bool")} | {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")} | {
        (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # Python 2 pickles (PSICOV, CIFAR)
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: the file asks to run code, not only to "
                                         f"hold arrays (a tampered or foreign file)")
        return super().find_class(module, name)


def _unpickle(path, **kw):
    """pickle.load through SafeUnpickler (arrays and containers only); a gzip file when the path ends in .gz."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        return SafeUnpickler(f, **kw).load()


def load_npy(path, encoding="ASCII"):
    """np.load of a .npy file without pickle; an object array (a pickled dict or tuple, as the NB360 files are)
    is read through SafeUnpickler instead of np.load(allow_pickle=True), which would run any code it names."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        return SafeUnpickler(f, encoding=encoding).load()


def atomic_path(path):
    """A temporary name in the folder of `path`, with the same suffix (np.save / np.savez append theirs): write
    there, then os.replace(tmp, path), so that a kill mid-write never leaves a half file under the real name."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_atomic(path, write):
    """write(tmp) then os.replace(tmp, path); the temporary file is removed when write fails."""
    tmp = atomic_path(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached(data_dir, task, sources, build):
    """Arrays built once by build() -> {name: array}, saved under data_dir/cache/ (through a .part folder of this
    process, so that two runs building it at once do not mix their files) and memory-mapped on later runs. Rebuilt
    when a source file changes size or date."""
    stamp = hashlib.md5(repr([(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in map(Path, sources)])
                        .encode()).hexdigest()[:8]
    folder = Path(data_dir) / "cache" / f"{task}_{stamp}"
    if not (folder / "done").exists():
        arrays, tmp = build(), folder.with_name(f"{folder.name}.part{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key in arrays:
            np.save(tmp / f"{key}.npy", np.asarray(arrays[key]))
        (tmp / "done").touch()
        if (folder / "done").exists():  # another run finished it meanwhile: keep that one
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    return {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}


def expect_ndim(task, path, a, ndim, what):
    if a.ndim != ndim:
        raise UserError(f"task '{task}': {path} holds an array of shape {a.shape}; expected {what}")
    return a

# ---- NAS-Bench-360 -------------------------------------------------------------------------------------------
def normalize(mean, std):
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return lambda x: (x / 255.0 - m) / s


def crop_flip(x, j=None, pad=4):
    """torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip on one raw (C, H, W) image (zero padding)."""
    h, w = x.shape[-2:]
    i, k = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    x = F.pad(x, (pad, pad, pad, pad))[:, i:i + h, k:k + w]
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def cifar_root(task, data_dir, folder, archive, md5):
    """The python-pickle CIFAR folder (torchvision's layout), downloaded from the Toronto page on first use."""
    root = Path(data_dir) / folder
    if not root.exists():
        unpack(task, fetch(task, data_dir, archive, f"https://www.cs.toronto.edu/~kriz/{archive}", f"md5:{md5}",
                           "https://www.cs.toronto.edu/~kriz/cifar.html"), data_dir)
    return root


def cifar_batches(task, files, label_key):
    """The python-pickle batches: uint8 images (N, 3, 32, 32) and int64 labels."""
    def parse(path):
        d = _unpickle(path, encoding="bytes")
        return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[label_key], np.int64)
    parsed = [read(task, f, parse) for f in files]
    return np.concatenate([p[0] for p in parsed]), np.concatenate([p[1] for p in parsed])


@loader("cifar100")
def _cifar100(name, data_dir):
    """torchvision CIFAR-100: RandomCrop(32, 4) + flip for training, Normalize(CIFAR-100 statistics)."""
    root = cifar_root(name, data_dir, "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
    (x_train, y_train), (x_test, y_test) = [cifar_batches(name, [root / s], b"fine_labels") for s in ("train", "test")]
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, augment=crop_flip,
                transform=normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)))


@loader("spherical")
def _spherical(name, data_dir):
    """Spherical CIFAR-100 (gzip pickle, images (N, 3, 60, 60)): /255, no augmentation, no normalisation."""
    src = fetch(name, data_dir, "s2_cifar100.gz", S3 + "spherical/s2_cifar100.gz", home=NB360)

    def parse(path):
        d = _unpickle(path)
        return {f"{k}_{s}": expect_ndim(name, path, np.asarray(d[s]["images"]), 4, "images (N, 3, 60, 60)") if k == "x"
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
        _, _, cb = read(self.task, self._file("distance", f"{pid}-cb.npy"), lambda p: load_npy(p, encoding="latin1"))
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
    return dict(sets=sets, in_shape=(57, 512, 512), out_shape=(1, 512, 512))


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
        names = ["./" + str(p.relative_to(Path(data_dir))) for p in files]
        write_atomic(lst, lambda t: np.save(t, names))  # as preprocess_cosmic.py does
    sky_of = functools.lru_cache(None)(lambda folder: np.load(folder / "sky.npy") if (folder / "sky.npy").exists()
                                       else None)

    def load_split(lst):
        images, masks, skies = [], [], []
        for rel in read(name, lst, load_npy):
            path = Path(data_dir) / str(rel).removeprefix("./")
            d = read(name, path, lambda p: expect_ndim(name, p, np.load(p), 3, "(2 or 3, H, W)"))[:, 64:192, 64:192]
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
        return read(name, path, lambda p: load_npy(p, encoding="bytes"))
    x = {s: expect_ndim(name, f"ninapro_{s}.npy", get("ninapro", s), 3, "(N, 52, 16)").astype(np.float32)
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
    if not np.isfinite(signal).all():  # a constant record has std 0
        raise UserError(f"task '{name}': {src} holds a record that is constant or not finite; delete it and get it "
                        f"again")
    offsets = np.cumsum([0] + [len(r) for r in records])
    train, test = train_test_split(np.arange(len(records)), test_size=0.1, random_state=0)
    rng, lab = np.random.RandomState(0), labels[train]  # stratified 10 % of the records: the draw of data.val_index
    val = np.sort(np.concatenate([rng.permutation(np.flatnonzero(lab == c))[: max(1, round(0.1 * (lab == c).sum()))]
                                  for c in np.unique(lab)]))
    fit = np.setdiff1d(np.arange(len(train)), val)

    def windows(recs):
        starts = [offsets[i] + np.arange(0, len(records[i]) - 1000, (500, 83, 250, 25)[labels[i]]) for i in recs]
        return Windows(signal, np.concatenate(starts), 1000), np.repeat(labels[recs], [len(s) for s in starts])
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = map(windows, (train[fit], train[val], test))
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, x_val=x_val, y_val=y_val, check=False)


@loader("satellite")
def _satellite(name, data_dir):
    """Satellite image time series: pickled dicts {'data': (N, 46), 'label': 1..24} -> (N, 1, 46), labels - 1."""
    def parse(path):
        d = load_npy(path)[()]
        return expect_ndim(name, path, np.asarray(d["data"], np.float32), 2, "data (N, 46)")[:, None], \
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
    return {k: expect_ndim(name, src, v, 3, f"{k} (N, 1000, 4)").transpose(0, 2, 1) if k.startswith("x") else v
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
                        f"recipe in docs/data.md, which needs librosa (not shipped here)")
    a = {p.stem: read(name, p, lambda p: np.load(p, mmap_mode="r")) for p in base.glob("*_*.npy")}
    for key in [k for k in a if k.startswith("mel")]:
        expect_ndim(name, base / f"{key}.npy", a[key], 4, "(N, 1, 96, 102)")
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
