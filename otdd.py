"""Optimal transport for embedder alignment: batched Sinkhorn, Sinkhorn divergence, OTDD and MMD.

Plain PyTorch, no geomloss or POT. Conventions (they match geomloss with p=2, which the official ORCA code uses):
  feature cost        c(x, x') = 1/2 ||x - x'||^2
  entropic OT         OT_eps(a, b) = min_pi <pi, C> + eps KL(pi || a x b)
  debiased divergence S_eps(a, b) = OT_eps(a, b) - 1/2 OT_eps(a, a) - 1/2 OT_eps(b, b)
OTDD (Alvarez-Melis & Fusi 2020, as ORCA runs it) compares labelled sets with the augmented cost
  d((x, i), (x', j)) = c(x, x') + 1/2 W(i, j),   W(i, j) = S_eps(class i, class j) under ||x - x'||^2
(no gradient through W). W uses the *unhalved* cost: the official otdd `pwdist_exact` hands geomloss its
`squared_distances` for p = 2, so W is a squared 2-Wasserstein distance (as `batch_augmented_cost` expects), and the
1/2 in d is the official lam_y * W / p.

Example: `loss = OTDD(x_src, y_src)(x_tgt)` (source side computed once), or `otdd(x_s, y_s, x_t, y_t)`.
Deviations from the official code (ORCA's otdd/ package on geomloss):
- geomloss does one Sinkhorn iteration per eps level and stops at the target eps; we keep iterating at the target
  eps until the marginals are met (`tol`), so values are those of a converged solver: `python bench.py otdd`
  compares both with a float64 solution (official ~1e-3 off, ours ~1e-6) and times them (ours 20-50x faster).
- The source-only quantities (source label distances, OT_eps(src, src)) are cached, not recomputed per call.
"""
import warnings

import torch

# ---- Sinkhorn core ------------------------------------------------------------------------------------------------


def sq_dist(x, y):
    """||x_i - y_j||^2 for batched point sets: (B, N, D), (B, M, D) -> (B, N, M). The cost of the label distances W
    (geomloss `squared_distances`, as the official `pwdist_exact` passes it)."""
    # expanded form: one matmul instead of a (B, N, M, D) difference tensor; rounding can dip just below 0.
    # In place after the first (B, N, M) buffer: at 5000 x 5000 points each one is 100 MB.
    sq = torch.baddbmm((x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :], x, y.transpose(1, 2), alpha=-2)
    return sq.clamp_min_(0)


def half_sq_dist(x, y):
    """c(x_i, y_j) = 1/2 ||x_i - y_j||^2 (geomloss's default cost for p = 2): (B, N, D), (B, M, D) -> (B, N, M)."""
    return sq_dist(x, y).mul_(0.5)


def _softmin(eps, C, h, dim):
    """Soft-min over `dim` of the (B, N, M) cost: -eps log sum exp(h - C / eps), where h (B, M) for dim=2
    or (B, N) for dim=1 holds log-weights + potential / eps. Returns (B, N) for dim=2, (B, M) for dim=1."""
    z = C / -eps
    z += h.unsqueeze(3 - dim)  # in place from here on: fresh (B, N, M) buffers cost more than the arithmetic
    z_max = z.amax(dim, keepdim=True).detach()  # a constant shift: log-sum-exp and its gradient are unchanged
    # exp() of arguments below about -87 leaves the vectorised fast path on CPU and runs ~10x slower. Such terms
    # weigh < 1e-35 next to the largest term (exactly 1), so clamping them to -80 changes nothing measurable.
    z.sub_(z_max).clamp_(min=-80.0).exp_()
    return -eps * (z.sum(dim).log() + z_max.squeeze(dim))


def _scaling_sweep(K, a, b, p, q, omega, symmetric):
    """One relaxed Sinkhorn iteration x <- x + omega (T(x) - x) in scaling form. K = exp((f + g - C) / eps) (B, N, M)
    holds the potentials (f, g); p (B, N), q (B, M) are offsets from them in units of eps -> new p, q. It is the
    log-domain update -eps log sum_j b_j exp((g_j - C_ij) / eps) with a matrix-vector product for the log-sum-exp."""
    # both products as (1, N) @ (N, M): on CPU this is several times faster than K @ (M, 1) for these shapes
    p_new = -torch.log(((b * q.exp())[:, None, :] @ K.transpose(1, 2))[:, 0])
    p = torch.where(a > 0, p + omega * (p_new - p), 0.0)  # padding keeps offset 0
    if symmetric:  # f = g by symmetry; the q-update would repeat the p-update
        return p, p
    q_new = -torch.log(((a * p.exp())[:, None, :] @ K)[:, 0])
    return p, torch.where(b > 0, q + omega * (q_new - q), 0.0)


def sinkhorn(C, a, b=None, eps=0.1, tol=1e-2, max_iter=2000, scaling=0.5, overrelax=1.9):
    """Entropic OT values of a batch of problems: OT_eps = min_pi <pi, C> + eps KL(pi || a x b).

    C (B, N, M) cost; a (B, N), b (B, M) weights, each row summing to 1 (0 = padding) -> (B,). b=None means the
    symmetric problem OT_eps(a, a) with a symmetric C. eps-scaling from the cost's spread down to eps (factor
    `scaling`, one iteration per level), then over-relaxed iterations at eps until the L1 marginal error of every
    problem is below `tol` (at most `max_iter`). Differentiable w.r.t. C: dOT/dC = pi (envelope theorem).
    """
    symmetric = b is None
    b = a if symmetric else b
    with torch.no_grad():
        C0 = C.detach()
        # OT(C - r(+)s) = OT(C) - <a, r> - <b, s> for fixed marginals. Centring rows and columns keeps the
        # numbers small (~ the spread of C, not its size ~ D), which keeps float32 rounding far below eps.
        r = (b[:, None, :] @ C0.transpose(1, 2))[:, 0]  # (B, N) row means
        s = (a[:, None, :] @ C0)[:, 0] - (a * r).sum(1, keepdim=True)  # (B, M) column means of C - r
        C0 = (C0 - r[:, :, None]).sub_(s[:, None, :])
        padding = (a[:, :, None] == 0) | (b[:, None, :] == 0)
        eps_now = max(C0.abs().masked_fill_(padding, 0).amax().item(), eps)
        # Symmetric problems (x against itself) have a near-identity plan: the plain update T then maps f to about
        # -f (up to a constant) and alternating updates crawl, while the average (f + T(f)) / 2 lands next to the
        # fixed point at once (geomloss does the same). Other problems use over-relaxed updates, 1 < w < 2
        # (Thibault et al. 2017): with costs ~1000x eps plain Sinkhorn is slow, and w = 1.9 needs 3-30x fewer.
        # Over-relaxation is only locally convergent: from some warm starts w = 1.9 oscillates with growing
        # amplitude. A problem whose error doubles over its best so far falls back to w = 1 (plain Sinkhorn,
        # which always converges); the others keep w.
        omega = torch.full((len(a), 1), 0.5 if symmetric else overrelax, dtype=a.dtype, device=a.device)
        best = torch.full((len(a),), float("inf"), dtype=a.dtype, device=a.device)
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        # problems that met tol stop moving, so each problem of a batch ends as it would alone: over-relaxed
        # updates (w > 1) continued far past convergence can drift and overflow in float32
        done = torch.zeros(len(a), dtype=torch.bool, device=a.device)
        iters, converged = 0, False
        while not converged and iters < max_iter:
            # Stabilised scaling form (Schmitzer 2019): absorb (f, g) into the kernel K, then iterate on offsets
            # p, q with matrix-vector products, ~10x cheaper on CPU than a log-sum-exp over (B, N, M) per update.
            # The clamp keeps exp finite (exp(-80) = 2e-35; below -87, exp also runs ~10x slower on CPU).
            K = torch.add(f[:, :, None], g[:, None, :]).sub_(C0).div_(eps_now).clamp_(-80, 80).exp_()
            K.masked_fill_(padding, 0)  # padding never enters a sum (its clamped entries could reach e^80)
            p, q = torch.zeros_like(f), torch.zeros_like(g)
            while iters < max_iter:
                w = omega if eps_now == eps else omega.clamp(max=1.0)
                p_new, q_new = _scaling_sweep(K, a, b, p, q, w, symmetric)
                err = (b * (q_new - q).abs()).sum(1) / w[:, 0]  # sum_j b_j |T(g)_j - g_j| / eps: L1 marginal error
                p, q = torch.where(done[:, None], p, p_new), torch.where(done[:, None], q, q_new)
                if eps_now > eps:
                    break  # eps-scaling: one iteration per level, each level warm-starts the next
                iters += 1
                done |= err < tol
                if not symmetric:
                    omega[(err > 2 * best) | ~torch.isfinite(err)] = 1.0
                    best = torch.minimum(best, err)
                converged = bool(done.all())
                if converged or max(p.abs().max(), q.abs().max()) > 30:
                    break  # done, or re-absorb before exp(p), exp(q) can overflow
            f, g = f + eps_now * p, g + eps_now * q
            # eps-scaling: start at the cost's spread, where one iteration gives the right potentials, and shrink
            eps_now = max(eps_now * scaling, eps)
        if not converged:
            worst = err.masked_fill(done, 0).max().item()
            warnings.warn(f"sinkhorn: marginal error {worst:.1e} > tol={tol} after {max_iter} iterations")
    # One last Sinkhorn step with autograd on. At the fixed point, d<a,f>/dC = pi and g does not move to first
    # order, so backprop through this single step gives the envelope gradient; no need to unroll the loop.
    C1 = (C - r[:, :, None]).sub_(s[:, None, :])
    f = _softmin(eps, C1, b.log() + g / eps, dim=2)
    g = _softmin(eps, C1.detach(), a.log() + f.detach() / eps, dim=1)
    return (a * (f + r)).sum(1) + (b * (g + s)).sum(1)


# ---- input checks -------------------------------------------------------------------------------------------------


def _as_points(name, x, dim=None, batched=False):
    """Checks a (N, D) point tensor, or (B, N, D) if batched, and returns it in float32 or float64."""
    if not torch.is_tensor(x) or x.ndim not in ((2, 3) if batched else (2,)):
        shapes = "(N, D) or (B, N, D)" if batched else "(N, D)"
        raise ValueError(f"{name} must be a {shapes} tensor of points, got {getattr(x, 'shape', type(x))}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): pass at least one point with one feature")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has {x.shape[-1]} features but the other set has {dim}: use the same feature space")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf: check the features (e.g. a diverged embedder) first")
    # half precision has ~3 significant digits, far too few for costs ~1000x eps
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def _group_by_class(name, x, y):
    """Splits labelled points into padded classes (no gradient): x (N, D), y (N,) or None (one dummy label) ->
    X (C, n_max, D), w (C, n_max) uniform 1/n_c on the class's points and 0 on padding, counts (C,), label (N,)."""
    y = torch.zeros(len(x), dtype=torch.long, device=x.device) if y is None else torch.as_tensor(y, device=x.device)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y{name[1:]} has shape {tuple(y.shape)} for {len(x)} points in {name}: "
                         "pass one label per row")
    classes, index, counts = torch.unique(y, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        bad = classes[counts.argmin()].item()
        raise ValueError(f"class {bad} of y{name[1:]} has 1 point: label distances need >= 2 points per class "
                         "(the official min_labelcount=2); drop or merge that class")
    order = torch.argsort(index, stable=True)
    slot = torch.arange(len(x), device=x.device) - (torch.cumsum(counts, 0) - counts)[index[order]]
    X = x.new_zeros(len(classes), counts.max().item(), x.shape[1])
    X[index[order], slot] = x[order]
    w = x.new_zeros(X.shape[:2])
    w[index[order], slot] = 1.0 / counts[index[order]].to(x.dtype)
    return X, w, counts, index


# ---- debiased Sinkhorn divergence ---------------------------------------------------------------------------------


def sinkhorn_divergence(x, y, a=None, b=None, eps=0.1, cost=half_sq_dist, **solver):
    """S_eps(a, b) = OT_eps(a, b) - 1/2 OT_eps(a, a) - 1/2 OT_eps(b, b) between a = sum_i a_i delta_{x_i} and
    b = sum_j b_j delta_{y_j}. x (N, D) or (B, N, D), y (M, D) or (B, M, D); a, b weights (uniform if None,
    0 = padding). cost(x, y) -> (B, N, M), default 1/2 ||x - y||^2. `solver` goes to sinkhorn(). -> () or (B,)."""
    x = _as_points("x", x, batched=True)
    y = _as_points("y", y, dim=x.shape[-1], batched=True).to(x.dtype)
    if x.ndim != y.ndim or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)}: pass (N, D), (M, D) or (B, N, D), (B, M, D)")
    batched = x.ndim == 3
    x, y = (x, y) if batched else (x[None], y[None])
    a = x.new_full(x.shape[:2], 1 / x.shape[1]) if a is None else a.reshape(x.shape[:2]).to(x.dtype)
    b = y.new_full(y.shape[:2], 1 / y.shape[1]) if b is None else b.reshape(y.shape[:2]).to(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        ot_xy = sinkhorn(cost(x, y), a, b, eps, **solver)
        ot_xx = sinkhorn(cost(x, x), a, None, eps, **solver)  # None: symmetric problem, see sinkhorn()
        ot_yy = sinkhorn(cost(y, y), b, None, eps, **solver)
    value = ot_xy - 0.5 * ot_xx - 0.5 * ot_yy
    return value if batched else value[0]


# ---- OTDD ---------------------------------------------------------------------------------------------------------


def _pair_ot(X, w, counts, i, j=None, eps=0.1, **solver):
    """OT_eps(class i[p], class j[p]) under the label-distance cost ||x - x'||^2 (sq_dist, unhalved) for P class pairs
    in ONE batched Sinkhorn call; j=None: OT_eps(class i, class i).
    X (K, n_max, D) padded classes, w (K, n_max) their weights, counts (K,), i, j (P,) -> (P,)."""
    n_i = counts[i].max().item()  # drop padding that no problem in the batch needs
    X_i, w_i = X[i][:, :n_i], w[i][:, :n_i]
    if j is None:
        return sinkhorn(sq_dist(X_i, X_i), w_i, None, eps, **solver)
    n_j = counts[j].max().item()
    return sinkhorn(sq_dist(X_i, X[j][:, :n_j]), w_i, w[j][:, :n_j], eps, **solver)


def _bures_sq(X1, w1, X2, w2):
    """Squared 2-Wasserstein distance between the Gaussian fits (mean, unbiased covariance) of padded point sets:
    X1 (P, n1, D), w1 (P, n1), X2 (P, n2, D), w2 (P, n2) -> (P,). With S = Z^T Z,
    W2^2 = ||m1 - m2||^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2,  and the last trace = ||Z1 Z2^T||_* ."""
    def fit(X, w):
        m = (w[..., None] * X).sum(1)
        n = (w > 0).sum(1, keepdim=True)
        return m, (X - m[:, None]) * (w * n / (n - 1)).sqrt()[..., None]  # padding rows have w = 0 -> zero rows
    (m1, Z1), (m2, Z2) = fit(X1, w1), fit(X2, w2)
    # S1^1/2 S2 S1^1/2 has the same nonzero eigenvalues as (Z1 Z2^T)^T (Z1 Z2^T), so the trace of its square root is
    # the sum of singular values of an (n1, n2) matrix: no D x D sqrtm, cheap at D=768 with ~500 points per class
    cross = torch.linalg.svdvals(Z1 @ Z2.transpose(1, 2)).sum(-1)
    return ((m1 - m2) ** 2).sum(-1) + (Z1**2).sum((1, 2)) + (Z2**2).sum((1, 2)) - 2 * cross


class OTDD:
    """Optimal transport dataset distance to a fixed labelled source set, as ORCA's stage 2 uses it.

    OTDD(x_s (N, D), y_s (N,), eps, label_distance="exact"|"gaussian", label_tol, **solver)(x_t (M, D), y_t or None)
    -> scalar S_eps between the labelled sets under d((x, i), (x', j)) = 1/2 ||x - x'||^2 + 1/2 W(i, j),
    differentiable w.r.t. x_t. W(i, j) = S_eps(class i, class j) under the unhalved cost ||x - x'||^2 ("exact", the
    official pwdist_exact), or the squared Bures-Wasserstein distance W2^2 between the classes' Gaussian fits
    ("gaussian", the official otdd-gaussian, wasserstein_gauss_distance with squared=True): both are squared
    2-Wasserstein distances, equal to ||m_i - m_j||^2 for point-mass classes. y_t=None gives all targets one label.
    Everything that depends only on the source is computed once here: W_ss (C_s, C_s), OT_eps(src, src) `ot_ss`.
    `solver` options go to sinkhorn(); the label distances stop at the looser marginal error `label_tol`: only their
    values are used, and a Sinkhorn value converges far faster than its marginals (at label_tol=0.1 in float32, W is
    within 7e-5 relative of a float64 label_tol=1e-5 solve on bench.py's Swin-like data).
    """

    def __init__(self, x_s, y_s, eps=0.1, label_distance="exact", label_tol=0.1, **solver):
        if label_distance not in ("exact", "gaussian"):
            raise ValueError(f"label_distance must be 'exact' or 'gaussian', got {label_distance!r}")
        self.eps, self.label_distance, self.solver = eps, label_distance, solver
        self.label_solver = dict(solver, tol=label_tol)
        self.x_s = _as_points("x_s", x_s).detach()
        self.X_s, self.w_s, self.counts_s, self.label_s = _group_by_class("x_s", self.x_s, y_s)
        n_cls = len(self.counts_s)
        with torch.no_grad(), torch.autocast(device_type=self.x_s.device.type, enabled=False):
            self.self_ot_s = self._self_ot(self.X_s, self.w_s, self.counts_s)  # OT_eps(class, class), reused per call
            i, j = torch.triu_indices(n_cls, n_cls, offset=1, device=self.x_s.device)
            self.W_ss = self._label_distances(self.X_s, self.w_s, self.counts_s, i, j, self.self_ot_s)
            C_ss = self._cost(self.x_s, self.label_s, self.x_s, self.label_s, self.W_ss)
            a = self.x_s.new_full((1, len(self.x_s)), 1 / len(self.x_s))
            self.ot_ss = sinkhorn(C_ss, a, None, eps, **solver)[0]  # a constant of the alignment problem

    def _self_ot(self, X, w, counts):
        """OT_eps(class k, class k) for every padded class (K,); only the exact label distance needs them."""
        if self.label_distance == "gaussian":
            return None
        return _pair_ot(X, w, counts, torch.arange(len(counts), device=X.device), None, self.eps, **self.label_solver)

    def _label_distances(self, X, w, counts, i, j, self_ot):
        """W(i[p], j[p]) for class pairs i != j, all in one batched call, as a symmetric (K, K) matrix whose diagonal
        W(k, k) = 0 and whose entries outside the pairs stay 0 (unused)."""
        W = X.new_zeros(len(counts), len(counts))
        if len(i) == 0:
            return W
        if self.label_distance == "gaussian":
            W[i, j] = _bures_sq(X[i], w[i], X[j], w[j])
        else:
            W[i, j] = _pair_ot(X, w, counts, i, j, self.eps, **self.label_solver) - 0.5 * (self_ot[i] + self_ot[j])
        W[j, i] = W[i, j]
        return W

    @staticmethod
    def _cost(x1, label1, x2, label2, W):
        """Augmented cost d = 1/2 ||x - x'||^2 + 1/2 W(label, label'): (N, D), (N,), (M, D), (M,) -> (1, N, M)."""
        return half_sq_dist(x1[None], x2[None]).add_((0.5 * W)[label1[:, None], label2[None, :]])

    def __call__(self, x_t, y_t=None):
        x_t = _as_points("x_t", x_t, dim=self.x_s.shape[1]).to(self.x_s.dtype)
        if x_t.device != self.x_s.device:
            raise ValueError(f"x_t is on {x_t.device} but the source is on {self.x_s.device}: move one of them")
        X_t, w_t, counts_t, label_t = _group_by_class("x_t", x_t, y_t)
        n_s, n_t = len(self.counts_s), len(counts_t)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            with torch.no_grad():
                # stack the source classes, then the target classes (labels n_s, n_s + 1, ...), so that all pairs
                # (source, target) and (target, target') go to one batched Sinkhorn call
                n_max = max(self.X_s.shape[1], X_t.shape[1])
                X = torch.cat([_pad(self.X_s, n_max), _pad(X_t, n_max)])
                w = torch.cat([_pad(self.w_s, n_max), _pad(w_t, n_max)])
                counts = torch.cat([self.counts_s, counts_t])
                t_i, t_j = n_s + torch.triu_indices(n_t, n_t, offset=1)
                i = torch.cat([torch.arange(n_s).repeat_interleave(n_t), t_i]).to(x_t.device)
                j = torch.cat([n_s + torch.arange(n_t).repeat(n_s), t_j]).to(x_t.device)
                self_ot = self._self_ot(X_t, w_t, counts_t)  # only the target self-terms are new
                self_ot = None if self_ot is None else torch.cat([self.self_ot_s, self_ot])
                W = self._label_distances(X, w, counts, i, j, self_ot)  # (n_s + n_t, n_s + n_t)
            # the outer debiased divergence; only these two solves see x_t with autograd on
            a = self.x_s.new_full((1, len(self.x_s)), 1 / len(self.x_s))
            b = x_t.new_full((1, len(x_t)), 1 / len(x_t))
            ot_st = sinkhorn(self._cost(self.x_s, self.label_s, x_t, n_s + label_t, W), a, b, self.eps, **self.solver)
            ot_tt = sinkhorn(self._cost(x_t, n_s + label_t, x_t, n_s + label_t, W), b, None, self.eps, **self.solver)
        return ot_st[0] - 0.5 * self.ot_ss - 0.5 * ot_tt[0]


def _pad(X, n):
    """Zero-pads dim 1 of a (K, n_k) or (K, n_k, D) tensor to n."""
    return torch.cat([X, X.new_zeros(X.shape[0], n - X.shape[1], *X.shape[2:])], dim=1)


def otdd(x_s, y_s, x_t, y_t=None, eps=0.1, label_distance="exact", label_tol=0.1, **solver):
    """OTDD between labelled sets (x_s (N, D), y_s (N,)) and (x_t (M, D), y_t (M,) or None = one label) -> scalar,
    differentiable w.r.t. x_t (see OTDD for the definition). Recomputes the source side; in a loop use OTDD."""
    return OTDD(x_s, y_s, eps, label_distance, label_tol, **solver)(x_t, y_t)


# ---- MMD ----------------------------------------------------------------------------------------------------------


def mmd(x, y, kernel_mul=2.0, kernel_num=5):
    """Biased multi-bandwidth Gaussian-kernel MMD^2, ORCA's `utils.MMD_loss`: x (N, D), y (M, D) -> scalar.
    K(u, v) = sum_k exp(-||u - v||^2 / (bw * kernel_mul^k)), k < kernel_num, with bw = mean pairwise ||u - v||^2
    over the joined set (off-diagonal, no gradient) / kernel_mul^(kernel_num // 2); MMD^2 = mean K_xx + mean K_yy
    - 2 mean K_xy. The official code first draws len(y) source rows with replacement: do that before calling,
    x[torch.randint(len(x), (len(y),))], to match it; with equal sizes this is its mean(K_ss + K_tt - K_st - K_ts)."""
    x = _as_points("x", x)
    y = _as_points("y", y, dim=x.shape[-1]).to(x.dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = torch.cat([x, y])[None]
        sq = sq_dist(z, z)[0]  # (N + M, N + M)
        n = len(z[0])
        bw = sq.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
        K = sum(torch.exp(-sq / (bw * kernel_mul**k)) for k in range(kernel_num))
        nx = len(x)
        return K[:nx, :nx].mean() + K[nx:, nx:].mean() - 2 * K[:nx, nx:].mean()
