"""Tests of pdebench.py (the PDEBench trajectory reader of ups.py) on tiny files in the real formats, written here
with h5py, and a smoke run of `ups.py --task pdebench` on them.

    python -m pytest tests/test_pdebench.py -v        # CPU, offline, < 1 minute
"""
import numpy as np
import pytest
import torch

import pdebench
import ups

h5py = pytest.importorskip("h5py")
N1, T1, X1 = 20, 21, 64  # single 1D files: samples, steps, points (every 5th step, X // n points are kept)
N2, T2, X2 = 20, 5, 32  # single 2D files
NG = 100  # grouped files: the smallest key count whose official test split is not empty


def coded(shape, offset=0.0):
    """Values that name their own position: element [i, t, x...] of the flat order, plus an offset per channel."""
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) % 9973 + offset).astype(np.float32)


def write_files(root):
    """One tiny file per family of pdebench.FILES, each in its real layout; returns {family: raw arrays}."""
    raw = {}
    for family, spec in pdebench.FILES.items():
        path = root / spec["file"]
        with h5py.File(path, "w") as f:
            if spec["file"].endswith(".hdf5") and spec["channels"] == ("u",):  # tensor (N, T, X)
                raw[family] = {"tensor": coded((N1, T1, X1))}
            elif spec["file"].endswith(".hdf5"):  # compressible flow: one dataset per quantity (N, T, X[, Y])
                shape = (N1, T1, X1) if spec["dim"] == 1 else (N2, T2, X2, X2)
                raw[family] = {q: coded(shape, 1e5 * k) for k, q in enumerate(("Vx", "Vy", "density", "pressure"))
                               if spec["dim"] == 2 or q != "Vy"}
            elif family == "pde_incomp_ns_2d":  # velocity (N, T, X, Y, 2)
                raw[family] = {"velocity": coded((N2, T2, X2 * 2, X2 * 2, 2))}
            else:  # grouped: one group per seed, data (T, X[, Y], V), written out of order
                shape = (T1, X1, 1) if spec["dim"] == 1 else (T2, X2, X2, len(spec["channels"]))
                raw[family] = {f"{i:04d}": np.full(shape, i, np.float32) + coded(shape) / 1e4
                               for i in np.random.RandomState(0).permutation(NG)}
                for key, a in raw[family].items():
                    f[f"{key}/data"] = a
                continue
            for key, a in raw[family].items():
                f[key] = a
    return raw


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pdebench")
    return root, write_files(root)


def test_official_splits_and_fractions():
    """The protocol of the official loaders at the real sizes: .hdf5 test = first 10 %; .h5 test = keys 900-909 and
    train pool 90-899 (two 10 % cuts); training fraction of the pool; validation from the pool, never trained on."""
    test = pdebench.split_indices("tensor", 10000, "test", 0.5, 10)
    train = pdebench.split_indices("tensor", 10000, "train", 0.5, 10)
    val = pdebench.split_indices("tensor", 10000, "val", 0.5, 10)
    assert test.tolist() == list(range(1000)) and train.tolist() == list(range(1000, 5500))
    assert val.tolist() == list(range(9990, 10000))
    gtest, gtrain = (pdebench.split_indices("grouped", 1000, s, 0.5, 10) for s in ("test", "train"))
    assert gtest.tolist() == list(range(900, 910)) and gtrain.tolist() == list(range(90, 495))
    full, fval = (pdebench.split_indices("cfd", 10000, s, 1.0, 10) for s in ("train", "val"))
    assert full.tolist() == list(range(1000, 9990)) and not set(full) & set(fval) and len(fval) == 10


@pytest.mark.parametrize("family", list(pdebench.FILES))
def test_reader_reads_the_protocol_samples_steps_and_points(files, tmp_path, family):
    root, raw = files
    spec = pdebench.FILES[family]
    n = 16 if spec["dim"] == 1 else 8
    arrays = raw[family]
    grouped = not any(k in arrays for k in ("tensor", "density", "velocity"))
    kind = "grouped" if grouped else "velocity" if "velocity" in arrays else "tensor" if "tensor" in arrays else "cfd"
    count = NG if grouped else len(next(iter(arrays.values())))
    for split in ("train", "val", "test"):
        a = pdebench.trajectories(family, split, n, root, n_val=2)
        idx = pdebench.split_indices(kind, count, split, spec["fraction"], 2)
        assert isinstance(a, np.memmap) and a.dtype == np.float32
        s = (slice(None, None, (X1 if spec["dim"] == 1 else X2 * (2 if kind == "velocity" else 1)) // n),) * spec["dim"]
        t = slice(None, None, spec["time"])
        if grouped:
            keys = sorted(arrays)
            want = np.stack([np.moveaxis(arrays[keys[i]][(t,) + s], -1, 1) for i in idx])
        elif kind == "velocity":
            want = np.moveaxis(arrays["velocity"][(idx, t) + s], -1, 2)
        else:
            want = np.stack([arrays[q][(idx, t) + s] for q in (("tensor",) if kind == "tensor" else
                                                               spec["channels"])], 2)
        assert a.shape == (len(idx), want.shape[1], len(spec["channels"])) + (n,) * spec["dim"]
        assert np.array_equal(a, want)
    # num caps a split to its first samples (only those are read), and the cache is per request
    few = pdebench.trajectories(family, "train", n, root, num=3, n_val=2)
    assert len(few) == 3 and np.array_equal(few, pdebench.trajectories(family, "train", n, root, n_val=2)[:3])


def test_reader_rejects_a_size_that_does_not_divide_the_file(files):
    root, _ = files
    with pytest.raises(pdebench.UserError, match="multiple"):
        pdebench.trajectories("pde_advection", "train", 24, root)


def test_normalisation_round_trip_with_training_statistics(files):
    """Per-channel statistics of the training split: normalised training data has mean 0 and std 1 per channel,
    and un-normalising gives the physical values back."""
    root, _ = files
    a = pdebench.trajectories("pde_cfd_2d", "train", 8, root, n_val=2)
    mean, std = pdebench.channel_stats(a, chunk=3)  # chunks that do not divide the sample count
    x = torch.as_tensor(np.array(a)).flatten(0, 1)  # (N T, C, n, n)
    z = ups.normalise(x, mean, std)
    per = z.transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(per.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(per.std(1, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-4)
    assert np.allclose(mean, [np.asarray(a)[:, :, c].mean() for c in range(4)], rtol=1e-6)
    assert torch.allclose(ups.normalise(z, mean, std, inverse=True), x, rtol=1e-5, atol=1e-2)
    assert not torch.allclose(z, x)  # the channels differ by 1e5: normalising does something


def test_model_carries_statistics_and_metrics_are_physical(files):
    """The statistics are model buffers (so in every checkpoint), and evaluate_family scores un-normalised values:
    persistence nRMSE equals the one computed on the raw trajectories by the test itself."""
    root, _ = files
    spec = ups.family_spec("pde_cfd_1d", 16)
    traj = pdebench.trajectories("pde_cfd_1d", "test", 16, root)
    stats = pdebench.channel_stats(pdebench.trajectories("pde_cfd_1d", "train", 16, root, n_val=2))
    args = ups.get_args(["--task", "pdebench", "--body", "tiny", "--size", "16", "--modes", "4", "--width", "4"])
    model = ups.UPSModel(ups.common.build_body("tiny"), [spec], args, [stats])
    assert torch.allclose(model.state_dict()["mean"][0, [0, 2, 3]], torch.as_tensor(stats[0]))
    assert model.state_dict()["std"][0, 1] == 1  # Vy is absent from 1D CFD
    r = ups.evaluate_family(model, traj, spec, 0, 16, "cpu", batch=8)
    x, y = np.asarray(traj[:, :-1], np.float64), np.asarray(traj[:, 1:], np.float64)
    own = np.mean(np.sqrt(((x - y) ** 2).mean((2, 3))) / np.sqrt((y ** 2).mean((2, 3))))
    assert r["persistence_nrmse"] == pytest.approx(own, rel=1e-4)
    assert r["nrmse"] == pytest.approx(own, rel=1e-4)  # untrained residual model = persistence, in physical units


def test_smoke_run_pdebench_on_tiny_files(files, run):
    root, _ = files
    proc, final = run("ups.py", "--task", "pdebench", "--data_dir", root, "--body", "tiny", "--size", "16",
                      "--width", "4", "--modes", "4", "--n_train", 2, "--n_test", 2, "--epochs", 1,
                      "--align_epochs", 1, "--fewshot_n", 2, "--fewshot_epochs", 1)
    assert set(final["families"]) == set(pdebench.TRAIN.split(","))
    assert set(final["fewshot"]) == set(pdebench.FEWSHOT.split(","))
    for r in list(final["families"].values()) + [f["ups"] for f in final["fewshot"].values()]:
        assert all(np.isfinite(v) and v > 0 for v in r.values())
