"""Losses, metrics and evaluation: what the numbers in log.jsonl and results.json mean.

The training losses and metrics of the official configs (orca_pare_reference.md §3.4: ORCA's per-task loss and
metric), checked against their definitions and scikit-learn in tests/test_common.py. One module so that every
method reports the same number the same way (design.md); common.py re-exports every name here.
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F

import distributed
from models import in_float32


# ---- losses and metrics --------------------------------------------------------------------------------------
def _per_sample(t):
    return t.reshape(t.shape[0], -1).float()


# training losses that the official code sums over the batch (Darcy: LpLoss(size_average=False)): the sum is part of
# the effective lr and of PaRe's task-vs-source balance. evaluate() divides by N: reported losses are per sample.
SUMMED_LOSSES = {"rel_l2"}


@in_float32  # autocast off, inputs in float32 (models.in_float32; the official code computes losses in float32)
def compute_loss(name, pred, y, pos_weight=None):
    """Training losses of the official configs. pred and y are batched; classification y are class ids. A loss in
    SUMMED_LOSSES is the sum over the batch, every other one the mean."""
    if name == "ce":
        return F.cross_entropy(pred.float(), y)
    if name == "bce":
        pw = None if pos_weight is None else torch.full_like(y, float(pos_weight), dtype=torch.float32)
        return F.binary_cross_entropy_with_logits(pred.float(), y.float(), pos_weight=pw)
    if name == "mse":
        return F.mse_loss(pred.float(), y.float())
    p, t = _per_sample(pred), _per_sample(y)
    if name == "rmse":
        return (p - t).pow(2).mean(1).sqrt().mean()
    if name == "nrmse":  # PDEBench: per-sample RMSE / RMS of the target, averaged
        return ((p - t).pow(2).mean(1).sqrt() / t.pow(2).mean(1).sqrt().clamp_min(1e-12)).mean()
    if name == "rel_l2":  # Darcy: ||y_hat - y|| / ||y|| per sample, summed (official LpLoss(size_average=False))
        return ((p - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)).sum()
    raise ValueError(f"unknown loss {name}")


def mae8(pred, y, min_sep=24, max_dist=8.0):
    """PSICOV MAE@8. pred, y: (N, L, L) distance maps (y NaN where padded). Symmetrise and clamp the prediction
    at 0.01; over upper-triangle pairs with |i-j| >= 24 and true distance <= 8 A; mean per protein, nanmean."""
    pred = np.clip((pred + np.swapaxes(pred, -1, -2)) / 2, 0.01, None)
    L = y.shape[-1]
    i, j = np.triu_indices(L, k=min_sep)
    scores = []
    for p, t in zip(pred, y):
        tv, pv = t[i, j], p[i, j]
        keep = np.isfinite(tv) & (tv <= max_dist)
        scores.append(np.abs(pv[keep] - tv[keep]).mean() if keep.any() else np.nan)
    return float(np.nanmean(scores))


def compute_metric(name, pred, y):
    """Reported error metrics (lower is better), on the *whole* evaluation set (not averaged over chunks as the
    official code does). pred: logits / predictions (N, ...); y: targets (N, ...), numpy arrays."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
    if name == "error":  # 0-1 error (fraction; the papers print it in %)
        return float((pred.argmax(1) != y).mean())
    if name == "1-f1":  # ECG: 1 - macro F1 over all classes
        return float(1 - f1_score(y, pred.argmax(1), labels=list(range(pred.shape[1])), average="macro",
                                  zero_division=0))
    if name == "1-auroc":  # multi-label: mean per-class AUROC over classes with both labels; dense: one AUROC
        if pred.ndim == 2 and y.ndim == 2:
            cols = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
            return float(1 - np.mean([roc_auc_score(y[:, c], pred[:, c]) for c in cols]))
        return float(1 - roc_auc_score(y.reshape(-1), pred.reshape(-1)))
    if name == "1-map":  # FSD50K: 1 - mean per-class average precision
        cols = [c for c in range(y.shape[1]) if y[:, c].sum() > 0]
        return float(1 - np.mean([average_precision_score(y[:, c], pred[:, c]) for c in cols]))
    p, t = pred.reshape(len(pred), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    if name == "nrmse":
        return float((np.sqrt(((p - t) ** 2).mean(1)) / np.sqrt((t ** 2).mean(1))).mean())
    if name == "rel_l2":
        return float((np.linalg.norm(p - t, axis=1) / np.linalg.norm(t, axis=1)).mean())
    if name == "mse":
        return float(((p - t) ** 2).mean())
    if name == "mae8":
        return mae8(pred.reshape(len(pred), *pred.shape[-2:]), y.reshape(len(y), *y.shape[-2:]))
    raise ValueError(f"unknown metric {name}")


def task_loss(task, pred, y):
    """The task's training loss, after the task's optional decoding (Darcy: back to physical units)."""
    if task.decode is not None:
        pred, y = task.decode(pred), task.decode(y)
    loss = compute_loss(task.loss, pred, y, task.pos_weight)
    m = distributed.micro  # under torchrun, in a training step: this rank's rows of a micro-batch
    if task.loss in SUMMED_LOSSES and m.size and m.size != len(pred):
        loss = loss * (m.size / len(pred))  # a sum over the micro-batch: DDP averages W shares x W / (their rows)
    return loss


@torch.no_grad()
def predict(model, dataset, batch_size=256, device="cpu", ctx=contextlib.nullcontext(), shard=True):
    """Run the model over a dataset; returns (predictions, targets) as CPU float tensors. Under torchrun each rank
    predicts its block of the rows and every rank gets all of them, in order (distributed.gather_rows); shard=False:
    every rank predicts every row in the same batches (a model whose output depends on the batch)."""
    model.eval()
    preds, ys = [], []
    n, part = len(dataset), dataset
    if distributed.world() > 1 and shard:
        part = torch.utils.data.Subset(dataset, distributed.eval_indices(n))
    for x, y in torch.utils.data.DataLoader(part, batch_size=batch_size):
        with ctx:
            preds.append(model(x.to(device)).float().cpu())
        ys.append(y)
    if part is dataset:
        return torch.cat(preds), torch.cat(ys)
    return distributed.gather_rows(torch.cat(preds), n), distributed.gather_rows(torch.cat(ys), n)


def evaluate(model, task, dataset, batch_size=256, device="cpu", ctx=contextlib.nullcontext(), shard=True):
    """{"loss", "score"} of a model on a dataset: the task loss per sample and the task metric on the whole set."""
    pred, y = predict(model, dataset, batch_size, device, ctx, shard)
    loss = task_loss(task, pred, y).item() / (len(pred) if task.loss in SUMMED_LOSSES else 1)
    if task.decode is not None:
        pred, y = task.decode(pred), task.decode(y)
    return {"loss": loss, "score": compute_metric(task.metric, pred.numpy(), y.numpy())}
