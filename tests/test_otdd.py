"""Tests of otdd.py against independent computations (numpy Sinkhorn, scipy LP, closed forms) and invariants.

Run: python -m pytest tests/test_otdd.py -q
"""
import os
import sys

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.optimize import linprog

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import otdd  # noqa: E402

TIGHT = dict(tol=1e-11, max_iter=5000)  # float64 solves run to machine precision
TIGHT_OTDD = dict(TIGHT, label_tol=1e-11)
# Small eps makes Sinkhorn crawl on low-dimensional sets that overlap (e.g. x against itself); these tests use
# eps ~ the squared spacing of their points, the realistic high-dimensional regime is covered by bench.py otdd.


def points(n, d=3, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def logsumexp(z, axis):
    z_max = z.max(axis=axis, keepdims=True)
    return (z_max + np.log(np.exp(z - z_max).sum(axis=axis, keepdims=True))).squeeze(axis)


def numpy_ot(x, y, a, b, eps, iters=50000, scale=0.5):
    """Independent reference: dense, non-batched log-domain Sinkhorn in numpy float64, no eps-scaling, cost
    scale * ||x - y||^2 (0.5: the feature cost c; 1: the label-distance cost of the official pwdist_exact). Plain
    alternating updates, except x against itself, where those crawl and the averaged update is used."""
    C = scale * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    f, g = np.zeros(len(x)), np.zeros(len(y))
    for _ in range(iters):
        f_old, g_old = f, g
        if x is y:
            f = g = 0.5 * (f - eps * logsumexp(np.log(a)[None, :] + (f[None, :] - C) / eps, axis=1))
        else:
            f = -eps * logsumexp(np.log(b)[None, :] + (g[None, :] - C) / eps, axis=1)
            g = -eps * logsumexp(np.log(a)[:, None] + (f[:, None] - C) / eps, axis=0)
        if max(np.abs(f - f_old).max(), np.abs(g - g_old).max()) < 1e-14 * (1 + np.abs(C).max()):
            break  # a fixed point to rounding (far-apart sets need ~10^4 plain iterations at small eps / cost)
    return a @ f + b @ g


def test_sinkhorn_divergence_matches_numpy_reference():
    x, y = points(7, seed=1), points(9, seed=2, shift=0.5)
    a = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    a, b = a / a.sum(), torch.full((9,), 1 / 9, dtype=torch.float64)
    eps = 0.5
    X, Y, A, B = x.numpy(), y.numpy(), a.numpy(), b.numpy()
    ref = numpy_ot(X, Y, A, B, eps) - 0.5 * numpy_ot(X, X, A, A, eps) - 0.5 * numpy_ot(Y, Y, B, B, eps)
    assert otdd.sinkhorn_divergence(x, y, a, b, eps=eps, **TIGHT).item() == pytest.approx(ref, rel=1e-9)
    # float32 with the default stopping rule
    assert otdd.sinkhorn_divergence(x.float(), y.float(), a, b, eps=eps).item() == pytest.approx(ref, rel=1e-4)


def test_sinkhorn_approaches_exact_lp_as_eps_vanishes():
    x, y = points(6, d=2, seed=4), points(7, d=2, seed=5)
    C = 0.5 * torch.cdist(x, y) ** 2
    a, b = np.full(6, 1 / 6), np.full(7, 1 / 7)
    # exact OT: min <P, C> s.t. P 1 = a, P^T 1 = b, P >= 0
    eq = np.vstack([np.kron(np.eye(6), np.ones(7)), np.kron(np.ones(6), np.eye(7))])
    lp = linprog(C.numpy().ravel(), A_eq=eq, b_eq=np.concatenate([a, b]), bounds=(0, None))
    eps = 1e-3
    ot = otdd.sinkhorn(C[None], torch.tensor(a)[None], torch.tensor(b)[None], eps=eps, **TIGHT).item()
    # 0 <= OT_eps - OT_0 <= eps * log(6 * 7) (the entropy term is bounded by the log of the support size)
    assert lp.fun - 1e-9 <= ot <= lp.fun + eps * np.log(42)


def test_translation_closed_form():
    # c(x, y + t) = c(x, y) - <x - y, t> + |t|^2 / 2 and the middle term is separable, so S_eps(x, x + t) = |t|^2 / 2
    x, t = points(12, seed=6), torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    for eps in [1.0, 0.2]:
        value = otdd.sinkhorn_divergence(x, x + t, eps=eps, **TIGHT).item()
        assert value == pytest.approx(0.5 * t.dot(t).item(), rel=1e-9)


def test_invariants():
    x, y = points(10, seed=7), points(8, seed=8, shift=1.0)
    s_xy = otdd.sinkhorn_divergence(x, y, eps=0.5, **TIGHT)
    assert otdd.sinkhorn_divergence(x, x, eps=0.5, **TIGHT).abs().item() < 1e-10
    assert otdd.sinkhorn_divergence(y, x, eps=0.5, **TIGHT).item() == pytest.approx(s_xy.item(), rel=1e-9)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert otdd.sinkhorn_divergence(x[perm], y, eps=0.5, **TIGHT).item() == pytest.approx(s_xy.item(), rel=1e-9)


def test_batched_solve_equals_one_by_one_with_padding():
    sets = [(points(n, seed=10 + n), points(m, seed=20 + m, shift=0.3)) for n, m in [(5, 9), (8, 4), (3, 6)]]
    X, Y = torch.zeros(3, 8, 3, dtype=torch.float64), torch.zeros(3, 9, 3, dtype=torch.float64)
    A, B = torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3, 9, dtype=torch.float64)
    for k, (x, y) in enumerate(sets):
        X[k, : len(x)], Y[k, : len(y)] = x, y
        A[k, : len(x)], B[k, : len(y)] = 1 / len(x), 1 / len(y)
    batched = otdd.sinkhorn_divergence(X, Y, A, B, eps=0.2, **TIGHT)
    singles = torch.stack([otdd.sinkhorn_divergence(x, y, eps=0.2, **TIGHT) for x, y in sets])
    torch.testing.assert_close(batched, singles, rtol=1e-9, atol=1e-12)


def test_gradcheck_wrt_target_points():
    x = points(4, d=2, seed=30)
    y = points(5, d=2, seed=31, shift=0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda y: otdd.sinkhorn_divergence(x, y, eps=0.5, **TIGHT), (y,), atol=1e-7)


def labelled(n_per_class, n_classes, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return torch.randn(len(y), d, generator=g, dtype=torch.float64) + 2.0 * y[:, None], y


def numpy_label_distance(p, q, eps):
    """W(p, q) as the official pwdist_exact defines it: the debiased Sinkhorn divergence between two classes under the
    *unhalved* cost ||x - x'||^2 (geomloss squared_distances), computed by the numpy reference."""
    a, b = np.full(len(p), 1 / len(p)), np.full(len(q), 1 / len(q))
    return (numpy_ot(p, q, a, b, eps, scale=1.0) - 0.5 * numpy_ot(p, p, a, a, eps, scale=1.0)
            - 0.5 * numpy_ot(q, q, b, b, eps, scale=1.0))


def test_label_distances_use_the_unhalved_cost():
    # a label distance under the halved cost 1/2 ||x - x'||^2 is about half of these (it equals W at eps / 2, halved)
    x_s, y_s = labelled(6, 3, seed=42)
    dist = otdd.OTDD(x_s, y_s, eps=0.5, **TIGHT_OTDD)
    for i in range(3):
        for j in range(3):
            ref = 0.0 if i == j else numpy_label_distance(x_s[y_s == i].numpy(), x_s[y_s == j].numpy(), 0.5)
            assert dist.W_ss[i, j].item() == pytest.approx(ref, rel=1e-8, abs=1e-12)


def test_otdd_matches_its_definition():
    """Rebuild OTDD from independent pieces: W per class pair from the numpy reference (unhalved cost), then the
    outer S_eps with labels appended and the augmented cost 1/2 ||x - x'||^2 + 1/2 W."""
    x_s, y_s = labelled(6, 3, seed=40)
    x_t, y_t = labelled(5, 2, seed=41)
    groups = [x_s[y_s == c] for c in range(3)] + [x_t[y_t == c] for c in range(2)]
    W = torch.tensor([[numpy_label_distance(p.numpy(), q.numpy(), 0.5) if i != j else 0.0
                       for j, q in enumerate(groups)] for i, p in enumerate(groups)], dtype=torch.float64)

    def cost(z1, z2):
        lab = W[z1[..., -1].long()[:, :, None], z2[..., -1].long()[:, None, :]]
        return otdd.half_sq_dist(z1[..., :-1], z2[..., :-1]) + 0.5 * lab

    x_t_ref, x_t_ours = x_t.clone().requires_grad_(), x_t.clone().requires_grad_()
    z_s = torch.cat([x_s, y_s[:, None].double()], 1)
    z_t = torch.cat([x_t_ref, 3 + y_t[:, None].double()], 1)
    ref = otdd.sinkhorn_divergence(z_s, z_t, eps=0.5, cost=cost, **TIGHT)
    ours = otdd.otdd(x_s, y_s, x_t_ours, y_t, eps=0.5, **TIGHT_OTDD)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-8)
    # gradients flow through the feature cost only (W is a constant, as in the official code)
    ref.backward()
    ours.backward()
    torch.testing.assert_close(x_t_ours.grad, x_t_ref.grad, rtol=1e-7, atol=1e-10)


def test_otdd_object_function_and_self_distance():
    x_s, y_s = labelled(7, 3, seed=50)
    x_t = points(9, seed=51, shift=1.0)
    dist = otdd.OTDD(x_s, y_s, eps=0.5, **TIGHT_OTDD)
    assert dist(x_t).item() == pytest.approx(otdd.otdd(x_s, y_s, x_t, eps=0.5, **TIGHT_OTDD).item(), rel=1e-12)
    assert dist(x_t, torch.zeros(9)).item() == pytest.approx(dist(x_t).item(), rel=1e-12)  # dummy label = None
    # eps=2 (the label distances' unhalved cost makes it 1 for them): see TIGHT's comment
    assert abs(otdd.OTDD(x_s, y_s, eps=2.0, **TIGHT_OTDD)(x_s, y_s).item()) < 1e-12
    # float32 source, bfloat16 target under autocast: computed in float32, still differentiable
    dist32, x_t16 = otdd.OTDD(x_s.float(), y_s, eps=0.5), x_t.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = dist32(x_t16)
    value.backward()
    assert value.dtype == torch.float32 and x_t16.grad is not None
    assert value.item() == pytest.approx(dist(x_t.bfloat16().double()).item(), rel=1e-3)  # default tolerances


def test_one_target_label_leaves_the_gradient_of_the_feature_divergence():
    # ORCA gives every target point one label: the label term then depends on the source point alone, a shift of each
    # row of the cost that leaves the plan, hence the gradient, of the plain feature divergence (W scales drop out)
    x_s, y_s = labelled(6, 3, seed=43)
    x1, x2 = points(7, seed=44, shift=1.0).requires_grad_(), points(7, seed=44, shift=1.0).requires_grad_()
    otdd.otdd(x_s, y_s, x1, eps=1.0, **TIGHT_OTDD).backward()
    otdd.sinkhorn_divergence(x_s, x2, eps=1.0, **TIGHT).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-10)


def test_gaussian_label_distance_matches_sqrtm():
    x_s, y_s = labelled(6, 2, d=8, seed=60)  # 6 points in 8-D: rank-deficient covariances
    dist = otdd.OTDD(x_s, y_s, label_distance="gaussian")
    p, q = x_s[y_s == 0].numpy(), x_s[y_s == 1].numpy()
    S1, S2 = np.cov(p.T), np.cov(q.T)
    r1 = sqrtm(S1).real
    w2 = ((p.mean(0) - q.mean(0)) ** 2).sum() + np.trace(S1 + S2 - 2 * sqrtm(r1 @ S2 @ r1).real)
    # W2^2 itself (official wasserstein_gauss_distance, squared=True); the augmented cost then adds W / 2
    assert dist.W_ss[0, 1].item() == pytest.approx(w2, rel=1e-6)
    assert torch.isfinite(dist(points(5, d=8, seed=61))).item()


def test_mmd_matches_double_loop():
    x, y = points(5, seed=70), points(5, seed=71, shift=0.7)
    z = torch.cat([x, y]).numpy()
    d2 = np.array([[((u - v) ** 2).sum() for v in z] for u in z])
    bw = d2.sum() / (10 * 10 - 10) / 2**2
    k = lambda u, v: sum(np.exp(-((u - v) ** 2).sum() / (bw * 2**i)) for i in range(5))  # noqa: E731
    total = 0.0
    for i in range(5):
        for j in range(5):
            total += k(z[i], z[j]) + k(z[5 + i], z[5 + j]) - k(z[i], z[5 + j]) - k(z[5 + i], z[j])
    assert otdd.mmd(x, y).item() == pytest.approx(total / 25, rel=1e-10)


def test_bad_inputs_raise_one_clear_error():
    x_s, y_s = labelled(4, 2, seed=80)
    with pytest.raises(ValueError, match="has 1 point"):
        otdd.OTDD(x_s[:5], y_s[:5])  # class 1 has a single point
    with pytest.raises(ValueError, match="empty"):
        otdd.sinkhorn_divergence(x_s[:0], x_s)
    with pytest.raises(ValueError, match="NaN or inf"):
        otdd.otdd(x_s, y_s, torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="features"):
        otdd.OTDD(x_s, y_s)(points(4, d=5))
    with pytest.raises(ValueError, match="one label per row"):
        otdd.OTDD(x_s, y_s[:-1])
    with pytest.raises(ValueError, match="label_distance"):
        otdd.OTDD(x_s, y_s, label_distance="bures")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    x_s, y_s = labelled(20, 3, d=16, seed=90)
    x_t = points(30, d=16, seed=91).float()
    cpu = otdd.otdd(x_s.float(), y_s, x_t)
    gpu = otdd.otdd(x_s.float().cuda(), y_s.cuda(), x_t.cuda())
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)


def test_overrelaxation_falls_back_instead_of_diverging():
    # w = 1.99 oscillates with growing amplitude on these problems (without the fallback every value is NaN); each
    # problem must still end at the converged value, as plain Sinkhorn (w = 1) in float64 gives it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 40, 8, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]
    y = torch.randn(4, 30, 8, generator=g) * 2 + 1
    a, b = torch.full((4, 40), 1 / 40), torch.full((4, 30), 1 / 30)
    C = otdd.half_sq_dist(x, y)
    value = otdd.sinkhorn(C, a, b, eps=0.1, tol=1e-3, overrelax=1.99)
    ref = otdd.sinkhorn(C.double(), a.double(), b.double(), eps=0.1, tol=1e-6, overrelax=1.0, max_iter=50000)
    torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=0)
