"""Shared test set-up: offline hub (fail fast), the repo root on sys.path, and a helper to run a script.

Run the whole suite with `python -m pytest` from the repo root (CPU only, no network)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # hub downloads fail at once instead of retrying
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_script(script, *args, cwd=None, check=True, timeout=300):
    """Run `python script args...` as a subprocess (CleanRL-style smoke test).
    Returns (completed process, the dict on its `FINAL {json}` line or None)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    final = [line for line in proc.stdout.splitlines() if line.startswith("FINAL ")]
    return proc, (json.loads(final[-1][6:]) if final else None)


@pytest.fixture
def run(tmp_path):
    """run(script, *args): a smoke run with out_dir and data_dir inside the test's tmp_path."""
    def _run(script, *args, check=True):
        extra = [] if "--out_dir" in args else ["--out_dir", tmp_path / "out"]
        extra += [] if "--data_dir" in args else ["--data_dir", tmp_path / "data"]
        return run_script(script, *args, *extra, check=check)
    return _run
