"""Shared substrate of every method: the command line and the training plumbing (fit, optimiser, checkpoints, run
directory); the model pieces (embedder / body / head) are in models.py, losses and metrics in metrics.py, both
re-exported here.

What lives here and in models.py is what must be *identical* for a fair comparison between methods (design.md):
the model pieces, `evaluate`, the metrics, and the seed / device / log / checkpoint helpers. What *is* a method
(alignment, patch replacement, meta-learning, ...) lives in its own file and plugs into `fit` through a
`compute_loss` callback.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import pickle
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data
import distributed
from errors import UserError  # noqa: F401 (common.UserError is what the method scripts raise)
from official_data import write_atomic
from models import (Body, CrossModalModel, DenseHead1D, DenseHead2D, Embedder1D, Embedder2D,  # noqa: F401
                    InputNorm, PooledHead, TranslationTTA, build_body, build_model, in_float32, patch_side,
                    patch_stride, stack_num)  # re-exported
from metrics import (SUMMED_LOSSES, compute_loss, compute_metric, evaluate, mae8, predict,  # noqa: F401
                     task_loss)  # re-exported: losses and metrics live in metrics.py


# ---- command line --------------------------------------------------------------------------------------------
# Flags whose default depends on the task. Benchmark tasks (NAS-Bench-360, PDEBench) and the synthetic test tasks
# take the official config of data.TASKS and these fixed values for anything it leaves open; offline real tasks and
# --task custom get data-aware values from `auto_defaults` (an explicit flag always wins).
FIXED_DEFAULTS = dict(target_seq_len=512, epochs=20, batch_size=16, lr=1e-4, warmup_epochs=1, finetune="full",
                      input_norm="none", embed_bias_std=0.0, kernel_mult=1, new_lr_mult=1.0, select="best",
                      augment_shift=0.0, augment_scale=0.0, tta=0)


def add_common_args(parser):
    """The flags every method script shares, with the same names and meanings (style.md rule 5). Defaults of None
    are chosen per task: the official config (benchmark tasks) or from the data (offline tasks, custom)."""
    g = parser.add_argument_group("task and model")
    g.add_argument("--task", default="gunpoint", help="task name from data.py (python data.py --list)")
    g.add_argument("--data_dir", default="./datasets", help="where data sets are downloaded / cached")
    g.add_argument("--data_path", default=None, help="FILE.npz for --task custom")
    g.add_argument("--body", default="minilm", help="tiny | minilm | roberta | swin | any HF text id | timm name")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-pretrained keeps the body's architecture with random weights")
    g.add_argument("--target_seq_len", type=int, default=None,
                   help="max tokens the embedder may produce (default: official config | from the data)")
    g.add_argument("--input_norm", default=None, choices=["none", "channel", "instance"],
                   help="input standardisation: per-channel with training statistics | per sample | none (official)")
    g.add_argument("--embed_bias_std", type=float, default=None,
                   help="std of the random initial bias of the embedder's patch conv (0 = ORCA's zero init, with "
                        "which the LayerNorm after the patches discards each token's level and amplitude)")
    g.add_argument("--kernel_mult", type=int, default=None, help="each token's patch spans this many strides, "
                   "overlapping its neighbours (PatchTST); the token count is unchanged (1 = ORCA's patches)")
    g.add_argument("--finetune", default=None, choices=["full", "norms", "lora"],
                   help="what the fine-tuning stage trains in the body: everything (official) | its LayerNorms only "
                        "| LoRA adapters (peft) + LayerNorms; the embedder and head always train")
    g.add_argument("--lora_rank", type=int, default=8, help="rank of the LoRA adapters (--finetune lora)")
    g = parser.add_argument_group("optimisation (fine-tuning)")
    g.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: official | from --steps)")
    g.add_argument("--steps", type=int, default=None,
                   help="fine-tuning length in optimiser steps, rounded up to whole epochs (overrides --epochs)")
    g.add_argument("--batch_size", type=int, default=None)
    g.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step (gradients summed)")
    g.add_argument("--optimizer", default="adamw", choices=["sgd", "adam", "adamw"])
    g.add_argument("--lr", type=float, default=None, help="learning rate of the body")
    g.add_argument("--new_lr_mult", type=float, default=None,
                   help="learning rate of the new modules (embedder, head, method modules) = lr x this")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    g.add_argument("--warmup_epochs", type=float, default=None, help="linear LR warm-up length, in epochs")
    g.add_argument("--decay_epochs", type=float, default=-1, help="LR reaches 0 here (-1 = at --epochs)")
    g.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip (0 = off)")
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimiser steps (-1 = off)")
    g.add_argument("--augment_shift", type=float, default=None,
                   help="random translation of each training input by up to this fraction of its length / side "
                        "(per-sample labels only; 0 = off)")
    g.add_argument("--augment_scale", type=float, default=None,
                   help="std of a random gain 1 + N(0, s) on each training input (0 = off)")
    g.add_argument("--tta", type=int, default=None, help="test-time augmentation: class probabilities averaged over "
                   "the input and N-1 fixed translations within --augment_shift (0 = off; default: 9 on offline and "
                   "custom tasks whose training inputs are translated, else 0)")
    g.add_argument("--select", default=None, choices=["best", "last"],
                   help="checkpoint tested: best on validation | last epoch (default: best, or last when the "
                        "validation split has fewer than 50 samples and cannot rank epochs)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) | cuda | mps | cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bfloat16 on CUDA when supported, else float32")
    g.add_argument("--out_dir", default=None, help="default runs/{method}_{task}_s{seed}")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    g.add_argument("--ckpt_every", type=int, default=None,
                   help="write last.pt (resume point) every this many epochs (default: about 20 per run)")
    g.add_argument("--eval_batch_size", type=int, default=256)
    g.add_argument("--log_interval", type=int, default=10, help="optimiser steps between log lines")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward (nanoGPT; off until "
                   "measured on a GPU)")
    g.add_argument("--fused", action="store_true", help="fused Adam / AdamW kernels on CUDA (ignored elsewhere)")
    return parser


def auto_defaults(task, body="minilm", step_budget=None):
    """Data-aware defaults for offline real tasks and --task custom, chosen on the development suite
    (`python bench.py suite`) and nowhere else:
    - tokens: strides of at least 16 input values (channels x length, channels x pixels: a token of a few values
      keeps little more than their signs through the embedder's LayerNorm) and at most 64 tokens for a series, 32
      for an image; each patch spans 3 strides (--kernel_mult: overlapping patches), fewer where 3 would be wider than
      the input's side (digits); the patch conv's bias starts random (Embedder1D: the LayerNorm keeps token levels);
    - batch: the power of two nearest N / 8, between 8 and 32, so that a small set still gets several steps an epoch;
    - length: 300 optimiser steps (a small set gets many epochs), but at least 20 epochs up to 1000 steps (a
      larger set gets enough passes), warm-up 10 % of it;
    - the body's LayerNorms train, its attention and feed-forward weights stay pretrained (--finetune norms), at a
      learning rate of 1e-3 for everything that trains;
    - inputs standardised per channel with training statistics; the checkpoint tested is the best on validation
      only when the validation split can rank epochs (>= 50 samples), else the last;
    - a classification set with at most 2 training samples a class trains on randomly translated inputs (up to 10 %
      of the length / side) and is tested on 9 translations (--tta 9); larger sets do neither (it costs more there)."""
    n = len(task.train)
    C, *size = task.in_shape
    if len(size) == 1:
        tokens = math.ceil(size[0] / max(math.ceil(size[0] / AUTO_MAX_TOKENS_1D), math.ceil(AUTO_TOKEN_VALUES / C)))
    else:  # square patches; an image smaller than the least patch side is one token
        low = max(2, math.ceil(math.sqrt(AUTO_TOKEN_VALUES / C)))
        tokens = next(math.ceil(size[0] / p) * math.ceil(size[1] / p) for p in range(low, max(low, max(size)) + 1)
                      if math.ceil(size[0] / p) * math.ceil(size[1] / p) <= AUTO_MAX_TOKENS_2D)
    stride = patch_stride(size[0], tokens) if len(size) == 1 else patch_side(size, tokens)  # the embedder's own
    batch = int(min(32, max(8, 2 ** round(math.log2(max(1, n / 8))))))
    steps_per_epoch = math.ceil(n / batch)
    steps = step_budget or max(AUTO_STEPS, min(AUTO_MAX_STEPS, AUTO_MIN_EPOCHS * steps_per_epoch))
    epochs = math.ceil(steps / steps_per_epoch)
    few = task.kind == "classification" and n / task.num_outputs < AUTO_AUGMENT_BELOW
    return dict(target_seq_len=tokens, batch_size=batch, epochs=epochs, warmup_epochs=round(0.1 * epochs, 3),
                lr=AUTO_LR, new_lr_mult=AUTO_NEW_LR_MULT, finetune=AUTO_FINETUNE, input_norm="channel",
                embed_bias_std=AUTO_BIAS_STD, kernel_mult=max(1, min(AUTO_KERNEL_MULT, min(size) // stride)),
                augment_shift=AUTO_AUGMENT_SHIFT if few else 0.0, augment_scale=0.0, tta=AUTO_TTA if few else 0,
                select="best" if len(task.val) >= 50 else "last")


# chosen on the development suite (bench.py suite); the measurements behind each: docs/finetune.md's defaults table.
# norms at 1e-3 train as fast as full fine-tuning at 1e-4 at half the step time; the new modules at 3x help where
# they help and never break a set
AUTO_STEPS, AUTO_LR, AUTO_NEW_LR_MULT, AUTO_FINETUNE, AUTO_BIAS_STD = 300, 1e-3, 3.0, "norms", 0.1
# >= 16 values a token (fewer keep little more than their signs); a patch 3 strides wide, overlapping its neighbours
# (PatchTST) at the same token count, but no wider than the input (then every token sees it all); <= 64 / 32 tokens
AUTO_TOKEN_VALUES, AUTO_KERNEL_MULT, AUTO_MAX_TOKENS_1D, AUTO_MAX_TOKENS_2D = 16, 3, 64, 32
# >= 20 epochs up to 1000 steps: digits and Fashion-MNIST gain; the small sets keep 300 steps
AUTO_MIN_EPOCHS, AUTO_MAX_STEPS = 20, 1000
# translations (--augment_shift 0.1) only at 1-2 training samples a class, and then the tested model averages over
# 9 of them (--tta 9): docs/finetune.md "Augmentation" and "Test-time augmentation"
AUTO_AUGMENT_SHIFT, AUTO_AUGMENT_BELOW, AUTO_TTA = 0.1, 3, 9


def parse_args(parser, argv=None, method_defaults=None, method_auto=None):
    """Parse twice: first --task, then re-parse with that task's defaults, so explicit flags win.

    method_defaults: {task: {flag: value}} for a method's own per-task configs (e.g. PaRe's *_PaRe.yaml).
    method_auto(args, task) -> {flag: value}: the method's own data-aware defaults (stage lengths) for the tasks
    that take data-aware defaults; applied to the flags still unset (None)."""
    known, _ = parser.parse_known_args(argv)
    validate_args(known)  # before any data is read: the flags given, not yet the per-task defaults (all valid)
    defaults = dict(data.task_defaults(known.task))
    defaults.update((method_defaults or {}).get(known.task, {}))
    dests = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in dests})
    args = parser.parse_args(argv)
    chosen = {}
    if data.TASKS[args.task].get("auto"):
        task = data.get_task(args.task, args.data_dir, args.data_path)
        budget = args.steps
        if budget is None and args.epochs is not None:  # --epochs given: keep it, size the rest from the data
            budget = args.epochs * math.ceil(len(task.train) / (args.batch_size or auto_defaults(task)["batch_size"]))
        chosen = {k: v for k, v in auto_defaults(task, args.body, budget).items() if getattr(args, k, None) is None}
        vars(args).update(chosen)
        if "tta" in chosen:  # the test-time translations follow the training ones, also when --augment_shift is given
            args.tta = chosen["tta"] = AUTO_TTA if args.augment_shift > 0 else 0
        if method_auto:  # the method's own stage lengths, sized from the now complete args
            own = {k: v for k, v in method_auto(args, task).items() if getattr(args, k, None) is None}
            vars(args).update(own)
            chosen.update(own)
    for k, v in FIXED_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
            chosen[k] = v
    refuse_bad_augment(data.TASKS[args.task]["kind"], args.task, args.augment_shift, args.augment_scale, args.tta)
    if args.decay_epochs < 0:
        args.decay_epochs = args.epochs
    if args.ckpt_every is None:
        args.ckpt_every = max(1, args.epochs // 20)
    if chosen:
        print("defaults for task " + args.task + ": " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    args.auto_flags = sorted(chosen)
    args.auto_task = bool(data.TASKS[args.task].get("auto"))  # epochs already sized from --steps by auto_defaults
    return args


def refuse_bad_augment(kind, name, shift, scale, tta=0):
    """Augmentation moves the inputs, not the targets (a dense task refuses it); --tta averages class probabilities
    over the training translations. Checked where the kind is known: the task table, else when fit starts (custom)."""
    if kind == "dense" and (shift > 0 or scale > 0):
        raise UserError(f"--augment_shift / --augment_scale move or scale the inputs of a dense task ({name}) "
                        f"without its targets; set both to 0")
    if tta > 1 and not shift > 0:
        raise UserError(f"--tta {tta} averages over translations within --augment_shift, which is 0; set "
                        f"--augment_shift (e.g. 0.1) or --tta 0")
    if tta > 1 and kind not in (None, "classification"):
        raise UserError(f"--tta averages class probabilities; task {name} is {kind}: use --tta 0")


# flags that must be > 0, >= 0, or -1 (off) / > 0; a value of None is a per-task default, filled in later
POSITIVE = ("batch_size", "accum", "epochs", "steps", "target_seq_len", "eval_batch_size", "log_interval",
            "ckpt_every", "lora_rank", "lr", "new_lr_mult", "kernel_mult",
            "align_lr", "contrastive_lr")  # orca.py's and proposed.py's own learning rates
NON_NEGATIVE = ("seed", "weight_decay", "momentum", "warmup_epochs", "clip", "embed_bias_std", "augment_shift",
                "augment_scale", "tta")
OFF_OR_POSITIVE = ("max_steps", "decay_epochs")


def validate_args(args):
    """One error line for a flag value that cannot work (a batch size of 0, a negative learning rate, an unknown
    device), before anything is built. Flags that are ignored warn later, where that is known (setup, model_for)."""
    def bad(name, value, rule):
        raise UserError(f"--{name} {value}: must be {rule}; give a valid value (see --help)")
    for name in POSITIVE + NON_NEGATIVE + OFF_OR_POSITIVE:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value):
            bad(name, value, "a finite number")
        if name in POSITIVE and value <= 0:
            bad(name, value, "> 0")
        if name in NON_NEGATIVE and value < 0:
            bad(name, value, ">= 0")
        if name in OFF_OR_POSITIVE and value != -1 and value <= 0:
            bad(name, value, "> 0, or -1 (off)")
    device = getattr(args, "device", "auto")
    if not (device in ("auto", "cpu", "mps", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"unknown --device {device}; use auto, cpu, cuda, cuda:N or mps")


# ---- seeding, device, dtype ----------------------------------------------------------------------------------
def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def get_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but no CUDA device is visible; use --device cpu")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible; use "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        torch.set_float32_matmul_precision("high")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps requested but MPS is not available here; use --device cpu")
    return torch.device(name)


def autocast_context(device, dtype="auto"):
    """Returns (context manager, GradScaler). fp32 and CPU get a null context (nanoGPT idiom)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32" or device.type == "cpu":
        return contextlib.nullcontext(), torch.amp.GradScaler(enabled=False)
    ctx = torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
    return ctx, torch.amp.GradScaler(enabled=(dtype == "float16"))


def model_for(task, args):
    """build_model with the command line's choices (--body --pretrained --target_seq_len --input_norm
    --embed_bias_std)."""
    model = build_model(task, args.body, args.pretrained, args.target_seq_len, input_norm=args.input_norm,
                        bias_std=args.embed_bias_std, kernel_mult=getattr(args, "kernel_mult", 1))
    if getattr(args, "kernel_mult", 1) > 1 and getattr(model.embedder, "resize", False) \
            and "kernel_mult" not in getattr(args, "auto_flags", ()):  # given explicitly, not chosen from the data
        print(f"warning: --kernel_mult is ignored with --body {args.body}: it keeps its pretrained patch kernel")
    table = model.body.position_table
    if table is not None and getattr(model.embedder, "num_tokens", 0) > len(table):
        print(f"warning: {model.embedder.num_tokens} tokens (--target_seq_len {args.target_seq_len}) are more than the "
              f"{len(table)} pretrained positions of --body {args.body}: the positions start random")
    return model


def load_embedder(model, path, script, flag="--embedder_ckpt"):
    """Load an embedder.pt written by an earlier `script` run (stage-1 output, named by `flag`) into model.embedder;
    returns the dict it holds (the embedder's state and how it was made)."""
    if not Path(path).exists():
        raise UserError(f"{flag} {path} not found; give the embedder.pt of an earlier {script} run")
    state = load_checkpoint(path, f"{flag} of {script}")
    if not isinstance(state, dict) or "embedder" not in state:
        raise UserError(f"{path} is not a {script} embedder.pt (no 'embedder' entry)")
    try:
        model.embedder.load_state_dict(state["embedder"])
    except RuntimeError as e:
        raise UserError(f"embedder in {path} does not fit this model ({str(e).splitlines()[1].strip()}); it must "
                        f"come from a run with the same --task, --body, --target_seq_len and --kernel_mult") from None
    return state


def count_params(module):
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- optimiser and schedule ----------------------------------------------------------------------------------
def make_optimizer(params, name, lr, weight_decay=0.0, momentum=0.9, fused=False):
    """SGD (with momentum) or Adam / AdamW with the official betas (0.9, 0.98). params: tensors or param groups
    (dicts with their own "lr"); frozen tensors are dropped. fused: one kernel for all tensors (CUDA only)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return opt(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, **({"fused": True} if fused else {}))


def set_finetune(model, mode, lora_rank=8):
    """What the fine-tuning stage trains inside the body (the embedder, the head and any method module always train):
    - full: everything, as the papers run it (the default on the benchmark tasks);
    - norms: the body's LayerNorms only; attention and feed-forward weights stay pretrained ("One Fits All",
      Zhou et al., NeurIPS 2023: frozen self-attention and feed-forward, trained norms, positions, embedder, head);
    - lora: low-rank adapters (Hu et al. 2022, through the peft library) on the body's linear layers, plus its
      LayerNorms.
    Only ever switches gradients off (a part frozen by the method, e.g. orca.py --freeze body, stays frozen);
    calling it twice is harmless (resume)."""
    if mode == "full":
        return
    body = model.body.model
    if mode == "lora" and not any("lora_" in n for n, _ in body.named_parameters()):
        from peft import LoraConfig, inject_adapter_in_model
        # every nn.Linear of the body except MultiheadAttention's out_proj (its weight is read directly, bypassing
        # forward, so an adapter there would never be used)
        targets = sorted({n.split(".")[-1] for n, m in body.named_modules() if isinstance(m, nn.Linear)
                          and not n.endswith("out_proj")})
        frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0,
                                           target_modules=targets), body)
        for n, p in body.named_parameters():  # peft freezes nothing it did not add; keep earlier freezes
            if n in frozen:
                p.requires_grad_(False)
        body.to(next(model.embedder.parameters()).device)
    norms = {id(p) for m in body.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for n, p in body.named_parameters():
        p.requires_grad_(p.requires_grad and (id(p) in norms or "lora_" in n))


def param_groups(model, params, lr, new_lr_mult=1.0):
    """Optimiser groups: the pretrained body at lr, everything else (embedder, head, method modules: new weights) at
    lr x new_lr_mult, a higher rate for the new modules than for the body as in ORCA's embedder stage."""
    body = {id(p) for p in model.body.parameters()}
    params = [p for p in params if p.requires_grad]
    groups = [dict(params=[p for p in params if id(p) in body], lr=lr),
              dict(params=[p for p in params if id(p) not in body], lr=lr * new_lr_mult)]
    return [g for g in groups if g["params"]]


def lr_factor(step, warmup_steps, decay_steps):
    """ORCA's WarmupLR: linear warm-up to 1, then linear decay reaching 0 at decay_steps (clamped at 0). Deviation
    (docs/finetune.md): warm-up (step + 1) / W, not the official step / W, whose lr 0 wastes the first step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (decay_steps - step) / max(1, decay_steps - warmup_steps))


# ---- run directory: config, log, checkpoints, results, plot --------------------------------------------------
def save_checkpoint(state, path):
    """torch.save through a temporary file in the same folder and os.replace: a kill mid-write leaves the previous
    file whole (last.pt stays a valid resume point). Under torchrun only rank 0 writes."""
    if distributed.is_main():
        write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, what="checkpoint", map_location="cpu"):
    """torch.load(weights_only=True): tensors, numbers, strings and containers only. A pickle that names anything
    else (a function to call: the way a crafted file runs code) is refused with one line, as is a truncated file."""
    if not Path(path).exists():
        raise UserError(f"{what} {path} not found; check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL [\w.]+", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:  # weights_only refused to look up a global: tensors and containers never need one
            raise UserError(f"{what} {path} holds more than tensors ({found.group(0)}), which could run code when "
                            f"loaded; refused: load only files written by this project") from None
        first = next((line for line in str(e).splitlines() if line.strip() and "Weights only" not in line), "")
        raise UserError(f"cannot read {what} {path} ({type(e).__name__}: {first.strip()[:120]}); "
                        f"it is truncated or not a torch checkpoint: give another file, or delete it and start afresh "
                        f"(without --resume)") from None


class Run:
    """Owns out_dir: config.json, log.jsonl, ckpt.pt (best on validation), last.pt (resume), results.json,
    curves.png, and the final `FINAL {json}` stdout line. Holds an exclusive lock on out_dir/.lock for the life of
    the process (a second run there is refused); a fresh run removes the files of an earlier one, a --resume run
    must have the flags of the run it continues."""
    STALE = ("ckpt.pt", "last.pt", "results.json", "log.jsonl", "curves.png", "embedder.pt", "predictor.pt")
    # flags that may change on --resume: where and how the run is executed, not what it computes
    RESUME_FREE = {"resume", "out_dir", "data_dir", "device", "eval_batch_size", "log_interval", "ckpt_every",
                   "max_steps", "auto_flags", "distortion", "probe_samples", "probe_ckpt", "deterministic",
                   "compile", "fused", "tta"}  # tta: the test only

    def __init__(self, method, args):
        self.method, self.args, self.start = method, args, time.time()
        args.out_dir = args.out_dir or f"runs/{method}_{args.task}_s{args.seed}"
        self.dir = Path(args.out_dir)
        self._lock = None
        if distributed.is_main():  # under torchrun rank 0 alone prepares the directory; the others wait for it
            self.prepare(args)
        distributed.barrier()

    def prepare(self, args):
        """Make out_dir, take its lock, check a --resume (or clear an earlier run's files), write config.json."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make --out_dir {self.dir} ({e.strerror}); give a folder you can write") from None
        self._lock = open(self.dir / ".lock", "w")  # kept open: the lock lasts as long as this process
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another run is using --out_dir {self.dir} (it holds {self.dir / '.lock'}); wait for it "
                            f"to end or give another --out_dir") from None
        config = json.loads(json.dumps(vars(args), default=str))
        saved = self.dir / "config.json"
        if args.resume and saved.exists():
            try:
                self.check_resume(saved, config)
            except UserError:
                self._lock.close()  # refused: the directory is free again
                raise
        elif not args.resume:
            self.clear()
        write_atomic(saved, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        print("config: " + json.dumps(config))

    def clear(self):
        """A fresh run starts from an empty run directory: the files of an earlier run there (its checkpoints, log
        and results) would otherwise be resumed from, tested or reported as this run's. A stage-1 file given as
        --embedder_ckpt or --init_embedder is kept."""
        given = {Path(f).resolve() for f in (getattr(self.args, k, None) for k in ("embedder_ckpt", "init_embedder"))
                 if f}
        old = [p for d in [self.dir, *sorted(self.dir.glob("fewshot_*"))] for p in map(d.joinpath, self.STALE)
               if p.is_file() and p.resolve() not in given]
        for p in old:
            p.unlink()
        if old:
            print(f"fresh run: removed {len(old)} file(s) of an earlier run in {self.dir} (--resume continues one)")

    def check_resume(self, path, config):
        """--resume continues the schedule saved in last.pt: refuse flags that differ from the saved config.json."""
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"cannot read {path} to check the flags of the run to resume; start afresh (drop "
                            f"--resume) or give another --out_dir") from None
        keys = sorted((set(saved) | set(config)) - self.RESUME_FREE)
        # a flag newer than the saved run (absent from its config.json) ran at its off value, FIXED_DEFAULTS'
        differ = [k for k in keys if saved.get(k, FIXED_DEFAULTS.get(k)) != config.get(k)]
        if differ:
            what = ", ".join(f"--{k} {saved.get(k)} (now {config.get(k)})" for k in differ[:6])
            raise UserError(f"--resume in {self.dir} with other flags than the run it continues: {what}; resume with "
                            f"that run's flags, or start afresh (drop --resume, or give another --out_dir)")

    def log(self, **record):
        if not distributed.is_main():
            return
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self):
        """log.jsonl as dicts; a line cut short by a kill is skipped."""
        path = self.dir / "log.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def truncate(self, stage, after_epoch=None):
        """Drop the log records of `stage` (those of epochs > after_epoch when given): a stage that is redone, or
        resumed from the end of epoch after_epoch, logs them again, so the log equals an uninterrupted run's."""
        if not distributed.is_main():
            return
        path = self.dir / "log.jsonl"
        keep = [r for r in self.records() if r.get("stage") != stage or
                (after_epoch is not None and r.get("epoch", -1) <= after_epoch)]
        if path.exists() and len(keep) != len(path.read_text().splitlines()):
            write_atomic(self.dir / "log.jsonl",
                         lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in keep)))

    def finish(self, results):
        results = dict(method=self.method, task=self.args.task, body=self.args.body, **results,
                       seconds=round(time.time() - self.start, 1), out_dir=str(self.dir))
        if distributed.is_main():
            write_atomic(self.dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
            self.plot()
            print("FINAL " + json.dumps(results))
        distributed.barrier()  # the other ranks end with rank 0 (a rank that leaves early aborts the group)
        distributed.end()  # under torchrun: every rank exits here, past gloo's teardown at interpreter exit
        return results

    def plot(self):
        """One panel per (stage, quantity) found in log.jsonl: stage-1 curves, train loss, validation score."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        series = {}
        for r in self.records():
            for key, value in r.items():
                if key not in ("stage", "step", "epoch", "lr", "ms") and isinstance(value, (int, float)):
                    series.setdefault((r.get("stage", ""), key), []).append((r.get("step", 0), value))
        if not series:
            return
        fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
        for ax, ((stage, key), points) in zip(axes[0], sorted(series.items())):
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_title(f"{stage} {key}".strip(), fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        write_atomic(self.dir / "curves.png", lambda tmp: fig.savefig(tmp, dpi=90))
        plt.close(fig)


def epoch_loader(dataset, batch_size, seed, epoch):
    """A shuffled loader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g)


def epoch_order(n, seed, epoch):
    """The order in which epoch_loader reads n samples (its iterator draws a base seed, then the permutation;
    tests/test_ddp.py checks the two agree), which fit splits between the processes."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g)


def _rng_state():
    """RNG states as tensors, numbers and lists only, so that last.pt loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return dict(torch=torch.get_rng_state(), numpy=[name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached], python=[version, list(internal), gauss])


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))


def stop_nonfinite(what, run, fix):
    """The one-line error of a non-finite loss or weight: the run stops and keeps its checkpoints; the message names
    those that exist (nothing non-finite is ever written)."""
    kept = [str(run.dir / n) for n in ("last.pt", "ckpt.pt", "embedder.pt", "predictor.pt") if (run.dir / n).exists()]
    where = f"kept: {', '.join(kept)}" if kept else "no checkpoint had been written yet"
    raise UserError(f"{what}; run stopped ({where}); {fix}")


def all_finite(params):
    return all(bool(torch.isfinite(p).all()) for p in params)


def fit(model, task, args, run, device, compute=None, params=None, stage="finetune"):
    """Fine-tune `model` on task.train; keep the best-on-validation weights in ckpt.pt; returns best val score.

    compute(model, x, y, epoch) -> (loss, {extra logs}) is the method's hook; the default is plain fine-tuning
    (task loss of the full model). Gradients are summed over `accum` micro-batches as in the official code.
    A run killed at any point resumes (--resume) from last.pt, written at every epoch end, with the same RNG
    state, so it ends exactly as an uninterrupted run on CPU. A non-finite loss stops the run and keeps last.pt.
    Under torchrun every rank runs its share of each step (distributed.py: the global batch stays batch_size x
    accum) through DDP; evaluation is sharded and gathered, so every rank takes the same decisions; rank 0 writes."""
    ctx, scaler = autocast_context(device, args.dtype)
    compute = compute or (lambda m, x, y, epoch: (task_loss(task, m(x), y), {}))
    set_finetune(model, getattr(args, "finetune", "full"), getattr(args, "lora_rank", 8))
    given = params is not None
    params = [p for p in (params if given else model.parameters()) if p.requires_grad]
    if given and getattr(args, "finetune", "full") == "lora":  # the adapters are new parameters
        params += [p for n, p in model.body.named_parameters() if "lora_" in n and p.requires_grad
                   and all(p is not q for q in params)]
    optimizer = make_optimizer(param_groups(model, params, args.lr, getattr(args, "new_lr_mult", 1.0)),
                               args.optimizer, args.lr, args.weight_decay, args.momentum,
                               fused=getattr(args, "fused", False) and device.type == "cuda")
    net = torch.compile(model) if getattr(args, "compile", False) else model  # forward only; weights are shared
    step_fn = distributed.wrap(net, compute, device)  # DDP under torchrun
    local_accum = distributed.plan(args.batch_size, args.accum)[1]
    batches = math.ceil(len(task.train) / args.batch_size)
    if args.accum > batches:  # the trailing partial accumulation is dropped: no step would ever be taken
        raise UserError(f"--accum {args.accum} is more than the {batches} batches of an epoch, so no optimiser step "
                        f"would be taken; lower --accum or --batch_size")
    steps_per_epoch = max(1, batches // args.accum)
    if getattr(args, "steps", None) and not getattr(args, "auto_task", False):  # --steps on a fixed-config task
        args.epochs = math.ceil(args.steps / steps_per_epoch)
        args.decay_epochs = args.epochs
    warmup, decay = args.warmup_epochs * steps_per_epoch, args.decay_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, decay))
    # which checkpoint is tested: the best on validation, or the last epoch when the validation split is too small
    # to rank epochs (a handful of samples: one sample moves the error by 1/n, i.e. noise)
    select = getattr(args, "select", "best") or "best"
    every = getattr(args, "ckpt_every", 1) or 1
    shift, scale = getattr(args, "augment_shift", 0) or 0, getattr(args, "augment_scale", 0) or 0
    refuse_bad_augment(task.kind, task.name, shift, scale, getattr(args, "tta", 0))  # custom .npz: kind known now
    seed_everything(args.seed + 1)  # fine-tuning randomness must not depend on whether stage 1 ran (resume)
    start_epoch, step, best, best_state = 0, 0, math.inf, None
    last = run.dir / "last.pt"
    if args.resume and last.exists():
        state = load_checkpoint(last, "resume point")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best"]
        rng = state["rng"]  # a multi-process run saves every rank's RNG state
        _set_rng_state(rng[min(distributed.rank(), len(rng) - 1)] if isinstance(rng, list) else rng)
        print(f"resumed from {last} at epoch {start_epoch}")
        run.truncate(stage, after_epoch=state["epoch"])  # the records of a partial epoch are logged again
    else:
        run.truncate(stage)
    total = args.epochs * steps_per_epoch if args.max_steps < 0 else min(args.max_steps, args.epochs * steps_per_epoch)
    from tqdm import tqdm
    for epoch in range(start_epoch, args.epochs):
        if step >= total:
            break
        model.train()
        optimizer.zero_grad(set_to_none=True)
        t0 = time.time()
        # the order of epoch_loader; this rank's micro-batches of it (all of them on one process)
        micro = distributed.micro_batches(epoch_order(len(task.train), args.seed, epoch), args.batch_size, args.accum)
        # (its own generator: a loader draws a base seed from it, which must not move the global RNG state)
        loader = torch.utils.data.DataLoader(task.train, batch_sampler=[idx.tolist() for _, idx in micro],
                                             generator=torch.Generator())
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if distributed.is_main() else True)
        draws = (data.augment_table(len(task.train), args.seed, epoch, shift, scale, task.in_shape[1:])
                 if shift > 0 or scale > 0 else None)
        for i, ((m, idx), (x, y)) in enumerate(zip(micro, bar)):
            x, y = x.to(device), y.to(device)
            if draws is not None:
                x = data.augment(x, draws[idx])
            last_micro = (i + 1) % local_accum == 0
            with distributed.micro_batch(m), distributed.no_sync(step_fn, not last_micro):
                with ctx:
                    loss, extra = step_fn(x, y, epoch)
                if not torch.isfinite(loss):
                    stop_nonfinite(f"non-finite loss ({loss.item()}) at epoch {epoch} step {step}", run,
                                   "lower --lr (or use --dtype float32) and start afresh")
                weight = distributed.loss_weight(m)  # 1 on one process
                scaler.scale(loss if weight == 1 else loss * weight).backward()
            if not last_micro:
                continue  # accumulate (a trailing partial accumulation is dropped, as in the official code)
            if args.clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % args.log_interval == 0 or step == total:
                ms = (time.time() - t0) * 1000 / (i + 1) * local_accum
                lr = scheduler.get_last_lr()[0]
                # the values of the step's last micro-batch, as on one process (summed over the ranks' shares)
                loss_value, *values = distributed.sum_logged([loss.item(), *extra.values()],
                                                             m.share if m.index % args.accum == args.accum - 1 else 0)
                extra = dict(zip(extra, values))
                extras = "".join(f" | {k} {v:.4f}" for k, v in extra.items())
                print(f"step {step}/{total} | epoch {epoch} | loss {loss_value:.4f}{extras} | lr {lr:.1e} | "
                      f"{ms:.0f}ms/step")
                run.log(stage=stage, step=step, epoch=epoch, loss=loss_value, lr=lr, **extra)
            if step >= total:
                break
        complete = i + 1 == len(micro)  # False when --max_steps cut the epoch short
        if not all_finite(params):  # a finite loss with a non-finite gradient: stop before evaluating or saving
            stop_nonfinite(f"non-finite weights after epoch {epoch} step {step}", run,
                           "lower --lr (or set --clip 1) and start afresh")
        if len(task.val):
            val = evaluate(model, task, task.val, args.eval_batch_size, device, ctx)
            if select == "best" and val["score"] < best:
                best, best_state = val["score"], _cpu_state(model, epoch, val["score"])
            print(f"eval epoch {epoch} | val_loss {val['loss']:.4f} | val_{task.metric} {val['score']:.4f} "
                  f"(best {best:.4f})")
            run.log(stage=stage, step=step, epoch=epoch, val_loss=val["loss"], val_score=val["score"])
        if not complete:
            break  # a partial epoch is never written to last.pt: --resume redoes it whole, as after a kill
        final = epoch == args.epochs - 1 or step >= total
        if (epoch + 1) % every == 0 or final:
            # the tested checkpoint is flushed together with the resume point, so that both always agree
            if select == "last":
                best_state = {"model": model.state_dict(), "epoch": epoch, "val_score": None}
            if best_state is not None:
                save_checkpoint(best_state, run.dir / "ckpt.pt")
                best_state = None
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "best": best,
                             "rng": distributed.gather_objects(_rng_state())}, last)
    if best_state is not None:  # a --max_steps cut: the best epoch seen is still tested
        save_checkpoint(best_state, run.dir / "ckpt.pt")
    distributed.barrier()  # ckpt.pt is written (by rank 0) before any rank reads it
    return best


def _cpu_state(model, epoch, val_score):
    """A copy of the weights that later steps do not change (kept in memory until it is written)."""
    return {"model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, "epoch": epoch,
            "val_score": val_score}


def test_best(model, task, args, run, device):
    """Reload the tested checkpoint (ckpt.pt: best on validation, or the last epoch with --select last) and score it
    on the validation and test splits (through TranslationTTA with --tta > 1)."""
    ctx, _ = autocast_context(device, args.dtype)
    ckpt = run.dir / "ckpt.pt"
    if ckpt.exists():
        model.load_state_dict(load_checkpoint(ckpt, "checkpoint", device)["model"])
    if getattr(args, "tta", 0) > 1:  # refuse_bad_augment checked it before training
        model = TranslationTTA(model, args.augment_shift, args.tta)
    val = evaluate(model, task, task.val, args.eval_batch_size, device, ctx)["score"] if len(task.val) else None
    test = evaluate(model, task, task.test, args.eval_batch_size, device, ctx)
    return {"metric": task.metric, "test_score": test["score"], "val_score": val, "test_loss": test["loss"]}


def setup(method, args):
    """Common start of every method script: process group (under torchrun), seed, device, run directory. Returns
    (run, device). Every rank gets the same seed (distributed.py)."""
    name = distributed.init(args.device)
    seed_everything(args.seed, args.deterministic)
    device = get_device(name)
    if distributed.world() > 1:
        print(distributed.plan_line(args.batch_size, args.accum))
    if getattr(args, "fused", False) and device.type != "cuda":
        print("warning: --fused is ignored off CUDA (plain Adam / AdamW kernels)")
    if device.type == "cpu" and args.dtype in ("float16", "bfloat16"):
        print(f"warning: --dtype {args.dtype} is ignored on the CPU (autocast runs in float32 there)")
    return Run(method, args), device
