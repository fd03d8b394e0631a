"""Tests of ups.py: the unified representation, the solver data, the model plumbing, and a smoke run.

    python -m pytest tests/test_ups.py -v        # CPU, offline, < 1 minute
"""
import json

import numpy as np
import pytest
import torch

import common
import official_data
import ups

MIX = [  # (spec, batch): 1D and 2D, one to four channels, native grids coarser than the unified one
    (dict(dim=1, channels=("u",), n=16), 3),
    (dict(dim=1, channels=("v",), n=8), 2),
    (dict(dim=2, channels=("u", "v"), n=16), 2),
    (dict(dim=2, channels=("v",), n=8), 1),
    (dict(dim=1, channels=("Vx", "density", "pressure"), n=16), 2),  # 1D CFD: no Vy
    (dict(dim=2, channels=("Vx", "Vy", "density", "pressure"), n=16), 2),  # 2D CFD: every slot
    (dict(dim=2, channels=("h",), n=16), 1),  # shallow water: the height in the first slot
]


def test_unified_round_trip_is_exact_for_a_mix_of_families():
    torch.manual_seed(0)
    fields = [torch.randn(B, len(s["channels"]), *(s["n"],) * s["dim"]) for s, B in MIX]
    unified = [ups.to_unified(f, s, size=16) for f, (s, _) in zip(fields, MIX)]
    batch = torch.cat([u for u, _ in unified])  # one tensor for the whole mix
    assert ups.C_MAX == 4 and batch.shape == (sum(B for _, B in MIX), 4, 16, 16)
    for f, chunk, (s, _), (_, mask) in zip(fields, batch.split([B for _, B in MIX]), MIX, unified):
        assert torch.equal(ups.from_unified(chunk, s), f)
        slots = [ups.SLOT[q] for q in s["channels"]]
        assert torch.equal(chunk[:, slots, 0, :: 16 // s["n"]], f if s["dim"] == 1 else f[:, :, 0])  # by name
        absent = [c for c in range(ups.C_MAX) if c not in slots]
        assert chunk[:, absent].abs().sum() == 0 and mask[:, absent].sum() == 0  # missing quantity: zero, masked
        present = mask.sum() / len(f) / len(s["channels"])
        assert present == (16 if s["dim"] == 1 else 256)  # 1D: one row counts; 2D: the whole grid
        if s["dim"] == 1:  # broadcast along the second axis
            assert torch.equal(chunk, chunk[:, :, :1].expand_as(chunk))


def test_masked_unified_nrmse_equals_the_family_nrmse():
    """The loss on masked unified tensors is the nRMSE of the family's own fields (so training optimises it)."""
    torch.manual_seed(1)
    for s, B in MIX:
        y, pred = (torch.randn(B, len(s["channels"]), *(s["n"],) * s["dim"]) for _ in range(2))
        (uy, mask), (up, _) = ups.to_unified(y, s, 16), ups.to_unified(pred, s, 16)
        unified = common.compute_loss("nrmse", up * mask, uy * mask).item()
        own = common.compute_metric("nrmse", pred.numpy(), y.numpy())
        assert unified == pytest.approx(own, rel=1e-5)


def test_unified_rejects_wrong_shapes_and_pads_1d_coordinates_with_zero():
    with pytest.raises(common.UserError):
        ups.to_unified(torch.zeros(2, 1, 10), dict(dim=1, channels=("u",), n=10), size=16)  # 10 does not divide 16
    with pytest.raises(common.UserError):
        ups.to_unified(torch.zeros(2, 2, 8), dict(dim=1, channels=("u",), n=8), size=16)  # two channels, one named
    grid1, grid2 = ups.coordinate_grid(dict(dim=1), 8), ups.coordinate_grid(dict(dim=2), 8)
    assert grid1[1].abs().sum() == 0 and torch.equal(grid1[0], grid2[0]) and torch.equal(grid2[1], grid2[0].T)


def _spec(name, dt, steps):
    return dict(ups.FAMILIES[name], dt=dt, times=dt * np.arange(steps + 1))


def test_advection_matches_the_exact_shifted_solution():
    spec = ups.FAMILIES["advection"]
    traj = spec["solve"](np.random.RandomState(0), 3, spec)[:, :, 0]  # (3, 11, 32)
    k = np.fft.rfftfreq(spec["n"], 1.0 / spec["n"])
    for t_index, t in enumerate(spec["times"]):  # the band-limited profile shifted by beta t, exactly, by FFT
        exact = np.fft.irfft(np.fft.rfft(traj[:, 0]) * np.exp(-2j * np.pi * k * spec["beta"] * t), n=spec["n"])
        assert np.abs(traj[:, t_index] - exact).max() < 1e-5 * np.abs(exact).max()
    assert np.abs(traj[:, -1] - traj[:, 0]).max() > 0.1  # and it did move


def _dx(u, order):  # spectral derivative written independently of ups.spectral_dx
    n = u.shape[-1]
    return np.real(np.fft.ifft(np.fft.fft(u) * (2j * np.pi * np.fft.fftfreq(n, 1.0 / n)) ** order))


@pytest.mark.parametrize("name", ["burgers", "reacdiff"])
def test_1d_solver_data_satisfy_their_equation(name):
    """Centred time difference over a tiny step against the right-hand side evaluated by the test itself."""
    dt, f = 1e-4, ups.FAMILIES[name]
    u = f["solve"](np.random.RandomState(1), 4, _spec(name, dt, 2))[:, :, 0]  # (4, 3, 32)
    dudt = (u[:, 2] - u[:, 0]) / (2 * dt)
    mid = u[:, 1]
    if name == "burgers":
        rhs, other = -mid * _dx(mid, 1) + f["nu"] * _dx(mid, 2), f["nu"] * _dx(mid, 2)
    else:
        rhs, other = f["nu"] * _dx(mid, 2) + f["rho"] * mid * (1 - mid), f["rho"] * mid * (1 - mid)
    error = np.abs(dudt - rhs).max()
    assert error < 1e-3 * np.abs(rhs).max()
    assert np.abs(dudt - rhs - 0.1 * other).max() > 10 * error  # sharp enough to see a 10 % change of nu / rho


def test_burgers_conserves_the_mean_over_a_saved_trajectory():
    """Exact on the solver's grid; on the saved (every 4th point) grid up to the aliasing of the steep fronts."""
    f = ups.FAMILIES["burgers"]
    u = f["solve"](np.random.RandomState(2), 4, f)[:, :, 0]  # (4, 11, 32), t up to 0.5
    drift = np.abs(u.mean(-1) - u[:, :1].mean(-1)).max()
    assert drift < 1e-3 * np.abs(u).max()
    assert np.abs(u[:, -1] - u[:, 0]).max() > 100 * drift  # the state itself changes a lot


def test_2d_fitzhugh_nagumo_data_satisfy_their_equations():
    import scipy.sparse as sp
    dt, f = 1e-4, ups.FAMILIES["reacdiff2d"]
    uv = f["solve"](np.random.RandomState(3), 2, _spec("reacdiff2d", dt, 2))  # (2, 3, 2, 32, 32)
    n, h = f["n"], 2.0 / f["n"]
    second = sp.diags([np.ones(n - 1), -2 * np.ones(n), np.ones(n - 1)], [-1, 0, 1]).tolil()
    second[0, 0] = second[-1, -1] = -1  # zero flux through the walls
    lap = (sp.kron(sp.eye(n), second) + sp.kron(second, sp.eye(n))) / h ** 2  # independent of the solver's stencil
    for b in range(2):
        u, v = uv[b, 1, 0].ravel(), uv[b, 1, 1].ravel()
        rhs = [f["Du"] * lap @ u + u - u ** 3 - f["k"] - v, f["Dv"] * lap @ v + u - v]
        for c in range(2):
            dudt = (uv[b, 2, c] - uv[b, 0, c]).ravel() / (2 * dt)
            assert np.abs(dudt - rhs[c]).max() < 1e-3 * np.abs(rhs[c]).max()


@pytest.mark.parametrize("head", ["tokens", "pooled"])
def test_untrained_residual_model_is_persistence(head):
    """Zero-initialised residual head: predictions equal the input state, through pack / mask / rollout."""
    torch.manual_seed(0)
    args = ups.get_args(["--body", "tiny", "--size", "16", "--modes", "4", "--width", "4", "--head", head])
    specs = [dict(ups.FAMILIES["advection"], n=16), dict(ups.FAMILIES["reacdiff2d"], n=8)]
    model = ups.UPSModel(common.build_body("tiny"), specs, args)
    for fam, s in enumerate(specs):
        traj = torch.randn(2, 4, len(s["channels"]), *(s["n"],) * s["dim"])
        r = ups.evaluate_family(model, traj, s, fam, 16, "cpu")
        assert r["nrmse"] == pytest.approx(r["persistence_nrmse"], abs=1e-6)
        assert r["rollout_nrmse"] == pytest.approx(r["persistence_rollout_nrmse"], abs=1e-6)
        assert r["nrmse"] > 0.5  # random data: persistence is far off, so the equality above is not trivial


def test_spectral_layers_run_in_float32_under_bfloat16_autocast(monkeypatch):
    """The FFTs see float32 inputs under bfloat16 autocast (CUDA autocast would pass bfloat16 through; CPU autocast
    upcasts inside the FFT op, below the Python call recorded here, so this test sees what a GPU would get)."""
    seen, rfft2 = [], torch.fft.rfft2
    monkeypatch.setattr(torch.fft, "rfft2", lambda x, *a, **k: (seen.append(x.dtype), rfft2(x, *a, **k))[1])
    args = ups.get_args(["--body", "tiny", "--size", "16", "--modes", "4", "--width", "4"])
    model = ups.UPSModel(common.build_body("tiny"), [dict(ups.FAMILIES["reacdiff2d"], n=16)], args)
    x = ups.pack(torch.randn(2, ups.C_MAX, 16, 16), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lifted = model.embedder.lift(torch.cat([x[:, :-1], model.grids[[0, 0]]], 1))
        out = model(x)
    assert lifted.dtype == torch.bfloat16  # autocast is on: without the guard the spectral input would be bfloat16
    assert seen == [torch.float32] * args.fno_layers and torch.isfinite(out).all()


def test_fno_only_model_never_runs_the_body(monkeypatch):
    """--no-use_body: the FNO embedder and head alone (the comparison of issue 17); with the body it is called."""
    specs = [dict(ups.FAMILIES["reacdiff2d"], n=16)]
    x = ups.pack(torch.randn(2, ups.C_MAX, 16, 16), 0)
    for flag, calls in (("--no-use_body", 0), ("--use_body", 1)):
        args = ups.get_args(["--body", "tiny", "--size", "16", "--modes", "4", "--width", "4", flag])
        body, seen = common.build_body("tiny"), []
        model = ups.UPSModel(body, specs, args)
        forward = body.forward
        monkeypatch.setattr(body, "forward", lambda *a, **k: (seen.append(1), forward(*a, **k))[1])
        assert model(x).shape == (2, ups.C_MAX, 16, 16) and len(seen) == calls


def test_smoke_run_tiny(run, tmp_path):
    proc, final = run("ups.py", "--body", "tiny", "--n_train", 2, "--n_test", 2, "--epochs", 1, "--align_epochs", 1,
                      "--fewshot_n", 2, "--fewshot_epochs", 1, "--width", 4, "--modes", 4)
    assert final["metric"] == "nrmse" and np.isfinite(final["test_score"])
    assert set(final["families"]) == {"advection", "burgers", "reacdiff", "reacdiff2d"}
    for r in final["families"].values():
        assert all(np.isfinite(v) and v > 0 for v in r.values())
    assert set(final["fewshot"]["burgers_nu0.05"]) >= {"zero_shot", "ups", "scratch"}
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["test_score"] == final["test_score"]
    assert (out / "embedder.pt").exists() and (out / "ckpt.pt").exists()
