"""Precision (issue 18, item 2): heads and losses run in float32 whatever the autocast (models.in_float32), so that a
bfloat16 body cannot round a dense prediction to 8 significant bits, and a float32 run is unchanged.

    python -m pytest tests/test_precision.py -v          # CPU, offline, a few seconds
"""
import numpy as np
import torch

import common
import data
import models

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_in_float32_switches_autocast_off_and_casts_half_inputs():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast(**BF16):
        assert (a @ b).dtype == torch.bfloat16  # autocast is really on here: the check below can fail
        out = models.in_float32(lambda x, y=None: x @ y)(a.bfloat16(), y=b)
    assert out.dtype == torch.float32 and torch.equal(out, a.bfloat16().float() @ b)
    double = torch.randn(3, dtype=torch.float64)
    assert models.in_float32(lambda x: x)(double) is double  # float64 (and float32) pass unchanged


def test_heads_return_float32_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(0)
    heads = [(models.PooledHead(16, 3), (2, 5, 16)), (models.DenseHead1D(2, 4, 18), (2, 5, 16)),
             (models.DenseHead2D(16, 2, (2, 2), 4, (8, 8), crop=True), (2, 4, 16))]
    for head, shape in heads:
        features = torch.randn(*shape, generator=g).bfloat16()  # what a bfloat16 body hands the head
        with torch.autocast(**BF16):
            out = head(features)
        assert out.dtype == torch.float32, type(head).__name__
        # the same numbers as the float32 head on the (upcast) features: nothing in the head is rounded
        assert torch.equal(out, type(head).forward.__wrapped__(head, features.float()))


def test_model_output_and_loss_are_float32_with_a_bfloat16_body():
    task = data.get_task("synthetic_dense_2d")
    torch.manual_seed(0)
    model = common.build_model(task, "tiny")
    x, y = data.take(task.train, range(8))
    with torch.autocast(**BF16):
        features = model.body(model.embed(x))
        # without the wrapper the head's 1x1 conv would return bfloat16 here (the check below can fail)
        assert type(model.head).forward.__wrapped__(model.head, features).dtype == torch.bfloat16
        pred = model(x)
        loss = common.task_loss(task, pred, y)
    assert pred.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.autocast(**BF16):
        loss = common.compute_loss("ce", torch.randn(4, 3).bfloat16(), torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32


def test_perfect_dense_prediction_has_zero_nrmse_under_autocast():
    # an O(1) field (values in [1, 2)) predicted exactly by a 1x1-conv dense head (identity weights)
    y = 1 + torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    head = models.DenseHead2D(1, 1, (16, 16), 1, (16, 16), crop=True)
    with torch.no_grad():
        head.conv.weight.fill_(1.0)
        head.conv.bias.zero_()
    features = y.flatten(2).transpose(1, 2)  # (B, 256, 1): float32 tokens carrying the field
    with torch.autocast(**BF16):
        pred = head(features)
        loss = common.compute_loss("nrmse", pred, y)
    assert pred.dtype == torch.float32 and loss.item() < 1e-6
    assert common.compute_metric("nrmse", pred.detach().numpy(), y.numpy()) < 1e-6
    # what the head returned before (its output in bfloat16): the error the issue measured, ~1.5e-3
    rounded = common.compute_metric("nrmse", y.bfloat16().float().numpy(), y.numpy())
    assert 1e-3 < rounded < 2e-3


def test_float32_results_are_unchanged_by_the_wrapper():
    # a float32 run outside autocast: the wrapped heads and loss give exactly the unwrapped numbers
    task = data.get_task("synthetic_dense")
    torch.manual_seed(0)
    model = common.build_model(task, "tiny")
    x, y = data.take(task.train, range(8))
    features = model.body(model.embed(x))
    pred = model.head(features)
    assert torch.equal(pred, type(model.head).forward.__wrapped__(model.head, features))
    assert torch.equal(common.compute_loss("nrmse", pred, y), common.compute_loss.__wrapped__("nrmse", pred, y))
    assert np.isfinite(common.compute_metric("nrmse", pred.detach().numpy(), y.numpy()))
