"""ORCA: "align then refine" cross-modal fine-tuning (Shen, Li, Tran, Chen, Roberts, Talwalkar; ICML 2023).

Idea. A pretrained transformer body (a text model such as RoBERTa, or Swin) is reused on a task from another
modality. Stage 1 wraps the body in a task-specific embedder (conv patches -> tokens) and head (common.build_model).
Stage 2 trains the *embedder alone* so that the distribution of the target embeddings comes close to the
distribution of the body's own pretraining-modality embeddings: it minimises the optimal-transport dataset distance
(OTDD) between mean-pooled target tokens and mean-pooled source (proxy) features. Stage 3 fine-tunes embedder, body
and head on the task loss, exactly as plain fine-tuning (finetune.py) does.

    paper   https://arxiv.org/abs/2302.05738          code  https://github.com/sjunhongshen/ORCA (19b8c1c)
    study   "What explains the success of cross-modal fine-tuning with ORCA?" (Garcia-de-Herreros et al. 2024,
            https://arxiv.org/abs/2403.13537): its four questions are the flags --source, --embedder_epochs,
            --freeze and --no-pretrained below.

    python orca.py                                          # MiniLM on UCR GunPoint, 2-core CPU, about 2 minutes
    python orca.py --task digits --freeze body              # 2D task; stage 3 trains embedder + head only
    python orca.py --task synthetic --body tiny --embedder_epochs 3 --epochs 1   # seconds, for tests
    python orca.py --task ecg --body roberta                # NAS-Bench-360 ECG with the official config (GPU)

Deviations from the official code (orca_pare_reference.md sections 2, 3 and 6):
- OTDD is our own otdd.py (log-domain Sinkhorn), not the vendored microsoft/otdd + geomloss. The source-source label
  distances are computed once (the official code recomputes the same values on every call).
- Source features: the official CIFAR-10 / CoNLL-2003 features are used when their files are in --data_dir; offline,
  the proxies are real data shipped with installed packages (standard-library docstrings for text bodies,
  scikit-learn digits for vision bodies), embedded by the body's own pretrained input embedding and mean-pooled, as
  the official features are (data.source_features).
- Per-class target samples are drawn with randperm instead of a shuffled DataLoader; the count per class is the same,
  B * (floor(maxsamples / B) + 1), or the whole class when it is smaller.
- `--embedder_epochs 0` keeps the embedder initialisation of the shared substrate (pretrained LayerNorm / positions
  copied), so that it is exactly finetune.py; the official code re-initialises the embedder in that case.
- Validation is carved from the training split and the best-on-validation checkpoint is tested (the official code
  selects the epoch on the test set). Stage 2 always runs in float32.

Under torchrun: in stage 2 each rank computes the OTDD of every W-th class (all ranks draw the same class subsets),
and the values and gradients are summed over the ranks, so every rank takes the same embedder step; the mmd and l2
objectives draw from the generator inside the distance and run whole on every rank instead. Stage 3 splits each batch
between the ranks (common.fit, DDP); rank 0 alone writes embedder.pt, the checkpoints and the log, and prints.
"""
import argparse
import math
import time

import torch

import common
import data
import distributed
import otdd

# ---- config --------------------------------------------------------------------------------------------------
# ORCA-specific per-task defaults; the shared fine-tuning hyperparameters (lr, epochs, batch, ...) come from
# data.TASKS. Official values: src/configs/*.yaml (orca_pare_reference.md 3.4): 60 embedder steps and maxsamples 128
# everywhere, except NinaPro (100 steps) and DeepSEA / PSICOV (maxsamples 64).
ORCA_DEFAULTS = {
    "ninapro": dict(embedder_epochs=100),
    "deepsea": dict(maxsamples=64),
    "psicov": dict(maxsamples=64),
    # offline and custom tasks keep the official 60 steps x 128 samples (stage 2 takes ~40 s on GunPoint on a CPU)
    **{name: dict(embedder_epochs=10, maxsamples=32) for name in data.TASKS if name.startswith("synthetic")},
}
OBJECTIVES = ["otdd", "otdd-gaussian", "mmd", "l2"]
FREEZE = {"none": (), "embedder": ("embedder",), "body": ("body",), "both": ("embedder", "body")}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("ORCA stage 2: embedder alignment")
    g.add_argument("--objective", default="otdd", choices=OBJECTIVES,
                   help="distance to the source features: otdd (exact label distances, official), otdd-gaussian "
                        "(Gaussian label distances), mmd (multi-bandwidth Gaussian MMD), l2 (paired-row distance)")
    g.add_argument("--embedder_epochs", type=int, default=60,
                   help="embedder optimiser steps (one per pass over the classes); 0 = plain fine-tuning")
    g.add_argument("--maxsamples", type=int, default=128,
                   help="target points per class per step (about; B*(floor(M/B)+1) as in the official loop)")
    g.add_argument("--source", default="auto",
                   help="source data: auto (the official conll / cifar10, downloaded on benchmark tasks, used on "
                        "others when in --data_dir; else the proxy docstrings for text bodies, digits for vision; "
                        "synthetic for tiny) | conll | cifar10 | docstrings | digits | synthetic | none (= no "
                        "alignment)")
    g.add_argument("--align_lr", type=float, default=None,
                   help="embedder lr of stage 2 (default: the official 10 x --lr when --lr <= 1e-3, else --lr)")
    g.add_argument("--eps", type=float, default=0.1, help="entropic regularisation of the Sinkhorn solves")
    g.add_argument("--num_pseudo_classes", type=int, default=10,
                   help="k-means clusters of the targets that act as classes for dense / regression tasks")
    g.add_argument("--embedder_ckpt", default=None,
                   help="PATH to an embedder.pt from an earlier run: load it and skip stage 2")
    g = parser.add_argument_group("ORCA stage 3: fine-tuning")
    g.add_argument("--freeze", default="none", choices=list(FREEZE),
                   help="what stays frozen in stage 3: none (official) | embedder | body | both (head only)")
    args = common.parse_args(parser, argv, method_defaults=ORCA_DEFAULTS)
    args.align_lr = embedder_lr(args.lr) if args.align_lr is None else args.align_lr
    if args.embedder_epochs < 0 or args.maxsamples < 2:
        raise common.UserError("--embedder_epochs must be >= 0 and --maxsamples >= 2")
    return args


# ---- stage 2: the alignment objective ------------------------------------------------------------------------
def embedder_lr(lr):
    """METHOD: the embedder's lr is 10x the fine-tuning lr when that is <= 1e-3 (task_configs.py, module='embedder')."""
    return lr * 10 if lr <= 1e-3 else lr


def step_lr(step, milestones=(20, 40, 60), base=0.2):
    """METHOD: the official `no_warmup_scheduler` StepLR: factor base^m, m = number of milestones < step."""
    return base ** sum(step > m for m in milestones)


def l2_distance(target, source, generator):
    """The official `utils.l2`: shuffle the source into batches of n target rows and average the Euclidean distance
    between *paired* rows (target i with source i). A crude, order-dependent proxy, kept for the ablation."""
    n = len(target)
    order = torch.randperm(len(source), generator=generator).to(source.device)
    batches = [order[i:i + n] for i in range(0, max(1, len(source) - n + 1), n)]
    return torch.stack([(target[:len(b)] - source[b]).norm(dim=1).mean() for b in batches]).mean()


def make_distance(objective, src_x, src_y, eps):
    """distance(target_features (n, D), generator) -> differentiable scalar, for one target class.

    Every target point carries the same dummy label 0 (embedder.py:otdd sets ys = zeros): the target's class
    structure enters only through the class-weighted sum of per-class distances (align_embedder)."""
    if objective.startswith("otdd"):
        # METHOD: OTDD against the *whole labelled* source set; the source side is cached once (otdd.OTDD).
        exact = otdd.OTDD(src_x, src_y, eps=eps, label_distance="gaussian" if objective == "otdd-gaussian" else "exact")
        return lambda f, g: exact(f, torch.zeros(len(f), dtype=torch.long, device=f.device))
    if objective == "mmd":
        # official MMD_loss: n random source rows, drawn with replacement, against the n target rows
        return lambda f, g: otdd.mmd(f, src_x[torch.randint(len(src_x), (len(f),), generator=g).to(src_x.device)])
    return lambda f, g: l2_distance(f, src_x, g)


def class_groups(labels):
    """Indices of each class with at least 2 points (the official loop skips smaller classes), and class weights
    |class| / N (embedder.py:load_by_class)."""
    groups, weights = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) >= 2:
            groups.append(idx)
            weights.append(len(idx) / len(labels))
    if not groups:
        raise common.UserError("no class has 2 or more training points, so stage 2 has nothing to align; "
                               "use --embedder_epochs 0 or --source none")
    return groups, weights


def weighted_distance(model, dataset, groups, weights, distance, n_take, generator, device, backward=False,
                      shard=False):
    """Sum over classes (in random order) of weight_c * distance(pooled embedder features of <= n_take points of
    class c). With backward=True each class's gradient is accumulated right away, as the official loop does, so only
    one class's graph is alive at a time. Returns the float value of the sum. shard (under torchrun; a distance that
    draws nothing from `generator`): each rank takes every W-th class, and the values and gradients are summed over
    the ranks."""
    total, world, rank = 0.0, distributed.world(), distributed.rank()
    for position, c in enumerate(torch.randperm(len(groups), generator=generator).tolist()):
        idx = groups[c][torch.randperm(len(groups[c]), generator=generator)[:n_take]]
        if shard and position % world != rank:
            continue  # another rank's class (every rank makes every draw, so the generators stay in step)
        # METHOD: target features are the embedder's tokens mean-pooled over the sequence (B, L, D) -> (B, D); the
        # body never runs in stage 2 (the official wrapper's output_raw=True).
        x = data.take(dataset, idx.tolist())[0]  # reads only these samples (large tasks stay on disk)
        features = model.embed(x.to(device)).float().mean(1)
        if not torch.isfinite(features).all():  # a diverged embedder: the caller stops the run (otdd.py would raise)
            total = math.nan
            break
        value = weights[c] * distance(features, generator)
        if backward:
            value.backward()
        total += value.item()
    if shard and world > 1:
        if backward:
            distributed.sum_grads(model.embedder.parameters())
        total = distributed.sum_logged([total], 1.0)[0]
    return total


def align_embedder(model, dataset, labels, src_x, src_y, args, run, device):
    """METHOD: ORCA stage 2 (embedder.py:get_tgt_model). Trains model.embedder alone for args.embedder_epochs steps
    to minimise the class-weighted distance to the source features. Returns (otdd_before, otdd_after): the exact
    OTDD on the same fixed target subsets before and after, whatever the training objective."""
    src_x, src_y = src_x.to(device).float(), src_y.to(device)
    groups, weights = class_groups(labels)
    distance = make_distance(args.objective, src_x, src_y, args.eps)
    measure = distance if args.objective == "otdd" else make_distance("otdd", src_x, src_y, args.eps)
    # the official loop breaks once it has seen *more* than maxsamples points: B * (floor(M/B) + 1) per class
    n_take = args.batch_size * (args.maxsamples // args.batch_size + 1)

    def fixed_otdd():  # the same subsets (generator reseeded) before and after training
        with torch.no_grad():
            return weighted_distance(model, dataset, groups, weights, measure, n_take,
                                     torch.Generator().manual_seed(args.seed + 7), device, shard=True)

    before = fixed_otdd()
    params = list(model.embedder.parameters())
    optimizer = common.make_optimizer(params, args.optimizer, args.align_lr, args.weight_decay, args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_lr)
    generator = torch.Generator().manual_seed(args.seed)
    key = args.objective.replace("-", "_")
    print(f"stage 2: {len(groups)} classes, {n_take} points per class, {len(src_x)} source points, "
          f"{args.objective} before {before:.4f}, embedder lr {args.align_lr:.1e}")
    model.train()
    run.truncate("align")  # a stage 2 redone after a kill logs its steps again
    for step in range(1, args.embedder_epochs + 1):
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        # METHOD: ONE optimiser step per embedder "epoch", on gradients accumulated over all classes
        value = weighted_distance(model, dataset, groups, weights, distance, n_take, generator, device, backward=True,
                                  shard=args.objective.startswith("otdd"))
        if not math.isfinite(value):
            common.stop_nonfinite(f"non-finite {args.objective} ({value}) at embedder step {step}", run,
                                  "lower --lr or raise --eps, and start afresh")
        optimizer.step()
        if not common.all_finite(params):  # NaN weights would next fail inside otdd.py; nothing NaN is saved
            common.stop_nonfinite(f"non-finite embedder weights after embedder step {step}", run,
                                  "lower --lr or raise --eps, and start afresh")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        print(f"align step {step}/{args.embedder_epochs} | {key} {value:.4f} | lr {lr:.1e} | "
              f"{(time.time() - t0) * 1000:.0f}ms/step")
        run.log(stage="align", step=step, lr=lr, **{key: value})
    after = fixed_otdd()
    print(f"stage 2 done: otdd {before:.4f} -> {after:.4f}")
    return before, after


# ---- stage 3 ablation: what stays frozen ---------------------------------------------------------------------
def freeze(model, which):
    """Freeze model.embedder and/or model.body (requires_grad False) for stage 3; returns the trainable parameters.
    `embedder`: the aligned embedder is kept as is; `body`: the pretrained body is kept; `both`: the head alone."""
    for name in FREEZE[which]:
        getattr(model, name).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise common.UserError(f"--freeze {which} leaves nothing to train (this task's head has no parameters); "
                               f"use --freeze embedder or body")
    return params


# ---- main ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = get_args()
    run, device = common.setup("orca", args)

    # data
    task = data.get_task(args.task, args.data_dir, args.data_path)

    # stage 1 (METHOD: dimensionality alignment): task-specific embedder and head around the pretrained body
    model = common.model_for(task, args).to(device)
    trainable, total = common.count_params(model)
    print(f"task {task.name}: {task.kind}, in {task.in_shape}, out {task.out_shape}, "
          f"train/val/test {len(task.train)}/{len(task.val)}/{len(task.test)} | params {trainable:,}/{total:,}")

    # stage 2 (METHOD: distribution alignment): train the embedder alone towards the source features. It is skipped
    # when an aligned embedder is given (--embedder_ckpt, e.g. for the --freeze ablations) or found (--resume), and
    # it is off for --embedder_epochs 0 / --source none, which makes this script plain fine-tuning (finetune.py).
    emb_path = run.dir / "embedder.pt"
    align = dict(source="none", objective=args.objective, embedder_epochs=args.embedder_epochs, otdd_before=None,
                 otdd_after=None)
    if args.embedder_ckpt or (args.resume and emb_path.exists()):
        state = common.load_embedder(model, args.embedder_ckpt or emb_path, "orca.py")
        align = {k: state.get(k) for k in align}  # describe the stage 2 that made this embedder
        print(f"stage 2 skipped: embedder loaded from {args.embedder_ckpt or emb_path} ({align})")
    elif args.embedder_epochs > 0 and args.source != "none":
        t0 = time.time()
        # auto: the official source, downloaded on a benchmark task; a proxy (one line says why) otherwise
        source = data.resolve_source(args.source, model.body, args.data_dir, args.task)
        align["source"] = source
        # the source features depend on the body's weights: a random body (--no-pretrained, tiny) gets its own cache
        body_key = f"{args.body}|pretrained" if args.pretrained and args.body != "tiny" else \
            f"{args.body}|random-seed{args.seed}"
        src_x, src_y = data.source_features(source, model.body, body_key, args.data_dir)
        # METHOD: dense / regression targets get k-means pseudo-classes of their labels (embedder.py:infer_labels)
        labels = data.class_labels(task, k=args.num_pseudo_classes, seed=args.seed)
        align["otdd_before"], align["otdd_after"] = align_embedder(model, task.train, labels, src_x, src_y, args,
                                                                   run, device)
        align["align_seconds"] = round(time.time() - t0, 1)
    else:
        align["embedder_epochs"] = 0
        print("stage 2 skipped (--embedder_epochs 0 or --source none): plain fine-tuning")
    common.save_checkpoint(dict(embedder=model.embedder.state_dict(), **align), emb_path)  # for --embedder_ckpt

    # stage 3: fine-tune, the same loop as finetune.py. ORCA trains everything; --freeze keeps parts fixed to ask what
    # the aligned embedder and the pretrained body each contribute (Garcia-de-Herreros et al. 2024, question 3).
    params = freeze(model, args.freeze)
    print(f"stage 3: freeze {args.freeze}, trainable params {sum(p.numel() for p in params):,}")
    common.fit(model, task, args, run, device, params=params)

    # test the last epoch's weights too (the official code prints "[test last]"): with a tiny validation split
    # (GunPoint: 10 series) the best-on-validation epoch is a noisy choice
    ctx, _ = common.autocast_context(device, args.dtype)
    last = common.evaluate(model, task, task.test, args.eval_batch_size, device, ctx)["score"]
    extra = dict(test_score_last=last, freeze=args.freeze, pretrained=args.pretrained, **align)
    # test the best-on-validation weights and save
    run.finish(common.test_best(model, task, args, run, device) | extra)
