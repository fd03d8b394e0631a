"""PDEBench trajectories for UPS (ups.py), read by the protocol of the official UnifiedPDESolvers code
(generate_data.py UNetDatasetSingle + data_loaders.py MixedDataset, commit 96b9d74).

Why a module of its own: official_data.py reads PDEBench as ORCA does (two time slices per sample, initial -> last
state, other files); UPS needs whole trajectories, of other files (Burgers Nu=0.001, 2D CFD M=0.1, incompressible
Navier-Stokes), with other splits, and neither official_data.py (634 lines) nor data.py (650) has room for that under
the 760-line limit of tests/test_layout.py. It uses official_data's download (`fetch`, same DaRUS ids and checksums
where official_data has them) and imports nothing else of the project, so it adds no import cycle.

The protocol, as the official code does it:
- Formats. Single files (.hdf5): `tensor` (N, T, X) for the scalar 1D equations; `Vx`, `Vy`, `density`, `pressure`
  (N, T, X[, Y]) for compressible flow (1D has no Vy). Grouped files (.h5): one group per seed, keys sorted, each
  `key/data` of shape (T, X[, Y], V). The incompressible Navier-Stokes file: `velocity` (N, T, X, Y, 2).
- Resolution 128 per axis: 1D files keep every 8th of their 1024 points and every 5th time step; 2D files every step
  at 128 x 128 (NS: every 4th of 512 points). Here the space step is X // n, the official one for n = 128 (ups.py's
  --size); tiny files and small --size get a coarser step, and n must divide X.
- Splits. Single files: test = the first 10 % of the samples, train pool = the rest. Grouped files: the official
  loader cuts 10 % twice (once over the sorted keys, then again over the samples it kept), so of 1000 keys the test
  set is keys 900-909 and the train pool keys 90-899; kept here, as the numbers of the paper come from it.
- Fractions (MixedDataset ratio): training uses the first half of the pool, except 2D CFD and NS (all of it).
- The incompressible Navier-Stokes file (`velocity`, inferred from PDEBench's published layout, not checked against
  the file): the official loader takes it for a grouped file, which it is not; read here as Vx, Vy, split as a
  single file, with at least one test sample (the file holds few samples, each with many steps).
- Validation (ours: the official code validates on the test set): the last trajectories of the train pool, never
  trained on (for the half-fraction families they come from the unused half).
Files are never read whole: only the samples a split uses, one at a time (h5py reads strided slices from disk), into a
memory-mapped .npy cache per (family, split, samples, resolution) under <data_dir>/cache/ups/.
"""
import hashlib
from pathlib import Path

import numpy as np

from errors import UserError
from official_data import DARUS, PDEBENCH, PDE_FILES, fetch, write_atomic


def _file(name, dim, channels, time, fraction, text, darus=None):
    file_id, md5 = (PDE_FILES[darus][1], PDE_FILES[darus][2]) if darus else (None, None)
    return dict(file=name, dim=dim, channels=channels, time=time, fraction=fraction, text=text, file_id=file_id,
                md5=md5)


# family -> file (official generate_data.py load_pde), channel names in the unified slots of ups.py (u, v, h: the
# official code puts a file's own channels first, in slots 0, 1), time step, training fraction, and the official text
# (generate_text_embeddings.py; NS has none there, ours). DaRUS ids / md5: official_data.PDE_FILES where it has the
# file; the others are not downloaded (fetch names PDEBench's page).
FILES = {
    "pde_shallow_water": _file("2D_rdb_NA_NA.h5", 2, ("h",), 1, 0.5, "2D Shallow-Water", "pde_shallow_water"),
    "pde_diffusion_sorption": _file("1D_diff-sorp_NA_NA.h5", 1, ("u",), 5, 0.5, "1D Diffusion-Sorption",
                                    "pde_diffusion_sorption"),
    "pde_burgers": _file("1D_Burgers_Sols_Nu0.001.hdf5", 1, ("u",), 5, 0.5, "1D Burgers' Equation Nu=0.001"),
    "pde_advection": _file("1D_Advection_Sols_beta0.4.hdf5", 1, ("u",), 5, 0.5, "1D Advection Beta=0.4",
                           "pde_advection"),
    "pde_cfd_1d": _file("1D_CFD_Rand_Eta0.1_Zeta0.1_periodic_Train.hdf5", 1, ("Vx", "density", "pressure"), 5, 0.5,
                        "1D Navier-Stokes Eta=0.1 Zeta=0.1 Periodic", "pde_navier_stokes"),
    "pde_cfd_2d": _file("2D_CFD_Rand_M0.1_Eta0.1_Zeta0.1_periodic_128_Train.hdf5", 2,
                        ("Vx", "Vy", "density", "pressure"), 1, 1.0,
                        "2D Navier-Stokes M=0.1 Eta=0.1 Zeta=0.1 Periodic"),
    "pde_incomp_ns_2d": _file("ns_incom_inhom_2d_512-0.h5", 2, ("Vx", "Vy"), 1, 1.0,
                              "2D Incompressible Navier-Stokes"),
    # held out of training for the few-shot experiment (the official MixedDataset comments them out)
    "pde_diffusion_reaction": _file("ReacDiff_Nu0.5_Rho1.0.hdf5", 1, ("u",), 5, 0.5,
                                    "1D Diffusion-Reaction Nu=0.5 Rho=1.0", "pde_diffusion_reaction"),
    "pde_diffusion_reaction_2d": _file("2D_diff-react_NA_NA.h5", 2, ("u", "v"), 1, 0.5, "2D Diffusion-Reaction",
                                       "pde_diffusion_reaction_2d"),
}
TRAIN = "pde_shallow_water,pde_diffusion_sorption,pde_burgers,pde_advection,pde_cfd_1d,pde_cfd_2d,pde_incomp_ns_2d"
FEWSHOT = "pde_diffusion_reaction,pde_diffusion_reaction_2d"


def layout(f):
    """(kind, number of samples, spatial extent X) of an open h5py file; kind: tensor | cfd | velocity | grouped."""
    if "tensor" in f:
        return "tensor", f["tensor"].shape[0], f["tensor"].shape[2]
    if "density" in f:
        return "cfd", f["density"].shape[0], f["density"].shape[2]
    if "velocity" in f:
        return "velocity", f["velocity"].shape[0], f["velocity"].shape[2]
    keys = sorted(f.keys())
    if not keys or "data" not in f[keys[0]]:
        raise UserError(f"{f.filename}: neither tensor, density/Vx/..., velocity nor groups holding `data`")
    return "grouped", len(keys), f[keys[0]]["data"].shape[1]


def split_indices(kind, count, split, fraction, n_val):
    """Sample indices (positions in the sorted keys for grouped files) of one split, by the official protocol above;
    val = the last n_val of the train pool, and train never reaches into it."""
    if kind == "grouped":  # the official loader's two 10 % cuts: keys, then the samples kept
        cut = int(count * 0.9)
        test, pool = np.arange(cut, cut + int((count - cut) * 0.1)), np.arange(int(cut * 0.1), cut)
    else:
        cut = max(1, int(count * 0.1)) if kind == "velocity" else int(count * 0.1)
        test, pool = np.arange(cut), np.arange(cut, count)
    if split == "test":
        return test
    if split == "val":
        return pool[len(pool) - n_val:] if n_val else pool[:0]
    return pool[: min(int(len(pool) * fraction), len(pool) - n_val)]


def _sample(f, kind, keys, i, channels, time, space, dim):
    """One trajectory (T', C, n[, n]) float32, read strided from disk."""
    s = (slice(None, None, space),) * dim
    if kind == "tensor":
        a = f["tensor"][(i, slice(None, None, time)) + s][:, None]
    elif kind == "cfd":  # one dataset per quantity, in the order the family names them
        a = np.stack([f[q][(i, slice(None, None, time)) + s] for q in channels], 1)
    elif kind == "velocity":  # (T, X, Y, 2) -> (T, 2, X, Y)
        a = np.moveaxis(f["velocity"][(i, slice(None, None, time)) + s], -1, 1)
    else:  # grouped: key/data (T, X[, Y], V) -> (T, V, X[, Y])
        a = np.moveaxis(f[keys[i]]["data"][(slice(None, None, time),) + s], -1, 1)
    return np.asarray(a, dtype=np.float32)


def trajectories(family, split, n, data_dir, num=None, n_val=10):
    """(N, T', C, n[, n]) float32 memory map of one family's split at n points per axis: num caps the number of
    trajectories (None = all the protocol gives); n_val trajectories of the train pool are the validation split."""
    spec = FILES[family]
    path = fetch(family, data_dir, spec["file"], spec["file_id"] and DARUS + str(spec["file_id"]),
                 spec["md5"] and f"md5:{spec['md5']}", PDEBENCH)
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"family '{family}': cannot open {path} ({e}); delete it and get it again") from None
    with f:
        kind, count, extent = layout(f)
        if extent % n:
            raise UserError(f"family '{family}': {extent} points per axis in {path.name} are not a multiple of "
                            f"--size {n}")
        idx = split_indices(kind, count, split, spec["fraction"], n_val)[:num]
        if not len(idx):
            raise UserError(f"family '{family}': the {split} split of {path.name} ({count} samples) is empty")
        space, stat = extent // n, path.stat()
        key = f"{path}|{stat.st_size}|{int(stat.st_mtime)}|{idx.tolist()}|{spec['time']}|{space}"
        out = Path(data_dir) / "cache" / "ups" / f"{family}_{split}{len(idx)}_n{n}_" \
            f"{hashlib.md5(key.encode()).hexdigest()[:8]}.npy"
        if not out.exists():
            keys = sorted(f.keys()) if kind == "grouped" else None
            first = _sample(f, kind, keys, idx[0], spec["channels"], spec["time"], space, spec["dim"])
            expect = (len(spec["channels"]),) + (n,) * spec["dim"]
            if first.shape[1:] != expect:
                raise UserError(f"family '{family}': a sample of {path.name} reads as {first.shape[1:]} per step, "
                                f"not (channels, space) = {expect}")
            def fill(tmp):  # sample by sample into a memory map (a split can exceed memory)
                a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(idx),) + first.shape)
                a[0] = first
                for j, i in enumerate(idx[1:], 1):
                    a[j] = _sample(f, kind, keys, i, spec["channels"], spec["time"], space, spec["dim"])
                a.flush()
            write_atomic(out, fill)  # a kill mid-write leaves no half cache
    return np.load(out, mmap_mode="r")


def channel_stats(traj, chunk=64):
    """Per-channel mean and std (C,) over samples, steps and space of (N, T, C, ...) trajectories, in float64 and a
    few trajectories at a time (a memory map is never read whole). std 0 -> 1 (official simple_normalize)."""
    c = traj.shape[2]
    shift = np.moveaxis(np.asarray(traj[0], np.float64), 1, 0).reshape(c, -1).mean(1)  # keeps sq - mean^2 exact
    total, sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(traj), chunk):
        a = np.moveaxis(np.asarray(traj[start:start + chunk], np.float64), 2, 0).reshape(c, -1) - shift[:, None]
        total, sq, count = total + a.sum(1), sq + (a ** 2).sum(1), count + a.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 0.0))
    mean = mean + shift
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)
