"""Source data of `--source auto` (issue 18, item 3): on a benchmark task the official source (CIFAR-10 / CoNLL-2003)
is downloaded as the task data are, a proxy is used only when that fails, with one printed line, and results.json
records the source used ("none" without an alignment / mixing stage). Offline tasks never try the network.

    python -m pytest tests/test_source.py -v          # CPU, offline (no network is ever reached), about 1.5 minutes
"""
import io
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest

import common
import data
import official_data
from conftest import run_script


def body(kind, dim):
    b = common.build_body("tiny")
    b.kind, b.dim = kind, dim
    return b


def no_download(*args, **kwargs):
    raise AssertionError("a download was tried")


def source_lines(out):
    return [line for line in out.splitlines() if line.startswith("source:")]


@pytest.mark.parametrize("offline", ["DATA_OFFLINE", "no network"])
@pytest.mark.parametrize("kind, dim, task, proxy, official", [("vision", 128, "cifar100", "digits", "cifar10"),
                                                              ("text", 768, "ecg", "docstrings", "conll")])
def test_benchmark_task_falls_back_to_the_proxy_with_one_line(tmp_path, monkeypatch, capsys, offline, kind, dim,
                                                              task, proxy, official):
    def refused(url, timeout):
        raise urllib.error.URLError("no network here")
    monkeypatch.setattr(official_data.urllib.request, "urlopen", refused)  # never the real network
    if offline == "DATA_OFFLINE":
        monkeypatch.setenv("DATA_OFFLINE", "1")
    assert data.default_source(body(kind, dim), tmp_path, task) == proxy
    lines = source_lines(capsys.readouterr().out)
    assert len(lines) == 1, lines
    assert f"offline proxy '{proxy}'" in lines[0] and f"official {official}" in lines[0]
    assert ("DATA_OFFLINE" if offline == "DATA_OFFLINE" else "no network here") in lines[0]  # why
    assert not list(tmp_path.rglob("*.part"))


def cifar10_archive(path, n=4):
    """A tiny cifar-10-python.tar.gz in the real layout: cifar-10-batches-py/data_batch_1..5 (python pickles)."""
    rng = np.random.RandomState(0)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            blob = pickle.dumps({b"labels": list(rng.randint(0, 10, n)),
                                 b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8)})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_benchmark_task_downloads_the_official_source(tmp_path, monkeypatch, capsys):
    fetched = []

    def fake_fetch(task, data_dir, rel, url=None, checksum=None, home=None):  # the "download": tiny files
        path = tmp_path / rel
        fetched.append(url)
        if rel.endswith(".tar.gz"):
            cifar10_archive(path)
        else:
            rng = np.random.RandomState(len(fetched))
            np.save(path, rng.randn(6, 32, 768).astype(np.float32) if "xs" in rel else rng.randint(0, 8, 6))
        return path
    monkeypatch.setattr(official_data, "fetch", fake_fetch)
    assert data.default_source(body("vision", 128), tmp_path, "darcy") == "cifar10"
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    x, y = data.load_source("cifar10", body("vision", 128), tmp_path, n=12).tensors
    assert x.shape == (12, 3, 32, 32) and y.shape == (12,)
    assert data.default_source(body("text", 768), tmp_path, "pde_burgers") == "conll"
    assert fetched[1:] == [url for _, url in data.CONLL_FILES]
    x, y = data.load_source("conll", body("text", 768), tmp_path).tensors
    assert x.shape == (6, 32, 768) and y.shape == (6,)
    assert not source_lines(capsys.readouterr().out)  # nothing to report: the official source is used
    # present now: no second download
    monkeypatch.setattr(official_data, "fetch", no_download)
    assert data.default_source(body("vision", 128), tmp_path, "cifar100") == "cifar10"


def test_offline_tasks_never_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(official_data, "fetch", no_download)
    monkeypatch.setattr(official_data.urllib.request, "urlopen", no_download)
    for task in ("digits", "gunpoint", "custom", "synthetic", None):
        assert data.default_source(body("vision", 128), tmp_path, task) == "digits"
        assert data.default_source(body("text", 768), tmp_path, task) == "docstrings"
        assert data.default_source(body("tiny", 64), tmp_path, task) == "synthetic"
    assert data.default_source(body("tiny", 64), tmp_path, "cifar100") == "synthetic"  # the test body, always
    assert not source_lines(capsys.readouterr().out)


def test_resolve_source_takes_a_named_source_as_given_and_auto_from_default_source(tmp_path, monkeypatch):
    monkeypatch.setattr(official_data, "fetch", no_download)
    assert data.resolve_source("docstrings", body("vision", 128), tmp_path, "cifar100") == "docstrings"
    assert data.resolve_source("auto", body("vision", 128), tmp_path, "gunpoint") == "digits"
    assert data.resolve_source("auto", body("tiny", 64), tmp_path, "cifar100") == "synthetic"

def test_text_body_that_cannot_read_conll_says_so_on_benchmark_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(official_data, "fetch", no_download)  # 384-wide MiniLM: CoNLL features are 768 wide
    assert data.default_source(body("text", 384), tmp_path, "gunpoint") == "docstrings"
    assert not source_lines(capsys.readouterr().out)
    assert data.default_source(body("text", 384), tmp_path, "satellite") == "docstrings"
    lines = source_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "768 wide" in lines[0] and "384 wide" in lines[0]


@pytest.mark.parametrize("script, off", [("orca.py", ["--embedder_epochs", "0"]), ("pare.py", ["--k0", "0"]),
                                         ("mona.py", ["--meta_steps", "0"]), ("proposed.py", ["--version", "001"])])
def test_results_record_the_source_used(run, script, off):
    tiny = ["--task", "synthetic", "--body", "tiny", "--epochs", "1", "--max_steps", "1"]
    _, final = run(script, *tiny, *off)
    assert final["source"] == "none"  # no alignment / mixing stage: no source used


def test_scripts_record_the_source_of_their_stage(run):
    tiny = ["--task", "synthetic", "--body", "tiny", "--epochs", "1", "--max_steps", "1"]
    _, final = run("mona.py", *tiny, "--meta_steps", "1", "--source_batch_size", "4")
    assert final["source"] == "synthetic"


def test_benchmark_run_without_network_records_the_proxy(tmp_path, monkeypatch):
    # a real benchmark task (CIFAR-100 in its own format, tiny) with a small random Swin: the official CIFAR-10 source
    # cannot be had offline, so PaRe mixes in the digits proxy, says so in one line and records it
    rng = np.random.RandomState(0)
    (tmp_path / "cifar-100-python").mkdir()
    for split, n in (("train", 12), ("test", 4)):
        with open(tmp_path / "cifar-100-python" / split, "wb") as f:
            pickle.dump({b"fine_labels": list(rng.randint(0, 100, n)),
                         b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8)}, f)
    monkeypatch.setenv("DATA_OFFLINE", "1")
    proc, final = run_script("pare.py", "--task", "cifar100", "--body", "swin_tiny_patch4_window7_224",
                             "--no-pretrained", "--data_dir", tmp_path, "--out_dir", tmp_path / "out", "--epochs", "1",
                             "--max_steps", "1", "--batch_size", "4", "--accum", "1", "--source_n", "16")
    lines = source_lines(proc.stdout)
    assert len(lines) == 1 and "offline proxy 'digits'" in lines[0] and "DATA_OFFLINE" in lines[0], lines
    assert final["source"] == "digits"
