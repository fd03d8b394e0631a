"""MoNA: the virtual update, the outer losses, the meta step, and a smoke run.

    python -m pytest tests/test_mona.py -q        # CPU, offline, about 30 s
"""
import copy
import json
import math

import pytest
import torch

import common
import data
import mona
from conftest import run_script


@pytest.fixture
def setup():
    """A tiny body on the synthetic task, one target batch and one labelled source batch (tokens, labels)."""
    torch.manual_seed(0)
    args = mona.get_args(["--task", "synthetic", "--body", "tiny", "--batch_size", "8", "--inner_lr", "0.5"])
    task = data.get_task("synthetic")
    model = common.build_model(task, "tiny", target_seq_len=16)
    x, y = task.train.tensors[0][:8], task.train.tensors[1][:8]
    source = data.load_source("synthetic", model.body)
    src_tokens = data.embed_source(model.body, source.tensors[0][:8])
    return args, task, model, x, y, src_tokens, source.tensors[1][:8]


def test_virtual_update_is_one_sgd_step(setup):
    args, task, model, x, y, *_ = setup
    theta = mona.target_params(model, "all")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    theta_star, inner = mona.virtual_update(model, theta, task, x, y, inner_lr=0.3)
    # independent computation: an ordinary backward pass and torch.optim.SGD on a copy of the model
    manual = copy.deepcopy(model)
    params = [p for k, p in manual.named_parameters() if k in theta]
    loss = common.task_loss(task, manual(x), y)
    loss.backward()
    torch.optim.SGD(params, lr=0.3).step()
    assert torch.allclose(inner, loss)
    expected = dict(manual.named_parameters())
    assert set(theta_star) == set(theta) and any(k.startswith("head.") for k in theta_star)
    for k, v in theta_star.items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    # the model itself is untouched by the virtual update
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    changed = [k for k in theta if not torch.equal(theta_star[k], theta[k])]
    assert len(changed) > len(theta) // 2
    # --inner_steps 2: two SGD steps on the same batch
    theta_two, _ = mona.virtual_update(model, theta, task, x, y, inner_lr=0.3, steps=2)
    manual = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for k, p in manual.named_parameters() if k in theta], lr=0.3)
    for _ in range(2):
        optimizer.zero_grad()
        common.task_loss(task, manual(x), y).backward()
        optimizer.step()
    expected = dict(manual.named_parameters())
    assert all(torch.allclose(v, expected[k], atol=1e-5) for k, v in theta_two.items())


def test_meta_step_changes_only_the_embedder(setup):
    args, task, model, x, y, src_tokens, src_y = setup
    before = {k: v.clone() for k, v in model.named_parameters()}  # (buffers, e.g. input statistics, never train)
    optimizer = torch.optim.SGD(model.embedder.parameters(), lr=0.1)
    losses = mona.meta_step(model, optimizer, task, x, y, src_tokens, src_y, args)
    assert set(losses) >= {"inner", "outer", "align", "uniform"} and all(math.isfinite(v) for v in losses.values())
    for k, v in model.named_parameters():
        same = torch.equal(v, before[k])
        assert same != k.startswith("embedder."), f"{k} {'unchanged' if same else 'changed'}"
    assert all(p.grad is None for p in model.body.parameters())  # the body never accumulates a gradient


def test_align_uniform_formulas():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 0])
    align, uniform = mona.align_uniform(f, labels, normalize=False)
    d2 = {(i, j): float(((f[i] - f[j]) ** 2).sum()) for i in range(4) for j in range(i + 1, 4)}
    same = [d2[p] for p in [(0, 1), (0, 3), (1, 3)]]
    assert align.item() == pytest.approx(sum(same) / 3)
    assert uniform.item() == pytest.approx(math.log(sum(math.exp(-2 * v) for v in d2.values()) / 6))
    # Wang & Isola's reference code on normalised features
    g = torch.randn(10, 5)
    lab = torch.arange(10) % 3
    a, u = mona.align_uniform(g, lab, normalize=True)
    n = torch.nn.functional.normalize(g, dim=1)
    pos = [(i, j) for i in range(10) for j in range(i + 1, 10) if lab[i] == lab[j]]
    ref_align = torch.stack([(n[i] - n[j]).norm().pow(2) for i, j in pos]).mean()
    ref_uniform = torch.pdist(n, p=2).pow(2).mul(-2).exp().mean().log()
    assert torch.allclose(a, ref_align, atol=1e-5) and torch.allclose(u, ref_uniform, atol=1e-5)
    # no pair shares a label: L_align is 0; the loss pulls same-label pairs together (positive sign)
    assert mona.align_uniform(g[:3], torch.arange(3))[0].item() == 0.0 and a.item() > 0


def test_outer_gradient_flows_only_through_the_virtual_update(setup):
    args, task, model, x, y, src_tokens, src_y = setup
    phi = list(model.embedder.parameters())

    def outer_grad_norm(first_order):
        args.first_order = first_order
        _, align, uniform = mona.meta_losses(model, task, x, y, src_tokens, src_y, args)
        grads = torch.autograd.grad(align + uniform, phi, allow_unused=True)
        return sum(0.0 if g is None else g.norm().item() for g in grads)

    # the source path never calls the target embedder: any gradient must come through theta*(phi_e)
    assert outer_grad_norm(first_order=False) > 1e-6
    assert outer_grad_norm(first_order=True) == 0.0
    inner, _, _ = mona.meta_losses(model, task, x, y, src_tokens, src_y, args)  # L_inner reaches phi_e directly
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(inner, phi))
    args.first_order, args.inner_lr = False, 0.0  # alpha = 0: theta* = theta, no path either
    assert outer_grad_norm(first_order=False) == 0.0


def test_default_source_batch_has_at_most_the_target_batch_tokens():
    args = mona.get_args(["--task", "gunpoint", "--body", "tiny", "--batch_size", "20"])
    assert args.source_batch_size == -1
    assert mona.source_batch_size(args, 15, 32) == 9  # 20 x 15 target tokens hold 9 sentences of 32 tokens
    assert mona.source_batch_size(args, 64, 32) == 20  # never more samples than --batch_size
    assert mona.source_batch_size(args, 1, 512) == 2  # L_uniform needs a pair
    args.source_batch_size = 5  # an explicit value wins
    assert mona.source_batch_size(args, 15, 32) == 5
    with pytest.raises(common.UserError, match="--source_batch_size"):
        mona.get_args(["--task", "gunpoint", "--source_batch_size", "1"])


def test_embedder_epochs_zero_is_plain_finetuning(run):
    # --embedder_epochs is --meta_epochs (design.md's command line). An explicit 0 on a task with data-aware defaults
    # (GunPoint) switches stage 1 off; it must not fall back to the data-sized AUTO_META_STEPS as an unset flag does
    a, b = (mona.get_args(["--task", "gunpoint", "--body", "tiny", flag, "0"])
            for flag in ("--meta_epochs", "--embedder_epochs"))
    assert a.meta_epochs == b.meta_epochs == 0 and a.meta_steps == b.meta_steps
    assert mona.get_args(["--task", "gunpoint", "--body", "tiny"]).meta_steps == mona.AUTO_META_STEPS
    proc, final = run("mona.py", "--task", "gunpoint", "--body", "tiny", "--embedder_epochs", "0", "--max_steps", "2")
    assert final["meta_steps"] == 0 and "stage 1 skipped" in proc.stdout and "meta step" not in proc.stdout


def test_outer_lr_default_is_data_aware():
    # beta: AUTO_OUTER_LR_MULT x --lr on the data-aware tasks (chosen on the suite), ORCA's 10 x --lr on the others;
    # an explicit --outer_lr wins on both, and the data-aware choice is listed with the other chosen defaults
    auto = mona.get_args(["--task", "gunpoint", "--body", "tiny"])
    assert auto.outer_lr == pytest.approx(mona.AUTO_OUTER_LR_MULT * auto.lr) and "outer_lr" in auto.auto_flags
    assert mona.get_args(["--task", "gunpoint", "--body", "tiny", "--lr", "2e-3"]).outer_lr == pytest.approx(
        mona.AUTO_OUTER_LR_MULT * 2e-3)
    bench = mona.get_args(["--task", "synthetic", "--body", "tiny"])
    assert bench.outer_lr == pytest.approx(10 * bench.lr) and "outer_lr" not in bench.auto_flags
    for task in ("gunpoint", "synthetic"):
        explicit = mona.get_args(["--task", task, "--body", "tiny", "--outer_lr", "5e-4"])
        assert explicit.outer_lr == 5e-4 and "outer_lr" not in explicit.auto_flags
    assert mona.get_args(["--task", "synthetic", "--body", "tiny", "--outer_lr", "-1"]).outer_lr == pytest.approx(
        10 * bench.lr)


def test_smoke_run(run, tmp_path):
    proc, final = run("mona.py", "--task", "synthetic", "--body", "tiny", "--epochs", "1", "--meta_steps", "2",
                      "--distortion", "--probe_samples", "100", "--log_interval", "1")
    assert final["method"] == "mona" and final["meta_steps"] == 2 and 0 <= final["test_score"] <= 1
    assert 2 <= final["source_batch_size"] <= 16  # resolved from -1, recorded
    assert final["distortion"] == pytest.approx(final["probe_before"] - final["probe_after"])
    assert "meta step 2/2" in proc.stdout
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    stages = [r for r in records if r.get("stage") == "meta"]
    assert len(stages) == 2 and {"inner", "outer", "align", "uniform"} <= set(stages[0])
    # --embedder_ckpt reuses the stage-1 embedder and skips stage 1
    proc, final = run("mona.py", "--task", "synthetic", "--body", "tiny", "--epochs", "1",
                      "--embedder_ckpt", out / "embedder.pt", "--out_dir", tmp_path / "out2")
    assert "stage 1 skipped" in proc.stdout and final["meta_steps"] == 2
    # --probe_ckpt measures any run's checkpoint the same way: it reproduces this run's figure after fine-tuning
    # (before: the freshly built body, the pretrained one for real bodies; the tiny body is random, so no match)
    proc = run_script("mona.py", "--task", "synthetic", "--body", "tiny", "--probe_samples", "100",
                      "--data_dir", tmp_path / "data", "--probe_ckpt", out / "ckpt.pt")[0]
    probe = json.loads(proc.stdout.splitlines()[-1][len("PROBE "):])
    first = json.loads((out / "results.json").read_text())
    assert 0 <= probe["probe_before"] <= 1
    assert probe["probe_after"] == pytest.approx(first["probe_after"])
