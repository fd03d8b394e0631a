"""MoNA: meta-learned modality knowledge alignment (Ma, Li, Cai, Kang; ICML 2024).

Idea. Cross-modal fine-tuning reuses less of the body's source knowledge the larger the modality gap is: fine-tuning
distorts what the encoder knew (linear probes on source data get worse). MoNA first *meta-learns the target
embedder* phi_e so that a fine-tuning step of the encoder on target data keeps the encoder good at the source
modality, then fine-tunes everything. Stage 1 (Algorithm 1), for I_1 iterations: take the target model (phi_e and the
pretrained encoder theta_f0 and the head), virtually update it, theta* = theta - alpha grad_theta L_inner (L_inner =
target task loss); pass a labelled *source* batch through the body's frozen pretrained input embedding and the
virtually updated encoder; score its features with L_outer = L_align + L_uniform (Wang & Isola 2020); update phi_e
alone with beta grad of L'_outer = lambda L_outer + L_inner. The virtual update is thrown away: the encoder starts
every iteration from theta_f0. Stage 2 is plain full fine-tuning (common.fit).

    paper   https://arxiv.org/abs/2406.18864 (PMLR v235, 33777-33793); no public code was found: the paper and its
            Algorithm 1 are the spec.

    python mona.py                                         # MiniLM on UCR GunPoint: 20 meta steps, 60 epochs (CPU)
    python mona.py --task digits --distortion              # 2D task; linear-probe source accuracy before / after
    python mona.py --task synthetic --body tiny --epochs 1 # seconds, for tests
    python mona.py --embedder_epochs 0 --distortion        # plain fine-tuning, with the same distortion measure

Choices where the paper is silent or the slides are ambiguous (there is no official code to deviate from):
- Both minus signs of the slide's L_outer = -E_{y_i = y_j} ||f_i - f_j||^2 - log E exp(-2 ||f_i - f_j||^2) are
  dropped: L_align = +E_{i<j, y_i = y_j} ||f_i - f_j||^2 (alpha = 2), L_uniform = +log E_{i<j} exp(-2 ||f_i - f_j||^2),
  Wang & Isola's losses. L'_outer is *minimised* (phi_e <- phi_e - beta grad), and as printed the first term would
  push same-label source features apart and the second pull all features together (collapse): the negation of
  Wang & Isola's objective, the opposite of the "source discriminability" the slide says L_outer measures. Features
  are mean-pooled encoder outputs, L2-normalised by default (Wang & Isola; --no-normalize turns it off).
- theta = encoder + head (--inner_params all) or the encoder alone (body); the embedder is not part of the virtual
  update because the source path does not use it. Only the encoder's virtual step reaches L_outer; the head is
  included because L_inner needs it, and with --inner_steps > 1 its step changes the encoder's next one.
- The gradient of L_outer reaches phi_e *only* through theta*(phi_e), i.e. through grad_theta L_inner: a second-order
  term (create_graph=True). --first_order detaches that gradient, so the L_outer part vanishes and stage 1 becomes
  embedder training on L_inner alone (an ablation, not a cheap MAML-style approximation). L_inner's own gradient
  reaches phi_e directly. L_inner in L'_outer is the loss at theta (before the virtual step), on the same batch.
- The embedder update uses the script's optimiser (AdamW by default) with lr beta = --outer_lr, not plain SGD; beta
  defaults to 10x the fine-tuning lr, the embedder-lr rule of ORCA's code (task_configs.py), which MoNA compares to
  (offline / custom tasks: 1x, AUTO_OUTER_LR_MULT, chosen on the development suite).
- alpha, beta, lambda, I_1 are not in the slides; defaults below are ours (see docs/mona.md). Attention runs on
  PyTorch's math kernel during the virtual update, because the fused kernels have no double backward.

Under torchrun: stage 1 runs whole and identically on every rank (the virtual step and L_uniform need the whole batch:
they are not sums over samples, so stage 1 is not faster on more GPUs); stage 2 splits each batch (common.fit, DDP,
which also starts every rank from rank 0's weights); the distortion probe runs on every rank; rank 0 writes, prints.
"""
import argparse
import contextlib
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
import data

# ---- config --------------------------------------------------------------------------------------------------
# MoNA-specific per-task defaults; the shared fine-tuning hyperparameters come from data.TASKS. I_1 is not in the
# slides: 5 passes on the benchmark tasks; 20 meta steps (AUTO_META_STEPS) on the data-aware offline and custom
# tasks, whatever their size, which a 2-core CPU runs in a minute or two.
AUTO_META_STEPS = 20
# beta on the data-aware tasks: --lr (1e-3), not ORCA's 10 x --lr. Suite, seeds 0-2, 10x -> 1x: GunPoint 0.198 ->
# 0.142, Coffee 0.131 -> 0.071, PigCVP 0.604 -> 0.493, BasicMotions 0 -> 0, Fashion-MNIST 0.243 -> 0.251, digits
# 0.032 -> 0.053 (worse); 3x on PigCVP 0.529, GunPoint 0.20, Coffee 0.167
AUTO_OUTER_LR_MULT = 1.0
MONA_DEFAULTS = {
    "burgers": dict(meta_epochs=1),
    **{name: dict(meta_epochs=1) for name in data.TASKS if name.startswith("synthetic")},
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("MoNA stage 1: meta-learned target embedder")
    g.add_argument("--source", default="auto",
                   help="labelled source data: auto (the official conll / cifar10, downloaded on benchmark tasks, "
                        "used on others when in --data_dir; else the proxy docstrings for text bodies, digits for "
                        "vision, synthetic for tiny) | conll | cifar10 | docstrings | digits | synthetic | "
                        "none (= plain fine-tuning)")
    # --embedder_epochs: the name every method gives its embedder stage (design.md's command line, as proposed.py)
    g.add_argument("--meta_epochs", "--embedder_epochs", type=float, default=None,
                   help="I_1 in passes over the target training set (default 5; offline / custom tasks: --meta_steps); "
                        "0 = plain fine-tuning")
    g.add_argument("--meta_steps", type=int, default=None,
                   help="I_1 in embedder updates; overrides --meta_epochs when >= 0; 0 = plain fine-tuning")
    g.add_argument("--inner_lr", type=float, default=0.1, help="alpha: SGD step size of the virtual update")
    g.add_argument("--outer_lr", type=float, default=None,
                   help="beta: embedder learning rate (default 10 x --lr, as ORCA; offline / custom tasks: "
                        "AUTO_OUTER_LR_MULT x --lr)")
    g.add_argument("--outer_weight", type=float, default=0.5, help="lambda in L'_outer = lambda L_outer + L_inner")
    g.add_argument("--inner_steps", type=int, default=1, help="virtual SGD steps on the same target batch")
    g.add_argument("--inner_params", default="all", choices=["all", "body"],
                   help="theta of the virtual update: all (encoder + head) | body (encoder only)")
    g.add_argument("--first_order", action="store_true",
                   help="detach grad L_inner in theta*: removes the L_outer gradient (ablation)")
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise source features before L_align / L_uniform (Wang & Isola)")
    g.add_argument("--source_batch_size", type=int, default=-1,
                   help="source samples per meta step; -1 = --batch_size, cut to the target batch's token count")
    g.add_argument("--embedder_ckpt", default=None, help="PATH to an embedder.pt from an earlier run: skip stage 1")
    g = parser.add_argument_group("diagnostic")
    g.add_argument("--distortion", action="store_true",
                   help="linear-probe source accuracy through the encoder before and after fine-tuning")
    g.add_argument("--probe_samples", type=int, default=2000, help="source samples for the linear probe")
    g.add_argument("--probe_ckpt", default=None,
                   help="PATH to the ckpt.pt of any method's run (same --task, --body): print the distortion of its "
                        "fine-tuned encoder and exit, so every method is measured the same way")
    args = common.parse_args(parser, argv, method_defaults=MONA_DEFAULTS,
                             # `is not None`: an explicit --meta_epochs 0 means no stage 1, not "size it from the data"
                             method_auto=lambda a, task: dict(meta_steps=-1 if a.meta_epochs is not None
                                                              else AUTO_META_STEPS,
                                                              outer_lr=AUTO_OUTER_LR_MULT * a.lr))
    args.meta_epochs = 5 if args.meta_epochs is None else args.meta_epochs
    args.meta_steps = -1 if args.meta_steps is None else args.meta_steps
    if args.inner_steps < 1 or args.meta_epochs < 0 or args.outer_weight < 0:
        raise common.UserError("--inner_steps must be >= 1, --meta_epochs >= 0 and --outer_weight >= 0")
    args.outer_lr = 10 * args.lr if args.outer_lr is None or args.outer_lr < 0 else args.outer_lr
    if 0 <= args.source_batch_size < 2:
        raise common.UserError("--source_batch_size must be >= 2 (L_uniform needs pairs of source samples), or -1")
    return args


def source_batch_size(args, target_tokens, source_tokens):
    """--source_batch_size, with -1 resolved: --batch_size source samples, but no more tokens than the target batch.
    The paper gives no source batch size. With NAS-Bench-360 shapes the cut never binds (32-token CoNLL sentences
    against 32-500 target tokens for RoBERTa; CIFAR-10 and target images at the same resolution for Swin); on the
    offline CPU tasks (15-16 target tokens against 32-token sentences) it halves the source batch (GunPoint 20 -> 9,
    digits 32 -> 16). The source forward and backward then cost no more than the target's, so a meta step stays a
    fixed multiple of a plain step (bench.py mona) whatever the sequence lengths."""
    if args.source_batch_size > 0:
        return args.source_batch_size
    return max(2, min(args.batch_size, args.batch_size * target_tokens // source_tokens))


# ---- the outer loss (Wang & Isola 2020) ----------------------------------------------------------------------
def align_uniform(features, labels, normalize=True, t=2.0):
    """METHOD: Eq. (4). features (B, D), labels (B,) -> (L_align, L_uniform) over the pairs i < j.
    L_align = mean_{y_i = y_j} ||f_i - f_j||^2 (0 when no pair shares a label);
    L_uniform = log mean exp(-t ||f_i - f_j||^2)."""
    # Wang & Isola's reference code: align(x, y, alpha=2) and uniform(x, t=2) over torch.pdist pairs, on the
    # hypersphere; without normalisation L_uniform can be driven down just by scaling the features up
    f = F.normalize(features, dim=1) if normalize else features
    d2 = (f[:, None] - f[None]).pow(2).sum(-1)  # (B, B); not cdist, whose gradient is NaN at distance 0
    pairs = torch.ones_like(d2, dtype=torch.bool).triu(diagonal=1)
    # positive pairs are same-label *source* samples: the encoder should keep the source classes separable
    same = pairs & (labels[:, None] == labels[None])
    align = d2[same].mean() if same.any() else d2.new_zeros(())
    uniform = torch.logsumexp(-t * d2[pairs], 0) - math.log(int(pairs.sum()))  # log-mean-exp, stable
    return align, uniform


# ---- stage 1: virtual update and meta step -------------------------------------------------------------------
def target_params(model, which="all"):
    """theta of the virtual update, {name: parameter}: the encoder (body.*) and, for 'all', the head (head.*)."""
    prefixes = ("body.", "head.") if which == "all" else ("body.",)
    return {k: p for k, p in model.named_parameters() if k.startswith(prefixes) and p.requires_grad}


def virtual_update(model, theta, task, x, y, inner_lr, steps=1, first_order=False):
    """METHOD: theta* = theta - alpha grad_theta L_inner (Algorithm 1, 'virtually update'), `steps` times on (x, y).
    The model's own parameters are untouched: theta* lives only in the autograd graph (torch.func.functional_call).
    Returns (theta* as {name: tensor}, L_inner at theta). With first_order the gradients are detached."""
    # fused CPU/CUDA attention kernels have no double backward; the math kernel has
    kernel = (lambda: sdpa_kernel(SDPBackend.MATH)) if not first_order else contextlib.nullcontext
    names, inner = list(theta), None
    # MAML-style unrolled steps on the same batch; the slides show one (the default)
    for _ in range(steps):
        with kernel():
            loss = common.task_loss(task, functional_call(model, theta, (x,)), y)
        # create_graph keeps d(grad)/d(phi_e): the path by which L_outer reaches the embedder (second order)
        grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=not first_order,
                                    retain_graph=True, allow_unused=True)
        theta = {k: theta[k] if g is None else theta[k] - inner_lr * (g.detach() if first_order else g)
                 for k, g in zip(names, grads)}  # g is None for body weights the target path never uses
        inner = loss if inner is None else inner
    return theta, inner


def meta_losses(model, task, x, y, src_tokens, src_y, args):
    """METHOD: the losses of one stage-1 iteration -> (L_inner, L_align, L_uniform), differentiable in phi_e.
    src_tokens (B_s, T, D): source samples through the body's *pretrained* input embedding (theta_e0^S), fixed."""
    # theta starts from the current weights, which stage 1 never changes: Algorithm 1's "initialize the target model
    # with phi_e and theta_f0" at every iteration holds by construction
    theta = target_params(model, args.inner_params)
    theta_star, inner = virtual_update(model, theta, task, x, y, args.inner_lr, args.inner_steps, args.first_order)
    # METHOD: source features f_i^S = f(e(x_i^s; theta_e0^S); theta_f^T*), mean-pooled over tokens (slide 38)
    body_star = {k[len("body."):]: v for k, v in theta_star.items() if k.startswith("body.")}
    features = functional_call(model.body, body_star, (src_tokens,)).float().mean(1)  # (B_s, D)
    align, uniform = align_uniform(features, src_y, args.normalize)
    return inner, align, uniform


def meta_step(model, optimizer, task, x, y, src_tokens, src_y, args):
    """METHOD: one iteration of Algorithm 1: phi_e <- phi_e - beta grad_{phi_e} (lambda L_outer + L_inner) (Eq. 5).
    Only the embedder's .grad is written, so the optimiser (over phi_e) is the only thing that changes weights."""
    inner, align, uniform = meta_losses(model, task, x, y, src_tokens, src_y, args)
    outer = align + uniform
    # METHOD: L'_outer = lambda L_outer + L_inner (Eq. 5): the L_inner term keeps the embedder useful for the target
    # task, "to prevent the embedder from overly focusing on source modality" (slide 38)
    total = args.outer_weight * outer + inner
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite meta loss (inner {inner.item()}, outer {outer.item()})")
    # autograd.grad over phi_e only, not backward(): the encoder and head never receive a .grad in stage 1, so no
    # optimiser can move them by accident (the update of theta was only virtual)
    phi = [p for p in model.embedder.parameters() if p.requires_grad]
    for p, g in zip(phi, torch.autograd.grad(total, phi, allow_unused=True)):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not common.all_finite(phi):
        raise FloatingPointError(f"non-finite embedder weights (meta loss {total.item():.4g})")
    return dict(inner=inner.item(), outer=outer.item(), align=align.item(), uniform=uniform.item(), total=total.item())


def batches(dataset, batch_size, seed, drop_last=False):
    """Endless shuffled batches; the order depends only on (seed, pass)."""
    for n in range(10 ** 9):
        g = torch.Generator().manual_seed(seed * 100_003 + n)
        yield from torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, generator=g, drop_last=drop_last)


def train_embedder(model, task, source_set, steps, args, run, device):
    """METHOD: MoNA stage 1 (Algorithm 1). `steps` meta steps on target and source batches; updates phi_e only.
    Returns the last step's losses."""
    ctx, _ = common.autocast_context(device, args.dtype)
    # phi_e has its own optimiser; stage 2 starts a fresh one over all weights (common.fit), as plain fine-tuning
    optimizer = common.make_optimizer(model.embedder.parameters(), args.optimizer, args.outer_lr,
                                      args.weight_decay, args.momentum)
    # target and source batches come from their own seeded streams, so stage 2 sees the same data with or without it;
    # full source batches only, because L_uniform needs pairs
    target_it = batches(task.train, args.batch_size, args.seed + 11)
    source_it = batches(source_set, args.source_batch_size, args.seed + 13, drop_last=True)
    model.train()
    t0, losses = time.time(), {}
    run.truncate("meta")  # a stage 1 redone after a kill logs its steps again
    for step in range(1, steps + 1):
        x, y = next(target_it)
        src_x, src_y = next(source_it)
        src_tokens = data.embed_source(model.body, src_x.to(device))  # frozen source embedder, no grad
        try:
            with ctx:
                losses = meta_step(model, optimizer, task, x.to(device), y.to(device), src_tokens, src_y.to(device),
                                   args)
        except FloatingPointError as e:  # nothing non-finite reaches embedder.pt
            common.stop_nonfinite(f"{e} at meta step {step}", run, "lower --inner_lr or --outer_lr and start afresh")
        if step % args.log_interval == 0 or step == steps:
            ms = (time.time() - t0) * 1000 / step
            print(f"meta step {step}/{steps} | inner {losses['inner']:.4f} | outer {losses['outer']:.4f} | align "
                  f"{losses['align']:.4f} | uniform {losses['uniform']:.4f} | {ms:.0f}ms/step")
            run.log(stage="meta", step=step, **losses)
    return losses


# ---- diagnostic: distortion of source knowledge --------------------------------------------------------------
@torch.no_grad()
def linear_probe(body, source_set, n=2000, seed=0, device="cpu", batch_size=64):
    """Source knowledge left in an encoder (MoNA Sec. 3, Fig. 2; seed slide 35): n source samples -> pretrained
    source embedder -> encoder -> mean pool -> standardised logistic regression fit on a stratified 70% and scored
    on the other 30%. Returns the test accuracy. Self-contained, so other methods can copy it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    idx = torch.randperm(len(source_set), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = source_set[idx]
    was_training = body.training
    body.eval()
    feats = torch.cat([body(data.embed_source(body, xb.to(device))).float().mean(1).cpu()
                       for xb in x.split(batch_size)]).numpy()
    body.train(was_training)
    y = y.numpy()
    f_tr, f_te, y_tr, y_te = train_test_split(feats, y, test_size=0.3, random_state=seed, stratify=y)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(probe.fit(f_tr, y_tr).score(f_te, y_te))


# ---- main ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = get_args()
    if args.probe_ckpt:  # the diagnostic alone, for a run of another method
        device = common.get_device(args.device)
        common.seed_everything(args.seed)
        body = common.build_body(args.body, args.pretrained).to(device)
        name = data.resolve_source("auto" if args.source == "none" else args.source, body, args.data_dir, args.task)
        source_set = data.load_source(name, body, args.data_dir)
        before = linear_probe(body, source_set, args.probe_samples, args.seed, device)
        state = common.load_checkpoint(args.probe_ckpt, "--probe_ckpt", device)
        if not isinstance(state, dict) or "model" not in state:
            raise common.UserError(f"--probe_ckpt {args.probe_ckpt} has no 'model' entry; give a ckpt.pt of a run")
        state = state["model"]
        body.load_state_dict({k[len("body."):]: v for k, v in state.items() if k.startswith("body.")})
        after = linear_probe(body, source_set, args.probe_samples, args.seed, device)
        probe = dict(ckpt=args.probe_ckpt, probe_before=before, probe_after=after, distortion=before - after)
        print(f"PROBE {json.dumps(probe)}")
        raise SystemExit
    run, device = common.setup("mona", args)

    # data and model: the shared substrate (task-specific embedder and head around the pretrained body)
    task = data.get_task(args.task, args.data_dir, args.data_path)
    model = common.model_for(task, args).to(device)
    trainable, total = common.count_params(model)
    print(f"task {task.name}: {task.kind}, in {task.in_shape}, out {task.out_shape}, "
          f"train/val/test {len(task.train)}/{len(task.val)}/{len(task.test)} | params {trainable:,}/{total:,}")
    # source data: the official CoNLL-2003 / CIFAR-10, else an offline proxy of real data (data.default_source)
    source = args.source  # "auto" is resolved below, only if source data are read (on a benchmark task: a download)
    steps_per_epoch = math.ceil(len(task.train) / args.batch_size)
    meta_steps = args.meta_steps if args.meta_steps >= 0 else round(args.meta_epochs * steps_per_epoch)
    meta_steps = 0 if source == "none" else meta_steps
    source_set = None
    if meta_steps > 0 or args.distortion:  # the probe needs source data even for plain fine-tuning
        source = data.resolve_source("auto" if source == "none" else source, model.body, args.data_dir, args.task)
        source_set = data.load_source(source, model.body, args.data_dir)
        source_tokens = data.embed_source(model.body, source_set.tensors[0][:1]).shape[1]
        args.source_batch_size = source_batch_size(args, model.embedder.num_tokens, source_tokens)
        if len(source_set) < args.source_batch_size:
            raise common.UserError(f"source has {len(source_set)} samples, fewer than --source_batch_size "
                                   f"{args.source_batch_size}; lower it")
    results = dict(inner_lr=args.inner_lr, outer_lr=args.outer_lr, outer_weight=args.outer_weight,
                   first_order=args.first_order)
    # the paper's diagnostic (Fig. 2): how much source knowledge the encoder keeps. Measured here on the pretrained
    # encoder, which is also the encoder after stage 1 (stage 1 never changes it), and again after stage 2.
    if args.distortion:
        results["probe_before"] = linear_probe(model.body, source_set, args.probe_samples, args.seed, device)
        print(f"distortion probe before fine-tuning: source accuracy {results['probe_before']:.4f}")

    # stage 1 (METHOD: meta-learned target embedder, Algorithm 1) -> embedder.pt
    emb_path = run.dir / "embedder.pt"
    # saved with the embedder, so a reused one is described
    stage1 = dict(source=source if meta_steps else "none", meta_steps=meta_steps,
                  source_batch_size=args.source_batch_size if meta_steps else 0)
    if args.embedder_ckpt or (args.resume and emb_path.exists()):
        state = common.load_embedder(model, args.embedder_ckpt or emb_path, "mona.py")
        stage1 = {k: v for k, v in state.items() if k != "embedder"}
        print(f"stage 1 skipped: embedder loaded from {args.embedder_ckpt or emb_path}")
    elif meta_steps > 0:
        t0 = time.time()
        print(f"stage 1: {meta_steps} meta steps, source {source} ({len(source_set)} samples, "
              f"{args.source_batch_size} per step), theta = "
              f"{args.inner_params} ({sum(p.numel() for p in target_params(model, args.inner_params).values()):,} "
              f"params), {'first' if args.first_order else 'second'} order, alpha {args.inner_lr:g}, "
              f"beta {args.outer_lr:g}, lambda {args.outer_weight:g}")
        last = train_embedder(model, task, source_set, meta_steps, args, run, device)
        stage1.update(meta_seconds=round(time.time() - t0, 1), **{f"meta_{k}": v for k, v in last.items()})
    else:
        print("stage 1 skipped (--meta_epochs / --embedder_epochs / --meta_steps 0 or --source none): "
              "plain fine-tuning")
    common.save_checkpoint(dict(embedder=model.embedder.state_dict(), **stage1), emb_path)  # for --embedder_ckpt

    # stage 2: full fine-tuning from phi_e and theta_f0 (Algorithm 1, Eq. 1), the same loop as finetune.py; with
    # --resume it continues from last.pt, so a run killed in stage 2 does not redo stage 1
    common.fit(model, task, args, run, device)

    # test the best-on-validation weights; the distortion probe on the fine-tuned encoder; save
    results = common.test_best(model, task, args, run, device) | stage1 | results
    if args.distortion:
        results["probe_after"] = linear_probe(model.body, source_set, args.probe_samples, args.seed, device)
        results["distortion"] = results["probe_before"] - results["probe_after"]
        print(f"distortion: source probe accuracy {results['probe_before']:.4f} -> {results['probe_after']:.4f}")
    run.finish(results)
