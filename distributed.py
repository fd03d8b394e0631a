"""More than one process (torchrun, DistributedDataParallel), nanoGPT-style; a no-op without torchrun.

    torchrun --standalone --nproc_per_node 8 orca.py --task ecg --body roberta     # one node, 8 GPUs
    python orca.py --task ecg --body roberta                                       # the same run on one process

`init` (called by common.setup) reads RANK / LOCAL_RANK / WORLD_SIZE, starts the process group (nccl on CUDA, gloo on
the CPU) and binds each rank to its GPU. Every rank is seeded with the same --seed: a stage that runs on every rank
computes the same numbers, and random draws of a training step are made for the whole global micro-batch and sliced
(`batch_noise`), so they do not depend on the number of processes.

How common.fit splits the work (the global batch = --batch_size x --accum, the official config's, whatever the number
of processes W):
- `accum` mode, when --accum divides by W: each rank runs --accum / W whole micro-batches of a step;
- `rows` mode otherwise: each rank runs its 1/W slice of every micro-batch (sizes may differ by one row).
Gradients are averaged by DDP and every loss is weighted by W x (its rows / the micro-batch's rows) before backward,
so the step equals the 1-process step up to float summation order (a summed loss, metrics.SUMMED_LOSSES, is scaled
back to the micro-batch's sum in metrics.task_loss). In rows mode the random draws of a step equal the 1-process
run's too; in accum mode each rank draws for its own micro-batches, so a random step (PaRe's Gumbel noise) differs.
A rank that meets a non-finite loss stops with one error line, and torchrun then ends the other ranks.
With world size 1 every function here returns its input or does nothing: the 1-process numbers are unchanged.
"""
import atexit
import builtins
import contextlib
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from errors import UserError


def _print_stderr_only(*args, _print=builtins.print, **kwargs):
    if kwargs.get("file") is sys.stderr:
        _print(*args, **kwargs)


if int(os.environ.get("RANK", 0)) > 0:  # under torchrun, ranks other than 0 print errors (stderr) only
    builtins.print = _print_stderr_only


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def init(device="auto"):
    """Start the process group when launched by torchrun with WORLD_SIZE > 1; returns the device name this rank
    uses (cuda:LOCAL_RANK on GPUs). Ranks other than 0 print only to stderr (warnings and errors)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return device
    local = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device == "mps":
        raise UserError("--device mps cannot run under torchrun (no process-group backend); use one process")
    if cuda:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                            f"give --nproc_per_node <= the GPUs of a node, or --device cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(destroy)
    return device


def destroy():
    """At exit, while the interpreter is whole: collect any object still holding the process group (a DDP wrapper in
    a reference cycle; gloo's threads can abort a process torn down with one alive), then destroy the group."""
    if dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()


def end():
    """The clean end of a multi-process run, once every rank has passed Run.finish's barrier (results written): destroy
    the group, flush, and leave with os._exit(0). Left to the interpreter's exit, gloo's teardown in C++ destructors
    now and then aborts a rank that has finished ("terminate called without an active exception", SIGABRT) and
    torchrun reports the run failed: 2 torchrun runs in about 40 on the loaded 2-core machine (tests/test_ddp.py)."""
    if world() == 1:
        return
    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def describe():
    """One line for the log: the processes and the backend."""
    return f"{world()} processes ({dist.get_backend()})" if dist.is_initialized() else "1 process"


# ---- the global batch ----------------------------------------------------------------------------------------
def plan(batch_size, accum):
    """(mode, micro-batches per rank per step) for the global batch batch_size x accum over world() ranks."""
    W = world()
    if W > 1 and accum % W == 0:
        return "accum", accum // W
    return "rows", accum


def plan_line(batch_size, accum):
    mode, local = plan(batch_size, accum)
    each = f"{batch_size} x accum {local}" if mode == "accum" else f"{batch_size / world():g} x accum {local}"
    return (f"distributed: {describe()}, global batch {batch_size} x accum {accum} = {batch_size * accum} samples a "
            f"step; each process {each} ({mode} mode: --accum {'divided' if mode == 'accum' else 'kept'})")


@dataclass
class Micro:
    """The micro-batch being computed (set by common.fit around the method's hook): its index in the epoch, this
    rank's rows of it (a slice), its global size, and this rank's share of its rows (0 for a padding row)."""
    index: int = 0
    rows: slice = field(default_factory=lambda: slice(None))
    size: int = None
    share: float = 1.0


micro = Micro()


@contextlib.contextmanager
def micro_batch(m):
    global micro
    micro, old = m, micro
    try:
        yield m
    finally:
        micro = old


def micro_batches(order, batch_size, accum):
    """This rank's micro-batches of an epoch: [(Micro, dataset indices)]. order: the epoch's shuffled order. The
    1-process run's micro-batch j is order[j*B:(j+1)*B]; a trailing partial accumulation is kept as in the official
    loop in rows mode, and dropped (never computed) in accum mode."""
    W, r = world(), rank()
    mode, local = plan(batch_size, accum)
    chunks = list(order.split(batch_size))
    if mode == "accum":
        steps = len(chunks) // accum
        mine = [j for s in range(steps) for j in range(s * accum + r * local, s * accum + (r + 1) * local)]
        return [(Micro(j, slice(0, len(chunks[j])), len(chunks[j]), 1.0), chunks[j]) for j in mine]
    out = []
    for j, chunk in enumerate(chunks):
        n = len(chunk)
        lo, hi = r * n // W, (r + 1) * n // W
        if hi > lo:
            out.append((Micro(j, slice(lo, hi), n, (hi - lo) / n), chunk[lo:hi]))
        else:  # fewer rows than ranks: a padding row that weighs 0 keeps every rank in step
            out.append((Micro(j, slice(0, 1), n, 0.0), chunk[:1]))
    return out


def loss_weight(m):
    """The factor of a micro-batch's loss before backward, so that DDP's average over ranks equals the 1-process
    gradient (the sum over the step's micro-batches of their mean-loss gradients); 1 on one process."""
    return world() * m.share


def batch_noise(like, fill):
    """fill(t) for a t shaped like `like` but with the global micro-batch's rows, drawn on every rank (same seed,
    same draws), and this rank's rows of it: a random draw of a training step that does not depend on W."""
    n = micro.size or len(like)
    full = fill(like.new_empty((n, *like.shape[1:])))
    return full[micro.rows] if micro.size else full


# ---- wrapping and collectives --------------------------------------------------------------------------------
class _Step(torch.nn.Module):
    """compute(model, x, y, epoch) as a module, so that DDP sees the whole training step (a method's hook may call
    model.embed, model.body, ... rather than model.forward) and prepares the gradient all-reduce for it."""

    def __init__(self, model, compute):
        super().__init__()
        self.model, self.compute = model, compute

    def forward(self, x, y, epoch):
        return self.compute(self.model, x, y, epoch)


def wrap(model, compute, device):
    """step(x, y, epoch) -> compute(model, x, y, epoch): the hook itself on one process, wrapped in
    DistributedDataParallel otherwise. Some trainable parameters get no gradient in a step (the body's word embedding,
    which only source tokens use; PaRe's gate in its hard top-k phase or an unmixed step): DDP looks for them."""
    if world() == 1:
        return lambda x, y, epoch: compute(model, x, y, epoch)
    from torch.nn.parallel import DistributedDataParallel
    import inspect
    # the buffers (input statistics, UPS's masks and grids) are constant: no broadcast at every forward
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(_Step(model, compute), device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, **{quiet: False})


def no_sync(step, skip):
    """DDP's no_sync while accumulating: no all-reduce until the step's last micro-batch."""
    return step.no_sync() if skip and hasattr(step, "no_sync") else contextlib.nullcontext()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_logged(values, weight):
    """The logged numbers of a step: each rank's values x weight (its share of the micro-batch logged), summed over
    ranks (= the 1-process value of that micro-batch). values: a list of floats."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device()) * weight
    dist.all_reduce(t)
    return t.tolist()


def sum_grads(params):
    """Sum each parameter's .grad over the ranks (a parameter without one counts as zeros): for a stage that splits
    a sum of losses between the ranks by hand (ORCA's per-class OTDD) instead of through DDP."""
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            dist.all_reduce(p.grad)


def gather_rows(t, n):
    """Concatenate every rank's equal-sized tensor along dim 0 (rank order) and keep the first n rows."""
    if world() == 1:
        return t
    parts = [torch.empty_like(t, device=_device()) for _ in range(world())]
    dist.all_gather(parts, t.to(_device()))
    return torch.cat(parts)[:n].to(t.device)


def eval_indices(n):
    """This rank's contiguous block of ceil(n / W) of the n rows, padded with the last row (gather_rows cuts it)."""
    per = math.ceil(n / world())
    return [min(i, n - 1) for i in range(rank() * per, (rank() + 1) * per)]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. RNG states for last.pt); obj itself on one process."""
    if world() == 1:
        return obj
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
