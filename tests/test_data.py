"""Loaders of data.py on tiny files the tests write in the real formats, downloads, errors, pseudo-labels, sources.

    python -m pytest tests/test_data.py -q

Each expected value is computed independently from the raw arrays the test wrote (not by calling the loader's
helpers), following ORCA's data_loaders.py (orca_pare_reference.md §4)."""
import gzip
import hashlib
import pickle
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import scipy.io
import torch

import common
import data
import official_data
from common import UserError
from conftest import ROOT, run_script


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


# ---- downloads -----------------------------------------------------------------------------------------------
def test_fetch_checks_checksum_and_leaves_no_partial_file(tmp_path):
    payload = np.random.RandomState(0).bytes(3 << 20)
    (tmp_path / "remote.bin").write_bytes(payload)
    url = (tmp_path / "remote.bin").as_uri()
    good = "md5:" + hashlib.md5(payload).hexdigest()
    with pytest.raises(UserError) as e:  # wrong checksum: error, and neither the file nor a .part remains
        official_data.fetch("t", tmp_path / "d", "sub/file.bin", url, "md5:" + "0" * 32)
    assert "checksum" in one_line(e) and not list((tmp_path / "d").rglob("file.bin*"))
    path = official_data.fetch("t", tmp_path / "d", "sub/file.bin", url, good)
    assert path.read_bytes() == payload and not list((tmp_path / "d").rglob("*.part"))
    sha = "sha256:" + hashlib.sha256(payload).hexdigest()
    assert official_data.fetch("t", tmp_path / "d", "copy.bin", url, sha).read_bytes() == payload


class FakeResponse:
    """A download that announces 100 bytes, sends 50, then ends (or raises `fail` mid-way)."""
    headers = {"Content-Length": "100"}

    def __init__(self, fail=None):
        self.chunks, self.fail = [b"x" * 50], fail

    def read(self, n):
        if self.fail and not self.chunks:
            raise self.fail
        return self.chunks.pop() if self.chunks else b""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("fail", [None, KeyboardInterrupt()])
def test_truncated_or_interrupted_download_leaves_nothing(tmp_path, monkeypatch, fail):
    monkeypatch.setattr(official_data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(fail))
    with pytest.raises(KeyboardInterrupt if fail else UserError) as e:
        official_data.fetch("t", tmp_path, "f.bin", "http://example.invalid/f.bin")
    assert fail or "truncated: 50 of 100 bytes" in one_line(e)
    assert not list(tmp_path.rglob("f.bin*"))


def test_missing_file_fails_fast_with_one_line(tmp_path, monkeypatch):
    # nothing listens there: the download is refused at once
    monkeypatch.setattr(official_data, "S3", "http://127.0.0.1:9/")
    t0 = time.time()
    with pytest.raises(UserError) as e:
        data.get_task("ecg", tmp_path)
    msg = one_line(e)
    assert time.time() - t0 < 5
    assert "task 'ecg'" in msg and str(tmp_path / "challenge2017.pkl") in msg
    assert "127.0.0.1:9/ECG/challenge2017.pkl" in msg
    assert not list(tmp_path.rglob("*.part"))


def test_script_without_data_stops_in_seconds_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_OFFLINE", "1")
    t0 = time.time()
    proc, final = run_script("finetune.py", "--task", "ecg", "--data_dir", tmp_path, "--out_dir", tmp_path / "o",
                             check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and final is None and time.time() - t0 < 60
    assert len(lines) == 1 and lines[0].startswith("error: task 'ecg': missing") and "pde-xd" in lines[0], lines


def test_list_shows_every_task_and_presence(tmp_path):
    data.np.save(tmp_path / "satellite_train.npy", np.zeros(1))
    (tmp_path / "satellite_test.npy").write_bytes(b"x" * 10)
    out = subprocess.run([sys.executable, str(ROOT / "data.py"), "--list", "--data_dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == set(data.TASKS)
    assert rows["satellite"].rstrip().endswith("MB)") and rows["ecg"].rstrip().endswith("no")


# ---- NAS-Bench-360 -------------------------------------------------------------------------------------------
def write_ecg(root, rng):
    lengths = [3000, 2500, 4200, 1800, 900, 3300, 2600, 5000, 3100, 2000, 2800, 3600]
    labels = ["N", "A", "O", "~"] * 3
    records = [rng.randn(n) * (i + 1) + i for i, n in enumerate(lengths)]
    with open(root / "challenge2017.pkl", "wb") as f:
        pickle.dump({"data": np.array(records, dtype=object), "label": labels}, f)
    return records, labels


def test_ecg_windows_strides_split_and_zscore(tmp_path):
    from sklearn.model_selection import train_test_split
    records, labels = write_ecg(tmp_path, np.random.RandomState(0))
    task = data.get_task("ecg", tmp_path)
    assert (task.kind, task.metric, task.in_shape, task.out_shape) == ("classification", "1-f1", (1, 1000), (4,))
    code = {"N": 0, "A": 1, "O": 2, "~": 3}
    stride = {"N": 500, "A": 83, "O": 250, "~": 25}  # 500, 500 // 6, 500 // 2, 500 // 20

    def expected(ids):  # ORCA slide_and_cut on z-scored records
        xs, ys = [], []
        for i in ids:
            r = (records[i] - records[i].mean()) / records[i].std()
            for s in range(0, len(r) - 1000, stride[labels[i]]):
                xs.append(r[s:s + 1000])
                ys.append(code[labels[i]])
        return np.array(xs), np.array(ys)
    train, test = train_test_split(np.arange(len(records)), test_size=0.1, random_state=0)
    x_test, y_test = expected(test)
    xt, yt = task.test.tensors
    np.testing.assert_allclose(xt[:, 0].numpy(), x_test, atol=1e-5)
    np.testing.assert_array_equal(yt.numpy(), y_test)
    x_all, y_all = expected(train)  # train + val windows together are exactly the training records' windows
    got = torch.cat([task.train.tensors[0], task.val.tensors[0]])[:, 0].numpy()
    assert len(got) == len(x_all) and np.allclose(np.sort(got.sum(1)), np.sort(x_all.sum(1)), atol=1e-3)
    assert len(task.val) > 0 and len(task.train) > 0  # validation records: 10 % per class, at least one each
    assert isinstance(task.train.x, official_data.Windows)  # windows are views into one signal, not copies


def test_satellite_pickled_dicts(tmp_path):
    rng = np.random.RandomState(0)
    for split, n in (("train", 50), ("test", 20)):
        np.save(tmp_path / f"satellite_{split}.npy", {"data": rng.randn(n, 46), "label": rng.randint(1, 25, n)})
    task = data.get_task("satellite", tmp_path)
    raw = np.load(tmp_path / "satellite_test.npy", allow_pickle=True)[()]
    x, y = task.test.tensors
    assert task.in_shape == (1, 46) and task.out_shape == (24,) and len(task.train) + len(task.val) == 50
    np.testing.assert_allclose(x[:, 0].numpy(), raw["data"], atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), raw["label"] - 1)


def test_ninapro_transpose_and_official_val_split(tmp_path):
    rng = np.random.RandomState(0)
    (tmp_path / "ninaPro").mkdir()
    for split, n in (("train", 30), ("val", 8), ("test", 10)):
        np.save(tmp_path / "ninaPro" / f"ninapro_{split}.npy", rng.randn(n, 52, 16).astype(np.float32))
        np.save(tmp_path / "ninaPro" / f"label_{split}.npy", rng.randint(0, 18, n).astype(np.int8))
    task = data.get_task("ninapro", tmp_path)
    raw = np.load(tmp_path / "ninaPro" / "ninapro_val.npy")
    assert task.in_shape == (1, 16, 52) and task.out_shape == (18,) and (len(task.train), len(task.val)) == (30, 8)
    np.testing.assert_array_equal(task.val.tensors[0][:, 0].numpy(), raw.transpose(0, 2, 1))


def test_deepsea_npz_memory_mapped_transposed(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 6), ("test", 12)):
        arrays[f"x_{split}"] = np.eye(4, dtype=np.uint8)[rng.randint(0, 4, (n, 1000))]  # one-hot (N, 1000, 4)
        arrays[f"y_{split}"] = rng.randint(0, 2, (n, 36)).astype(np.uint8)
    np.savez(tmp_path / "deepsea_filtered.npz", **arrays)
    task = data.get_task("deepsea", tmp_path)
    assert (task.kind, task.loss, task.metric, task.pos_weight) == ("multilabel", "bce", "1-auroc", 4.0)
    assert task.in_shape == (4, 1000) and task.out_shape == (36,) and len(task.val) == 6
    assert isinstance(task.train.x.base, np.memmap) or isinstance(task.train.x, np.memmap)
    x, y = task.test.tensors
    np.testing.assert_array_equal(x.numpy(), arrays["x_test"].transpose(0, 2, 1))
    assert y.dtype == torch.float32 and torch.equal(y, torch.as_tensor(arrays["y_test"], dtype=torch.float32))
    assert data.get_task("deepsea", tmp_path).test.tensors[0].shape == (12, 4, 1000)  # second run: from the cache


def test_spherical_gzip_pickle_scaled(tmp_path):
    rng = np.random.RandomState(0)
    d = {s: {"images": rng.randint(0, 256, (n, 3, 60, 60)).astype(np.uint8), "labels": rng.randint(0, 100, n)}
         for s, n in (("train", 30), ("test", 10))}
    with gzip.open(tmp_path / "s2_cifar100.gz", "wb") as f:
        pickle.dump(d, f)
    task = data.get_task("spherical", tmp_path)
    x, y = task.test.tensors
    assert task.in_shape == (3, 60, 60) and task.out_shape == (100,)
    np.testing.assert_allclose(x.numpy(), d["test"]["images"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), d["test"]["labels"])


def write_cifar(root, folder, files, label_key, rng, n=20):
    (root / folder).mkdir()
    for f in files:
        with open(root / folder / f, "wb") as fh:
            images = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
            pickle.dump({label_key: list(rng.randint(0, 10, n)), b"data": images}, fh)


def test_cifar100_normalised_and_train_only_augmentation(tmp_path):
    rng = np.random.RandomState(0)
    write_cifar(tmp_path, "cifar-100-python", ["train", "test"], b"fine_labels", rng)
    task = data.get_task("cifar100", tmp_path)
    raw = pickle.load(open(tmp_path / "cifar-100-python" / "test", "rb"), encoding="bytes")
    mean, std = np.array([0.5071, 0.4867, 0.4408])[:, None, None], np.array([0.2675, 0.2565, 0.2761])[:, None, None]
    expect = (raw[b"data"].reshape(-1, 3, 32, 32) / 255.0 - mean) / std
    np.testing.assert_allclose(task.test.tensors[0].numpy(), expect, atol=1e-5)
    assert task.out_shape == (100,) and len(task.train) + len(task.val) == 20
    # training reads are RandomCrop(32, padding=4) + horizontal flip of the raw image, then normalised ...
    train_raw = pickle.load(open(tmp_path / "cifar-100-python" / "train", "rb"), encoding="bytes")[b"data"]
    raw = np.pad(train_raw[task.train.idx[0]].reshape(3, 32, 32) / 255.0, ((0, 0), (4, 4), (4, 4)))
    candidates = {(i, k, flip): (c[..., ::-1] if flip else c) for i in range(9) for k in range(9) for flip in (0, 1)
                  for c in [(raw[:, i:i + 32, k:k + 32] - mean) / std]}
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x = task.train[0][0].numpy()
        seen |= {key for key, c in candidates.items() if np.allclose(c, x, atol=1e-5)}
    assert {key[2] for key in seen} == {0, 1} and len({key[:2] for key in seen}) > 5
    assert torch.equal(task.val[0][0], task.val[0][0])  # ... and validation reads are not augmented


def write_mat(path, fields, v73):
    if not v73:
        scipy.io.savemat(path, fields)
        return
    with h5py.File(path, "w", userblock_size=512) as f:  # MATLAB v7.3: HDF5 with column-major (transposed) arrays
        for k, v in fields.items():
            f[k] = v.T
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")


@pytest.mark.parametrize("v73", [False, True])
def test_darcy_mat_subsample_normalise_grid_decode(tmp_path, v73):
    rng = np.random.RandomState(0)
    raw = {}
    for i, n in ((1, 6), (2, 3)):
        raw[i] = dict(coeff=rng.rand(n, 421, 421).astype(np.float32), sol=rng.rand(n, 421, 421).astype(np.float32))
        write_mat(tmp_path / f"piececonst_r421_N1024_smooth{i}.mat", raw[i], v73)
    task = data.get_task("darcy", tmp_path)
    assert task.in_shape == (3, 85, 85) and task.out_shape == (1, 85, 85) and task.loss == task.metric == "rel_l2"
    c_tr, s_tr = raw[1]["coeff"][:, ::5, ::5], raw[1]["sol"][:, ::5, ::5]
    x, y = task.test.tensors
    expect_x = (raw[2]["coeff"][:, ::5, ::5] - c_tr.mean(0)) / (c_tr.std(0, ddof=1) + 1e-5)
    np.testing.assert_allclose(x[:, 0].numpy(), expect_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x[0, 1, 3, :].numpy(), np.linspace(0, 1, 85), atol=1e-6)  # x grid along columns
    np.testing.assert_allclose(x[0, 2, :, 3].numpy(), np.linspace(0, 1, 85), atol=1e-6)  # y grid along rows
    np.testing.assert_allclose(task.decode(y)[:, 0].numpy(), raw[2]["sol"][:, ::5, ::5], atol=1e-5)
    assert len(task.train) + len(task.val) == 6


def write_protein(root, pid, length, split, rng):
    for sub in ("features", "distance"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    f = dict(seq="A" * length, ss=rng.rand(3, length), pssm=rng.rand(length, 22), sa=rng.rand(length),
             entropy=rng.rand(length), ccmpred=rng.rand(length, length), freecon=rng.rand(length, length),
             potential=rng.rand(length, length))
    pickle.dump(f, open(root / split / "features" / f"{pid}.pkl", "wb"))
    d = rng.rand(length, length) * 30
    d = (d + d.T) / 2
    np.save(root / split / "distance" / f"{pid}-cb.npy", np.array([length, "A" * length, d], dtype=object))
    return f, d


def test_psicov_features_padding_clip_and_metric(tmp_path):
    rng = np.random.RandomState(0)
    root = tmp_path / "protein"
    raw = {pid: write_protein(root, pid, n, "deepcov", rng) for pid, n in (("a", 30), ("b", 40), ("c", 25))}
    raw["t"] = write_protein(root, "t", 35, "psicov", rng)
    (root / "deepcov.lst").write_text("a\nb\nc\n")
    (root / "psicov.lst").write_text("t\n")
    task = data.get_task("psicov", tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (2, 1, 1) and task.in_shape == (57, 512, 512)
    x, y = task.train[0]  # protein a, training: padded by 5, targets clipped at 16
    f, d = raw["a"]
    assert x.shape == (57, 512, 512) and y.shape == (1, 512, 512)
    np.testing.assert_allclose(x[0, 5 + 2, 5 + 7].item(), f["ss"][0, 7], rtol=1e-6)  # channel 0: column residue
    np.testing.assert_allclose(x[1, 5 + 2, 5 + 7].item(), f["ss"][0, 2], rtol=1e-6)  # channel 1: row residue
    np.testing.assert_allclose(x[6, 5, 5 + 9].item(), f["pssm"][9, 0], rtol=1e-6)
    np.testing.assert_allclose(x[56, 5 + 3, 5 + 4].item(), f["potential"][3, 4], rtol=1e-6)
    assert x[:, :5].abs().sum() == 0 and x[:, 35:].abs().sum() == 0
    ref = np.minimum(d, 16)
    np.testing.assert_allclose(y[0, 5 + 3, 5 + 9].item(), ref[3, 9], rtol=1e-6)
    assert y[0, 0, 0] == 16 and y[0, 300, 300] == 16  # padding 100 clipped to 16 in training
    xt, yt = task.test[0]  # test: unclipped, padding stays 100
    dt = raw["t"][1]
    np.testing.assert_allclose(yt[0, 5 + 1, 5 + 30].item(), dt[1, 30], rtol=1e-6)
    assert yt[0, 0, 0] == 100 and yt[0, 400, 400] == 100
    # MAE@8 over the whole test set on each protein's own map: a prediction off by 1 A everywhere scores 1.0 when
    # some pairs with separation >= 24 lie within 8 A
    dt_small = dt.copy()
    assert (np.triu(dt_small <= 8, 24)).any()
    pred = yt.numpy()[None] + 1.0
    assert common.compute_metric("mae8", pred, yt.numpy()[None]) == pytest.approx(1.0)
    xb, yb = data.take(task.test, [0])  # the lazy dataset reads single samples; the whole split is refused
    assert xb.shape == (1, 57, 512, 512) and torch.equal(yb[0], yt)
    with pytest.raises(UserError):
        task.train.tensors
    labels = data.class_labels(task, k=2)
    assert labels.shape == (2,) and set(labels.tolist()) == {0, 1}


def test_psicov_download_and_unzip_through_s3(tmp_path, monkeypatch):
    import zipfile
    remote, rng = tmp_path / "remote", np.random.RandomState(2)
    for pid, split in (("a", "deepcov"), ("b", "deepcov"), ("t", "psicov")):
        write_protein(remote / "protein", pid, 12, split, rng)
    (remote / "protein" / "deepcov.lst").write_text("a\nb\n")
    (remote / "protein" / "psicov.lst").write_text("t\n")
    with zipfile.ZipFile(remote / "protein.zip", "w") as z:  # an archive with a top-level protein/ folder
        for p in (remote / "protein").rglob("*"):
            z.write(p, p.relative_to(remote))
    monkeypatch.setattr(official_data, "S3", remote.as_uri() + "/")
    task = data.get_task("psicov", tmp_path / "d")
    assert (tmp_path / "d" / "protein.zip").exists() and len(task.test) == 1 and task.test[0][0].shape == (57, 512, 512)
    assert not list((tmp_path / "d").rglob(".unpack_*"))
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(UserError) as e:
        official_data.unpack("psicov", tmp_path / "bad.zip", tmp_path / "out")
    assert "cannot extract" in one_line(e) and not list((tmp_path / "out").glob(".unpack_*"))


def test_psicov_long_protein_cropped_to_window(tmp_path):
    rng = np.random.RandomState(1)
    root = tmp_path / "protein"
    write_protein(root, "long", 520, "deepcov", rng)
    write_protein(root, "v", 20, "deepcov", rng)
    write_protein(root, "t", 20, "psicov", rng)
    (root / "deepcov.lst").write_text("long\nv\n")
    (root / "psicov.lst").write_text("t\n")
    task = data.get_task("psicov", tmp_path)
    np.random.seed(0)
    x, y = task.train[0]
    assert x.shape == (57, 512, 512) and y.max() <= 16


def write_cosmic(root, rng):
    files = {}
    fields = (("train", ("10760", "2"), 3), ("train", ("10595", "2"), 2), ("test", ("13737", "3"), 2))
    for split, (prop, vis), n in fields:
        folder = root / "cosmic" / f"npy_{split}" / "f435w" / prop / vis
        folder.mkdir(parents=True)
        np.save(folder / "sky.npy", np.arange(1, 6, dtype=np.float32) * 10)
        for i in range(1, n + 1):
            img = np.stack([rng.rand(256, 256), rng.rand(256, 256) > 0.9, rng.rand(256, 256) > 0.95]).astype(np.float32)
            np.save(folder / f"{i}_cutout.npy", img)
            files[(split, prop, i)] = img
    return files


def test_cosmic_lists_crop_ignore_and_train_only_sky(tmp_path):
    files = write_cosmic(tmp_path, np.random.RandomState(0))
    task = data.get_task("cosmic", tmp_path)
    listed = np.load(tmp_path / "cosmic" / "train_dirs.npy")
    assert len(listed) == 3 and all("10760" in p for p in listed)  # 10595_2 is a globular-cluster field: dropped
    assert task.in_shape == (1, 128, 128) and task.out_shape == (1, 128, 128) and task.metric == "1-auroc"
    img = files[("test", "13737", 1)]
    x, y = task.test.tensors
    np.testing.assert_allclose(x[0, 0].numpy(), img[0, 64:192, 64:192], atol=1e-6)  # no sky draw in test
    np.testing.assert_array_equal(y[0, 0].numpy(), img[1, 64:192, 64:192] * (1 - img[2, 64:192, 64:192]))
    torch.manual_seed(0)
    xa, _ = task.train[0]
    raw = files[("train", "10760", int(task.train.idx[0]) + 1)]
    shift = (xa[0] - torch.as_tensor(raw[0, 64:192, 64:192])).numpy()
    sky = 10.0 * (int(task.train.idx[0]) + 1)
    assert np.ptp(shift) < 1e-4 and -0.9 * sky - 1e-3 <= shift.mean() <= 3 * sky + 1e-3 and abs(shift.mean()) > 0


def test_fsd50k_needs_precomputed_logmel(tmp_path):
    with pytest.raises(UserError) as e:
        data.get_task("fsd50k", tmp_path)
    assert "librosa" in one_line(e) and "mel_train.npy" in one_line(e)
    rng = np.random.RandomState(0)
    (tmp_path / "fsd50k").mkdir()
    for split, n in (("train", 20), ("test", 8)):
        np.save(tmp_path / "fsd50k" / f"mel_{split}.npy", rng.randn(n, 1, 96, 102).astype(np.float32))
        np.save(tmp_path / "fsd50k" / f"labels_{split}.npy", (rng.rand(n, 200) > 0.9).astype(np.float32))
    task = data.get_task("fsd50k", tmp_path)
    assert (task.kind, task.metric, task.pos_weight, task.out_shape) == ("multilabel", "1-map", 10.0, (200,))


def write_idx(path, array, magic):
    with gzip.open(path, "wb") as f:
        f.write(magic + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes())


def test_fashion_mnist_idx_and_missing_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", [str(tmp_path / "nowhere")])
    with pytest.raises(UserError) as e:
        data.get_task("fashion_mnist", tmp_path)
    assert "apt-get install dataset-fashion-mnist" in one_line(e)
    rng = np.random.RandomState(0)
    (tmp_path / "fashion-mnist").mkdir()
    images = {s: rng.randint(0, 256, (n, 28, 28)).astype(np.uint8) for s, n in (("train", 30), ("t10k", 10))}
    for s, im in images.items():
        write_idx(tmp_path / "fashion-mnist" / f"{s}-images-idx3-ubyte.gz", im, b"\x00\x00\x08\x03")
        labels = rng.randint(0, 10, len(im)).astype(np.uint8)
        write_idx(tmp_path / "fashion-mnist" / f"{s}-labels-idx1-ubyte.gz", labels, b"\x00\x00\x08\x01")
    task = data.get_task("fashion_mnist", tmp_path)
    assert task.in_shape == (1, 28, 28) and task.out_shape == (10,)
    np.testing.assert_allclose(task.test.tensors[0][:, 0].numpy(), images["t10k"] / 255.0, atol=1e-6)


# ---- PDEBench ------------------------------------------------------------------------------------------------
def test_pde_1d_single_file_space_time_and_split(tmp_path):
    rng = np.random.RandomState(0)
    tensor = rng.rand(20, 201, 1024).astype(np.float32)
    with h5py.File(tmp_path / "1D_Advection_Sols_beta0.4.hdf5", "w") as f:
        f["tensor"] = tensor
    task = data.get_task("pde_advection", tmp_path)
    x, y = task.test.tensors  # test = the first 10 %: 2 samples
    assert task.in_shape == (1, 256) and x.shape == (2, 1, 256) and len(task.train) + len(task.val) == 18
    np.testing.assert_array_equal(x[:, 0].numpy(), tensor[:2, 0, ::4])
    np.testing.assert_array_equal(y[:, 0].numpy(), tensor[:2, 200, ::4])
    y_rest = torch.cat([task.train.tensors[1], task.val.tensors[1]])[:, 0].numpy()  # train + val = the other 90 %
    np.testing.assert_array_equal(np.sort(y_rest[:, 0]), np.sort(tensor[2:, 200, 0]))
    assert data.get_task("pde_advection", tmp_path).loss == "nrmse"


def test_pde_reaction_diffusion_targets_final_step(tmp_path):
    tensor = np.random.RandomState(0).rand(10, 101, 1024).astype(np.float32)
    with h5py.File(tmp_path / "ReacDiff_Nu0.5_Rho1.0.hdf5", "w") as f:
        f["tensor"] = tensor
    y = data.get_task("pde_diffusion_reaction", tmp_path).test.tensors[1]
    np.testing.assert_array_equal(y[:, 0].numpy(), tensor[:1, 100])  # not step 29 (ORCA's t_train = 30)


def test_pde_burgers_full_length_rmse(tmp_path):
    with h5py.File(tmp_path / "1D_Burgers_Sols_Nu1.0.hdf5", "w") as f:
        f["tensor"] = np.random.RandomState(0).rand(10, 201, 1024).astype(np.float32)
    task = data.get_task("pde_burgers", tmp_path)
    assert task.in_shape == (1, 1024) and task.loss == "rmse" and task.metric == "nrmse"
    assert common.stack_num(1024, task_default := data.TASKS["pde_burgers"]["defaults"]["target_seq_len"]) == 8
    assert 1024 // 8 == task_default  # 128 tokens, as intended (ORCA computed the stride from 256 and got 512)


def test_pde_1d_cfd_fields_concatenated_own_normaliser(tmp_path):
    rng = np.random.RandomState(0)
    fields = {k: (rng.rand(20, 101, 1024) * s).astype(np.float32) for k, s in (("density", 1), ("pressure", 10),
                                                                              ("Vx", 0.1))}
    with h5py.File(tmp_path / "1D_CFD_Rand_Eta0.1_Zeta0.1_periodic_Train.hdf5", "w") as f:
        for k, v in fields.items():
            f[k] = v
    task = data.get_task("pde_navier_stokes", tmp_path)
    assert task.in_shape == (1, 3072) and task.decode is not None
    y_raw = np.concatenate([fields[k][:, 100] for k in ("density", "pressure", "Vx")], 1)
    x_raw = np.concatenate([fields[k][:, 0] for k in ("density", "pressure", "Vx")], 1)
    np.testing.assert_allclose(task.decode(task.test.tensors[1])[:, 0].numpy(), y_raw[:2], rtol=1e-4, atol=1e-4)
    y_train = y_raw[2:]
    expect = (y_raw[:2] - y_train.mean(0)) / (y_train.std(0, ddof=1) + 1e-5)  # the targets' own statistics
    np.testing.assert_allclose(task.test.tensors[1][:, 0].numpy(), expect, rtol=1e-3, atol=1e-3)
    x_train = x_raw[2:]
    np.testing.assert_allclose(task.test.tensors[0][:, 0].numpy(),
                               (x_raw[:2] - x_train.mean(0)) / (x_train.std(0, ddof=1) + 1e-5), rtol=1e-3, atol=1e-3)


def write_groups(path, shape, n, rng):
    arrays = []
    with h5py.File(path, "w") as f:
        for i in range(n):
            arrays.append(rng.rand(*shape).astype(np.float32))
            f.create_group(f"{i:04d}")["data"] = arrays[-1]
    return arrays


def test_pde_grouped_files_1d_2d_and_two_species(tmp_path):
    rng = np.random.RandomState(0)
    ds = write_groups(tmp_path / "1D_diff-sorp_NA_NA.h5", (101, 1024, 1), 10, rng)
    sw = write_groups(tmp_path / "2D_rdb_NA_NA.h5", (101, 32, 32, 1), 10, rng)
    rd = write_groups(tmp_path / "2D_diff-react_NA_NA.h5", (101, 32, 32, 2), 10, rng)
    t = data.get_task("pde_diffusion_sorption", tmp_path)
    assert t.in_shape == (1, 1024) and len(t.test) == 1
    np.testing.assert_array_equal(t.test.tensors[1][0, 0].numpy(), ds[9][100, :, 0])  # sorted keys: the last 10 %
    t = data.get_task("pde_shallow_water", tmp_path)
    np.testing.assert_array_equal(t.test.tensors[0][0, 0].numpy(), sw[9][0, :, :, 0])
    t = data.get_task("pde_diffusion_reaction_2d", tmp_path)
    assert t.in_shape == (2, 32, 32) and t.out_shape == (2, 32, 32)  # (u, v) -> (u, v), not u -> v
    np.testing.assert_array_equal(t.test.tensors[1][0].numpy(), rd[9][100].transpose(2, 0, 1))


def test_pde_darcy_nu_to_solution(tmp_path):
    rng = np.random.RandomState(0)
    nu, u = rng.rand(10, 128, 128).astype(np.float32), rng.rand(10, 1, 128, 128).astype(np.float32)
    with h5py.File(tmp_path / "2D_DarcyFlow_beta0.1_Train.hdf5", "w") as f:
        f["nu"], f["tensor"] = nu, u
    t = data.get_task("pde_darcy", tmp_path)
    x, y = t.test.tensors
    assert t.in_shape == (1, 64, 64) and t.out_shape == (1, 64, 64)
    np.testing.assert_array_equal(x[0, 0].numpy(), nu[0, ::2, ::2])
    np.testing.assert_array_equal(y[0, 0].numpy(), u[0, 0, ::2, ::2])


# ---- bad files and bad user data -----------------------------------------------------------------------------
def test_corrupt_and_truncated_files_give_one_line(tmp_path):
    (tmp_path / "challenge2017.pkl").write_bytes(b"this is not a pickle at all")
    with pytest.raises(UserError) as e:
        data.get_task("ecg", tmp_path)
    assert "corrupt" in one_line(e) and "challenge2017.pkl" in one_line(e)
    buf = gzip.compress(pickle.dumps({"train": {"images": np.zeros((4, 3, 60, 60), np.uint8)}}))
    (tmp_path / "s2_cifar100.gz").write_bytes(buf[: len(buf) // 2])
    with pytest.raises(UserError) as e:
        data.get_task("spherical", tmp_path)
    assert "truncated" in one_line(e) and "s2_cifar100.gz" in one_line(e)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["tensor"] = np.zeros((10, 201, 1024), np.float32)
    blob = (tmp_path / "x.h5").read_bytes()
    (tmp_path / "1D_Advection_Sols_beta0.4.hdf5").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(UserError) as e:
        data.get_task("pde_advection", tmp_path)
    assert "1D_Advection_Sols_beta0.4.hdf5" in one_line(e)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*/done"))


@pytest.mark.parametrize("arrays, needle", [
    (dict(x_train=np.zeros((10, 8)), y_train=np.zeros(10, int), x_test=np.zeros((4, 8)), y_test=np.zeros(4, int)),
     "expected (N, C, L)"),
    (dict(x_train=np.full((10, 1, 8), np.nan), y_train=np.zeros(10, int), x_test=np.zeros((4, 1, 8)),
          y_test=np.zeros(4, int)), "NaN"),
    (dict(x_train=np.zeros((10, 1, 8)), y_train=np.arange(10) - 1, x_test=np.zeros((4, 1, 8)),
          y_test=np.zeros(4, int)), "labels must lie in"),
    (dict(x_train=np.zeros((10, 1, 8)), y_train=np.zeros(9, int), x_test=np.zeros((4, 1, 8)),
          y_test=np.zeros(4, int)), "has 10 samples but y_train has 9"),
])
def test_custom_npz_errors(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError) as e:
        data.get_task("custom", tmp_path, data_path=tmp_path / "d.npz")
    assert needle in one_line(e)


# ---- pseudo-labels and sources -------------------------------------------------------------------------------
def test_class_labels_dense_and_multilabel_are_kmeans_of_targets():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    task = data.get_task("synthetic_dense")
    labels = data.class_labels(task)
    y = task.train.tensors[1].reshape(len(task.train), -1).numpy()
    assert len(labels) == len(task.train) and len(np.unique(labels)) == 10
    ref = KMeans(10, n_init=3, random_state=0).fit_predict(y)
    assert adjusted_rand_score(ref, labels.numpy()) == 1.0
    multi = data.class_labels(data.get_task("synthetic_multilabel"))
    y = data.get_task("synthetic_multilabel").train.tensors[1].numpy()
    assert len(np.unique(multi)) == len(np.unique(y, axis=0)) <= 10  # one cluster per distinct label vector
    for row in np.unique(y, axis=0):
        assert len(np.unique(multi.numpy()[(y == row).all(1)])) == 1


def test_conll_features_pass_through_and_default_source(tmp_path):
    rng = np.random.RandomState(0)
    np.save(tmp_path / "text_xs_32.npy", rng.randn(30, 32, 64).astype(np.float32))
    np.save(tmp_path / "text_ys_32.npy", rng.randint(0, 8, 30))
    body = common.build_body("tiny")  # width 64, like the features written above
    assert data.default_source(body, tmp_path) == "synthetic"
    ds = data.load_source("conll", body, tmp_path, n=20)
    x, y = ds.tensors
    assert x.shape == (20, 32, 64) and torch.equal(data.embed_source(body, x), x)
    feats, labels = data.source_features("conll", body, "tiny", tmp_path, n=20)
    np.testing.assert_allclose(feats.numpy(), np.load(tmp_path / "text_xs_32.npy")[:20].mean(1), atol=1e-6)
    body.dim = 768
    body.kind = "text"
    assert data.default_source(body, tmp_path) == "conll"
    with pytest.raises(UserError) as e:
        data.embed_source(body, x)
    assert "64 wide" in one_line(e)


def test_cifar10_source_and_default_for_vision(tmp_path):
    rng = np.random.RandomState(0)
    write_cifar(tmp_path, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels", rng, n=4)
    body = common.build_body("tiny")
    body.kind = "vision"
    assert data.default_source(body, tmp_path) == "cifar10" and data.default_source(body, tmp_path / "x") == "digits"
    state = torch.get_rng_state()
    x, y = data.load_source("cifar10", body, tmp_path, n=12).tensors
    assert torch.equal(state, torch.get_rng_state())  # drawing the augmentation leaves the caller's RNG alone
    assert x.shape == (12, 3, 32, 32) and y.shape == (12,) and abs(x.mean()) < 1.5
