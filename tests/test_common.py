"""The shared substrate: shapes of every embedder x body x head, metrics against their definitions, the training
plumbing (resume, determinism, NaN guard) and one-line errors on bad input.

    python -m pytest tests/test_common.py -q
"""
import json
import math
import types

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

import common
import models
import data


# ---- bodies x embedders x heads ------------------------------------------------------------------------------
def _bert_tiny():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    return models._wrap_hf_text(BertModel(cfg))


def _roberta_tiny():
    from transformers import RobertaConfig, RobertaModel
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=99, max_position_embeddings=130)
    return models._wrap_hf_text(RobertaModel(cfg))


def _swin_tiny():  # Swin-base's layout at toy width: random weights, no download
    return common.build_body("swin", pretrained=False, embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=56)


BODIES = {"tiny": lambda: common.build_body("tiny"), "bert": _bert_tiny, "roberta": _roberta_tiny,
          "swin": _swin_tiny}
TASKS = ["synthetic", "synthetic_2d", "synthetic_dense", "synthetic_dense_2d", "synthetic_multilabel"]


@pytest.mark.parametrize("body_name", list(BODIES))
@pytest.mark.parametrize("task_name", TASKS)
def test_model_shapes(body_name, task_name):
    task = data.get_task(task_name)
    body = BODIES[body_name]()
    x, y = task.train.tensors[0][:3], task.train.tensors[1][:3]
    if body.kind == "vision" and len(task.in_shape) == 2:
        with pytest.raises(common.UserError, match="1D"):
            common.build_model(task, body_name, target_seq_len=32, body=body)
        return
    model = common.build_model(task, body_name, target_seq_len=32, body=body)
    tokens = model.embed(x)
    assert tokens.shape[0] == 3 and tokens.shape[2] == body.dim
    out = model(x)
    expected = (3, task.num_outputs) if task.kind != "dense" else (3, *task.out_shape)
    assert tuple(out.shape) == expected
    common.task_loss(task, out, y).backward()  # every head is differentiable end to end
    assert model.embedder.conv.weight.grad.abs().sum() > 0


def test_minilm_body_is_pretrained_and_offline():
    body = common.build_body("minilm")
    assert body.kind == "text" and body.dim == 384 and body.position_table.shape == (512, 384)
    random_body = common.build_body("minilm", pretrained=False)
    w1 = body.model.encoder.layer[0].attention.self.query.weight
    w2 = random_body.model.encoder.layer[0].attention.self.query.weight
    assert w1.shape == w2.shape and not torch.allclose(w1, w2)


def test_stack_num_is_smallest_dividing_stride():
    for length, target in [(1000, 64), (46, 512), (1000, 512), (1024, 32), (150, 64), (97, 10)]:
        s = common.stack_num(length, target)
        assert length % s == 0 and length // s <= target
        assert all(length % t or length // t > target for t in range(1, s))
    assert common.stack_num(1000, 64) == 20  # ECG in the official table: 50 tokens


def test_embedders_start_from_pretrained_pieces():
    body = _roberta_tiny()
    emb = common.Embedder1D(1, 40, 32, 64, body)
    assert torch.equal(emb.pos.data, body.position_table[:40])  # RoBERTa positions 2..L+1
    swin = _swin_tiny()
    emb2 = common.Embedder2D(5, (20, 20), 16, 64, swin)
    w = swin.patch_conv.weight
    assert torch.equal(emb2.conv.weight[:, 3:5], w[:, 0:2]) and torch.equal(emb2.conv.weight[:, :3], w)
    assert emb2.size == (56, 56) and emb2.pos is None


# ---- metrics and losses against definitions ------------------------------------------------------------------
def test_metrics_against_sklearn_and_formulas():
    rng = np.random.RandomState(0)
    logits, y = rng.randn(200, 4), rng.randint(0, 4, 200)
    assert common.compute_metric("error", logits, y) == pytest.approx(np.mean(logits.argmax(1) != y))
    assert common.compute_metric("1-f1", logits, y) == pytest.approx(1 - f1_score(y, logits.argmax(1), average="macro"))
    scores, multi = rng.randn(200, 5), (rng.rand(200, 5) < 0.3).astype(float)
    multi[:, 4] = 0  # a class with no positives is skipped, as nanmean does officially
    auc = np.mean([roc_auc_score(multi[:, c], scores[:, c]) for c in range(4)])
    assert common.compute_metric("1-auroc", scores, multi) == pytest.approx(1 - auc)
    ap = np.mean([average_precision_score(multi[:, c], scores[:, c]) for c in range(4)])
    assert common.compute_metric("1-map", scores, multi) == pytest.approx(1 - ap)
    pred, tgt = rng.randn(6, 1, 10), rng.randn(6, 1, 10)
    nrmse = np.mean([np.sqrt(np.mean((p - t) ** 2)) / np.sqrt(np.mean(t ** 2)) for p, t in zip(pred, tgt)])
    rel = np.mean([np.linalg.norm(p - t) / np.linalg.norm(t) for p, t in zip(pred, tgt)])
    assert common.compute_metric("nrmse", pred, tgt) == pytest.approx(nrmse)
    assert common.compute_metric("rel_l2", pred, tgt) == pytest.approx(rel)
    tp, tt = torch.tensor(pred), torch.tensor(tgt)
    assert common.compute_loss("nrmse", tp, tt).item() == pytest.approx(nrmse, rel=1e-5)
    # the Darcy training loss is the official LpLoss(size_average=False): summed over the batch, not averaged
    assert common.compute_loss("rel_l2", tp, tt).item() == pytest.approx(len(tp) * rel, rel=1e-5)
    # ... while evaluate() reports it per sample, whatever the evaluation batch size, next to the mean metric
    task = types.SimpleNamespace(loss="rel_l2", metric="rel_l2", decode=None, pos_weight=None)
    dataset = torch.utils.data.TensorDataset(tp.float(), tt.float())
    for batch_size in (2, 6):
        out = common.evaluate(torch.nn.Identity(), task, dataset, batch_size=batch_size)  # predictions = inputs
        assert out["loss"] == pytest.approx(rel, rel=1e-5) and out["score"] == pytest.approx(rel, rel=1e-5)


def test_mae8_against_explicit_loop():
    rng = np.random.RandomState(1)
    L = 40
    pred, true = rng.rand(2, L, L) * 12, rng.rand(2, L, L) * 12
    true[1, 30:, :] = np.nan  # padding of a shorter protein
    per_protein = []
    for p, t in zip(pred, true):
        errs = []
        for i in range(L):
            for j in range(i + 24, L):
                ps = max((p[i, j] + p[j, i]) / 2, 0.01)
                if np.isfinite(t[i, j]) and t[i, j] <= 8:
                    errs.append(abs(ps - t[i, j]))
        per_protein.append(np.mean(errs))
    assert common.mae8(pred, true) == pytest.approx(np.mean(per_protein))


def test_lr_schedule_is_warmup_then_linear_decay():
    f = [common.lr_factor(s, 4, 12) for s in range(14)]
    # warm-up (step + 1) / W, a listed deviation: the official step / W would give the first step lr 0
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[8] == pytest.approx(0.5) and f[12] == 0 and f[13] == 0


# ---- plumbing: determinism, resume, NaN guard -----------------------------------------------------------------
def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_same_seed_same_losses_and_resume_matches(run, tmp_path):
    common_args = ["--task", "synthetic", "--body", "tiny", "--epochs", "3", "--log_interval", "1", "--augment_shift",
                   "0.1", "--augment_scale", "0.1"]  # the augmentation draws resume too
    _, a = run("finetune.py", *common_args, "--out_dir", tmp_path / "a")
    _, b = run("finetune.py", *common_args, "--out_dir", tmp_path / "b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and a["test_score"] == b["test_score"]
    # "kill" run c in the middle of epoch 1 (6 steps per epoch), then resume it
    _, partial = run("finetune.py", *common_args, "--out_dir", tmp_path / "c", "--max_steps", "9")
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=False)["epoch"] == 0
    _, c = run("finetune.py", *common_args, "--out_dir", tmp_path / "c", "--resume")
    assert c["test_score"] == a["test_score"] and c["test_loss"] == a["test_loss"]
    assert _losses(tmp_path / "c")[-6:] == _losses(tmp_path / "a")[-6:]
    out = tmp_path / "a"
    for name in ("config.json", "log.jsonl", "ckpt.pt", "last.pt", "results.json", "curves.png"):
        assert (out / name).exists(), name


def test_nan_loss_stops_and_keeps_checkpoint(run, tmp_path):
    proc, _ = run("finetune.py", "--task", "synthetic", "--body", "tiny", "--epochs", "3", "--lr", "1e30",
                  "--optimizer", "sgd", check=False)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr


# ---- bad input: one clear line, no traceback -----------------------------------------------------------------
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp):
    x, y = np.random.randn(20, 1, 32).astype(np.float32), np.arange(20) % 2
    nan_x = x.copy()
    nan_x[3, 0, 5] = np.nan
    return {
        "unknown task": (["--task", "nope"], "unknown task"),
        "unknown body": (["--task", "synthetic", "--body", "no-such-model-xyz"], "cannot load body"),
        "missing file": (["--task", "custom", "--data_path", tmp / "missing.npz"], "not found"),
        "wrong shape": (["--task", "custom", "--data_path",
                         _npz(tmp / "a.npz", x_train=x[:, 0], y_train=y, x_test=x[:, 0], y_test=y)], "shape"),
        "nan": (["--task", "custom", "--data_path",
                 _npz(tmp / "b.npz", x_train=nan_x, y_train=y, x_test=x, y_test=y)], "NaN"),
        "label range": (["--task", "custom", "--data_path",
                         _npz(tmp / "c.npz", x_train=x, y_train=y - 1, x_test=x, y_test=y)], "labels must lie"),
        "corrupt npz": (["--task", "custom", "--data_path", _write(tmp / "d.npz", b"not a zip")], "cannot read"),
    }


def _write(path, content):
    path.write_bytes(content)
    return path


def test_bad_inputs_raise_clear_user_errors(tmp_path):
    for name, (args, message) in _bad_inputs(tmp_path).items():
        flags = dict(zip(args[::2], args[1::2]))
        with pytest.raises(common.UserError, match=message):
            if "--body" in flags:
                common.build_body(flags["--body"])
            else:
                data.get_task(flags["--task"], data_path=flags.get("--data_path"))


def test_user_error_prints_one_line_without_traceback(run):
    proc, _ = run("finetune.py", "--task", "custom", "--data_path", "missing.npz", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: task 'custom': file missing.npz not found"]


def test_docstring_text_proxy_loads_on_this_platform():
    texts, labels = data._docstring_sentences(per_class=50)  # must skip platform-only modules (asyncio.windows_*)
    assert sorted(set(labels.tolist())) == list(range(8)) and len(texts) == len(labels)


def test_source_embedding_follows_the_body():
    # the pretrained input embedding lives outside the module tree; .to() / .double() must still move it, or source
    # data would be embedded on the CPU in float32 while the body runs elsewhere (a crash on a GPU)
    body = common.build_body("minilm").double()
    ids = torch.tensor([[101, 2023, 2003, 102]])
    tokens = data.embed_source(body, ids)
    assert tokens.dtype == torch.float64 and body.embed_norm.weight.dtype == torch.float64
    assert torch.isfinite(body(tokens)).all()


def test_load_embedder_errors_name_the_fix(tmp_path):
    task = data.get_task("synthetic")
    model = common.build_model(task, "tiny", True, 64)
    with pytest.raises(common.UserError, match="not found"):
        common.load_embedder(model, tmp_path / "missing.pt", "orca.py")
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(common.UserError, match="no 'embedder' entry"):
        common.load_embedder(model, tmp_path / "ckpt.pt", "orca.py")
    torch.save({"embedder": model.embedder.state_dict(), "source": "synthetic"}, tmp_path / "embedder.pt")
    assert common.load_embedder(model, tmp_path / "embedder.pt", "orca.py")["source"] == "synthetic"
    other = common.build_model(task, "tiny", True, 8)  # fewer tokens: positions of another shape
    with pytest.raises(common.UserError, match="does not fit"):
        common.load_embedder(other, tmp_path / "embedder.pt", "orca.py")
