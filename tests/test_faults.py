"""Faults (issue 19): nothing executed, nothing lost, nothing silently wrong. Crafted pickles, torn writes, a shared
or stale run directory, --resume with other flags, bad flags and bad data, and NaN in every training stage; each
ends in one `error:` line, never a traceback. In-process on the tiny body (seconds); six subprocess runs check
what a user sees and what a kill -9 leaves.

    python -m pytest tests/test_faults.py -q        # CPU, offline, about a minute
"""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data
import finetune
import mona
import orca
import pare
import proposed
import ups
from conftest import ROOT, run_script
from errors import UserError

TINY = ["--task", "synthetic", "--body", "tiny", "--epochs", "2", "--log_interval", "1"]


class Evil:
    """A pickle that runs code when it is loaded: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line(e):
    message = str(e.value)
    assert "\n" not in message, message
    return message


def start(tmp_path, *flags, out="out"):
    """finetune.py's setup in this process: (args, run, device, task, model)."""
    args = finetune.get_args([*TINY, "--out_dir", str(tmp_path / out), "--data_dir", str(tmp_path / "data"), *flags])
    run, device = common.setup("finetune", args)
    task = data.get_task(args.task)
    return args, run, device, task, common.model_for(task, args)


def release(run):
    run._lock.close()  # what the end of a process does


def named_checkpoints(message):
    return re.findall(r"(/\S+\.pt)", message)


# ---- 1. no code execution ------------------------------------------------------------------------------------
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, evil)
    torch.load(evil, weights_only=False)  # the file is real: a plain torch.load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as e:
        common.load_checkpoint(evil, "--embedder_ckpt")
    assert "refused" in one_line(e) and "posix.system" in one_line(e)
    args, run, device, task, model = start(tmp_path, "--resume")
    for load in (lambda: common.load_embedder(model, evil, "orca.py"),  # --embedder_ckpt
                 lambda: proposed.load_stage1(model, evil, "000"),
                 lambda: (os.replace(evil, run.dir / "last.pt"), common.fit(model, task, args, run, device))):
        with pytest.raises(UserError, match="refused"):
            load()
    assert not marker.exists()


def test_crafted_official_data_files_are_refused(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "challenge2017.pkl").write_bytes(pickle.dumps({"data": [Evil(marker)], "label": ["N"]}))
    with pytest.raises(UserError) as e:
        data.get_task("ecg", tmp_path)
    assert "refused" in one_line(e) and "challenge2017.pkl" in one_line(e)
    np.save(tmp_path / "satellite_train.npy", np.array({"data": Evil(marker)}, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="refused"):
        data.get_task("satellite", tmp_path)
    assert not marker.exists()


def test_official_pickles_of_arrays_still_load(tmp_path):
    import official_data
    d = {"data": [np.arange(5.0)], "label": np.array(["N"]), "n": 3}
    for protocol in (2, 5):
        (tmp_path / "a.pkl").write_bytes(pickle.dumps(d, protocol=protocol))
        out = official_data._unpickle(tmp_path / "a.pkl")
        assert np.array_equal(out["data"][0], d["data"][0]) and out["n"] == 3
    np.save(tmp_path / "t.npy", np.array((np.zeros(2), 1), dtype=object), allow_pickle=True)
    assert official_data.load_npy(tmp_path / "t.npy")[1] == 1


# ---- 2. no data loss -----------------------------------------------------------------------------------------
def test_torn_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def torn(obj, f, *a, **k):  # half a file, then the disk is full (or the process is killed)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError):
        common.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    with pytest.raises(OSError):  # a cache in --data_dir: no half file left to break later runs
        data.source_features("synthetic", common.build_body("tiny"), "tiny|test", tmp_path)
    monkeypatch.undo()
    assert common.load_checkpoint(path)["epoch"] == 1 and sorted(tmp_path.rglob("*.pt")) == [path]
    path.write_bytes(b"PK\x03\x04 half a checkpoint")  # one written in place by an older version
    with pytest.raises(UserError) as e:
        common.load_checkpoint(path, "resume point")
    assert "truncated" in one_line(e)


def test_half_written_caches_are_rebuilt(tmp_path, capsys):
    """Caches cut short by a kill under an older version (written in place) are solved again, not a traceback."""
    body = common.build_body("tiny")

    def caches():  # the Burgers task, a UPS family, the source features of ORCA / UPS
        trajectories = ups.family_trajectories("advection", "train", 2, tmp_path)
        return [*data._burgers(tmp_path, n_train=8, n_test=4, n=32), trajectories,
                *data.source_features("synthetic", body, "tiny|test", tmp_path)]
    made = caches()
    for cache in [p for p in tmp_path.rglob("*") if p.is_file()]:
        cache.write_bytes(cache.read_bytes()[:100])
    again = caches()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(made, again))
    assert capsys.readouterr().out.count("cannot be read") == 3


KILL_DURING_SAVE = """
import os, runpy, signal, sys, torch
real = torch.save
def save(state, f, *args, **kwargs):  # the second last.pt: half of it is written, then the power goes
    if isinstance(state, dict) and state.get("epoch") == 1 and "last" in str(f):
        open(f, "wb").write(b"PK half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(state, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_while_writing_last_pt_then_resume(tmp_path):
    """kill -9 in the middle of writing last.pt (at a fixed point, not a timer): the previous last.pt is whole, and
    --resume ends with the numbers and the log of an uninterrupted run."""
    out = tmp_path / "out"
    (tmp_path / "kill.py").write_text(KILL_DURING_SAVE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    killed = subprocess.run([sys.executable, tmp_path / "kill.py", ROOT / "finetune.py", *TINY, "--out_dir", out],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and common.load_checkpoint(out / "last.pt")["epoch"] == 0
    _, resumed = run_script("finetune.py", *TINY, "--out_dir", out, "--resume")
    # the uninterrupted run is a subprocess too: same thread count (OMP_NUM_THREADS=1), so the same float sums
    _, reference = run_script("finetune.py", *TINY, "--out_dir", tmp_path / "reference")
    assert resumed["test_score"] == reference["test_score"] and resumed["test_loss"] == reference["test_loss"]
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            for d in (out, tmp_path / "reference")]
    assert logs[0] == logs[1] and len(logs[0]) > 0


# ---- 3. another run's numbers --------------------------------------------------------------------------------
def test_second_run_in_the_same_out_dir_is_refused(tmp_path):
    args, run, *_ = start(tmp_path)
    with pytest.raises(UserError) as e:
        start(tmp_path, "--resume")
    assert "another run" in one_line(e) and str(run.dir) in one_line(e)
    release(run)
    release(start(tmp_path, "--resume")[1])


def test_fresh_run_removes_stale_files_and_resume_keeps_them(tmp_path):
    out = tmp_path / "out"
    (out / "fewshot_ups").mkdir(parents=True)
    stale = [out / n for n in ("ckpt.pt", "last.pt", "results.json", "log.jsonl", "embedder.pt")]
    for p in stale + [out / "fewshot_ups" / "last.pt", out / "notes.txt"]:
        p.write_text("x")
    release(start(tmp_path, "--resume")[1])
    assert all(p.exists() for p in stale)
    release(start(tmp_path)[1])
    assert not any(p.exists() for p in stale + [out / "fewshot_ups" / "last.pt"]) and (out / "notes.txt").exists()



@pytest.mark.parametrize("flag", ["embedder_ckpt", "init_embedder"])
def test_fresh_run_keeps_a_stage1_file_given_as_a_flag(tmp_path, flag):
    args, run = start(tmp_path)[:2]
    release(run)
    kept, stale = run.dir / "embedder.pt", run.dir / "last.pt"
    for p in (kept, stale):
        p.write_text("x")
    setattr(args, flag, str(kept))  # e.g. proposed.py --version 001 --init_embedder OUT/embedder.pt
    run.clear()
    assert kept.exists() and not stale.exists()

@pytest.mark.parametrize("flags, named", [(["--lr", "1e-2"], "--lr"), (["--epochs", "3"], "--epochs"),
                                          (["--task", "synthetic_2d"], "--task"), (["--seed", "1"], "--seed"),
                                          (["--batch_size", "8"], "--batch_size")])
def test_resume_with_other_flags_is_refused(tmp_path, flags, named):
    release(start(tmp_path)[1])
    with pytest.raises(UserError) as e:
        start(tmp_path, "--resume", *flags)
    assert named in one_line(e) and "--resume" in one_line(e)
    release(start(tmp_path, "--resume", "--log_interval", "5", "--device", "cpu")[1])  # harmless flags may change


def test_resumed_log_equals_an_uninterrupted_run(tmp_path):
    def train(out, *flags):
        args, run, device, task, model = start(tmp_path, *flags, out=out)
        common.fit(model, task, args, run, device)
        release(run)
        return run.records()
    full = train("a")
    train("c", "--max_steps", "9")  # "killed" in the middle of epoch 1 (6 steps an epoch): its records are logged
    resumed = train("c", "--resume")
    assert resumed == full and len({(r["step"], "loss" in r) for r in full}) == len(full)


# ---- 4. bad flags and bad data -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (["--batch_size", "0"], "--batch_size"), (["--batch_size", "-4"], "--batch_size"), (["--accum", "0"], "--accum"),
    (["--lr", "0"], "--lr"), (["--lr=-1e-3"], "--lr"), (["--lr", "nan"], "--lr"), (["--epochs", "0"], "--epochs"),
    (["--target_seq_len", "0"], "--target_seq_len"), (["--steps", "0"], "--steps"),
    (["--max_steps", "0"], "--max_steps"), (["--eval_batch_size", "0"], "--eval_batch_size"),
    (["--weight_decay", "-1"], "--weight_decay"), (["--seed", "-1"], "--seed"),
    (["--device", "tpu"], "--device")])
def test_bad_flags_give_one_line(flags, named):
    with pytest.raises(UserError) as e:
        finetune.get_args([*TINY, *flags])
    message = one_line(e)
    assert named in message and ("must be" in message or "unknown --device" in message)


@pytest.mark.parametrize("script", [orca, pare, mona, proposed, ups])
def test_every_script_validates_flags(script):
    task = [] if script is ups else ["--task", "synthetic"]
    with pytest.raises(UserError, match="--batch_size"):
        script.get_args([*task, "--body", "tiny", "--batch_size", "0"])


def test_flags_that_fail_only_against_the_data_or_the_disk(tmp_path):
    args, run, device, task, model = start(tmp_path, "--accum", "50")  # 6 batches an epoch: no step ever
    with pytest.raises(UserError, match="--accum 50 is more than the 6 batches"):
        common.fit(model, task, args, run, device)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot make --out_dir"):
        start(tmp_path, out="file")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a torch checkpoint"):
        common.load_embedder(model, tmp_path / "bad.pt", "orca.py")


def test_ignored_dtype_warns(tmp_path, capsys):
    release(start(tmp_path, "--device", "cpu", "--dtype", "float16")[1])
    assert "warning: --dtype float16 is ignored" in capsys.readouterr().out


X, Y = np.random.RandomState(0).randn(20, 1, 32).astype(np.float32), np.arange(20) % 2


@pytest.mark.parametrize("arrays, needle", [
    (dict(x_test=X[:0], y_test=Y[:0]), "empty"),
    (dict(y_train=Y.astype(bool)), "boolean"),
    (dict(y_train=Y * 10 ** 7, y_test=Y * 10 ** 7), "relabel"),
    (dict(y_train=Y.astype(str)), "not an array of numbers"),
    (dict(y_train=np.array(3)), "scalar"),
    (dict(x_val=X[:4]), "x_val without y_val"),
    (dict(x_val=X[:4, :, :16], y_val=Y[:4]), "differ in shape"),
    (dict(y_train=X[:, :, :16], y_test=X), "differ in shape"),
    (dict(y_train=np.zeros((20, 1, 4, 4), np.float32), y_test=np.zeros((20, 1, 4, 4), np.float32)), "layout"),
])
def test_bad_custom_data_gives_one_line(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **(dict(x_train=X, y_train=Y, x_test=X, y_test=Y) | arrays))
    with pytest.raises(UserError) as e:
        data.get_task("custom", tmp_path, data_path=tmp_path / "d.npz")
    assert needle in one_line(e)


def test_float_labels_are_regression_with_a_warning_and_empty_train_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x_train=X, y_train=Y.astype(np.float32), x_test=X, y_test=Y.astype(np.float32))
    assert data.get_task("custom", tmp_path, data_path=tmp_path / "d.npz").kind == "regression"
    assert "taken as regression" in capsys.readouterr().out
    with pytest.raises(UserError, match="no training sample is left"):
        data.make_task("t", "regression", "mse", "mse", X[:1], Y[:1].astype(np.float32), X, Y.astype(np.float32))


# ---- 5. NaN in every stage that trains -----------------------------------------------------------------------
def test_nan_in_fine_tuning_names_a_checkpoint_that_exists(tmp_path):
    args, run, device, task, model = start(tmp_path, "--lr", "1e30", "--optimizer", "sgd")
    with pytest.raises(UserError) as e:
        common.fit(model, task, args, run, device)
    assert "non-finite" in one_line(e) and "no checkpoint had been written yet" in one_line(e)
    release(run)
    # the method hook (PaRe's and the proposed method's fit) turns NaN in epoch 1: last.pt of epoch 0 is kept
    args, run, device, task, model = start(tmp_path, out="b")
    nan_from_epoch_1 = lambda m, x, y, epoch: (common.task_loss(task, m(x), y) * (1 if epoch == 0 else np.nan), {})
    with pytest.raises(UserError) as e:
        common.fit(model, task, args, run, device, compute=nan_from_epoch_1)
    named = named_checkpoints(one_line(e))
    assert str(run.dir / "last.pt") in named and all(Path(p).exists() for p in named)
    last = common.load_checkpoint(run.dir / "last.pt")
    assert last["epoch"] == 0 and common.all_finite(last["model"].values())


def test_nan_in_orca_alignment_stops_before_otdd(tmp_path, monkeypatch):
    args = orca.get_args([*TINY, "--out_dir", str(tmp_path / "out"), "--embedder_epochs", "3"])
    run, task = common.Run("orca", args), data.get_task("synthetic")
    model = common.build_model(task, "tiny", target_seq_len=16)
    src_x, src_y = torch.randn(40, model.body.dim), torch.arange(40) % 4
    real = orca.weighted_distance

    def poisoned(model, *a, backward=False, **k):  # a step that leaves NaN weights (a huge --lr does the same)
        value = real(model, *a, backward=backward, **k)
        if backward:
            model.embedder.conv.weight.grad.fill_(np.nan)
        return value
    monkeypatch.setattr(orca, "weighted_distance", poisoned)
    with pytest.raises(UserError) as e:
        orca.align_embedder(model, task.train, data.class_labels(task), src_x, src_y, args, run, "cpu")
    assert "non-finite embedder weights after embedder step 1" in one_line(e)
    monkeypatch.undo()
    args.align_lr, model = 1e30, common.build_model(task, "tiny", target_seq_len=16)  # finite weights, NaN features:
    with pytest.raises(UserError, match="non-finite otdd"):  # stopped here, not by a ValueError inside otdd.py
        orca.align_embedder(model, task.train, data.class_labels(task), src_x, src_y, args, run, "cpu")


def test_nan_in_mona_meta_stage(tmp_path, monkeypatch):
    args = mona.get_args([*TINY, "--out_dir", str(tmp_path / "out"), "--batch_size", "8", "--source_batch_size", "8"])
    run, task = common.Run("mona", args), data.get_task("synthetic")
    model = common.build_model(task, "tiny", target_seq_len=16)
    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr(mona, "meta_losses", lambda *a: (nan, nan * 1, nan * 1))
    with pytest.raises(UserError) as e:
        mona.train_embedder(model, task, data.load_source("synthetic", model.body), 2, args, run,
                           torch.device("cpu"))
    assert "non-finite meta loss" in one_line(e) and "meta step 1" in one_line(e)


def test_nan_in_proposed_contrastive_stage(tmp_path, monkeypatch):
    args = proposed.get_args([*TINY, "--out_dir", str(tmp_path / "out"), "--contrastive_epochs", "1"])
    run, task = common.Run("proposed", args), data.get_task("synthetic")
    model = common.build_model(task, "tiny", target_seq_len=16)
    groups = data.class_labels(task)
    dataset = torch.utils.data.StackDataset(task.train, torch.utils.data.TensorDataset(groups))
    monkeypatch.setattr(proposed, "contrastive_loss", lambda sim, *a: sim.sum() * np.nan)
    with pytest.raises(UserError) as e:
        proposed.contrastive_stage(dataset, lambda x: model.embed(x).mean(1), model.embedder.parameters(), task, args,
                                   run, "cpu")
    assert "non-finite contrastive loss" in one_line(e) and not (run.dir / "embedder.pt").exists()


def test_nan_in_ups_alignment(tmp_path, monkeypatch):
    args = ups.get_args(["--body", "tiny", "--modes", "4", "--width", "4", "--align_objective", "none",
                         "--align_epochs", "1", "--out_dir", str(tmp_path / "out")])
    traj = {s: torch.randn(2, 4, 1, 32) for s in ("train", "val", "test")}
    task = ups.make_task("advection", ["advection"], ["advection"], {"advection": traj}, 32)
    run, model = common.Run("ups", args), ups.UPSModel(common.build_body("tiny"), [ups.FAMILIES["advection"]], args)
    monkeypatch.setattr(common, "compute_loss", lambda name, pred, y: pred.sum() * np.nan)
    with pytest.raises(UserError) as e:
        ups.align_embedder(model, task, args, run, "cpu")
    assert "non-finite stage-1 loss" in one_line(e) and not (run.dir / "embedder.pt").exists()


# ---- what a user sees: exit code, one line, no traceback -----------------------------------------------------
def test_user_sees_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    args, run, *_ = start(tmp_path)  # this process holds the run directory
    proc, _ = run_script("finetune.py", *TINY, "--out_dir", out, check=False)
    release(run)
    torch.save({"model": Evil(tmp_path / "marker")}, out / "last.pt")
    crafted, _ = run_script("finetune.py", *TINY, "--out_dir", out, "--resume", check=False)
    bad_flag, _ = run_script("orca.py", *TINY, "--batch_size", "0", check=False)
    for p, needle in ((proc, "another run"), (crafted, "refused"), (bad_flag, "--batch_size")):
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("error: ") and needle in p.stderr
    assert not (tmp_path / "marker").exists()
