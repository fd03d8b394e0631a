"""PaRe: patch replacement, "Enhancing Cross-Modal Fine-Tuning with Gradually Intermediate Modality Generation"
(Cai, Li, Ma, Kang, Xie, Sun, Zhu; ICML 2024).

Idea. Fine-tune the shared substrate (task embedder -> pretrained body -> head) while also training on
*intermediate modalities*: a gate network scores every token ("patch") of a target sample and of a source (proxy)
sample, and the k lowest-scoring target tokens are replaced by the k highest-scoring source tokens. The mixed
sequence goes through the same body; the target head must still predict the target label and a source head the
source label. k decays linearly over the epochs, so training moves from source-like to target-like inputs:

    L = L_task(f(x), y) + w * [(1 - lam) * L_task(h_t(g(mix)), y) + lam * CE(h_s(g(mix)), y_src)],  lam = k / N

    paper   https://arxiv.org/abs/2406.09003            code  https://github.com/BIT-DA/PaRe (7d5362c)

    python pare.py                                       # MiniLM on UCR GunPoint, 2-core CPU, about 2 minutes
    python pare.py --task digits --k0 16                 # 2D task, 16 of 64 tokens replaced at first
    python pare.py --task synthetic --body tiny --epochs 2            # seconds, for tests
    python pare.py --task synthetic --body tiny --replace off         # = python finetune.py (plain fine-tuning)

Deviations from the official code (orca_pare_reference.md sections 5 and 6.3):
- One file for 1D / 2D / classification / dense (official: main_PaRe{,_1d,_dense}.py). The source loss is always a
  source-class head on the mean-pooled body features of the mixed tokens. Official dense runs use VOC masks through
  the dense head; no dense source exists offline (the official 2D dense wrapper does carry such a pooled head).
- The replacement is vectorised with gather/scatter (official: a per-sample loop with nonzero), and phase A uses ONE
  Gumbel-perturbed top-k with a straight-through sigmoid relaxation instead of SubsetOperator's k sequential
  softmaxes (official phase A costs 3-4x a Swin step). The forward pass is the same: exactly k tokens replaced.
- Phase B replaces the k *lowest*-scoring target tokens, as the paper and phase A do; the official phase B replaces
  the highest-scoring ones (argsort(...)[:, -k:]), the opposite of phase A.
- The replacement is out of place (scatter), which avoids the official 1D in-place write into a tensor autograd saved.
- k schedule k(e) = int(k0 - (k0 - k_end) * e / E): k_end = 0 is the paper's k0 (1 - e/E) and the 1D code; the 2D
  configs' (begin_num, end_num) are k0 = begin_num, k_end = begin_num - end_num. lam = k / N (number of target
  tokens) as in the code; the slides write k / k0, available as --lam_by k0.
- A step with k = 0 is a plain step (the official code would add w * L_task of the unmixed tokens).
- Source tokens come from the body's own frozen pretrained input embedding (data.embed_source); source sequences may
  be shorter than the target's (T < N), so k <= min(N, T). Validation is carved from the training split and the best
  validation checkpoint is tested (official: best/last on the test set). Darcy's "Wv" fine-tuning is not reproduced.

Under torchrun: every rank runs its rows of each micro-batch, and the same rows of the paired source batch, through the
whole PaRe step, which common.fit wraps in DDP (it finds the gate's missing gradient in phase B and in unmixed steps);
the Gumbel noise is drawn for the whole micro-batch on every rank, so 2 processes draw what 1 does; rank 0 writes.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import distributed

# ---- config --------------------------------------------------------------------------------------------------
# PaRe's own per-task settings (src/configs/*_PaRe.yaml, orca_pare_reference.md 5.5) where they differ from the
# ORCA configs in data.TASKS. k counts are tokens: 2D configs (begin_num, end_num) -> k0 = begin, k_end = begin - end.
PARE_DEFAULTS = {
    "cifar100": dict(k0=2000, k_end=500),
    "spherical": dict(k0=2000, k_end=500, batch_size=16, accum=8),
    "ninapro": dict(k0=2000, k_end=500, batch_size=16, accum=2),
    "fsd50k": dict(k0=2000, k_end=500, lr=3e-5),
    "darcy": dict(k0=1000, k_end=500),
    "cosmic": dict(k0=500, k_end=0),
    "ecg": dict(k0=32, batch_size=64, accum=1, optimizer="adamw", lr=3e-5, weight_decay=0.1),
    "satellite": dict(k0=32, batch_size=64, accum=1),
    "deepsea": dict(k0=32, epochs=25),
    "burgers": dict(gumbel_epochs=3),  # 10 epochs: a shorter phase A so that both phases run
    **{name: dict(gumbel_epochs=1) for name in data.TASKS if name.startswith("synthetic")},
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    g = parser.add_argument_group("PaRe: patch replacement")
    g.add_argument("--replace", default="on", choices=["on", "off"], help="off = plain fine-tuning (finetune.py)")
    g.add_argument("--source", default="auto",
                   help="source data: auto (the official conll / cifar10, downloaded on benchmark tasks, used on "
                        "others when in --data_dir; else the proxy docstrings for text bodies, digits for vision, "
                        "synthetic for tiny) | conll | cifar10 | docstrings | digits | synthetic | none (= plain "
                        "fine-tuning)")
    g.add_argument("--source_n", type=int, default=5000, help="source samples drawn (official maxsize 5000)")
    g.add_argument("--k0", type=float, default=0.64,
                   help="tokens replaced at epoch 0: a count (>= 1), or a fraction of the N target tokens (< 1, "
                        "capped at the source length); 0 = plain fine-tuning. 0.64 = official 2000/3136 and 32/50")
    g.add_argument("--k_end", type=float, default=0, help="k reached at e = E (never trained on); count or fraction")
    g.add_argument("--lam_by", default="tokens", choices=["tokens", "k0"],
                   help="lam = k / N (tokens, official code) or k / k0 (the paper's slides)")
    g.add_argument("--mix_weight", type=float, default=None,
                   help="w of the mixed loss; default 1 for 2D classification, 0.1 for 1D, 0.3 for dense; 0 = off")
    g.add_argument("--gumbel_epochs", type=int, default=None,
                   help="phase A length (Gumbel top-k, gate trained), then hard top-k; default 10 for 2D, 5 for 1D")
    g.add_argument("--tau", type=float, default=0.9, help="Gumbel top-k temperature (official 0.9)")
    # data-aware offline / custom tasks: phase A is the first 10 % of the epochs (the 2D configs' 10 of 100)
    args = common.parse_args(parser, argv, method_defaults=PARE_DEFAULTS,
                             method_auto=lambda a, task: dict(gumbel_epochs=max(1, round(0.1 * a.epochs))))
    if args.k0 < 0 or args.k_end < 0 or args.tau <= 0 or (args.mix_weight or 0) < 0 or args.source_n < 1:
        raise common.UserError("--k0, --k_end, --mix_weight must be >= 0, --tau > 0 and --source_n >= 1")
    return args


def resolve(args, task, num_tokens, source_tokens):
    """Derived values: the per-task-type defaults (w, phase-A length) and k0 / k_end as token counts."""
    dims = len(task.in_shape) - 1
    if args.mix_weight is None:  # main_PaRe.py: 1; main_PaRe_1d.py L309: 0.1; main_PaRe_dense.py L316: 0.3
        args.mix_weight = 0.3 if task.kind == "dense" else 0.1 if dims == 1 else 1.0
    if args.gumbel_epochs is None:  # `if ep < 10` (main_PaRe.py), `if ep < 5` (main_PaRe_1d.py)
        args.gumbel_epochs = 5 if dims == 1 else 10
    k_max = min(num_tokens, source_tokens)

    def count(value, flag):
        if 0 < value < 1:  # a fraction of the target tokens, capped at what both sides have
            return min(int(value * num_tokens), k_max)
        if value != int(value) or value > k_max:
            raise common.UserError(f"{flag} {value:g}: only {k_max} patches can be replaced (target {num_tokens} "
                                   f"tokens, source {source_tokens}); give an integer <= {k_max} or a fraction < 1")
        return int(value)

    k0, k_end = count(args.k0, "--k0"), count(args.k_end, "--k_end")
    if k_end > k0:
        raise common.UserError(f"--k_end ({k_end} tokens) is larger than --k0 ({k0}); k must decay")
    return k0, k_end


# ---- the schedule --------------------------------------------------------------------------------------------
def k_schedule(epoch, epochs, k0, k_end):
    """METHOD: k decays linearly per epoch (slide 26: k = k0 (1 - e/E)); official 2D form int(begin - end * (e/E)),
    truncated toward zero, with the same order of operations (main_PaRe.py:mixup_embedding_gate)."""
    return int(k0 - (k0 - k_end) * (epoch / epochs))


def mix_lambda(k, num_tokens, k0, lam_by="tokens"):
    """METHOD: the mixed-loss weight: lam = k / N, the fraction of target tokens replaced (official `coefficient /
    x.size()[1]`), or k / k0 (the paper's slides; equal to the former when k0 = N)."""
    return k / (num_tokens if lam_by == "tokens" else k0)


# ---- the gate and the replacement ----------------------------------------------------------------------------
class Gate(nn.Module):
    """METHOD: one score in (0, 1) per token, sigmoid(Linear(D, 1)) (embedder_mix_PaRe.py:GatingNetwork); shared by
    target and source tokens. (B, L, D) -> (B, L)."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, tokens):
        return torch.sigmoid(self.fc(tokens)).squeeze(-1).float()


def select(scores, k, tau=0.9, gumbel=True, largest=True):
    """Pick k of the N tokens of each row by score: the top k (largest) or the bottom k.

    Returns (idx (B, k): the picked positions in ascending order, mask (B, N): exactly 1 on them and 0 elsewhere in
    the forward pass). gumbel=False is the hard top-k of phase B: the mask is a constant, the gate gets no gradient.
    gumbel=True is phase A: METHOD: Gumbel top-k with a straight-through estimator (SubsetOperator, main_PaRe.py).
    The official operator adds Gumbel(0, 1) noise to the scores and sums k sequential softmaxes (a k-step loop over
    N tokens); here the same perturbed scores pick the k tokens with one topk, and the backward pass uses a sigmoid
    relaxation around the threshold between the k-th and (k+1)-th perturbed score. The official straight-through form
    `hard - soft.detach() + soft` is written `hard + (soft - soft.detach())`, whose forward value is exactly `hard`.
    """
    if gumbel:
        # Gumbel(0, 1) = -log(Exp(1)), drawn for the whole micro-batch on every rank under torchrun (distributed.py)
        noise = -distributed.batch_noise(scores, lambda t: t.exponential_()).log()
        logits = (scores + noise) / tau
    else:
        logits = scores.detach()
    if not largest:
        logits = -logits  # the bottom k of the scores are the top k of their negation
    N = logits.shape[1]
    # one topk of k + 1 gives both the picked positions and the threshold for the relaxation below
    top = logits.topk(min(k + 1, N), dim=1)  # values sorted descending
    idx = top.indices[:, :k].sort(dim=1).values  # ascending positions: j-th source -> j-th replaced target (official)
    hard = torch.zeros_like(logits).scatter(1, idx, 1.0)
    if not gumbel:
        return idx, hard
    # soft k-hot: sigmoid of the distance to the midpoint between the k-th and (k+1)-th perturbed scores, so tokens
    # near the cut get the largest gradient (the role of the official summed softmaxes); the threshold is detached
    kth = top.values[:, k - 1:k]
    below = top.values[:, k:k + 1] if k < N else kth - 1  # (B, 1); k = N: everything is picked
    soft = torch.sigmoid(logits - ((kth + below) / 2).detach())
    return idx, hard + (soft - soft.detach())


def replace_patches(target, source, gate, k, tau=0.9, gumbel=True):
    """METHOD: PaRe's patch replacement (slide 26; main_PaRe.py:mixup_embedding_gate / _ori), vectorised over the
    batch. target (B, N, D), source (B, T, D) -> mixed (B, N, D), replaced (B, k), taken (B, k).

    The k lowest-scoring target tokens are overwritten by the k highest-scoring source tokens; the j-th taken source
    token (in position order) goes to the j-th replaced target position, as the official nonzero lists do, so
    source positions are not preserved. Kept target tokens stay where they are. In phase A the masks multiply the
    tokens (exactly by 1 forward), which is how the gate receives its straight-through gradient."""
    B, N, D = target.shape
    source = source.to(target.dtype)  # source tokens come from the frozen embedding in float32; autocast may differ
    # the gate scores both sides (one shared GatingNetwork, model.gate(x_src_flat) / model.gate(x_flat))
    with torch.set_grad_enabled(gumbel and torch.is_grad_enabled()):  # phase B: the gate is not trained
        taken, take_mask = select(gate(source), k, tau, gumbel, largest=True)  # (B, k), (B, T)
        replaced, replace_mask = select(gate(target), k, tau, gumbel, largest=False)  # (B, k), (B, N)
    # official: T * m_t, then rows where m_t = 0 <- rows of S * m_s where m_s = 1; here gather / scatter on indices
    kept = target * (1 - replace_mask).unsqueeze(-1).to(target.dtype)  # (B, N, D), exact copy of kept tokens
    picked = (source * take_mask.unsqueeze(-1).to(target.dtype)).gather(1, taken.unsqueeze(-1).expand(B, k, D))
    # out-of-place scatter: a new tensor, never a write into `target` (the official 1D phase B writes in place into
    # the tensor the plain forward already used, which fails in backward)
    mixed = kept.scatter(1, replaced.unsqueeze(-1).expand(B, k, D), picked)  # (B, N, D)
    return mixed, replaced, taken


# ---- source batches ------------------------------------------------------------------------------------------
class SourceBatches:
    """The source batch paired with the i-th target micro-batch of an epoch, a pure function of (seed, epoch, i), so
    a resumed run sees the same pairs. As main_PaRe.py:train_one_epoch: batch size = the target batch size, a fresh
    shuffled pass over the source set at every epoch start, re-started when it runs out."""

    def __init__(self, dataset, batch_size, seed):
        self.x, self.y = dataset.tensors
        self.batch_size, self.seed = batch_size, seed
        self.per_pass = math.ceil(len(self.y) / batch_size)

    def __call__(self, epoch, i):
        repeat, j = divmod(i, self.per_pass)
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 10_007 + repeat)
        rows = torch.randperm(len(self.y), generator=g)[j * self.batch_size:(j + 1) * self.batch_size]
        return self.x[rows], self.y[rows]  # the last batch of a pass may be short: that step is not mixed


# ---- the training step ---------------------------------------------------------------------------------------
def make_compute(task, sources, args, k0, k_end, device):
    """The common.fit hook compute(model, x, y, epoch) -> (loss, logs) of one PaRe step. `model` carries the extra
    PaRe modules `model.gate` and `model.source_head` (so fit checkpoints and resumes them with the model)."""
    def compute(model, x, y, epoch):
        # the micro-batch's index in the epoch (fit resumes only at epoch starts, so (epoch, i) is reproducible);
        # under torchrun x is this rank's rows of it, and so is the source batch
        i, m = distributed.micro.index, distributed.micro
        # one embedder pass feeds both body passes (the official Swin wrapper runs its embedder twice, same values)
        tokens = model.embed(x)  # (B, N, D)
        # METHOD: the plain task loss stays in the sum, L = L_task(f(x), y) + w * L_mix (main_PaRe.py L313-320)
        loss = common.task_loss(task, model.forward_tokens(tokens), y)
        # METHOD: k(e) and lam = k / N; mixing is skipped when k = 0 or when the source batch is short (official
        # `flag=False` when x.size(0) != x_src.size(0))
        k = k_schedule(epoch, args.epochs, k0, k_end)
        lam = mix_lambda(k, tokens.shape[1], k0, args.lam_by)
        x_src, y_src = sources(epoch, i)
        if k == 0 or len(x_src) != (m.size or len(x)):
            return loss, dict(k=float(k), lam=lam)  # no loss_tar / loss_src in the log: an unmixed step
        x_src, y_src = (x_src[m.rows], y_src[m.rows]) if m.size else (x_src, y_src)
        # METHOD: intermediate modality: bottom-k target tokens <- top-k source tokens; phase A (Gumbel + straight-
        # through, gate trained) for the first gumbel_epochs epochs, then hard top-k
        mixed, _, _ = replace_patches(tokens, data.embed_source(model.body, x_src), model.gate, k, args.tau,
                                      gumbel=epoch < args.gumbel_epochs)
        # METHOD: the mixed tokens go through the same body (forward_mid); target head -> target label, source
        # head on the pooled features -> source label
        features = model.body(mixed)  # (B, N', D')
        loss_tar = common.task_loss(task, model.head(features), y)
        loss_src = F.cross_entropy(model.source_head(features).float(), y_src.to(device))
        loss = loss + args.mix_weight * ((1 - lam) * loss_tar + lam * loss_src)
        return loss, dict(k=float(k), lam=lam, loss_tar=loss_tar.item(), loss_src=loss_src.item())

    return compute


def attach_pare_modules(model, num_source_classes):
    """METHOD: the gate (on D-wide tokens) and the source head (embedder_mix_PaRe.py: predictor_src), attached as
    submodules so that fit's checkpoints and --resume carry them."""
    model.gate = Gate(model.body.dim)
    model.source_head = common.PooledHead(model.body.out_dim, num_source_classes)
    return model


# ---- main ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = get_args()
    run, device = common.setup("pare", args)

    # data
    task = data.get_task(args.task, args.data_dir, args.data_path)

    # model: the shared substrate; the embedder starts from the body's pretrained pieces and there is no alignment
    # stage (every *_PaRe.yaml sets align_method srcinit, which forces embedder_epochs = 0)
    model = common.model_for(task, args).to(device)
    trainable, total = common.count_params(model)
    print(f"task {task.name}: {task.kind}, in {task.in_shape}, out {task.out_shape}, "
          f"train/val/test {len(task.train)}/{len(task.val)}/{len(task.test)} | params {trainable:,}/{total:,}")
    info = dict(source="none", replace=args.replace)

    if args.replace == "off" or args.source == "none" or args.k0 == 0 or args.mix_weight == 0:
        print("patch replacement off (--replace off, --source none, --k0 0 or --mix_weight 0): plain fine-tuning")
        info.update(replace="off", k0=0)
        common.fit(model, task, args, run, device)
    else:
        # auto: the official source, downloaded on a benchmark task; a proxy (one line says why) otherwise
        source = data.resolve_source(args.source, model.body, args.data_dir, args.task)
        info["source"] = source
        # METHOD: source (proxy) data with labels, embedded per step by the body's frozen pretrained embedding
        source_set = data.load_source(source, model.body, args.data_dir, n=args.source_n, seed=args.seed)
        # the source may be shorter than the target (32 text tokens vs N patches): k <= min(N, T)
        num_tokens = model.embedder.num_tokens
        source_tokens = data.embed_source(model.body, source_set.tensors[0][:1]).shape[1]
        k0, k_end = resolve(args, task, num_tokens, source_tokens)
        num_source_classes = int(source_set.tensors[1].max()) + 1
        attach_pare_modules(model, num_source_classes).to(device)
        ks = [k_schedule(e, args.epochs, k0, k_end) for e in range(args.epochs)]
        print(f"PaRe: source {source} ({len(source_set)} samples, {num_source_classes} classes, {source_tokens} "
              f"tokens) -> target {num_tokens} tokens | k per epoch {ks} | lam = k / "
              f"{num_tokens if args.lam_by == 'tokens' else k0} | w {args.mix_weight} | phase A (Gumbel, tau "
              f"{args.tau}) for epochs < {args.gumbel_epochs}")
        info.update(k0=k0, k_end=k_end, mix_weight=args.mix_weight, gumbel_epochs=args.gumbel_epochs,
                    source_tokens=source_tokens, target_tokens=num_tokens)
        # fine-tune everything with the PaRe step (the gate and the source head train with the rest)
        sources = SourceBatches(source_set, args.batch_size, args.seed)
        common.fit(model, task, args, run, device, compute=make_compute(task, sources, args, k0, k_end, device))

    # test the best-on-validation weights (plain forward: the gate and source head are training-only) and save
    run.finish(common.test_best(model, task, args, run, device) | info)
