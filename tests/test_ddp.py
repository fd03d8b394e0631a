"""Issue 16: more than one process (torchrun, DistributedDataParallel), on the CPU with gloo.

Every script on `synthetic` with the `tiny` body, started by torchrun with 2 processes, ends as the same script on one
process: the same test score and the same logged curves, within a float tolerance (the gradients of 2 half batches
are averaged in another order than one batch's: the curves agree to about 2e-7 relative; RTOL below), and the files
of its run directory are those of a 1-process run, written once (rank 0 alone writes and prints). A 2-process run
killed after its first epoch resumes and ends as an uninterrupted one. The arithmetic of the split (DDP's average of
W weighted shares = the 1-process gradient, for mean and summed losses, uneven and padded micro-batches, --accum
divided) is checked in-process with a simulated world of 2.

    python -m pytest tests/test_ddp.py -q        # CPU, 2 cores: about 2.5 minutes (16 tests)
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import common
import distributed
from conftest import ROOT, run_script

TINY = ["--task", "synthetic", "--body", "tiny", "--log_interval", "1"]
SCRIPTS = {  # a few steps of every stage of each script; pare: phase A (Gumbel) then phase B (gate frozen)
    "finetune.py": [*TINY, "--epochs", "2", "--augment_shift", "0.1", "--augment_scale", "0.1"],  # per-sample draws
    "orca.py": [*TINY, "--epochs", "2", "--embedder_epochs", "3"],
    "pare.py": [*TINY, "--epochs", "2"],
    "mona.py": [*TINY, "--epochs", "2", "--meta_steps", "2"],
    "proposed.py": [*TINY, "--epochs", "2", "--contrastive_epochs", "1"],
    # version 001: contrastive training of the head with the JVP keep-probability; its perturbed test forward draws
    # noise per batch, so every rank predicts the whole split (not sharded)
    "proposed.py 001": [*TINY, "--epochs", "2", "--contrastive_epochs", "1", "--version", "001", "--predict",
                        "perturb"],
    "ups.py": ["--body", "tiny", "--n_train", "2", "--n_test", "2", "--epochs", "2", "--align_epochs", "1",
               "--fewshot_n", "2", "--fewshot_epochs", "1", "--width", "4", "--modes", "4", "--batch_size", "8",
               "--log_interval", "1"],
}
RTOL = 1e-5  # relative tolerance of every logged number and test score, 2 processes against 1
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def torchrun(script, *args, nproc=2, check=True, wrapper=()):
    """python -m torch.distributed.run --standalone --nproc_per_node N [wrapper] script args -> (process, FINAL)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *map(str, wrapper), str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    final = [line for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
    return proc, (json.loads(final[-1][6:]) if final else None)


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def assert_close(a, b, what):
    """Two logs or results agree: the same keys and strings, numbers within RTOL (timings excepted)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if k not in ("seconds", "out_dir", "ms", "meta_seconds", "align_seconds"):
                assert_close(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{what}: {len(a)} != {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{what}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=RTOL, abs=1e-9), f"{what}: {a} (1 process) != {b} (2 processes)"
    else:
        assert a == b, f"{what}: {a} != {b}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name) -> (root, 1-process stdout and FINAL, 2-process stdout and FINAL), each made once per module."""
    made = {}

    def get(script):
        if script not in made:
            root = tmp_path_factory.mktemp(script.replace(".py", "").replace(" ", "_"))
            flags, file = [*SCRIPTS[script], "--data_dir", root / "data"], script.split()[0]
            made[script] = (root, run_script(file, *flags, "--out_dir", root / "one"),
                            torchrun(file, *flags, "--out_dir", root / "two"))
        return made[script]
    return get


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_end_as_one(script, runs):
    root, (one_proc, one), (two_proc, two) = runs(script)
    assert "distributed: 2 processes (gloo)" in two_proc.stdout
    assert_close(one["test_score"], two["test_score"], "test_score")
    assert_close(records(root / "one"), records(root / "two"), "log.jsonl")
    assert_close({k: v for k, v in one.items() if k != "fewshot"}, {k: v for k, v in two.items() if k != "fewshot"},
                 "results")
    # rank 0 alone writes and prints: the same files as one process, each log line and the FINAL line once
    assert files(root / "one") == files(root / "two")
    assert two_proc.stdout.count("config: ") == two_proc.stdout.count("FINAL ") == 1
    for line in ("eval epoch 0 ", "step 1/"):
        assert two_proc.stdout.count(line) == one_proc.stdout.count(line), line


KILL_AFTER_FIRST_EPOCH = """
import os, runpy, signal, sys, torch
real = torch.save
def save(state, f, *args, **kwargs):  # rank 0 (the only writer) dies as it is about to write epoch 1's last.pt
    if isinstance(state, dict) and state.get("epoch") == 1 and "last" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(state, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_two_process_run_resumes_as_an_uninterrupted_one(tmp_path, runs):
    """finetune.py on 2 processes, rank 0 killed (-9) as it writes the resume point of epoch 1 (of 2); torchrun ends
    rank 1; --resume on 2 processes ends with the numbers and the log of the uninterrupted 2-process run."""
    root, _, (_, reference) = runs("finetune.py")
    flags, out = [*SCRIPTS["finetune.py"], "--data_dir", tmp_path / "data"], tmp_path / "out"
    (tmp_path / "kill.py").write_text(KILL_AFTER_FIRST_EPOCH)
    killed, _ = torchrun("finetune.py", *flags, "--out_dir", out, check=False, wrapper=[tmp_path / "kill.py"])
    assert killed.returncode != 0 and common.load_checkpoint(out / "last.pt")["epoch"] == 0
    assert isinstance(common.load_checkpoint(out / "last.pt")["rng"], list)  # every rank's RNG state
    proc, resumed = torchrun("finetune.py", *flags, "--out_dir", out, "--resume")
    assert "resumed from" in proc.stdout
    assert resumed["test_score"] == reference["test_score"] and resumed["test_loss"] == reference["test_loss"]
    assert records(out) == records(root / "two") and len(records(out)) > 0


# ---- in-process: the order, and the arithmetic of the split --------------------------------------------------
def test_epoch_order_is_the_order_of_epoch_loader():
    data = torch.utils.data.TensorDataset(torch.arange(23))
    for seed, epoch in ((0, 0), (3, 5)):
        read = torch.cat([b[0] for b in common.epoch_loader(data, 4, seed, epoch)])
        assert torch.equal(read, common.epoch_order(23, seed, epoch))


@pytest.mark.parametrize("loss,batch,accum,n", [("ce", 8, 1, 21), ("ce", 5, 1, 11), ("rel_l2", 8, 1, 21),
                                                 ("rel_l2", 5, 1, 11), ("ce", 4, 2, 20), ("rel_l2", 4, 2, 20)])
def test_weighted_shares_average_to_the_one_process_gradient(monkeypatch, loss, batch, accum, n):
    """fit's arithmetic on a simulated world of 2: each rank's micro-batches (rows mode: its slice of each, uneven
    when the size is odd, a padding row when a micro-batch has 1 row; accum mode: whole micro-batches), loss x
    distributed.loss_weight, summed over the step, averaged over the ranks (DDP) = the 1-process step's gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x, y = torch.randn(n, 3), (torch.randint(0, 4, (n,)) if loss == "ce" else torch.randn(n, 4))
    task = types.SimpleNamespace(loss=loss, decode=None, pos_weight=None)
    order = common.epoch_order(n, 0, 0)

    def grads(pieces):
        model.zero_grad()
        for m, idx in pieces:
            with distributed.micro_batch(m):
                (common.task_loss(task, model(x[idx]), y[idx]) * distributed.loss_weight(m)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    steps = len(order.split(batch)) // accum
    one = [grads([p for p in distributed.micro_batches(order, batch, accum) if p[0].index // accum == s])
           for s in range(steps)]
    monkeypatch.setattr(distributed, "world", lambda: 2)
    for s in range(steps):
        ranks = []
        for r in range(2):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            mine = [p for p in distributed.micro_batches(order, batch, accum) if p[0].index // accum == s]
            assert len(mine) == (accum // 2 if accum % 2 == 0 else accum)
            ranks.append(grads(mine))
        torch.testing.assert_close((ranks[0] + ranks[1]) / 2, one[s], rtol=1e-5, atol=1e-6)
    if batch == 5:  # the last micro-batch of 11 rows has 1: rank 0 runs a padding row of weight 0
        monkeypatch.setattr(distributed, "rank", lambda: 0)
        assert distributed.micro_batches(order, batch, accum)[-1][0].share == 0.0


def test_one_process_is_untouched():
    """Without torchrun: world 1, the hook itself (no DDP), no collective, the RNG states saved as before."""
    assert distributed.world() == 1 and distributed.is_main()
    step = distributed.wrap(torch.nn.Identity(), lambda m, x, y, e: (x, {}), torch.device("cpu"))
    assert not isinstance(step, torch.nn.Module) and distributed.gather_objects({"a": 1}) == {"a": 1}
    m, idx = distributed.micro_batches(torch.arange(10), 4, 1)[-1]
    assert (m.index, m.size, m.share, distributed.loss_weight(m)) == (2, 2, 1.0, 1.0) and idx.tolist() == [8, 9]
