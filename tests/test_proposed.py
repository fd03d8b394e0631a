"""Tests of proposed.py: the noise recursion's variance, the contrastive loss against a loop over the slide's formula
and at its minimiser, the weights lam_ij against numpy's correlation, the self-attention scorer, P_l against finite
differences, perturbation forwarding at sigma = 0, and subprocess smoke runs of both versions.

    python -m pytest tests/test_proposed.py -v          # CPU, offline, about 40 s
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import data
import proposed

TINY = ("--task", "synthetic", "--body", "tiny", "--epochs", "1", "--contrastive_epochs", "1", "--max_steps", "2")


def test_noise_recursion_keeps_unit_variance():
    # n = 200k samples: the sample variance of a unit Gaussian has standard error sqrt(2 / n) = 0.0032 and the sample
    # correlation about 1 / sqrt(n) = 0.0022, so 0.015 is > 4.5 standard errors (false alarm < 1e-5 per check).
    n, sigmas, T = 200_000, [0.1, 0.5, 0.9], 4
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    copies = proposed.perturb(x, sigmas, T, torch.Generator().manual_seed(1))
    assert copies.shape == (len(sigmas) * T * n, 1)
    for s, sigma in enumerate(sigmas):
        for t in range(1, T + 1):
            xt = copies[(s * T + t - 1) * n:(s * T + t) * n, 0]
            assert abs(xt.var().item() - 1) < 0.015 and abs(xt.mean().item()) < 0.015
            # the recursion (not fresh noise): corr(x^t, x^0) = (1 - sigma^2)^(t/2)
            corr = np.corrcoef(xt.numpy(), x[:, 0].numpy())[0, 1]
            assert abs(corr - (1 - sigma ** 2) ** (t / 2)) < 0.015
    assert torch.equal(proposed.perturb(x, sigmas, 0), x)  # T = 0: no augmentation


def loop_loss(z, groups, lam, kind, tau, keep=None):
    """The slide-50 formula written with plain loops, for reference."""
    z = z.double()
    M = len(z)
    cos = [[float(z[i] @ z[j] / (z[i].norm() * z[j].norm())) for j in range(M)] for i in range(M)]
    sim = {"exp": lambda c: math.exp((c - 1) / tau), "shift": lambda c: (1 + c) / 2, "relu": lambda c: max(c, 0)}[kind]
    p = [1.0] * M if keep is None else keep.tolist()
    losses = []
    for Y in sorted(set(groups.tolist())):
        members = [i for i in range(M) if groups[i] == Y]
        num = sum(p[i] * p[j] * sim(cos[i][j]) for i in members for j in members)
        den = sum(lam[i, j].item() * p[i] * p[j] * sim(cos[i][j]) for i in members for j in range(M))
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["exp", "shift", "relu"])
def test_loss_matches_formula(kind):
    g = torch.Generator().manual_seed(0)
    z, groups = torch.randn(10, 5, generator=g), torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 1, 0])
    lam = proposed.contrastive_weights(groups, torch.rand(10, 10, generator=g), eps=0.3)
    keep = torch.rand(10, generator=g)
    for p in (None, keep):
        got = proposed.contrastive_loss(proposed.similarity(z, kind, 0.4), groups, lam, p).item()
        assert got == pytest.approx(loop_loss(z, groups, lam, kind, 0.4, p), rel=1e-5)


@pytest.mark.parametrize("kind", ["exp", "shift", "relu"])
def test_loss_minimal_when_classes_coincide_and_are_orthogonal(kind):
    # Among embeddings with non-negative entries (all cosines >= 0), the loss is smallest when each class sits on one
    # point and different classes are orthogonal: numerator maximal, cross terms minimal. Any perturbation is worse.
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    best = torch.eye(3)[groups]  # (8, 3): class c on axis c
    lam = proposed.contrastive_weights(groups, torch.zeros(8, 8), eps=0.5)
    loss = lambda z: proposed.contrastive_loss(proposed.similarity(z, kind, 0.5), groups, lam).item()
    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.3, 1.0):
        for _ in range(10):
            worse = (best + scale * torch.randn(8, 3, generator=g)).abs()
            assert loss(worse) > loss(best) + 1e-6
    # spreading one class while it stays orthogonal to the others: worse for exp and shift; relu is blind to it
    # (with no cross-class similarity its ratio is 1 whatever the spread: a weakness of the slide's ratio form)
    best4, spread = torch.eye(4)[groups], torch.eye(4)[groups]
    spread[0] = torch.tensor([math.cos(0.5), 0, 0, math.sin(0.5)])
    if kind == "relu":
        assert loss(best4) == pytest.approx(0.0, abs=1e-6) and loss(spread) == pytest.approx(0.0, abs=1e-6)
    else:
        assert loss(spread) > loss(best4) + 1e-6
    # for the affine map, anti-parallel classes beat orthogonal ones (documented in docs/proposed.md)
    if kind == "shift":
        pair = torch.tensor([0, 1])
        lam2 = proposed.contrastive_weights(pair, torch.zeros(2, 2))
        anti = proposed.contrastive_loss(proposed.similarity(torch.tensor([[1.0], [-1.0]]), kind), pair, lam2)
        orth = proposed.contrastive_loss(proposed.similarity(torch.tensor([[1.0, 0], [0, 1.0]]), kind), pair, lam2)
        assert anti < orth


def test_weights_follow_formula():
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(12, 6, generator=g)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0])
    eps = 0.2
    lam = proposed.contrastive_weights(groups, proposed.label_correlation(targets, "pearson"), eps)
    rho = np.corrcoef(targets.numpy())  # independent Pearson correlation
    for i in range(12):
        for j in range(12):
            want = 1.0 if groups[i] == groups[j] else eps / (max(rho[i, j], 0) + eps)
            assert lam[i, j].item() == pytest.approx(want, rel=1e-5)
    # classification: one-hot labels of different classes are uncorrelated or negatively correlated -> lam = 1
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    lam = proposed.contrastive_weights(torch.tensor([0, 1, 2, 1]), proposed.label_correlation(onehot), eps)
    assert torch.allclose(lam, torch.ones(4, 4))


def test_attention_scorer_gives_one_score_per_patch():
    torch.manual_seed(0)
    scorer = proposed.AttentionScorer(8, attn_dim=4)
    tokens = torch.randn(3, 11, 8)
    scores = scorer(tokens)
    assert scores.shape == (3, 11)  # one score per patch
    assert torch.allclose(scores.exp().sum(1), torch.ones(3), atol=1e-5)  # a distribution over the patches
    q, k = scorer.query(tokens), scorer.key(tokens)  # attention received by patch i, mean over the 11 queries
    for b in range(3):
        A = torch.stack([torch.softmax(q[b, r] @ k[b].T / 2.0, 0) for r in range(11)])  # scale 1/sqrt(4)
        assert torch.allclose(scores[b].exp(), A.mean(0), atol=1e-6)
    # hard selection replaces exactly the k lowest-scoring target patches
    source = torch.randn(3, 6, 8)
    mixed, _, _ = proposed.replace_patches(tokens, source, scorer, 4, gumbel=False)
    for b in range(3):
        changed = {i for i in range(11) if not torch.equal(mixed[b, i], tokens[b, i])}
        assert changed == set(scores[b].argsort()[:4].tolist())


def test_keep_probability_matches_finite_differences():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3).double()
    d = torch.randn(4, 5, dtype=torch.float64)
    d_tilde = d + 1e-3 * torch.randn(4, 5, dtype=torch.float64)
    p = proposed.keep_probability(head, d, d_tilde, "classification")
    change = (head(d_tilde).softmax(-1) - head(d).softmax(-1)).norm(dim=1)  # first-order: |J (d~ - d)|
    assert torch.allclose(p, 1 - change / 3, atol=1e-5)
    # regression: C = |h(d)|, and h linear -> the JVP is exact: |W (d~ - d)| / |W d + b|
    big = d + torch.randn(4, 5, dtype=torch.float64)
    p = proposed.keep_probability(head, d, big, "regression")
    want = (1 - ((big - d) @ head.weight.T).norm(dim=1) / head(d).norm(dim=1)).clamp(0, 1)
    assert torch.allclose(p, want, atol=1e-9)
    assert torch.equal(proposed.keep_probability(head, d, d, "classification"), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("task_name", ["synthetic", "synthetic_dense_2d"])
def test_perturbation_forwarding_with_zero_sigma_is_normal_forwarding(task_name):
    task = data.get_task(task_name)
    torch.manual_seed(0)
    model = common.build_model(task, "tiny").eval()
    model.embedder = proposed.ProjectedEmbedder(model.embedder, model.body.dim)  # identity at the start
    x = task.test.tensors[0][:5]
    stats = (torch.tensor(0.3), torch.tensor(2.0))
    with torch.no_grad():
        normal = model(x)
        assert torch.allclose(proposed.PerturbedForward(model, 0.0, 4, stats)(x), normal, atol=1e-5)
        noisy = proposed.PerturbedForward(model, 0.5, 4, stats)(x)
    assert noisy.shape == normal.shape and not torch.allclose(noisy, normal, atol=1e-3)


def test_contrastive_lr_default_is_data_aware():
    # stage-1 lr: AUTO_CONTRASTIVE_LR on the data-aware tasks (chosen on the suite), the slides' 1e-3 on the others;
    # an explicit --contrastive_lr wins on both, and the data-aware choice is listed with the other chosen defaults
    auto = proposed.get_args(["--task", "gunpoint", "--body", "tiny"])
    assert auto.contrastive_lr == proposed.AUTO_CONTRASTIVE_LR != 1e-3 and "contrastive_lr" in auto.auto_flags
    bench = proposed.get_args(["--task", "synthetic", "--body", "tiny"])
    assert bench.contrastive_lr == 1e-3 and "contrastive_lr" not in bench.auto_flags
    for task in ("gunpoint", "synthetic"):
        explicit = proposed.get_args(["--task", task, "--body", "tiny", "--contrastive_lr", "5e-4"])
        assert explicit.contrastive_lr == 5e-4 and "contrastive_lr" not in explicit.auto_flags
    with pytest.raises(common.UserError, match="--contrastive_lr"):
        proposed.get_args(["--task", "synthetic", "--body", "tiny", "--contrastive_lr", "0"])


def test_smoke_version_000_and_resume(run, tmp_path):
    proc, final = run("proposed.py", *TINY)
    assert final["version"] == "000" and final["scorer"] == "attention" and 0 <= final["test_score"] <= 1
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "contrastive" and "loss" in r for r in records)  # stage-1 curve logged
    assert (out / "embedder.pt").exists()
    proc, again = run("proposed.py", *TINY, "--resume")
    assert "stage 1 skipped" in proc.stdout and again["test_score"] == final["test_score"]


def test_perturbation_forwarding_takes_the_same_test_time_translations(run, tmp_path):
    """--predict perturb with --tta: the perturbed score is averaged over the same translations as the normal one, so
    at sigma 0 (perturbation forwarding = normal forwarding) the two losses agree; without the averaging they differ."""
    flags = [*TINY, "--version", "001", "--predict", "perturb", "--perturb_sigma", "0", "--augment_shift", "0.2"]
    _, final = run("proposed.py", *flags, "--tta", "5")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tta"] == 5
    assert math.isclose(final["test_loss"], final["normal_test_loss"], rel_tol=1e-5)
    assert final["test_score"] == final["normal_test_score"]


def test_smoke_version_001_starts_a_kept_embedder_from_init_embedder(run, tmp_path):
    flags = [*TINY, "--version", "001", "--train_embedder", "linear", "--predict", "perturb"]
    # the tiny body, like a text body, has no pretrained patch embedding: keeping its random embedder is refused
    proc, final = run("proposed.py", *flags, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and final is None and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: --version 001 --train_embedder linear would keep a random embedder")
    assert "--init_embedder FILE" in lines[0]
    # a stage-1 embedder.pt as orca.py / mona.py / proposed.py 000 write it, with weights no initialisation draws
    model = common.model_for(data.get_task("synthetic"), proposed.get_args(list(TINY)))
    trained = {k: v + 1.0 for k, v in model.embedder.state_dict().items()}
    (tmp_path / "stage1").mkdir()
    path = tmp_path / "stage1" / "embedder.pt"
    torch.save({"embedder": trained, "source": "synthetic"}, path)
    proc, final = run("proposed.py", *flags, "--init_embedder", path)
    assert final["version"] == "001" and "normal_test_score" in final and final["init_embedder"] == str(path)
    assert (tmp_path / "out" / "predictor.pt").exists() and f"embedder started from {path}" in proc.stdout
    tested = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    for k, v in trained.items():  # --train_embedder linear: the loaded embedding stays as loaded
        assert torch.equal(tested[f"embedder.embedder.{k}"], v), k
    # --init_embedder with a file that holds no embedder: one line naming the flag
    torch.save({"head": {}}, tmp_path / "stage1" / "predictor.pt")
    args = proposed.get_args([*flags, "--init_embedder", str(tmp_path / "stage1" / "predictor.pt")])
    with pytest.raises(common.UserError, match="no 'embedder' entry"):
        proposed.start_embedder(model, args)
    with pytest.raises(common.UserError, match="--init_embedder .* not found"):
        proposed.start_embedder(model, proposed.get_args([*flags, "--init_embedder", str(tmp_path / "none.pt")]))
    class Crafted:  # a pickle that would run a command when loaded without weights_only
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    torch.save({"embedder": Crafted()}, tmp_path / "stage1" / "crafted.pt")
    with pytest.raises(common.UserError, match="refused"):
        proposed.start_embedder(model, proposed.get_args([*flags, "--init_embedder",
                                                          str(tmp_path / "stage1" / "crafted.pt")]))
    assert not (tmp_path / "ran").exists()
    with pytest.raises(common.UserError, match="--version 000 loads its own"):
        proposed.get_args([*TINY, "--init_embedder", str(path)])
