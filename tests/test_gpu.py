"""GPU smoke suite (issue 18, item 7): every method script for a few steps on the accelerator with bfloat16 autocast
(and finetune.py with float16, the GradScaler path), results.json written and finite, --resume continuing a run cut
after its first epoch there; heads, losses and the OT solver in float32 under autocast.

    python -m pytest -q tests/test_gpu.py                        # on a CUDA machine (skipped without CUDA)
    TEST_GPU_DEVICE=cpu python -m pytest -q tests/test_gpu.py    # the same checks on the CPU (about 2 minutes)

On the CPU the scripts ignore --dtype (common.autocast_context: autocast is for CUDA), so TEST_GPU_DEVICE=cpu checks
the plumbing of the suite, and the in-process dtype checks below run under CPU autocast. What only a GPU shows (FFT,
generators and index tensors on the right device, cuBLAS in bfloat16) needs the real run.
"""
import json
import math
import os

import pytest
import torch

import common
import data
import otdd
from conftest import run_script

DEVICE = os.environ.get("TEST_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (TEST_GPU_DEVICE=cpu runs it on the CPU)")

TINY = ["--task", "synthetic", "--body", "tiny", "--epochs", "2", "--batch_size", "16", "--log_interval", "1"]
SCRIPTS = {  # each method's own stage kept to a step or two
    "finetune.py": [],
    "orca.py": ["--embedder_epochs", "2", "--maxsamples", "16"],
    "pare.py": ["--source_n", "64"],
    "mona.py": ["--meta_steps", "2", "--source_batch_size", "4"],
    "proposed.py": ["--contrastive_epochs", "1"],
}
UPS = ["ups.py", "--body", "tiny", "--n_train", "2", "--n_test", "2", "--epochs", "1", "--align_epochs", "1",
       "--fewshot_n", "2", "--fewshot_epochs", "1", "--width", "4", "--modes", "4"]


def finite_results(out):
    """results.json of a finished run: every top-level number finite (None is a score not computed)."""
    results = json.loads((out / "results.json").read_text())
    numbers = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers and all(math.isfinite(v) for v in numbers.values()), numbers
    assert math.isfinite(results["test_score"])
    return results


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs_and_resumes_on_the_device(script, tmp_path):
    flags = [*TINY, *SCRIPTS[script], "--device", DEVICE, "--dtype", "bfloat16", "--data_dir", tmp_path / "data",
             "--out_dir", tmp_path / "out"]
    steps = math.ceil(len(data.get_task("synthetic").train) / 16)  # one epoch of optimiser steps
    proc, _ = run_script(script, *flags, "--max_steps", steps)  # cut after epoch 0: last.pt is the resume point
    assert (tmp_path / "out" / "last.pt").exists() and (tmp_path / "out" / "results.json").exists()
    proc, final = run_script(script, *flags, "--resume")
    assert "resumed from" in proc.stdout and "at epoch 1" in proc.stdout, proc.stdout[-2000:]
    assert finite_results(tmp_path / "out")["test_score"] == final["test_score"]
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_ups_runs_and_resumes_on_the_device(tmp_path):
    flags = [*UPS[1:], "--device", DEVICE, "--dtype", "bfloat16", "--data_dir", tmp_path / "data", "--out_dir",
             tmp_path / "out"]
    _, first = run_script(UPS[0], *flags)
    finite_results(tmp_path / "out")
    proc, again = run_script(UPS[0], *flags, "--resume")
    assert "skipped" in proc.stdout.lower() or "resumed" in proc.stdout.lower(), proc.stdout[-2000:]
    assert math.isfinite(again["test_score"])


def test_float16_autocast_with_grad_scaler(tmp_path):
    _, final = run_script("finetune.py", *TINY, "--device", DEVICE, "--dtype", "float16", "--data_dir",
                          tmp_path / "data", "--out_dir", tmp_path / "out")
    finite_results(tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("task_name", ["synthetic", "synthetic_2d", "synthetic_dense", "synthetic_dense_2d",
                                       "synthetic_multilabel"])
def test_heads_and_losses_are_float32_under_autocast(task_name, dtype):
    device = torch.device(DEVICE)
    task = data.get_task(task_name)
    torch.manual_seed(0)
    model = common.build_model(task, "tiny").to(device)
    x, y = (t.to(device) for t in data.take(task.train, range(8)))
    with torch.autocast(device.type, dtype=dtype):
        pred = model(x)
        loss = common.task_loss(task, pred, y)
    assert pred.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    score = common.evaluate(model, task, task.val, 32, device, torch.autocast(device.type, dtype=dtype))["score"]
    assert math.isfinite(score)


def test_ot_solver_runs_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g).to(DEVICE), (torch.randn(30, 8, generator=g) + 1).to(DEVICE)
    reference = otdd.sinkhorn_divergence(x, y)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        value = otdd.sinkhorn_divergence(x, y)
    assert value.dtype == torch.float32 and torch.allclose(value, reference, rtol=1e-4)
