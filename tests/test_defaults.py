"""Any length and any size through the embedders, the data-aware defaults of offline and custom tasks, the
fine-tuning modes (full / norms / lora), input standardisation and checkpoint selection, and the suite's 1-NN.

    python -m pytest tests/test_defaults.py -q
"""
import itertools
import json
import unittest.mock

import numpy as np
import pytest
import torch

import bench
import common
import data
import models

TINY = common.build_body("tiny")


# ---- any length, any size ------------------------------------------------------------------------------------
@pytest.mark.parametrize("length,budget", [(151, 64), (1, 64), (7, 64), (997, 16), (150, 19), (2000, 32)])
def test_1d_embedder_takes_any_length(length, budget):
    emb = common.Embedder1D(2, length, 64, budget, TINY)
    tokens = emb(torch.randn(3, 2, length))
    n = tokens.shape[1]
    assert n == emb.num_tokens <= budget and emb.stride * n >= length > emb.stride * (n - 1)
    # close to the requested number of tokens: at least about half of it (a prime length no longer collapses)
    assert n >= min(length, budget) / 2 - 1
    dense = common.DenseHead1D(3, emb.stride, length)
    assert dense(torch.randn(3, n, 64)).shape == (3, 3, length)  # the dense head crops back to the input length


def test_prime_length_used_to_collapse_and_now_pads():
    assert common.stack_num(151, 64) == 151  # ORCA's divisor rule: one token
    emb = common.Embedder1D(1, 151, 64, 64, TINY)
    assert (emb.stride, emb.num_tokens, emb.pad) == (3, 51, 2)
    x = torch.randn(2, 1, 151)
    # the padding is zeros on the right: the last token sees x[..., 150] and two zeros
    manual = emb.conv(torch.nn.functional.pad(x, (0, 2)))[..., -1]
    assert torch.allclose(emb.conv(torch.cat([x, torch.zeros(2, 1, 2)], -1))[..., -1], manual)


@pytest.mark.parametrize("length,budget,k", [(150, 10, 2), (151, 64, 2), (1, 64, 2), (7, 3, 3), (2000, 64, 2)])
def test_overlapping_patches_keep_the_token_count_and_centre_each_window(length, budget, k):
    """--kernel_mult K: token t is the conv of the K strides of zero-padded input centred on its own stride
    [t s - (K-1) s // 2, ...), a direct loop over the windows; the count of tokens and strides is that of K = 1."""
    torch.manual_seed(0)
    one = common.Embedder1D(2, length, 64, budget, TINY)
    emb = common.Embedder1D(2, length, 64, budget, TINY, kernel_mult=k)
    assert (emb.stride, emb.num_tokens) == (one.stride, one.num_tokens) and emb.conv.kernel_size == (k * emb.stride,)
    x = torch.randn(3, 2, length)
    s, left = emb.stride, (k - 1) * emb.stride // 2
    padded = torch.zeros(3, 2, left + emb.num_tokens * s + (k - 1) * s)
    padded[..., left:left + length] = x
    want = torch.stack([torch.einsum("bcl,dcl->bd", padded[..., t * s:t * s + k * s], emb.conv.weight) + emb.conv.bias
                        for t in range(emb.num_tokens)], 1)
    assert torch.allclose(emb(x), emb.norm(want) + emb.pos, atol=1e-5)
    dense = common.DenseHead1D(3, emb.stride, length)  # a dense head still crops back to the input length
    assert dense(torch.randn(3, emb.num_tokens, 64)).shape == (3, 3, length)


@pytest.mark.parametrize("hw,k", [((28, 28), 2), ((8, 8), 2), ((13, 7), 3)])
def test_overlapping_image_patches(hw, k):
    torch.manual_seed(0)
    one = common.Embedder2D(1, hw, 64, 32, TINY)
    emb = common.Embedder2D(1, hw, 64, 32, TINY, kernel_mult=k)
    assert (emb.grid, emb.size, emb.num_tokens) == (one.grid, one.size, one.num_tokens)
    x = torch.randn(2, 1, *hw)
    p, e = emb.size[0] // emb.grid[0], emb.extra
    right, bottom = emb.size[1] - hw[1] + e - e // 2, emb.size[0] - hw[0] + e - e // 2
    padded = torch.nn.functional.pad(x, (e // 2, right, e // 2, bottom))
    want = torch.stack([torch.einsum("bchw,dchw->bd", padded[..., i * p:i * p + k * p, j * p:j * p + k * p],
                                     emb.conv.weight) + emb.conv.bias
                        for i in range(emb.grid[0]) for j in range(emb.grid[1])], 1)
    assert torch.allclose(emb(x), emb.norm(want) + emb.pos, atol=1e-5)


@pytest.mark.parametrize("length,budget,official", [(1000, 64, 20), (1000, 512, 2), (46, 512, 1), (1024, 128, 8),
                                                     (1024, 512, 2), (1024, 32, 32), (128, 256, 1), (3072, 128, 24)])
def test_official_stride_kept_where_it_divides(length, budget, official):
    """NAS-Bench-360 (ECG 1000 @ 64, DeepSEA 1000 @ 512, Satellite 46) and PDEBench lengths keep ORCA's stride."""
    assert common.stack_num(length, budget) == official == common.patch_stride(length, budget)
    assert common.Embedder1D(1, length, 64, budget, TINY).pad == 0


@pytest.mark.parametrize("hw", [(13, 7), (1, 1), (28, 28), (5, 30)])
def test_2d_embedder_pads_and_dense_head_crops(hw):
    task = data.make_task("t", "dense", "nrmse", "nrmse", np.random.randn(6, 2, *hw).astype(np.float32),
                          np.random.randn(6, 1, *hw).astype(np.float32), np.random.randn(4, 2, *hw).astype(np.float32),
                          np.random.randn(4, 1, *hw).astype(np.float32))
    model = common.build_model(task, "tiny", target_seq_len=16, body=common.build_body("tiny"))
    x = task.train.tensors[0][:3]
    assert model.embed(x).shape[1] <= 16 and model(x).shape == (3, 1, *hw)
    # zero padding, not resizing: changing a pixel changes only the tokens of its own patch
    x2 = x.clone()
    x2[..., 0, 0] += 1
    changed = (model.embed(x2) - model.embed(x)).abs().sum((0, 2)) > 1e-6
    assert changed.sum() == 1


# ---- input standardisation -----------------------------------------------------------------------------------
def test_channel_norm_uses_training_statistics_and_is_saved():
    x = np.random.randn(40, 3, 20).astype(np.float32) * np.array([1, 10, 100], np.float32)[:, None] + 5
    y = np.arange(40) % 2
    task = data.make_task("t", "classification", "ce", "error", x, y, x[:10], y[:10])
    model = common.build_model(task, "tiny", target_seq_len=8, input_norm="channel")
    z = model.embedder.input_norm(task.train.tensors[0])
    assert torch.allclose(z.mean((0, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std((0, 2), unbiased=False), torch.ones(3), atol=1e-3)
    state = model.state_dict()
    assert "embedder.input_norm.mean" in state and "embedder.input_norm.std" in state
    other = common.build_model(task, "tiny", target_seq_len=8, input_norm="channel")
    other.embedder.input_norm.mean.zero_()
    other.load_state_dict(state)  # a checkpoint brings the training statistics back
    assert torch.equal(other.embedder.input_norm.mean, model.embedder.input_norm.mean)
    inst = common.InputNorm(3, 1, "instance")(torch.as_tensor(x[:4]))
    assert torch.allclose(inst.mean(-1), torch.zeros(4, 3), atol=1e-4)


# ---- data-aware defaults -------------------------------------------------------------------------------------
def _custom(tmp_path, n=60, length=151, channels=1, classes=3):
    rng = np.random.RandomState(0)
    y = np.arange(n) % classes
    x = (rng.randn(n, channels, length) + y[:, None, None]).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    return path


def test_auto_defaults_from_the_data(tmp_path):
    task = data.get_task("custom", data_path=_custom(tmp_path))
    d = common.auto_defaults(task)
    assert len(task.val) == 0 and d["select"] == "last"  # 6 validation samples would be noise: none is carved
    assert common.Embedder1D(1, 151, 64, d["target_seq_len"]).stride >= 16  # >= 16 values per token
    assert d["target_seq_len"] <= 32 and d["batch_size"] == 8 and d["input_norm"] == "channel"
    steps = d["epochs"] * -(-len(task.train) // d["batch_size"])
    assert common.AUTO_STEPS <= steps < common.AUTO_STEPS + len(task.train)  # a step budget, not an epoch count
    big = data.get_task("digits")
    assert common.auto_defaults(big)["select"] == "best" and len(big.val) >= 50
    assert common.auto_defaults(big)["target_seq_len"] == 4  # 8x8 images: 4x4 patches (16 values)
    assert common.auto_defaults(big)["epochs"] == common.AUTO_MIN_EPOCHS  # 36 steps an epoch: 300 steps = 9 epochs
    huge = data.make_task("huge", "classification", "ce", "error", np.zeros((64_000, 1, 8), np.float32),
                          np.arange(64_000) % 2, np.zeros((8, 1, 8), np.float32), np.arange(8) % 2)
    assert common.auto_defaults(huge)["epochs"] == 1  # 2000 steps an epoch: the 1000-step cap, in whole epochs
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    long = data.make_task("long", "classification", "ce", "error", z(8, 1, 2000), np.arange(8) % 2, z(4, 1, 2000),
                          np.arange(4) % 2)
    tokens = common.auto_defaults(long)["target_seq_len"]  # a long series (PigCVP's length): up to 64 tokens
    assert tokens == 63 and common.Embedder1D(1, 2000, 64, tokens).stride == 40  # the divisor rule: 50 of 40 samples
    image = data.make_task("image", "classification", "ce", "error", z(8, 1, 28, 28), np.arange(8) % 2,
                           z(4, 1, 28, 28), np.arange(4) % 2)
    assert common.auto_defaults(image)["target_seq_len"] == 25  # an image keeps at most 32 tokens: 6x6 patches
    # overlapping patches: 3 strides wide, but never wider than the input's side (docs/finetune.md, "Overlapping
    # patches"), counted in the embedder's own stride: a long series and a 28x28 image (6-pixel strides, 18-pixel
    # patches) get 3, digits' 8x8 images with their 4x4 strides get 2 (a patch of 8 pixels); a series of 40 samples
    # (3 tokens, the divisor stride 20) gets 2, one of 50 (4 tokens, stride 25) 2, one of 31 (stride 31) 1
    assert common.auto_defaults(long)["kernel_mult"] == common.auto_defaults(image)["kernel_mult"] == 3
    assert common.auto_defaults(big)["kernel_mult"] == 2
    for length, k in (40, 2), (31, 1), (20, 2), (1, 1), (48, 3), (50, 2), (150, 3):
        short = data.make_task("short", "classification", "ce", "error", z(8, 1, length), np.arange(8) % 2,
                               z(4, 1, length), np.arange(4) % 2)
        auto = common.auto_defaults(short)
        assert auto["kernel_mult"] == k, length
        stride = common.Embedder1D(1, length, 8, auto["target_seq_len"]).stride
        assert k == 1 or k * stride <= length, (length, stride)  # the patch the embedder builds fits the series
    wide = data.make_task("wide", "classification", "ce", "error", z(8, 1, 8, 64), np.arange(8) % 2,
                          z(4, 1, 8, 64), np.arange(4) % 2)  # 2 x 16 tokens of 4x4: the short side bounds the patch
    assert common.auto_defaults(wide)["kernel_mult"] == 2 and common.auto_defaults(wide)["target_seq_len"] == 32
    for hw in (1, 1), (2, 2):  # an image smaller than the least patch side (4 at one channel): one token, K = 1
        tiny = data.make_task("tiny", "classification", "ce", "error", z(8, 1, *hw), np.arange(8) % 2, z(4, 1, *hw),
                              np.arange(4) % 2)
        assert common.auto_defaults(tiny)["target_seq_len"] == 1 and common.auto_defaults(tiny)["kernel_mult"] == 1


# ---- augmentation ---------------------------------------------------------------------------------------------
def test_augment_matches_a_direct_loop():
    """A translation by s moves value t to t + s, the edge value fills what comes in; then the gain multiplies."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(3, 2, 11, generator=g), torch.randn(2, 3, 5, 7, generator=g)
    d1 = torch.tensor([[3., 1.5], [-4., 1.], [0., 0.]])
    d2 = torch.tensor([[1., -2., 0.5], [-6., 9., 1.]])
    want1 = torch.zeros_like(x1)
    for b in range(3):
        for t in range(11):
            want1[b, :, t] = x1[b, :, min(max(t - int(d1[b, 0]), 0), 10)] * d1[b, 1]
    want2 = torch.zeros_like(x2)
    for b in range(2):
        for i in range(5):
            for j in range(7):
                src = x2[b, :, min(max(i - int(d2[b, 0]), 0), 4), min(max(j - int(d2[b, 1]), 0), 6)]
                want2[b, :, i, j] = src * d2[b, 2]
    assert torch.equal(data.augment(x1, d1), want1) and torch.equal(data.augment(x2, d2), want2)


def test_augment_draws_depend_on_seed_epoch_and_index_only():
    a = data.augment_table(500, 0, 3, 0.1, 0.2, (28, 40))
    assert torch.equal(a, data.augment_table(500, 0, 3, 0.1, 0.2, (28, 40)))  # resume / every rank: same draws
    assert not torch.equal(a, data.augment_table(500, 0, 4, 0.1, 0.2, (28, 40)))  # a new epoch: new draws
    assert set(a[:, 0].tolist()) == set(range(-3, 4)) and set(a[:, 1].tolist()) == set(range(-4, 5))  # round(0.1 s)
    assert 0.15 < a[:, 2].std() < 0.25 and abs(a[:, 2].mean() - 1) < 0.05
    small = data.augment_table(200, 0, 0, 0.1, 0.0, (8,))
    assert set(small[:, 0].tolist()) == {-1, 0, 1} and torch.all(small[:, 1] == 1)  # at least one step; no gain
    assert torch.all(data.augment_table(50, 0, 0, 0.0, 0.0, (8,)) == torch.tensor([0., 1.]))  # off


def test_augment_draws_are_not_a_shuffle_stream():
    # the shifts must not replay the randint stream of the shuffle generator of any nearby epoch (an earlier seed,
    # seed x 100003 + epoch + 7, was exactly epoch_loader's seed for epoch + 7)
    for seed, epoch in [(0, 0), (0, 3), (2, 5)]:
        shifts = data.augment_table(300, seed, epoch, 0.5, 0.0, (16,))[:, 0]
        for e in range(-20, 40):
            g = torch.Generator().manual_seed(seed * 100_003 + e)
            assert not torch.equal(shifts, torch.randint(-8, 9, (300,), generator=g).float())


def test_augmentation_only_at_two_samples_a_class(tmp_path):
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    few = data.make_task("few", "classification", "ce", "error", z(8, 1, 50), np.arange(8) % 4, z(4, 1, 50),
                         np.arange(4) % 4)  # 2 a class (PigCVP)
    many = data.make_task("many", "classification", "ce", "error", z(12, 1, 50), np.arange(12) % 4, z(4, 1, 50),
                          np.arange(4) % 4, x_val=z(4, 1, 50), y_val=np.arange(4) % 4)  # 3 a class
    assert len(many.train) == 12
    dense = data.make_task("dense", "dense", "mse", "nrmse", z(8, 1, 50), z(8, 1, 50), z(4, 1, 50), z(4, 1, 50))
    assert common.auto_defaults(few)["augment_shift"] == common.AUTO_AUGMENT_SHIFT == 0.1 and few.num_outputs == 4
    assert common.auto_defaults(many)["augment_shift"] == 0 and common.auto_defaults(dense)["augment_shift"] == 0
    assert common.auto_defaults(data.get_task("pigcvp"))["augment_shift"] == 0.1
    assert common.auto_defaults(data.get_task("gunpoint"))["augment_shift"] == 0


def test_tta_averages_over_fixed_translations_in_the_training_range():
    """TranslationTTA feeds the input itself and n-1 translations of it by at most round(shift x size) per axis
    (the same for every call), and returns the log of the mean of the class probabilities."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1)[:, :3] * 5

    for x in (torch.randn(4, 2, 40), torch.randn(3, 1, 20, 30)):
        seen.clear()
        out = common.TranslationTTA(Spy(), 0.1, 9)(x)
        assert len(seen) == 9 and torch.equal(seen[0], x)
        ks = [round(0.1 * s) for s in x.shape[2:]]
        moves = set()
        for y in seen:  # each copy is x translated by one whole move for the whole batch, within [-k, k] per axis
            match = [m for m in itertools.product(*[range(-k, k + 1) for k in ks])
                     if torch.equal(y, data.augment(x, torch.tensor([[*m, 1.0]] * len(x))))]
            assert match
            moves.add(match[0])
        assert len(moves) >= 4  # not the identity nine times
        want = torch.stack([torch.softmax(y.flatten(1)[:, :3] * 5, -1) for y in seen]).mean(0).log()
        assert torch.allclose(out, want, atol=1e-6)
        first = list(seen)
        seen.clear()
        common.TranslationTTA(Spy(), 0.1, 9)(x)
        assert all(torch.equal(a, b) for a, b in zip(first, seen))  # fixed: the same moves every call
    one = common.TranslationTTA(Spy(), 0.1, 1)(x)
    assert torch.allclose(one, torch.log_softmax(x.flatten(1)[:, :3] * 5, -1), atol=1e-6)


def test_tta_default_follows_the_augmentation_and_needs_a_shift(tmp_path, run):
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    few = data.make_task("few", "classification", "ce", "error", z(8, 1, 50), np.arange(8) % 4, z(4, 1, 50),
                         np.arange(4) % 4)
    assert common.auto_defaults(few)["tta"] == common.AUTO_TTA == 9
    assert common.auto_defaults(data.get_task("gunpoint"))["tta"] == 0
    assert common.auto_defaults(data.get_task("pigcvp"))["tta"] == 9
    proc, _ = run("finetune.py", "--task", "gunpoint", "--body", "tiny", "--tta", "9", check=False)
    assert proc.returncode != 0 and "--augment_shift" in proc.stderr and "Traceback" not in proc.stderr
    # a task whose outputs are not class probabilities: refused at parse time, before any training step
    proc, _ = run("finetune.py", "--task", "synthetic_multilabel", "--augment_shift", "0.1", "--tta", "9", check=False)
    assert proc.returncode != 0 and "class probabilities" in proc.stderr and "Traceback" not in proc.stderr
    assert "step" not in proc.stdout
    # the default follows the translations the run trains with, given or chosen
    import argparse
    parser = common.add_common_args(argparse.ArgumentParser())
    assert common.parse_args(parser, ["--task", "pigcvp", "--augment_shift", "0"]).tta == 0  # not refused
    assert common.parse_args(parser, ["--task", "gunpoint", "--augment_shift", "0.05"]).tta == 9
    assert common.parse_args(parser, ["--task", "pigcvp", "--tta", "5"]).tta == 5  # an explicit flag wins


def test_resume_of_a_run_older_than_the_augmentation_flags(tmp_path):
    """A config.json written before --augment_shift existed resumes when the flag is off now, not when it is on."""
    import types
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.001, "task": "pigcvp"}))
    fake = types.SimpleNamespace(RESUME_FREE=common.Run.RESUME_FREE, dir=tmp_path)
    common.Run.check_resume(fake, tmp_path / "config.json", {"lr": 0.001, "task": "pigcvp", "augment_shift": 0.0})
    with pytest.raises(common.UserError, match="--augment_shift None"):
        common.Run.check_resume(fake, tmp_path / "config.json", {"lr": 0.001, "task": "pigcvp", "augment_shift": 0.1})


def test_augmenting_a_dense_task_is_refused(run, tmp_path):
    # a task-table dense task: refused at parse time, before ORCA's alignment stage would run
    proc, _ = run("orca.py", "--task", "synthetic_dense", "--body", "tiny", "--augment_shift", "0.1", check=False)
    assert proc.returncode != 0 and "dense task" in proc.stderr and "Traceback" not in proc.stderr
    assert "stage" not in proc.stdout
    # a dense custom .npz (its kind known once the file is read): refused by fit
    x = np.random.default_rng(0).standard_normal((40, 1, 32)).astype(np.float32)
    path = tmp_path / "dense.npz"
    np.savez(path, x_train=x, y_train=x.copy(), x_test=x[:8], y_test=x[:8].copy())
    proc, _ = run("finetune.py", "--task", "custom", "--data_path", path, "--body", "tiny", "--augment_scale", "0.1",
                  check=False)
    assert proc.returncode != 0 and "dense task (custom)" in proc.stderr and "Traceback" not in proc.stderr


def test_explicit_flags_win_and_config_records_the_choice(tmp_path, run):
    import finetune
    path = _custom(tmp_path)
    args = finetune.get_args(["--task", "custom", "--data_path", str(path), "--body", "tiny", "--batch_size", "4"])
    assert args.batch_size == 4 and "batch_size" not in args.auto_flags and "target_seq_len" in args.auto_flags
    args = finetune.get_args(["--task", "custom", "--data_path", str(path), "--body", "tiny", "--epochs", "2"])
    assert args.epochs == 2 and args.warmup_epochs == pytest.approx(0.2)
    proc, final = run("finetune.py", "--task", "custom", "--data_path", path, "--body", "tiny", "--steps", "12")
    assert "defaults for task custom:" in proc.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["input_norm"] == "channel" and config["select"] == "last" and "epochs" in config["auto_flags"]
    assert final["val_score"] is None and final["test_score"] <= 1.0
    assert config["kernel_mult"] == common.AUTO_KERNEL_MULT == 3 and "kernel_mult" in config["auto_flags"]
    args = finetune.get_args(["--task", "custom", "--data_path", str(path), "--body", "tiny", "--kernel_mult", "1"])
    assert args.kernel_mult == 1 and "kernel_mult" not in args.auto_flags
    assert common.model_for(data.get_task("custom", data_path=path), args).embedder.conv.kernel_size == (16,)


def test_kernel_mult_is_ignored_by_a_vision_body_with_a_warning(capsys):
    """A vision body keeps its pretrained patch kernel: --kernel_mult given on the command line warns, the data-aware
    default (2) passes silently; a text body gets the wider kernel."""
    import finetune
    swin = common.build_body("swin", pretrained=False, embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=56)
    task = data.get_task("digits")
    for flags, warned in ([], False), (["--kernel_mult", "3"], True):
        args = finetune.get_args(["--task", "digits", "--body", "tiny", *flags])
        args.body = "swin"
        with unittest.mock.patch.object(models, "build_body", lambda *a, **k: swin):
            model = common.model_for(task, args)
        assert model.embedder.conv.kernel_size == (4, 4) and model.embedder.extra == 0  # the Swin patch kernel
        assert ("--kernel_mult is ignored" in capsys.readouterr().out) == warned
    text = common.model_for(task, finetune.get_args(["--task", "digits", "--body", "tiny"]))
    assert text.embedder.conv.kernel_size == (8, 8)  # 4x4 strides, 2 strides wide


def test_benchmark_and_synthetic_tasks_keep_fixed_defaults():
    import finetune
    args = finetune.get_args(["--task", "synthetic"])
    assert (args.epochs, args.batch_size, args.lr, args.finetune, args.input_norm, args.select) == \
        (2, 16, 1e-3, "full", "none", "best")
    assert args.kernel_mult == 1  # ORCA's non-overlapping patches, bit-exact
    args = finetune.get_args(["--task", "ecg"])  # the official ECG config; no data needed to parse
    assert (args.epochs, args.batch_size, args.lr, args.target_seq_len, args.optimizer) == (15, 4, 1e-6, 64, "sgd")


# ---- fine-tuning modes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "norms", "lora"])
def test_finetune_modes(mode):
    task = data.get_task("synthetic")
    model = common.build_model(task, "tiny", target_seq_len=16)
    common.set_finetune(model, mode, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    body = {n for n in trainable if n.startswith("body.")}
    assert any(n.startswith("embedder.") for n in trainable) and any(n.startswith("head.") for n in trainable)
    if mode == "full":
        assert body == {"body." + n for n, _ in model.body.named_parameters()}
    elif mode == "norms":
        assert body and all("norm" in n for n in body)
    else:
        assert any("lora_" in n for n in body) and all("lora_" in n or "norm" in n for n in body)
        x = task.train.tensors[0][:4]
        before = model(x)
        with torch.no_grad():  # adapters start at zero (B = 0): the pretrained function is unchanged ...
            for n, p in model.body.named_parameters():
                if "lora_B" in n:
                    p.add_(0.1)
        assert not torch.allclose(model(x), before)  # ... and they are on the forward path
        common.set_finetune(model, mode, lora_rank=4)  # idempotent (resume)
        assert sum("lora_A" in n for n, _ in model.named_parameters()) == \
            sum(1 for n, _ in model.body.named_parameters() if "lora_A" in n)


def test_new_modules_get_their_own_learning_rate():
    model = common.build_model(data.get_task("synthetic"), "tiny", target_seq_len=16)
    groups = common.param_groups(model, model.parameters(), 1e-4, 10)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lora_run_trains_and_resumes(run, tmp_path):
    flags = ["--task", "synthetic", "--body", "tiny", "--finetune", "lora", "--epochs", "2", "--log_interval", "1"]
    _, a = run("finetune.py", *flags, "--out_dir", tmp_path / "a")
    run("finetune.py", *flags, "--out_dir", tmp_path / "b", "--max_steps", "7")
    _, b = run("finetune.py", *flags, "--out_dir", tmp_path / "b", "--resume")
    assert a["test_loss"] == b["test_loss"]


# ---- checkpoint selection and the suite's baseline -----------------------------------------------------------
def test_select_last_tests_the_final_weights(run, tmp_path):
    flags = ["--task", "synthetic", "--body", "tiny", "--epochs", "3", "--select", "last"]
    _, final = run("finetune.py", *flags)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["epoch"] == 2


def test_knn_error_matches_a_direct_computation():
    task = data.get_task("synthetic")
    x = torch.cat([task.train.tensors[0], task.val.tensors[0]]).flatten(1)
    y = torch.cat([task.train.tensors[1], task.val.tensors[1]])
    xt, yt = task.test.tensors
    nearest = torch.cdist(xt.flatten(1), x).argmin(1)
    assert bench.knn_error(task) == pytest.approx((y[nearest] != yt).float().mean().item())


def test_custom_regression_with_one_target_a_sample_learns_in_the_users_units(tmp_path, run):
    # y (N,) floats of scale 1000: the common layout of a user's regression set. It used to crash the head's build
    # (out_shape ()), and unstandardised targets are out of reach of a head that starts near 0 (MiniLM on a case like
    # this: test mse 669,000 against 11,800 for predicting the mean; 7,000 standardised)
    rng = np.random.RandomState(0)
    x = rng.randn(160, 1, 32).astype(np.float32)
    y = (1000 + 300 * x[:, 0, :8].mean(1)).astype(np.float32)
    path = tmp_path / "reg.npz"
    np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    task = data.get_task("custom", data_path=path)
    assert task.kind == "regression" and task.out_shape == (1,)
    y_train = torch.stack([task.train[i][1] for i in range(len(task.train))])
    assert abs(float(y_train.mean())) < 0.3 and 0.7 < float(y_train.std()) < 1.3  # standardised targets
    assert torch.allclose(task.decode(task.test[0][1]), torch.tensor(y[120:121]), rtol=1e-5)
    _, final = run("finetune.py", "--task", "custom", "--data_path", path, "--body", "tiny", "--steps", "60",
                   "--out_dir", tmp_path / "out")
    mean_guess = float(((y[120:] - y[:120].mean()) ** 2).mean())  # about 15,000: the mse of predicting the mean
    assert final["metric"] == "mse" and final["test_score"] < 0.9 * mean_guess  # in the user's units, and learnt


def test_an_embedder_of_another_kernel_mult_is_refused_with_one_line(tmp_path):
    task = data.get_task("synthetic")
    wide = common.build_model(task, "tiny", target_seq_len=8, kernel_mult=2)
    torch.save({"embedder": wide.embedder.state_dict()}, tmp_path / "embedder.pt")
    common.load_embedder(common.build_model(task, "tiny", target_seq_len=8, kernel_mult=2), tmp_path / "embedder.pt",
                         "orca.py")  # the same patches: loads
    with pytest.raises(common.UserError, match="same --task, --body, --target_seq_len and --kernel_mult"):
        common.load_embedder(common.build_model(task, "tiny", target_seq_len=8), tmp_path / "embedder.pt", "orca.py")
