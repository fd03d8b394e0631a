"""UPS: one FNO-transformer for many PDE families, warm-started from a pretrained language model (Shen, Marwah,
Talwalkar 2024, "UPS: Efficiently Building Foundation Models for PDE Solving via Cross-Modal Adaptation").

Idea. PDEs of different dimension and different physical quantities share one representation: a state is
(C_MAX, S, S); 1D fields are broadcast along a second axis whose coordinate is zero; missing quantities are zero
channels that a mask removes from the loss. An FNO embedder turns a state into hidden channels, each channel becomes a
token, a pretrained text transformer reads them after the tokens of a one-line description of the PDE, and a linear
head maps the pooled features to the next state. Stage 1 aligns the embedder to the body's feature space (MMD to the
body's embeddings of real text + the FNO's own prediction loss; body frozen); stage 2 trains one model on all
families at once, current state -> next state. Reported: one-step and autoregressive-rollout nRMSE per family next to
persistence (next state = current), and few-shot transfer to a held-out coefficient next to a from-scratch model.

    paper  https://arxiv.org/abs/2403.07187      code  https://github.com/sjunhongshen/UnifiedPDESolvers (96b9d74)

    python ups.py                                       # 4 offline families, MiniLM body, 2-core CPU
    python ups.py --families burgers --no-pretrained --align_epochs 0 --fewshot_family none   # one family, scratch
    python ups.py --task pdebench --body roberta --data_dir ./datasets --device cuda   # PDEBench (pdebench.py), GPU

Choices of the official code (generate_data.py, embedder.py, main.py, configs/base.yaml) kept here: 4 channel slots
(Vx, Vy, density, pressure; a file's own scalar fields in the first ones); PDEBench at 128 x 128 with the official
families, fractions, splits and steps (pdebench.py), diffusion-reaction 1D and 2D held out for few-shot transfer;
per-family per-channel normalisation with training statistics, metrics after un-normalising; 1D fields
broadcast along the rows, mask on one row; coordinate grid appended to the FNO input (fc0 takes channels + 2); FNO2d
embedder (4 Fourier layers, 12 x 12 modes, GELU), hidden channel -> token by Linear(S*S, D) + LayerNorm; description
tokens from the body's frozen input embedding in front (add_text=cat); learned positions, second LayerNorm; body fed
by inputs_embeds; head Linear(D, C*S*S) on the mean over tokens (--head pooled); stage 1 = masked nRMSE of the FNO's
own output head + MMD(mean-pooled tokens, source features), embedder only; stage 2 = masked nRMSE, all parameters,
Adam, weight decay 1e-5.
Deviations from the official code:
- Offline data (the default without files): small sets solved here with scipy (advection, Burgers, 1D
  diffusion-reaction, 2D FitzHugh-Nagumo), S = 32, 10 steps per trajectory; coefficients chosen so the dynamics show
  at this size. Source: docstring text unless CoNLL features are present.
- The mask covers a family's own quantities only (the official 1D CFD mask also counts its empty Vy slot, a zero
  target); the statistics are population (not unbiased) std, over the training split only, kept in the model.
- `--residual` (default on): the head predicts the change of the state and starts at zero, so training starts from
  persistence; the official head predicts the state, which a few hundred CPU steps leave far behind persistence.
- `--head tokens` (default): each PDE token is mapped back to an S x S map and the maps are mixed pointwise (the
  inverse of the embedder); at our budget it learned faster than the official pooled head (docs/ups.md).
  `--fno_skip` (default): it also mixes the FNO's hidden maps, so a pointwise update need not pass through D numbers
  per map (without it the offline 2D family stayed at persistence). `--no-use_body`: the FNO and head alone.
- CPU-sized defaults: width 16 (official 32), 5 + 3 epochs (20 + 100) of 48 trajectories per family (twice the
  data at fewer epochs stopped the 2D family from over-fitting; docs/ups.md), lr 3e-4 (5e-5), stage-1 lr 1e-3.
- The packed input carries a constant plane with the family id, by which the model looks up grid, mask and text, so
  the shared common.fit / evaluate loop runs unchanged (the official loader returns ((x, text), (y, mask))).
- No domain padding in the FNO; OTDD (labels = family) offered next to MMD; validation on held-out trajectories (the
  official code validates on test); rollout evaluation (the public code scores one step), each prediction fed back
  through from_unified / to_unified.

Under torchrun: stage 1 (MMD / OTDD over a batch) runs whole and identically on every rank; stage 2 and the few-shot
fits split each multi-family batch between the ranks (common.fit, DDP; validation sharded and gathered); the
per-family rollout tests run whole on every rank (the same numbers); rank 0 alone writes and prints.
"""
import argparse
import copy
import types
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import pdebench

# ---- config --------------------------------------------------------------------------------------------------
QUANTITIES = ("Vx", "Vy", "density", "pressure")  # the official 4 unified channel slots, in its order
C_MAX = len(QUANTITIES)
# a family's quantities are placed by name; a file's own fields u, v (h: water height) go to the first slots, as the
# official generate_data.py pads a state's own channels with zero channels after them
SLOT = dict({q: i for i, q in enumerate(QUANTITIES)}, u=0, v=1, h=0)
TASK_DEFAULTS = {  # per --task; an explicit flag wins. pdebench: the official size, width and few-shot families
    "offline": dict(families="advection,burgers,reacdiff,reacdiff2d", fewshot_family="burgers_nu0.05", size=32,
                    n_train=48, n_test=8, width=16, fewshot_n=4),
    "pdebench": dict(families=pdebench.TRAIN, fewshot_family=pdebench.FEWSHOT, size=128, n_train=None, n_test=None,
                     width=32, fewshot_n=100),
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("UPS data and model")
    g.add_argument("--families", default=None, help="comma list of families trained together (one = single-family "
                   f"model); default: all of --task. Choices: {', '.join(FAMILIES)}")
    g.add_argument("--size", type=int, default=None, help="unified grid S: every state becomes (C_MAX, S, S); "
                   "default 32 offline, 128 pdebench (official)")
    g.add_argument("--n_train", type=int, default=None, help="training trajectories per family; default 48 "
                   "offline (10 steps each), pdebench: all the official fraction gives")
    g.add_argument("--n_test", type=int, default=None, help="test trajectories per family (validation: half as "
                   "many, 10 on pdebench by default); default 8 offline, pdebench: the whole official test split")
    g.add_argument("--width", type=int, default=None, help="FNO hidden channels = PDE tokens (default 16 offline, "
                   "32 pdebench = official)")
    g.add_argument("--modes", type=int, default=12, help="Fourier modes kept per axis, <= size/2 (official 12)")
    g.add_argument("--fno_layers", type=int, default=4, help="Fourier layers in the embedder (official 4)")
    g.add_argument("--text", action=argparse.BooleanOptionalAction, default=True, help="PDE description tokens")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True, help="predict the change")
    g.add_argument("--head", default="tokens", choices=["tokens", "pooled"],
                   help="tokens: each PDE token back to an S x S map, then mixed (ours); pooled: official")
    g.add_argument("--fno_skip", action=argparse.BooleanOptionalAction, default=True,
                   help="--head tokens also mixes the FNO's hidden maps (ours; docs/ups.md)")
    g.add_argument("--use_body", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-use_body: the FNO embedder and head alone, the body replaced by the identity (the "
                   "comparison the paper's claim rests on; --align_objective none: stage 1 on the FNO loss)")
    g = parser.add_argument_group("UPS stage 1 (alignment, body frozen) and few-shot transfer")
    g.add_argument("--align_epochs", type=int, default=5, help="embedder alignment epochs (0 = skip; official 20)")
    g.add_argument("--align_objective", default="mmd", choices=["mmd", "otdd", "none"],
                   help="distance to the body's source features (official mmd); none = FNO loss only")
    g.add_argument("--align_batch", type=int, default=128, help="target samples per stage-1 step (official 128)")
    g.add_argument("--align_lr", type=float, default=1e-3, help="stage-1 learning rate")
    g.add_argument("--fewshot_family", default=None, help="comma list of held-out families, each fine-tuned at the "
                   "end; none. Default burgers_nu0.05 offline, diffusion-reaction 1D and 2D on pdebench (paper)")
    g.add_argument("--fewshot_n", type=int, default=None, help="their training trajectories (default 4 offline, "
                   "100 pdebench; ours)")
    g.add_argument("--fewshot_epochs", type=int, default=8, help="its epochs (for UPS and the scratch model)")
    parser.set_defaults(task="offline", epochs=3, batch_size=16, lr=3e-4, weight_decay=1e-5, optimizer="adam",
                        warmup_epochs=0.2, clip=1.0, eval_batch_size=64)
    args = parser.parse_args(argv)  # not common.parse_args: --task picks the data source, not a data.py task
    if args.task not in TASK_DEFAULTS:
        raise common.UserError(f"--task {args.task}: ups.py takes --task offline (scipy solvers) or pdebench")
    for k, v in TASK_DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in common.FIXED_DEFAULTS.items():  # UPS keeps the official fine-tuning recipe: full, no input norm
        if getattr(args, k) is None:
            setattr(args, k, v)
    common.validate_args(args)
    args.ckpt_every = args.ckpt_every or max(1, args.epochs // 20)
    args.decay_epochs = args.epochs if args.decay_epochs < 0 else args.decay_epochs
    if not 1 <= args.modes <= args.size // 2:
        raise common.UserError(f"--modes {args.modes} must lie in 1..size/2 = {args.size // 2}")
    return args


# ---- offline data: the same equation families, solved with scipy ----------------------------------------------
def _profile(rng, num, n, modes=4):
    """Random smooth periodic profiles (num, n) on [0, 1): sums of `modes` sines with 1/k amplitudes."""
    x, k = np.arange(n) / n, np.arange(1, modes + 1)
    amp, phase = rng.randn(num, modes) / k, rng.rand(num, modes) * 2 * np.pi
    return (amp[:, :, None] * np.sin(2 * np.pi * k[None, :, None] * x + phase[:, :, None])).sum(1)


def spectral_dx(u, order=1):
    """d^order u / dx^order along the last axis, periodic unit interval, by FFT."""
    n = u.shape[-1]
    return np.fft.irfft((2j * np.pi * np.fft.rfftfreq(n, 1.0 / n)) ** order * np.fft.rfft(u), n=n)


def laplacian_neumann(u, h):
    """5-point Laplacian on the last two axes of a cell-centred grid; zero-flux walls (ghost cells copy the edge)."""
    p = np.pad(u, [(0, 0)] * (u.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return (p[..., 2:, 1:-1] + p[..., :-2, 1:-1] + p[..., 1:-1, 2:] + p[..., 1:-1, :-2] - 4 * u) / h ** 2


def integrate(rhs, u0, times):
    """Method of lines: scipy's adaptive RK45 on all samples at once. u0 (N, ...) -> (N, len(times), ...)."""
    from scipy.integrate import solve_ivp
    sol = solve_ivp(lambda _, flat: rhs(flat.reshape(u0.shape)).ravel(), (0.0, times[-1]), u0.ravel(),
                    method="RK45", rtol=1e-7, atol=1e-9, t_eval=times)
    return np.moveaxis(sol.y.reshape(*u0.shape, len(times)), -1, 1)


def solve_advection(rng, num, f):
    """u_t + beta u_x = 0, periodic (PDEBench Advection). Exact solution: the initial profile shifted by beta t."""
    return integrate(lambda u: -f["beta"] * spectral_dx(u), _profile(rng, num, f["n"]), f["times"])[:, :, None]


def solve_burgers(rng, num, f):
    """u_t + (u^2/2)_x = nu u_xx, periodic: data.solve_burgers step by step on a 4x finer grid, then subsampled
    (PDEBench solves at 1024 points and keeps every 8th)."""
    states = [0.5 * _profile(rng, num, 4 * f["n"])]
    for _ in range(len(f["times"]) - 1):
        states.append(data.solve_burgers(states[-1], nu=f["nu"], t_end=f["dt"]))
    return np.stack(states, 1)[:, :, None, ::4]


def solve_reacdiff(rng, num, f):
    """u_t = nu u_xx + rho u (1 - u), periodic (PDEBench ReacDiff); initial values in [0.1, 0.5]."""
    p = _profile(rng, num, f["n"])
    u0 = 0.1 + 0.4 * (p - p.min(1, keepdims=True)) / np.ptp(p, 1, keepdims=True)
    return integrate(lambda u: f["nu"] * spectral_dx(u, 2) + f["rho"] * u * (1 - u), u0, f["times"])[:, :, None]


def solve_reacdiff2d(rng, num, f):
    """FitzHugh-Nagumo on [-1, 1]^2, zero-flux walls (PDEBench 2D diffusion-reaction):
    u_t = Du lap u + u - u^3 - k - v,  v_t = Dv lap v + u - v. Initial state: random smooth cosine modes."""
    n, modes = f["n"], np.arange(4)
    basis = np.cos(np.pi * modes[:, None] * (np.arange(n) + 0.5) / n)  # (4, n) Neumann eigenfunctions
    uv0 = np.einsum("bckl,ki,lj->bcij", rng.randn(num, 2, 4, 4) / (1.0 + modes[:, None] + modes), basis, basis)

    def rhs(uv):
        u, v = uv[:, 0], uv[:, 1]
        return np.stack([f["Du"] * laplacian_neumann(u, 2.0 / n) + u - u ** 3 - f["k"] - v,
                         f["Dv"] * laplacian_neumann(v, 2.0 / n) + u - v], 1)
    return integrate(rhs, uv0, f["times"])


def _family(dim, channels, dt, solve, text, n=32, steps=10, **coef):
    times = None if dt is None else dt * np.arange(steps + 1)
    return dict(dim=dim, channels=channels, n=n, dt=dt, times=times, solve=solve, text=text, **coef)


FAMILIES = {  # offline stand-ins for PDEBench's ADV, Burgers, ReacDiff, 2D diff-react; then a held-out coefficient
    "advection": _family(1, ("u",), 0.1, solve_advection, "1D advection equation beta=0.4", beta=0.4),
    "burgers": _family(1, ("u",), 0.05, solve_burgers, "1D Burgers equation nu=0.01", nu=0.01),
    "reacdiff": _family(1, ("u",), 0.1, solve_reacdiff, "1D diffusion-reaction equation nu=0.005 rho=2",
                        nu=0.005, rho=2.0),
    "reacdiff2d": _family(2, ("u", "v"), 0.25, solve_reacdiff2d, "2D diffusion-reaction equation FitzHugh-Nagumo",
                          Du=1e-3, Dv=5e-3, k=5e-3),
    "burgers_nu0.05": _family(1, ("u",), 0.05, solve_burgers, "1D Burgers equation nu=0.05", nu=0.05),
    # PDEBench files (pdebench.py), official texts; n (points per axis) is --size, set in family_spec
    **{name: _family(f["dim"], f["channels"], None, None, f["text"], n=None) for name, f in pdebench.FILES.items()},
}


def family_spec(name, size):
    """A family's spec; PDEBench families are read at the unified size itself (n = S, as the official 128)."""
    return dict(FAMILIES[name], n=size) if FAMILIES[name]["solve"] is None else FAMILIES[name]


def family_trajectories(name, split, num, data_dir, size=32, n_val=10):
    """(num, T+1, C, n) or (num, T+1, C, n, n) float32 trajectories of one family: offline ones solved once and
    cached; PDEBench ones a memory map of the files' samples (pdebench.trajectories; num None = the official split)."""
    f = FAMILIES[name]
    if f["solve"] is None:
        return pdebench.trajectories(name, split, size, data_dir, num, n_val)
    path = Path(data_dir) / "ups" / f"{name}_{split}{num}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError) as e:  # written in place by an older version and cut short: solve again
            print(f"warning: cache {path} cannot be read ({type(e).__name__}); solving it again")
    rng = np.random.RandomState(zlib.crc32(f"{name}|{split}".encode()))  # the data do not depend on --seed
    traj = f["solve"](rng, num, f).astype(np.float32)
    if not np.isfinite(traj).all():
        raise common.UserError(f"family '{name}': the solver produced NaN/inf; check its coefficients")
    common.write_atomic(path, lambda tmp: np.save(tmp, traj))  # a kill mid-write leaves no half cache
    return traj


# ---- the unified representation ------------------------------------------------------------------------------
def to_unified(fields, spec, size=32):
    """METHOD: one layout for all families (paper sec. 3.1). fields (B, C_f, n) for 1D or (B, C_f, n, n) for 2D,
    channels named by spec["channels"] -> (state (B, C_MAX, size, size), mask of the same shape: 1 where the loss
    counts)."""
    fields = torch.as_tensor(fields, dtype=torch.float32)
    B, C, n = fields.shape[0], fields.shape[1], spec["n"]
    if fields.shape[1:] != (len(spec["channels"]),) + (n,) * spec["dim"] or size % n:
        raise common.UserError(f"fields of shape {tuple(fields.shape)} do not match the family (dim {spec['dim']}, "
                               f"channels {spec['channels']}, n {n}), or n does not divide size {size}")
    r = size // n
    fields = fields.repeat_interleave(r, -1)  # a coarser grid is repeated (nearest), so it comes back exactly
    if spec["dim"] == 1:  # broadcast along a second axis (official generate_data.py)
        fields = fields[:, :, None, :].expand(B, C, size, size)
    else:
        fields = fields.repeat_interleave(r, -2)
    slots = [SLOT[q] for q in spec["channels"]]
    state, mask = torch.zeros(B, C_MAX, size, size), torch.zeros(B, C_MAX, size, size)
    state[:, slots] = fields
    mask[:, slots, : 1 if spec["dim"] == 1 else size] = 1.0  # 1D: one row, so a sample weighs its own n points
    return state, mask


def from_unified(state, spec):
    """Inverse of to_unified: (B, C_MAX, S, S) -> the family's own fields (B, C_f, n[, n])."""
    r = state.shape[-1] // spec["n"]
    fields = state[:, [SLOT[q] for q in spec["channels"]]]
    return fields[:, :, 0, ::r] if spec["dim"] == 1 else fields[:, :, ::r, ::r]


def coordinate_grid(spec, size):
    """(2, S, S) coordinates in [0, 1): x along the last axis, y along the rows; y = 0 for 1D (paper: the
    missing d - d_s coordinates are set to zero)."""
    t = torch.arange(size, dtype=torch.float32) / size
    y = t[:, None].expand(size, size) if spec["dim"] == 2 else torch.zeros(size, size)
    return torch.stack([t[None, :].expand(size, size), y])


def pack(state, fam):
    """(B, C_MAX, S, S), family id(s) -> (B, C_MAX + 1, S, S): the last plane holds the family id."""
    ids = torch.as_tensor(fam, dtype=state.dtype, device=state.device).reshape(-1, 1, 1, 1)
    return torch.cat([state, ids.expand(len(state), 1, *state.shape[-2:])], 1)


def normalise(fields, mean, std, inverse=False):
    """METHOD: per-family per-channel normalisation (official simple_normalize / denormalize): fields (B, C_f, ...)
    with the family's training-split mean and std (C_f,) -> (fields - mean) / std, or back with inverse."""
    shape = (1, -1) + (1,) * (fields.ndim - 2)
    mean, std = (torch.as_tensor(a, dtype=torch.float32).reshape(shape) for a in (mean, std))
    return fields * std + mean if inverse else (fields - mean) / std


class PairDataset(torch.utils.data.Dataset):
    """(packed normalised state at t, masked normalised state at t+1) of every step of every trajectory of several
    families, made only when a batch is read: PDEBench trajectories stay memory maps on disk (a 128 x 128 unified
    state is 256 KB, so the official data in this layout would not fit in memory; the official code keeps one .npy
    file per sample). parts: (trajectories (N, T+1, C_f, ...), spec, family id, mean, std) per family."""

    def __init__(self, parts, size):
        self.parts, self.size = parts, size
        self.offsets = np.cumsum([0] + [len(p[0]) * (p[0].shape[1] - 1) for p in parts])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitems__(self, items):  # the DataLoader reads a whole batch with one call
        items, out = np.asarray(items, dtype=np.int64), [None] * len(items)
        for p, (traj, spec, fam, mean, std) in enumerate(self.parts):
            where = np.nonzero((items >= self.offsets[p]) & (items < self.offsets[p + 1]))[0]
            if not len(where):
                continue
            i, t = np.divmod(items[where] - self.offsets[p], traj.shape[1] - 1)
            x, mask = to_unified(normalise(torch.as_tensor(np.asarray(traj[i, t])), mean, std), spec, self.size)
            y, _ = to_unified(normalise(torch.as_tensor(np.asarray(traj[i, t + 1])), mean, std), spec, self.size)
            for k, xk, yk in zip(where, pack(x, fam), y * mask):
                out[k] = (xk, yk)
        return out

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


def make_task(name, families, table, splits, size, stats=None):
    """data.Task of (packed state, masked next state) pairs over `families`, normalised with stats[family] =
    (mean, std) (None: as they are); splits[family][split] are trajectories; a family's id is its index in `table`."""
    stats = stats or {f: (0.0, 1.0) for f in families}
    sets = [PairDataset([(splits[f][split], family_spec(f, size), table.index(f), *stats[f]) for f in families], size)
            for split in ("train", "val", "test")]
    shape = (C_MAX, size, size)
    return data.Task(name, "dense", (C_MAX + 1, size, size), shape, "nrmse", "nrmse", *sets)


# ---- the FNO-transformer -------------------------------------------------------------------------------------
class SpectralConv2d(nn.Module):
    """(B, W, S, S) -> (B, W, S, S): keep the lowest modes x modes frequencies (both signs on the first axis), mix
    channels with learned complex matrices, inverse FFT (FNO, Li et al. 2021; official SpectralConv2d_fast)."""

    def __init__(self, width, modes):
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.rand(width, width, 2 * modes * modes, dtype=torch.cfloat) / width ** 2)

    def forward(self, x):
        m, S = self.modes, x.shape[-2]
        # GPU safety: CUDA autocast leaves torch.fft alone, so a bfloat16 activation would reach cuFFT (which has no
        # bfloat16 transforms, and half precision only for powers of two) and the complex mixing; the spectral layer
        # runs with autocast off, in float32 (CPU autocast upcasts FFTs itself, so only this guard makes both agree)
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            x_ft = torch.fft.rfft2(x)  # (B, W, S, S // 2 + 1)
            low = torch.cat([x_ft[..., :m, :m], x_ft[..., -m:, :m]], -2).flatten(2)  # (B, W, 2m * m)
            mixed = torch.einsum("bik,iok->bok", low, self.weight).unflatten(2, (2 * m, m))
            gap = mixed.new_zeros(*mixed.shape[:2], S - 2 * m, m)  # irfft2 pads the last axis with zeros itself
            return torch.fft.irfft2(torch.cat([mixed[..., :m, :], gap, mixed[..., m:, :]], -2), s=x.shape[-2:])


class FNOEmbedder(nn.Module):
    """METHOD: the FNO embedder (official PDEEmbeddings + FNO2d): (state, grid) -> FNO hidden channels -> one token
    per channel.
    Returns tokens (B, T_text + width, D) and, if asked, the FNO's own prediction (B, C_MAX, S, S) for stage 1."""

    def __init__(self, size, width, modes, layers, dim, num_text, body):
        super().__init__()
        self.lift = nn.Conv2d(C_MAX + 2, width, 1)  # official fc0 over (channels, 2 coordinates)
        self.spectral = nn.ModuleList(SpectralConv2d(width, modes) for _ in range(layers))
        self.pointwise = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.fno_head = nn.Sequential(nn.Conv2d(width, 128, 1), nn.GELU(), nn.Conv2d(128, C_MAX, 1))  # fc1, fc2
        self.to_token = nn.Linear(size * size, dim)  # official projection: Conv1d(S*S, D, 1) over the channels
        self.norm, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(num_text + width, dim))
        table = body.position_table
        if table is not None and table.shape[0] >= len(self.pos) and table.shape[1] == dim:
            self.pos.data.copy_(table[: len(self.pos)])  # learned positions start from the body's own
            self.norm2.load_state_dict(body.embed_norm.state_dict())
        else:
            nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, state, grid, text=None, with_fno=False):
        h = self.lift(torch.cat([state, grid], 1))  # (B, W, S, S)
        for i, (spectral, pointwise) in enumerate(zip(self.spectral, self.pointwise)):
            h = spectral(h) + pointwise(h)
            h = F.gelu(h) if i < len(self.spectral) - 1 else h
        tokens = self.norm(self.to_token(h.flatten(2)))  # (B, W, D): hidden channel -> token
        if text is not None:
            tokens = torch.cat([text, tokens], 1)  # (B, T_text + W, D)
        return self.norm2(tokens + self.pos), (self.fno_head(h) if with_fno else None), h


class TokenHead(nn.Module):
    """METHOD: (ours, --head tokens) features (B, L, D) -> (B, C_MAX, S, S). Each of the last W (PDE) tokens goes
    back to an S x S map, the inverse of the embedder's channel -> token map, and the W maps are mixed pointwise
    into the C_MAX channels, as the FNO's own output head (fc1, GELU, fc2) does. With skip (--fno_skip, ours) the
    FNO's W hidden maps are mixed in too: a channel -> token -> map round trip through D numbers per map cannot carry
    a pointwise local update at full resolution (the 2D reaction-diffusion family stayed at persistence without it)."""

    def __init__(self, dim, width, size, skip=False):
        super().__init__()
        self.width, self.size, self.skip = width, size, skip
        self.to_map = nn.Linear(dim, size * size)
        self.mix = nn.Sequential(nn.Conv2d(width * (1 + skip), 128, 1), nn.GELU(), nn.Conv2d(128, C_MAX, 1))

    def forward(self, features, hidden=None):
        maps = self.to_map(features[:, -self.width:]).unflatten(2, (self.size, self.size))  # (B, W, S, S)
        return self.mix(torch.cat([maps, hidden], 1) if self.skip else maps)


def tokenizer_name(body):
    """The Hugging Face name of a text body's tokenizer; '' for a body built from a config alone (roberta without
    weights: it has no name, and no tokenizer is at hand offline)."""
    return getattr(body.model, "name_or_path", "") if body.kind == "text" else ""


@torch.no_grad()
def describe(body, texts):
    """METHOD: PDE text (official add_text=cat): one-line PDE descriptions -> (F, T, D) tokens of the body's own
    frozen input embedding. Text bodies use their tokenizer; the tiny test body, and a body without weights (whose
    random embedding table knows no vocabulary anyway), read the UTF-8 bytes as token ids."""
    if body.kind == "text" and tokenizer_name(body):
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(tokenizer_name(body))(texts, padding=True, return_tensors="pt")
        ids = ids["input_ids"]
    elif body.kind in ("tiny", "text"):  # bytes, zero-padded
        ids = torch.tensor([list(t.encode().ljust(max(len(t.encode()) for t in texts), b"\0")) for t in texts])
    else:
        raise common.UserError("UPS feeds tokens to a text transformer: use --body minilm, roberta, a Hugging Face "
                               "text model id or tiny, not a vision body")
    return body.source_embeddings(ids).float()


class UPSModel(nn.Module):
    """packed x (B, C_MAX+1, S, S) -> masked next state (B, C_MAX, S, S), both normalised. Holds each family's
    coordinate grid, mask and frozen description tokens (specs[i] is family id i), looked up by the family-id plane,
    and each family's per-channel training statistics (mean, std in its slots), so that a checkpoint carries them."""

    def __init__(self, body, specs, args, stats=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(len(specs), C_MAX))
        self.register_buffer("std", torch.ones(len(specs), C_MAX))
        for i, (spec, (mean, std)) in enumerate(zip(specs, stats or [])):
            slots = [SLOT[q] for q in spec["channels"]]
            self.mean[i, slots], self.std[i, slots] = torch.as_tensor(mean), torch.as_tensor(std)
        zeros = [torch.zeros((1, len(s["channels"])) + (s["n"],) * s["dim"]) for s in specs]
        self.register_buffer("grids", torch.stack([coordinate_grid(s, args.size) for s in specs]))
        self.register_buffer("masks", torch.cat([to_unified(z, s, args.size)[1] for z, s in zip(zeros, specs)]))
        self.register_buffer("text", describe(body, [s["text"] for s in specs]) if args.text else None)
        self.embedder = FNOEmbedder(args.size, args.width, args.modes, args.fno_layers, body.dim,
                                    0 if self.text is None else self.text.shape[1], body)
        self.body, self.residual, self.use_body = body, args.residual, getattr(args, "use_body", True)
        self.pooled = args.head == "pooled"  # official: Linear(D, C*S*S) on the mean over tokens
        self.head = nn.Linear(body.out_dim, C_MAX * args.size ** 2) if self.pooled else \
            TokenHead(body.out_dim, args.width, args.size, getattr(args, "fno_skip", False))
        if self.residual:  # ours: the model starts as persistence (next state = current state)
            last = self.head if self.pooled else self.head.mix[-1]
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)

    def stats(self, fam, spec):
        """(mean, std) of family id `fam` in its own channel order (CPU tensors), for normalise."""
        slots = [SLOT[q] for q in spec["channels"]]
        return self.mean[fam, slots].cpu(), self.std[fam, slots].cpu()

    def embed(self, x, with_fno=False):  # -> tokens (B, L, D), masked FNO prediction or None, state, family ids,
        state, fam = x[:, :-1], x[:, -1, 0, 0].round().long()  # FNO hidden maps (B, W, S, S)
        tokens, fno, hidden = self.embedder(state, self.grids[fam], None if self.text is None else self.text[fam],
                                            with_fno)
        if fno is not None:
            fno = (fno + state if self.residual else fno) * self.masks[fam]
        return tokens, fno, state, fam, hidden

    def forward(self, x):
        tokens, _, state, fam, hidden = self.embed(x)
        features = self.body(tokens) if self.use_body else tokens  # (B, L, D)
        out = self.head(features.mean(1)).reshape(state.shape) if self.pooled else self.head(features, hidden)
        # METHOD: missing quantities (and the copies of a 1D row) are masked out, as the official out *= mask
        return (out + state if self.residual else out) * self.masks[fam]


# ---- stage 1: align the embedder to the body's feature space --------------------------------------------------
def align_embedder(model, task, args, run, device):
    """METHOD: stage 1 (official embedder.py get_tgt_model): train the embedder alone on the FNO's masked nRMSE plus the
    distance between its mean-pooled tokens and the body's source features (MMD, or OTDD with family labels)."""
    if args.align_objective != "none":
        import otdd
        body_key = f"{args.body}|pretrained" if args.pretrained and args.body != "tiny" else \
            f"{args.body}|random-seed{args.seed}"  # a random body has features of its own
        source = data.default_source(model.body, args.data_dir)
        if source == "docstrings" and not tokenizer_name(model.body):  # no tokenizer for the docstring sentences
            print("note: the body has no tokenizer (no weights): stage 1 aligns to the synthetic token source")
            source = "synthetic"
        src_x, src_y = (t.to(device) for t in data.source_features(source, model.body, body_key, args.data_dir))
    distance = otdd.OTDD(src_x, src_y, eps=0.1) if args.align_objective == "otdd" else None
    params = list(model.embedder.parameters())
    optimizer = common.make_optimizer(params, args.optimizer, args.align_lr, args.weight_decay)
    step, gen = 0, torch.Generator().manual_seed(args.seed)
    run.truncate("align")  # a stage 1 redone after a kill logs its steps again
    for epoch in range(args.align_epochs):
        for x, y in common.epoch_loader(task.train, args.align_batch, args.seed, 10_000 + epoch):
            tokens, fno_pred, _, fam, _ = model.embed(x.to(device), with_fno=True)
            fno_loss = common.compute_loss("nrmse", fno_pred, y.to(device))
            pooled = tokens.mean(1)  # (B, D), as the official feats2.mean(1)
            if not torch.isfinite(pooled).all():  # a diverged embedder: stop here, not inside otdd.py
                common.stop_nonfinite(f"non-finite embedder output at stage-1 step {step}", run,
                                      "lower --align_lr and start afresh")
            if args.align_objective == "mmd":  # official MMD_loss: as many source rows, drawn with replacement
                align = otdd.mmd(src_x[torch.randint(len(src_x), (len(pooled),), generator=gen)], pooled)
            else:
                align = distance(pooled, fam) if distance else torch.zeros((), device=device)
            loss = fno_loss + align
            if not torch.isfinite(loss):  # nothing non-finite reaches embedder.pt
                common.stop_nonfinite(f"non-finite stage-1 loss at step {step}", run,
                                      "lower --align_lr and start afresh")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            optimizer.step()
            if not common.all_finite(params):
                common.stop_nonfinite(f"non-finite embedder weights at stage-1 step {step}", run,
                                      "lower --align_lr and start afresh")
            step += 1
        print(f"align epoch {epoch} | loss {loss.item():.4f} | fno_nrmse {fno_loss.item():.4f} | "
              f"{args.align_objective} {align.item():.4f}")
        run.log(stage="align", step=step, epoch=epoch, loss=loss.item(), fno_nrmse=fno_loss.item(),
                align=align.item())
    common.save_checkpoint(dict(embedder=model.embedder.state_dict(), objective=args.align_objective),
                           run.dir / "embedder.pt")


# ---- evaluation: one step and autoregressive rollout ---------------------------------------------------------
@torch.no_grad()
def evaluate_family(model, traj, spec, fam, size, device, batch=64):
    """METHOD: autoregressive evaluation in physical units (the official evaluate() un-normalises before the metric).
    nRMSE in the family's own layout: one step over every (t, t+1) test pair; rollout from t = 0 over all steps,
    each prediction fed back through from_unified / to_unified; persistence for both. traj (N, T+1, C_f, ...) may
    be a memory map: a few trajectories are read at a time."""
    model.eval()
    mean, std = model.stats(fam, spec)

    def step(fields):  # physical (B, C_f, ...) -> predicted next physical fields, through the normalised model
        out = [from_unified(model(pack(to_unified(normalise(c, mean, std), spec, size)[0], fam).to(device)).cpu(),
                            spec) for c in fields.split(batch)]
        return normalise(torch.cat(out).float(), mean, std, inverse=True)

    def nrmse(pred, y):  # per sample (a pair, or a whole trajectory), summed here, averaged at the end
        return common.compute_metric("nrmse", pred.numpy(), y.numpy()) * len(y)
    sums, pairs = dict.fromkeys(("nrmse", "rollout_nrmse", "persistence_nrmse", "persistence_rollout_nrmse"), 0.0), 0
    per_chunk = max(1, batch // (traj.shape[1] - 1))
    for start in range(0, len(traj), per_chunk):
        chunk = torch.as_tensor(np.asarray(traj[start:start + per_chunk], dtype=np.float32))
        target = chunk[:, 1:]  # (n, T, C, ...)
        rollout = [chunk[:, 0]]
        for _ in range(target.shape[1]):
            rollout.append(step(rollout[-1]))
        sums["nrmse"] += nrmse(step(chunk[:, :-1].flatten(0, 1)), target.flatten(0, 1))
        sums["rollout_nrmse"] += nrmse(torch.stack(rollout[1:], 1), target)
        sums["persistence_nrmse"] += nrmse(chunk[:, :-1].flatten(0, 1), target.flatten(0, 1))
        sums["persistence_rollout_nrmse"] += nrmse(chunk[:, :1].expand_as(target), target)
        pairs += target.shape[0] * target.shape[1]
    return {k: v / (pairs if k in ("nrmse", "persistence_nrmse") else len(traj)) for k, v in sums.items()}


if __name__ == "__main__":
    args = get_args()
    run, device = common.setup("ups", args)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    fewshots = [f.strip() for f in args.fewshot_family.split(",") if f.strip() and f.strip() != "none"]
    table = families + fewshots  # family id = index in this table
    if any(f not in FAMILIES for f in table) or set(fewshots) & set(families) or len(set(table)) < len(table):
        raise common.UserError(f"--families / --fewshot_family: each must be one of {', '.join(FAMILIES)}, once, and "
                               f"the few-shot families must be held out of --families")
    if any(args.size % family_spec(f, args.size)["n"] for f in table):
        raise common.UserError(f"--size {args.size} must be a multiple of every family's grid (offline: 32)")

    # data: solver trajectories or PDEBench memory maps, split by trajectory (pdebench.py: the official splits)
    n_val = max(1, (args.n_test or 20) // 2)
    counts = dict(train=args.n_train, val=n_val, test=args.n_test)
    splits = {f: {s: family_trajectories(f, s, n, args.data_dir, args.size, n_val) for s, n in counts.items()}
              for f in table}
    for f in fewshots:  # METHOD: a held-out family has only a few training trajectories
        splits[f]["train"] = splits[f]["train"][: args.fewshot_n]
    # METHOD: per-family per-channel statistics of the training split (official simple_normalize), kept as model
    # buffers so that every checkpoint carries them
    stats = {f: pdebench.channel_stats(splits[f]["train"]) for f in table}
    task = make_task("+".join(families), families, table, splits, args.size, stats)
    print(f"families {families}: train/val/test pairs {len(task.train)}/{len(task.val)}/{len(task.test)}")

    # model: FNO embedder -> (pretrained) text body -> linear head
    specs = [family_spec(f, args.size) for f in table]
    model = UPSModel(common.build_body(args.body, args.pretrained), specs, args, [stats[f] for f in table]).to(device)
    print("params {:,}/{:,}".format(*common.count_params(model)), f"| tokens per state {len(model.embedder.pos)}",
          "| FNO embedder + head {:,}".format(sum(common.count_params(m)[1] for m in (model.embedder, model.head))))

    # METHOD: stage 1, align the embedder, body frozen
    if args.resume and (run.dir / "embedder.pt").exists():
        model.embedder.load_state_dict(common.load_checkpoint(run.dir / "embedder.pt", "stage-1 file")["embedder"])
    elif args.align_epochs > 0:
        align_embedder(model, task, args, run, device)

    # METHOD: stage 2, one model for all families, next-step masked nRMSE, the shared loop; then per-family test
    val_score = common.fit(model, task, args, run, device)
    model.load_state_dict(common.load_checkpoint(run.dir / "ckpt.pt", "checkpoint", device)["model"])
    results = {f: evaluate_family(model, splits[f]["test"], specs[table.index(f)], table.index(f), args.size, device)
               for f in families}
    for f, r in results.items():
        print(f"test {f} | " + " | ".join(f"{k} {v:.4f}" for k, v in r.items()))

    # METHOD: few-shot transfer (paper sec. 5.3): fine-tune on a few trajectories of each held-out family, next to a
    # model of the same size trained from scratch (random body, no alignment) on the same trajectories
    fs = {}
    unified = copy.deepcopy(model.state_dict())  # each held-out family starts from the unified model
    for fewshot in fewshots:
        fs_task = make_task(fewshot, [fewshot], table, splits, args.size, stats)
        fs_args = copy.copy(args)
        fs_args.epochs = fs_args.decay_epochs = args.fewshot_epochs
        spec, fid = specs[table.index(fewshot)], table.index(fewshot)
        model.load_state_dict(unified)
        fs[fewshot] = dict(trajectories=len(splits[fewshot]["train"]),
                           zero_shot=evaluate_family(model, splits[fewshot]["test"], spec, fid, args.size, device))
        scratch = UPSModel(common.build_body(args.body, pretrained=False), specs, args,
                           [stats[f] for f in table]).to(device)
        for key, candidate in (("ups", model), ("scratch", scratch)):
            fs_run = types.SimpleNamespace(dir=run.dir / f"fewshot_{fewshot}_{key}", log=run.log,
                                           truncate=run.truncate)
            fs_run.dir.mkdir(exist_ok=True)
            common.fit(candidate, fs_task, fs_args, fs_run, device, stage=f"fewshot_{fewshot}_{key}")
            candidate.load_state_dict(common.load_checkpoint(fs_run.dir / "ckpt.pt", "checkpoint", device)["model"])
            fs[fewshot][key] = evaluate_family(candidate, splits[fewshot]["test"], spec, fid, args.size, device)
            print(f"fewshot {fewshot} {key} | " + " | ".join(f"{k} {v:.4f}" for k, v in fs[fewshot][key].items()))

    test_score = float(np.mean([r["nrmse"] for r in results.values()]))
    run.finish(dict(families=results, metric="nrmse", test_score=test_score, val_score=val_score, fewshot=fs))
