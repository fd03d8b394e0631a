"""Tests of pare.py: the vectorised patch replacement against a per-sample reference, the k / lam formulas, the gate's
gradient in each phase, deterministic source pairing, smoke + resume runs, and `--replace off` == finetune.py.

    python -m pytest tests/test_pare.py -v          # CPU, offline, about 40 s
"""
import json

import pytest
import torch

import common
import data
import pare

TINY = ("--task", "synthetic", "--body", "tiny", "--epochs", "2")


def gate_with(weight):
    gate = pare.Gate(weight.numel())
    with torch.no_grad():
        gate.fc.weight.copy_(weight[None])
        gate.fc.bias.zero_()
    return gate


def tokens(B=4, N=12, T=7, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.randn(B, T, D, generator=g), torch.randn(D, generator=g)


@pytest.mark.parametrize("gumbel", [False, True])
def test_replacement_against_per_sample_reference(gumbel):
    target, source, w = tokens()
    gate, k = gate_with(w), 5
    torch.manual_seed(1)
    mixed, replaced, taken = pare.replace_patches(target, source, gate, k, tau=0.9, gumbel=gumbel)
    for b in range(len(target)):
        changed = [i for i in range(target.shape[1]) if not torch.equal(mixed[b, i], target[b, i])]
        assert changed == replaced[b].tolist() and len(changed) == k  # exactly k replaced, nothing else moved
        kept = [i for i in range(target.shape[1]) if i not in changed]
        assert torch.equal(mixed[b, kept], target[b, kept])  # kept patches keep their positions and values
        # the j-th taken source patch (ascending position) sits in the j-th replaced target position
        assert taken[b].tolist() == sorted(taken[b].tolist()) and len(set(taken[b].tolist())) == k
        assert torch.equal(mixed[b, changed], source[b, taken[b]])
        if not gumbel:  # phase B: bottom-k target scores out, top-k source scores in (an independent sort)
            s_tar, s_src = (target[b] @ w).tolist(), (source[b] @ w).tolist()
            assert changed == sorted(sorted(range(len(s_tar)), key=s_tar.__getitem__)[:k])
            assert taken[b].tolist() == sorted(sorted(range(len(s_src)), key=lambda i: -s_src[i])[:k])


def test_gumbel_selection_is_topk_of_perturbed_scores():
    scores = torch.rand(3, 20)
    torch.manual_seed(5)
    idx, mask = pare.select(scores, 6, tau=0.9, gumbel=True, largest=False)
    torch.manual_seed(5)
    gumbel = -torch.log(torch.empty_like(scores).exponential_())  # the same draws, Gumbel(0, 1)
    expected = torch.argsort((scores + gumbel) / 0.9, dim=1)[:, :6].sort(dim=1).values
    assert torch.equal(idx, expected)
    assert torch.equal(mask, torch.zeros_like(mask).scatter(1, expected, 1.0))  # exactly 0/1 forward
    assert mask.sum(1).tolist() == [6.0] * 3


def test_gate_gets_gradient_only_in_phase_a():
    target, source, w = tokens()
    target.requires_grad_(True)
    for gumbel in (True, False):
        gate = gate_with(w)
        mixed, _, _ = pare.replace_patches(target, source, gate, 5, gumbel=gumbel)
        (mixed * torch.randn_like(mixed)).sum().backward()
        grad = gate.fc.weight.grad
        if gumbel:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None or grad.abs().sum() == 0
        assert target.grad.abs().sum() > 0  # kept target tokens always pass gradient back to the embedder
        target.grad = None


def test_k_schedule_and_lambda_match_formulas():
    # 2D config (cifar100_PaRe.yaml): begin_num 2000, end_num 1500, 60 epochs: int(begin - end * (e / E))
    assert [pare.k_schedule(e, 60, 2000, 500) for e in range(60)] == [int(2000 - 1500 * (e / 60)) for e in range(60)]
    # 1D (main_PaRe_1d.py): int(seq_num - seq_num * (e / E)) = the paper's k0 (1 - e/E)
    assert [pare.k_schedule(e, 15, 32, 0) for e in range(15)] == [int(32 - 32 * (e / 15)) for e in range(15)]
    assert pare.k_schedule(0, 10, 40, 0) == 40 and pare.k_schedule(5, 10, 40, 0) == 20
    assert pare.mix_lambda(2000, 3136, 2000) == 2000 / 3136 and pare.mix_lambda(16, 50, 32, "k0") == 0.5


def test_resolve_defaults_and_clear_errors():
    args = pare.get_args(["--task", "satellite"])  # a benchmark task: the official phase A of 5 epochs (1D)
    task = data.get_task("synthetic")  # 1D classification
    assert pare.resolve(args, task, 50, 32) == (32, 0)  # 0.64 * 50 = 32
    assert args.mix_weight == 0.1 and args.gumbel_epochs == 5
    args = pare.get_args(["--task", "digits", "--k0", "0.64", "--k_end", "4"])
    assert pare.resolve(args, data.get_task("synthetic_dense_2d"), 64, 16) == (16, 4)  # fraction capped at T = 16
    # dense w; a data-aware task's phase A is the first 10 % of its epochs
    assert args.mix_weight == 0.3 and args.gumbel_epochs == max(1, round(0.1 * args.epochs))
    with pytest.raises(common.UserError, match="only 16 patches"):
        pare.resolve(pare.get_args(["--k0", "20"]), task, 64, 16)
    with pytest.raises(common.UserError, match="k must decay"):
        pare.resolve(pare.get_args(["--k0", "4", "--k_end", "8"]), task, 64, 16)


def test_source_batches_depend_only_on_seed_epoch_index():
    ds = data.load_source("synthetic", None)  # 200 samples
    sources = pare.SourceBatches(ds, 16, seed=0)
    x1, y1 = sources(3, 2)
    assert torch.equal(sources(3, 2)[0], x1) and not torch.equal(sources(4, 2)[0], x1)
    rows = torch.cat([sources(0, i)[1] for i in range(13)])  # one pass of ceil(200 / 16) = 13 batches
    assert len(rows) == 200 and sorted(rows.tolist()) == sorted(ds.tensors[1].tolist())
    assert len(sources(0, 12)[0]) == 8 and not torch.equal(sources(0, 13)[0], sources(0, 0)[0])  # a new pass


@pytest.mark.parametrize("task_name", ["synthetic", "synthetic_2d", "synthetic_dense", "synthetic_dense_2d"])
def test_compute_hook_on_every_task_type(task_name):
    common.seed_everything(0)
    task = data.get_task(task_name)
    model = pare.attach_pare_modules(common.build_model(task, "tiny", True, 512), 4)
    args = pare.get_args(["--task", task_name, "--body", "tiny", "--gumbel_epochs", "1", "--epochs", "4"])
    k0, k_end = pare.resolve(args, task, model.embedder.num_tokens, 16)
    compute = pare.make_compute(task, pare.SourceBatches(data.load_source("synthetic", None), 8, 0), args, k0, k_end,
                                "cpu")
    x, y = task.train.tensors[0][:8], task.train.tensors[1][:8]
    for epoch in (0, 1):  # phase A, then phase B
        model.zero_grad(set_to_none=True)
        loss, logs = compute(model, x, y, epoch)
        loss.backward()
        assert logs["k"] == pare.k_schedule(epoch, 4, k0, k_end) and {"loss_tar", "loss_src"} <= logs.keys()
        plain = common.task_loss(task, model(x), y)
        w, lam = args.mix_weight, logs["lam"]
        assert loss.item() == pytest.approx(plain.item() + w * ((1 - lam) * logs["loss_tar"] + lam * logs["loss_src"]),
                                            rel=1e-5)
        gate_grad = model.gate.fc.weight.grad
        assert (gate_grad is not None and gate_grad.abs().sum() > 0) == (epoch == 0)
        assert model.source_head.linear.weight.grad.abs().sum() > 0


def test_smoke_and_resume(run, tmp_path):
    proc, final = run("pare.py", *TINY)
    assert final["method"] == "pare" and final["replace"] == "on" and final["k0"] == 16
    assert final["source"] == "synthetic"
    assert "k per epoch [16, 8]" in proc.stdout and proc.stdout.splitlines()[-1].startswith("FINAL ")
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any("loss_src" in r for r in records)
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["model"]
    assert "gate.fc.weight" in state and "source_head.linear.weight" in state  # saved with the model
    # a run stopped after epoch 0, then resumed, ends exactly as the uninterrupted one
    run("pare.py", *TINY, "--max_steps", "6", "--out_dir", tmp_path / "cut")
    proc, resumed = run("pare.py", *TINY, "--resume", "--out_dir", tmp_path / "cut")
    assert "resumed from" in proc.stdout
    assert resumed["test_loss"] == final["test_loss"] and resumed["val_score"] == final["val_score"]


def test_replace_off_is_plain_finetuning(run, tmp_path):
    _, plain = run("finetune.py", *TINY, "--out_dir", tmp_path / "ft")
    proc, off = run("pare.py", *TINY, "--replace", "off", "--out_dir", tmp_path / "off")
    assert "plain fine-tuning" in proc.stdout and off["replace"] == "off"
    assert off["test_loss"] == plain["test_loss"] and off["val_score"] == plain["val_score"]
    losses = [[r.get("loss") for r in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())]
              for d in ("ft", "off")]
    assert losses[0] == losses[1]
