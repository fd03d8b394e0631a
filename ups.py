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
    python ups.py --task pdebench --body roberta        # PDEBench files (fetched through data.py), GPU

Choices of the official code (generate_data.py, embedder.py, main.py, configs/base.yaml) kept here: 1D fields
broadcast along the rows, mask on one row; coordinate grid appended to the FNO input (fc0 takes channels + 2); FNO2d
embedder (4 Fourier layers, 12 x 12 modes, GELU), hidden channel -> token by Linear(S*S, D) + LayerNorm; description
tokens from the body's frozen input embedding in front (add_text=cat); learned positions, second LayerNorm; body fed
by inputs_embeds; head Linear(D, C*S*S) on the mean over tokens (--head pooled); stage 1 = masked nRMSE of the FNO's
own output head + MMD(mean-pooled tokens, source features), embedder only; stage 2 = masked nRMSE, all parameters,
Adam, weight decay 1e-5.
Deviations from the official code:
- Data: small offline sets solved here with scipy (advection, Burgers, 1D diffusion-reaction, 2D FitzHugh-Nagumo),
  S = 32, 10 steps per trajectory, 2 channel slots (official: PDEBench, 128 x 128, slots Vx, Vy, density, pressure);
  coefficients chosen so the dynamics show at this size. Source: docstring text unless CoNLL features are present.
- `--residual` (default on): the head predicts the change of the state and starts at zero, so training starts from
  persistence; the official head predicts the state, which a few hundred CPU steps leave far behind persistence.
- `--head tokens` (default): each PDE token is mapped back to an S x S map and the maps are mixed pointwise (the
  inverse of the embedder); at our budget it learned faster than the official pooled head (docs/ups.md).
- CPU-sized defaults: width 16 (official 32), 5 + 2 epochs (20 + 100), lr 3e-4 (5e-5), stage-1 lr 1e-3.
- The packed input carries a constant plane with the family id, by which the model looks up grid, mask and text, so
  the shared common.fit / evaluate loop runs unchanged (the official loader returns ((x, text), (y, mask))).
- No domain padding in the FNO; OTDD (labels = family) offered next to MMD; validation on held-out trajectories (the
  official code validates on test); rollout evaluation (the public code scores one step), each prediction fed back
  through from_unified / to_unified.
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

# ---- config --------------------------------------------------------------------------------------------------
QUANTITIES = ("u", "v")  # unified channel slots; each family's quantities are placed by name
C_MAX = len(QUANTITIES)
DEFAULT_FAMILIES = {"offline": "advection,burgers,reacdiff,reacdiff2d",
                    "pdebench": "pde_advection,pde_burgers,pde_diffusion_reaction,pde_diffusion_reaction_2d"}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("UPS data and model")
    g.add_argument("--families", default=None, help="comma list of families trained together (one = single-family "
                   f"model); default: all of --task. Choices: {', '.join(FAMILIES)}")
    g.add_argument("--size", type=int, default=32, help="unified grid S: every state becomes (C_MAX, S, S)")
    g.add_argument("--n_train", type=int, default=24, help="training trajectories per family (10 steps each)")
    g.add_argument("--n_test", type=int, default=8, help="test trajectories per family (validation: half as many)")
    g.add_argument("--width", type=int, default=16, help="FNO hidden channels = PDE tokens (official 32)")
    g.add_argument("--modes", type=int, default=12, help="Fourier modes kept per axis, <= size/2 (official 12)")
    g.add_argument("--fno_layers", type=int, default=4, help="Fourier layers in the embedder (official 4)")
    g.add_argument("--text", action=argparse.BooleanOptionalAction, default=True, help="PDE description tokens")
    g.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True, help="predict the change")
    g.add_argument("--head", default="tokens", choices=["tokens", "pooled"],
                   help="tokens: each PDE token back to an S x S map, then mixed (ours); pooled: official")
    g = parser.add_argument_group("UPS stage 1 (alignment, body frozen) and few-shot transfer")
    g.add_argument("--align_epochs", type=int, default=5, help="embedder alignment epochs (0 = skip; official 20)")
    g.add_argument("--align_objective", default="mmd", choices=["mmd", "otdd", "none"],
                   help="distance to the body's source features (official mmd); none = FNO loss only")
    g.add_argument("--align_batch", type=int, default=128, help="target samples per stage-1 step (official 128)")
    g.add_argument("--align_lr", type=float, default=1e-3, help="stage-1 learning rate")
    g.add_argument("--fewshot_family", default="burgers_nu0.05", help="held-out family fine-tuned at the end; none")
    g.add_argument("--fewshot_n", type=int, default=4, help="its training trajectories")
    g.add_argument("--fewshot_epochs", type=int, default=8, help="its epochs (for UPS and the scratch model)")
    parser.set_defaults(task="offline", epochs=2, batch_size=16, lr=3e-4, weight_decay=1e-5, optimizer="adam",
                        warmup_epochs=0.2, clip=1.0, eval_batch_size=64)
    args = parser.parse_args(argv)  # not common.parse_args: --task picks the data source, not a data.py task
    if args.task not in DEFAULT_FAMILIES:
        raise common.UserError(f"--task {args.task}: ups.py takes --task offline (scipy solvers) or pdebench")
    args.families = args.families or DEFAULT_FAMILIES[args.task]
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
    # PDEBench files (data.pde_trajectories): the same equations at full size, subsampled to n points per axis
    "pde_advection": _family(1, ("u",), None, None, "1D advection equation beta=0.4"),
    "pde_burgers": _family(1, ("u",), None, None, "1D Burgers equation nu=1.0"),
    "pde_diffusion_reaction": _family(1, ("u",), None, None, "1D diffusion-reaction equation nu=0.5 rho=1"),
    "pde_diffusion_reaction_2d": _family(2, ("u", "v"), None, None, "2D diffusion-reaction equation FitzHugh-Nagumo"),
}


def family_trajectories(name, split, num, data_dir):
    """(num, T+1, C, n) or (num, T+1, C, n, n) float32 trajectories of one family, solved once and cached."""
    f = FAMILIES[name]
    if f["solve"] is None:  # PDEBench files: data.py reads them (same files, URLs and checksums as its pde_* tasks)
        if not hasattr(data, "pde_trajectories"):
            raise common.UserError(f"family '{name}': data.py has no PDEBench trajectory reader (pde_trajectories) "
                                   f"yet; use the offline families ({DEFAULT_FAMILIES['offline']})")
        return data.pde_trajectories(name, split, num, data_dir, f["n"])
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
    slots = [QUANTITIES.index(q) for q in spec["channels"]]
    state, mask = torch.zeros(B, C_MAX, size, size), torch.zeros(B, C_MAX, size, size)
    state[:, slots] = fields
    mask[:, slots, : 1 if spec["dim"] == 1 else size] = 1.0  # 1D: one row, so a sample weighs its own n points
    return state, mask


def from_unified(state, spec):
    """Inverse of to_unified: (B, C_MAX, S, S) -> the family's own fields (B, C_f, n[, n])."""
    r = state.shape[-1] // spec["n"]
    fields = state[:, [QUANTITIES.index(q) for q in spec["channels"]]]
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


def make_task(name, families, table, splits, size):
    """data.Task of (packed state, masked next state) pairs over `families`; splits[family][split] are
    trajectories; a family's id is its index in `table`."""
    sets = []
    for split in ("train", "val", "test"):
        xs, ys = [], []
        for f in families:
            traj = torch.as_tensor(splits[f][split])
            states, mask = to_unified(traj.flatten(0, 1), FAMILIES[f], size)
            states = states.unflatten(0, traj.shape[:2])  # (N, T+1, C_MAX, S, S)
            xs.append(pack(states[:, :-1].flatten(0, 1), table.index(f)))
            ys.append((states[:, 1:] * mask[0]).flatten(0, 1))
        sets.append(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)))
    x, y = sets[0].tensors
    return data.Task(name, "dense", tuple(x.shape[1:]), tuple(y.shape[1:]), "nrmse", "nrmse", *sets)


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
        return self.norm2(tokens + self.pos), (self.fno_head(h) if with_fno else None)


class TokenHead(nn.Module):
    """METHOD: (ours, --head tokens) features (B, L, D) -> (B, C_MAX, S, S). Each of the last W (PDE) tokens goes
    back to an S x S map, the inverse of the embedder's channel -> token map, and the W maps are mixed pointwise
    into the C_MAX channels, as the FNO's own output head (fc1, GELU, fc2) does."""

    def __init__(self, dim, width, size):
        super().__init__()
        self.width, self.size = width, size
        self.to_map = nn.Linear(dim, size * size)
        self.mix = nn.Sequential(nn.Conv2d(width, 128, 1), nn.GELU(), nn.Conv2d(128, C_MAX, 1))

    def forward(self, features):
        return self.mix(self.to_map(features[:, -self.width:]).unflatten(2, (self.size, self.size)))


@torch.no_grad()
def describe(body, texts):
    """METHOD: PDE text (official add_text=cat): one-line PDE descriptions -> (F, T, D) tokens of the body's own
    frozen input embedding. Text bodies use their tokenizer; the tiny test body reads bytes."""
    if body.kind == "text":
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(body.model.name_or_path)(texts, padding=True, return_tensors="pt")
        ids = ids["input_ids"]
    elif body.kind == "tiny":  # bytes, zero-padded
        ids = torch.tensor([list(t.encode().ljust(max(map(len, texts)), b"\0")) for t in texts])
    else:
        raise common.UserError("UPS feeds tokens to a text transformer: use --body minilm, roberta, a Hugging Face "
                               "text model id or tiny, not a vision body")
    return body.source_embeddings(ids).float()


class UPSModel(nn.Module):
    """packed x (B, C_MAX+1, S, S) -> masked next state (B, C_MAX, S, S). Holds each family's coordinate grid,
    mask and frozen description tokens (specs[i] is family id i), looked up by the family-id plane."""

    def __init__(self, body, specs, args):
        super().__init__()
        zeros = [torch.zeros((1, len(s["channels"])) + (s["n"],) * s["dim"]) for s in specs]
        self.register_buffer("grids", torch.stack([coordinate_grid(s, args.size) for s in specs]))
        self.register_buffer("masks", torch.cat([to_unified(z, s, args.size)[1] for z, s in zip(zeros, specs)]))
        self.register_buffer("text", describe(body, [s["text"] for s in specs]) if args.text else None)
        self.embedder = FNOEmbedder(args.size, args.width, args.modes, args.fno_layers, body.dim,
                                    0 if self.text is None else self.text.shape[1], body)
        self.body, self.residual = body, args.residual
        self.pooled = args.head == "pooled"  # official: Linear(D, C*S*S) on the mean over tokens
        self.head = nn.Linear(body.out_dim, C_MAX * args.size ** 2) if self.pooled else \
            TokenHead(body.out_dim, args.width, args.size)
        if self.residual:  # ours: the model starts as persistence (next state = current state)
            last = self.head if self.pooled else self.head.mix[-1]
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)

    def embed(self, x, with_fno=False):  # -> tokens (B, L, D), masked FNO prediction or None, state, family ids
        state, fam = x[:, :-1], x[:, -1, 0, 0].round().long()
        tokens, fno = self.embedder(state, self.grids[fam], None if self.text is None else self.text[fam], with_fno)
        if fno is not None:
            fno = (fno + state if self.residual else fno) * self.masks[fam]
        return tokens, fno, state, fam

    def forward(self, x):
        tokens, _, state, fam = self.embed(x)
        features = self.body(tokens)  # (B, L, D)
        out = self.head(features.mean(1)).reshape(state.shape) if self.pooled else self.head(features)
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
        src_x, src_y = (t.to(device) for t in data.source_features(source, model.body, body_key, args.data_dir))
    distance = otdd.OTDD(src_x, src_y, eps=0.1) if args.align_objective == "otdd" else None
    params = list(model.embedder.parameters())
    optimizer = common.make_optimizer(params, args.optimizer, args.align_lr, args.weight_decay)
    step, gen = 0, torch.Generator().manual_seed(args.seed)
    run.truncate("align")  # a stage 1 redone after a kill logs its steps again
    for epoch in range(args.align_epochs):
        for x, y in common.epoch_loader(task.train, args.align_batch, args.seed, 10_000 + epoch):
            tokens, fno_pred, _, fam = model.embed(x.to(device), with_fno=True)
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
    """METHOD: autoregressive evaluation. nRMSE in the family's own layout: one step over every (t, t+1) test pair;
    rollout from t = 0 over all steps, each prediction fed back through from_unified / to_unified; persistence for
    both."""
    model.eval()
    traj = torch.as_tensor(traj)
    target = traj[:, 1:]  # (N, T, C, ...)

    def step(fields):  # (B, C_f, ...) -> predicted next fields
        return torch.cat([from_unified(model(pack(to_unified(chunk, spec, size)[0], fam).to(device)).cpu(), spec)
                          for chunk in fields.split(batch)])

    def nrmse(pred, y):  # per sample (a pair, or a whole trajectory), then the mean
        return common.compute_metric("nrmse", pred.numpy(), y.numpy())
    rollout = [traj[:, 0]]
    for _ in range(target.shape[1]):
        rollout.append(step(rollout[-1]))
    return dict(nrmse=nrmse(step(traj[:, :-1].flatten(0, 1)), target.flatten(0, 1)),
                rollout_nrmse=nrmse(torch.stack(rollout[1:], 1), target),
                persistence_nrmse=nrmse(traj[:, :-1].flatten(0, 1), target.flatten(0, 1)),
                persistence_rollout_nrmse=nrmse(traj[:, :1].expand_as(target), target))


if __name__ == "__main__":
    args = get_args()
    run, device = common.setup("ups", args)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    fewshot = None if args.fewshot_family == "none" else args.fewshot_family
    table = families + [fewshot] * bool(fewshot)  # family id = index in this table
    if any(f not in FAMILIES for f in table) or fewshot in families:
        raise common.UserError(f"--families / --fewshot_family: each must be one of {', '.join(FAMILIES)}, and the "
                               f"few-shot family must be held out of --families")

    # data: cached solver trajectories, split by trajectory
    counts = dict(train=args.n_train, val=max(1, args.n_test // 2), test=args.n_test)
    splits = {f: {s: family_trajectories(f, s, n, args.data_dir) for s, n in counts.items()} for f in table}
    task = make_task("+".join(families), families, table, splits, args.size)
    print(f"families {families}: train/val/test pairs {len(task.train)}/{len(task.val)}/{len(task.test)}")

    # model: FNO embedder -> (pretrained) text body -> linear head
    specs = [FAMILIES[f] for f in table]
    model = UPSModel(common.build_body(args.body, args.pretrained), specs, args).to(device)
    print("params {:,}/{:,}".format(*common.count_params(model)), f"| tokens per state {len(model.embedder.pos)}")

    # METHOD: stage 1, align the embedder, body frozen
    if args.resume and (run.dir / "embedder.pt").exists():
        model.embedder.load_state_dict(common.load_checkpoint(run.dir / "embedder.pt", "stage-1 file")["embedder"])
    elif args.align_epochs > 0:
        align_embedder(model, task, args, run, device)

    # METHOD: stage 2, one model for all families, next-step masked nRMSE, the shared loop; then per-family test
    val_score = common.fit(model, task, args, run, device)
    model.load_state_dict(common.load_checkpoint(run.dir / "ckpt.pt", "checkpoint", device)["model"])
    results = {f: evaluate_family(model, splits[f]["test"], FAMILIES[f], table.index(f), args.size, device)
               for f in families}
    for f, r in results.items():
        print(f"test {f} | " + " | ".join(f"{k} {v:.4f}" for k, v in r.items()))

    # METHOD: few-shot transfer (paper sec. 5.3): fine-tune on a few trajectories of the held-out family, next to a
    # model of the same size trained from scratch (random body, no alignment) on the same trajectories
    fs = None
    if fewshot:
        few = {fewshot: dict(splits[fewshot], train=splits[fewshot]["train"][: args.fewshot_n])}
        fs_task = make_task(fewshot, [fewshot], table, few, args.size)
        fs_args = copy.copy(args)
        fs_args.epochs = fs_args.decay_epochs = args.fewshot_epochs
        spec, fid = FAMILIES[fewshot], table.index(fewshot)
        fs = dict(family=fewshot, trajectories=args.fewshot_n,
                  zero_shot=evaluate_family(model, splits[fewshot]["test"], spec, fid, args.size, device))
        scratch = UPSModel(common.build_body(args.body, pretrained=False), specs, args).to(device)
        for key, candidate in (("ups", model), ("scratch", scratch)):
            fs_run = types.SimpleNamespace(dir=run.dir / f"fewshot_{key}", log=run.log, truncate=run.truncate)
            fs_run.dir.mkdir(exist_ok=True)
            common.fit(candidate, fs_task, fs_args, fs_run, device, stage=f"fewshot_{key}")
            candidate.load_state_dict(common.load_checkpoint(fs_run.dir / "ckpt.pt", "checkpoint", device)["model"])
            fs[key] = evaluate_family(candidate, splits[fewshot]["test"], spec, fid, args.size, device)
            print(f"fewshot {fewshot} {key} | " + " | ".join(f"{k} {v:.4f}" for k, v in fs[key].items()))

    test_score = float(np.mean([r["nrmse"] for r in results.values()]))
    run.finish(dict(families=results, metric="nrmse", test_score=test_score, val_score=val_score, fewshot=fs))
