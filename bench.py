"""Benchmarks, one named section each: `python bench.py SECTION [--device auto|cpu|cuda] [--threads N]`.

Sections (the BENCHES dict at the bottom):
  otdd   ORCA's stage-2 OTDD step (value + backward): official engine (geomloss, source side recomputed per call)
         vs our otdd.OTDD (source side cached), both against a converged float64 solution of ours.
  pare   one PaRe training step (phase A: Gumbel top-k; phase B: hard top-k) over one plain fine-tuning step,
         same body (--body), same batch.
  mona   one MoNA stage-1 meta step (second-order virtual update + source pass) over one plain fine-tuning step,
         same body (--body), same target batch, on gunpoint and digits; ratio_meta_step is the larger ratio.
  ddp    steps/s of finetune.py under torchrun, 2 processes against 1, the same global batch (CPU: gloo; the real
         figure comes from a GPU node): python bench.py ddp --body tiny
  suite  the development suite (data.SUITE: real data sets that installed packages ship): a method script with
         default flags over every set and seed, next to 1-NN (Euclidean, scikit-learn) and plain fine-tuning:
         python bench.py suite --method orca --seeds 0 1 2 [--jobs 2] [--args "--finetune norms"]

Each section prints a table and, as its last line, `BENCH {json}` with its figures, all measured side by side in
one run on the same machine and data.
"""
import argparse
import ctypes
import json
import statistics
import time

import torch

import otdd

# ---- otdd ---------------------------------------------------------------------------------------------------------

# the official stage-2 setting (orca_pare_reference.md 2.3-2.4): 5000 pooled source features, ~160 target points
# of one target class with a dummy label, eps = 0.1; Swin/CIFAR-10 (D=128, 10 classes), RoBERTa/text (D=768, 8)
OTDD_SETTINGS = {"swin": dict(dim=128, n_classes=10), "text": dict(dim=768, n_classes=8)}


def make_features(n, n_classes, dim, seed, spread=0.7):
    """Gaussian clusters passed through a LayerNorm, like token-mean embedder outputs: (n, dim) features and (n,)
    labels. Rows have norm ~sqrt(dim), so costs 1/2 ||x - x'||^2 are ~1000x eps=0.1 at D=128."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_classes, dim, generator=g)
    y = torch.randint(n_classes, (n,), generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)
    return torch.nn.functional.layer_norm(x, (dim,)), y


def otdd_data(setting, device, dtype=torch.float32):
    cfg = OTDD_SETTINGS[setting]
    x_s, y_s = make_features(5000, cfg["n_classes"], cfg["dim"], seed=0)
    x_t, _ = make_features(160, 1, cfg["dim"], seed=1)  # one target class, ORCA's dummy label 0
    return x_s.to(device, dtype), y_s.to(device), x_t.to(device, dtype)


def official_otdd_step(x_s, y_s, x_t, eps=0.1):
    """One ORCA OTDD call as the official code runs it (embedder.py:otdd -> otdd DatasetDistance -> geomloss): a new
    distance object per call, so every class-pair label distance is recomputed, each pair its own geomloss
    SamplesLoss call read back with .item(); then the outer debiased Sinkhorn on labels-appended points with the
    augmented cost 1/2 ||x - x'||^2 + 1/2 W, and backward. Returns the value."""
    from geomloss import SamplesLoss
    try:
        from geomloss.utils import squared_distances  # geomloss 0.2.x, as the official code imports it
    except ImportError:  # geomloss 0.3 moved the 0.2 API under _legacy
        from geomloss._legacy.utils import squared_distances

    blur = eps**0.5  # geomloss: eps = blur^p with p = 2, default cost 1/2 ||x - y||^2, eps-scaling factor 0.5
    # the label distances get the unhalved cost ||x - y||^2: pwdist_exact passes squared_distances for p = 2
    inner = SamplesLoss("sinkhorn", p=2, blur=blur, debias=True, cost=squared_distances, backend="tensorized")
    classes = y_s.unique()
    n_cls = len(classes)
    groups = [x_s[y_s == c] for c in classes] + [x_t.detach()]  # the target is one class, label n_cls
    W = torch.zeros(n_cls + 1, n_cls + 1, device=x_s.device)
    for i in range(n_cls + 1):  # source-source pairs (pwdist_exact, symmetric) and source-target pairs
        for j in range(i + 1, n_cls + 1):
            W[i, j] = W[j, i] = inner(groups[i], groups[j]).item()

    def augmented_cost(z1, z2):
        # (B, N, D + 1), (B, M, D + 1) with the label in the last column -> (B, N, M), like batch_augmented_cost
        l1, l2 = z1[..., -1].long(), z2[..., -1].long()
        return otdd.half_sq_dist(z1[..., :-1], z2[..., :-1]) + 0.5 * W[l1[:, :, None], l2[:, None, :]]

    outer = SamplesLoss("sinkhorn", p=2, blur=blur, debias=True, cost=augmented_cost, backend="tensorized")
    z_s = torch.cat([x_s, y_s[:, None].to(x_s.dtype)], 1)
    z_t = torch.cat([x_t, torch.full_like(x_t[:, :1], n_cls)], 1)
    loss = outer(z_s, z_t)
    loss.backward()
    return loss.item()


def ours_step(dist, x_t, x_s=None, y_s=None):
    """One alignment step with our OTDD object `dist`; dist=None: the uncached otdd() function. Returns the value."""
    loss = dist(x_t) if dist is not None else otdd.otdd(x_s, y_s, x_t)
    loss.backward()
    return loss.item()


def timed(fn, repeats, device):
    """Runs fn() `repeats` times -> (median seconds per call, last return value)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _proc_status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def peak_memory(fn, device):
    """Runs fn() once -> (return value, peak memory growth in MiB). GPU: torch.cuda.max_memory_allocated; CPU: the
    resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs after malloc_trim) minus the resident set
    before the call, since tracemalloc does not see torch's allocations."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS so that the baseline is honest
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _proc_status_mb("VmRSS")
    except OSError:  # not Linux: no memory figure
        return fn(), float("nan")
    out = fn()
    return out, _proc_status_mb("VmHWM") - base


def bench_otdd(args):
    import geomloss  # noqa: F401  (imported here so that no timed call pays for the import)

    device = torch.device(args.device)

    def run(fn, repeats):
        """Calls fn() `repeats` times -> (median wall seconds, mean process CPU seconds, peak memory MiB, last value).
        CPU time is disturbed less than wall time by other jobs on a shared machine. Only fn() is timed, not the
        memory bookkeeping around it."""
        walls, cpus, peak = [], [], 0.0

        def call():
            c0, t0 = time.process_time(), time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            return result

        for _ in range(repeats):
            out, mem = peak_memory(call, device)
            peak = max(peak, mem)
        return statistics.median(walls), statistics.mean(cpus), peak, out

    results = {}
    for setting, cfg in OTDD_SETTINGS.items():
        x_s, y_s, x_t = otdd_data(setting, device)
        fresh = lambda: x_t.detach().clone().requires_grad_()  # noqa: E731  (a new target batch each step)
        # reference: our solver in float64, every marginal error below 1e-5 (1e3x tighter than the defaults;
        # 1e-6 gives the same value to 1e-14)
        t_ref, _, _, ref = run(lambda: otdd.otdd(x_s.double(), y_s, x_t.double(), tol=1e-5, label_tol=1e-5,
                                                 max_iter=20000).item(), 1)
        t_off, cpu_off, mem_off, v_off = run(lambda: official_otdd_step(x_s, y_s, fresh()), args.repeats)
        t_init, _, mem_init, dist = run(lambda: otdd.OTDD(x_s, y_s), 1)
        t_ours, cpu_ours, mem_ours, v_ours = run(lambda: ours_step(dist, fresh()), 3 * args.repeats)
        t_nocache, _, _, _ = run(lambda: ours_step(None, fresh(), x_s, y_s), 1)
        results[setting] = dict(
            speedup=t_off / t_ours, speedup_cpu_time=cpu_off / cpu_ours, speedup_uncached=t_off / t_nocache,
            rel_diff=abs(v_ours - ref) / abs(ref), rel_diff_official=abs(v_off - ref) / abs(ref),
            t_official_s=t_off, t_ours_s=t_ours, cpu_official_s=cpu_off, cpu_ours_s=cpu_ours, t_ours_init_s=t_init,
            t_ours_uncached_s=t_nocache, t_ref_s=t_ref, value_ref=ref, value_ours=v_ours, value_official=v_off,
            mem_official_mb=mem_off, mem_ours_mb=mem_ours, mem_ours_init_mb=mem_init)
        print(f"{setting}: done ({time.strftime('%X')})", flush=True)
    print(f"\nOTDD alignment step (value + backward), 5000 source points, 160 target points, eps=0.1; device {device},"
          f" {torch.get_num_threads()} torch threads; official = geomloss as ORCA calls it, ours = OTDD (cached)")
    print(f"{'setting':<20}{'official s':>11}{'ours s':>9}{'speedup':>9}{'(cpu time)':>11}{'rel_diff ours':>14}"
          f"{'rel_diff off.':>14}{'peak MiB off/ours':>19}{'ours init s/MiB':>17}{'uncached s':>11}")
    for setting, r in results.items():
        name = f"{setting} D={OTDD_SETTINGS[setting]['dim']} C={OTDD_SETTINGS[setting]['n_classes']}"
        print(f"{name:<20}{r['t_official_s']:>11.3f}{r['t_ours_s']:>9.3f}{r['speedup']:>8.1f}x"
              f"{r['speedup_cpu_time']:>10.1f}x{r['rel_diff']:>14.1e}{r['rel_diff_official']:>14.1e}"
              f"{r['mem_official_mb']:>11.0f}/{r['mem_ours_mb']:<7.0f}{r['t_ours_init_s']:>9.2f}/"
              f"{r['mem_ours_init_mb']:<7.0f}{r['t_ours_uncached_s']:>11.2f}")
    print("speedup: official / ours wall time per step (cpu time: the same in process CPU seconds); rel_diff:"
          " |value - float64 reference| / reference;\npeak MiB: " + ("torch.cuda.max_memory_allocated growth"
          if device.type == "cuda" else "growth of the peak resident set (VmHWM) over the call"))
    summary = dict(section="otdd", device=str(device), threads=torch.get_num_threads(),
                   speedup=min(r["speedup"] for r in results.values()),
                   rel_diff=max(r["rel_diff"] for r in results.values()),
                   rel_diff_official=max(r["rel_diff_official"] for r in results.values()), settings=results)
    print("BENCH " + json.dumps(summary))


# ---- pare ---------------------------------------------------------------------------------------------------------

def bench_pare(args):
    """One PaRe training step (fwd + bwd + AdamW) over one plain fine-tuning step: same body (--body), same batch
    (sklearn digits, 32 images, 64 tokens), same machine, interleaved round by round; phase A (Gumbel top-k, gate
    trained) and phase B (hard top-k). Two body passes are the floor (ratio ~2); the official phase A is ~5-6x."""
    import common
    import data
    import pare  # bench.py may import method files; method files never import each other

    device = torch.device(args.device)
    common.seed_everything(0)
    task = data.get_task("digits")
    model = common.build_model(task, args.body, True, 64).to(device)
    source = data.load_source(data.default_source(model.body), model.body)
    margs = pare.get_args(["--task", "digits", "--body", args.body, "--epochs", "100", "--gumbel_epochs", "1"])
    k0, k_end = pare.resolve(margs, task, model.embedder.num_tokens,
                             data.embed_source(model.body, source.tensors[0][:1]).shape[1])
    pare.attach_pare_modules(model, int(source.tensors[1].max()) + 1).to(device)
    compute = pare.make_compute(task, pare.SourceBatches(source, 32, 0), margs, k0, k_end, device)
    optimizer = common.make_optimizer(model.parameters(), "adamw", 1e-5)
    x, y = (t.to(device) for t in data.take(task.train, range(32)))
    steps = {"plain": lambda: (common.task_loss(task, model(x), y), {}),  # = common.fit's default step
             "pare phase A": lambda: compute(model, x, y, 0), "pare phase B": lambda: compute(model, x, y, 1)}
    times = {name: [] for name in steps}
    model.train()
    for r in range(1 + 3 * args.repeats):  # round 0 is a warm-up
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, _ = step()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(f"device {device}, torch threads {torch.get_num_threads()}; body {args.body}, digits batch 32, "
          f"{model.embedder.num_tokens} target tokens, k {k0}; median of {3 * args.repeats} interleaved steps")
    print(f"{'step':<14}{'ms/step':>10}{'x plain':>9}")
    for name in steps:
        print(f"{name:<14}{ms[name]:>10.1f}{ms[name] / ms['plain']:>9.2f}")
    summary = dict(section="pare", device=str(device), threads=torch.get_num_threads(), body=args.body, k=k0,
                   ms_plain=ms["plain"], ms_phase_a=ms["pare phase A"], ms_phase_b=ms["pare phase B"],
                   ratio_phase_a=ms["pare phase A"] / ms["plain"], ratio_phase_b=ms["pare phase B"] / ms["plain"],
                   goal=2.2)
    print("BENCH " + json.dumps(summary))


# ---- mona ---------------------------------------------------------------------------------------------------------

def bench_mona(args):
    """One MoNA stage-1 meta step (virtual update with create_graph, source batch through the virtually updated body,
    second-order embedder update) over one plain fine-tuning step (fwd + bwd + AdamW on all weights): same body
    (--body), same target batch, same machine, interleaved round by round; on gunpoint and digits with their default
    batch and token counts. The source batch is mona.py's default (--batch_size samples, cut to the target batch's
    token count); the same meta step with a full --batch_size of source samples and --first_order are timed beside."""
    import common
    import data
    import mona  # bench.py may import method files; method files never import each other

    device = torch.device(args.device)
    rows = {}
    for name in ("gunpoint", "digits"):
        margs = mona.get_args(["--task", name, "--body", args.body])
        common.seed_everything(0)
        task = data.get_task(name)
        model = common.build_model(task, args.body, True, margs.target_seq_len).to(device).train()
        source = data.load_source(data.default_source(model.body), model.body)
        x, y = (t.to(device) for t in data.take(task.train, range(margs.batch_size)))
        src_x, src_y = (t[:margs.batch_size].to(device) for t in source.tensors)
        src_tokens = data.embed_source(model.body, src_x)
        n = mona.source_batch_size(margs, model.embedder.num_tokens, src_tokens.shape[1])  # as mona.py resolves it
        plain_opt = common.make_optimizer(model.parameters(), "adamw", 1e-5)
        meta_opt = common.make_optimizer(model.embedder.parameters(), "adamw", 1e-5)

        def plain():  # = common.fit's default step
            common.task_loss(task, model(x), y).backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def meta(first_order, n_src):
            margs.first_order = first_order
            mona.meta_step(model, meta_opt, task, x, y, src_tokens[:n_src], src_y[:n_src], margs)

        steps = {"plain": plain, "meta": lambda: meta(False, n), "first_order": lambda: meta(True, n),
                 "full_source": lambda: meta(False, margs.batch_size)}
        times = {k: [] for k in steps}
        for r in range(1 + 5 * args.repeats):  # round 0 is a warm-up; a plain step varies by 15 % run to run
            for k, step in steps.items():
                seconds, _ = timed(step, 1, device)
                if r > 0:
                    times[k].append(seconds)
        ms = {k: 1000 * statistics.median(t) for k, t in times.items()}
        rows[name] = dict(tokens=x.shape[0] * model.embedder.num_tokens, source_batch=n,
                          source_tokens=n * src_tokens.shape[1],
                          ms_plain=ms["plain"], ms_meta=ms["meta"], ms_first_order=ms["first_order"],
                          ratio_meta_step=ms["meta"] / ms["plain"], ratio_first_order=ms["first_order"] / ms["plain"],
                          full_source_batch=margs.batch_size, full_source_tokens=margs.batch_size * src_tokens.shape[1],
                          ms_full_source=ms["full_source"], ratio_full_source=ms["full_source"] / ms["plain"])
    print(f"device {device}, torch threads {torch.get_num_threads()}; body {args.body}; median of {5 * args.repeats} "
          f"interleaved steps; tokens per batch target / source (source samples)")
    print(f"{'task':<10}{'tokens':>15}{'plain ms':>10}{'meta ms':>9}{'x plain':>9}{'1st-order ms':>14}{'x plain':>9}"
          f"{'full source':>16}{'meta ms':>9}{'x plain':>9}")
    for name, r in rows.items():
        default = f"{r['tokens']}/{r['source_tokens']} ({r['source_batch']})"
        full = f"{r['full_source_tokens']} ({r['full_source_batch']})"
        print(f"{name:<10}{default:>15}{r['ms_plain']:>10.0f}{r['ms_meta']:>9.0f}{r['ratio_meta_step']:>9.2f}"
              f"{r['ms_first_order']:>14.0f}{r['ratio_first_order']:>9.2f}{full:>16}{r['ms_full_source']:>9.0f}"
              f"{r['ratio_full_source']:>9.2f}")
    print("The meta step runs the target batch forward, backward with create_graph, and backward again (second order),"
          "\nplus the source batch forward and backward: with as many source as target tokens (the default) that is"
          "\nabout 10 forward passes against plain's 3. 'full source': --source_batch_size = --batch_size, whose"
          "\n32-token sentences have twice the tokens of these targets.")
    summary = dict(section="mona", device=str(device), threads=torch.get_num_threads(), body=args.body,
                   ratio_meta_step=max(r["ratio_meta_step"] for r in rows.values()),
                   ratio_full_source=max(r["ratio_full_source"] for r in rows.values()), goal=3.5, tasks=rows)
    print("BENCH " + json.dumps(summary))


# ---- suite --------------------------------------------------------------------------------------------------------

def knn_error(task):
    """Test error of a 1-nearest-neighbour classifier, Euclidean distance on the flattened raw inputs (scikit-learn),
    fitted on every labelled training sample (the train and validation splits)."""
    from sklearn.neighbors import KNeighborsClassifier
    xs, ys = zip(*[task.train.tensors] + ([task.val.tensors] if len(task.val) else []))
    x, y = torch.cat(xs).flatten(1).numpy(), torch.cat(ys).numpy()
    x_test, y_test = (t.numpy() for t in task.test.tensors)
    return float((KNeighborsClassifier(1).fit(x, y).predict(x_test.reshape(len(x_test), -1)) != y_test).mean())


def suite_run(script, task, seed, extra, root, threads):
    """One run of `script` on a suite task (its default flags + extra), in root/...; reused when a finished run with
    the same command line is there already. Returns its FINAL dict."""
    import os
    import pathlib
    import shlex
    import subprocess
    import sys
    tag = ("_" + "".join(c if c.isalnum() else "-" for c in " ".join(extra)).strip("-")) if extra else ""
    out = pathlib.Path(root) / f"{script.removesuffix('.py')}{tag}_{task}_s{seed}"
    argv = [script, "--task", task, "--seed", str(seed), "--out_dir", str(out), *extra]
    done = out / "results.json"
    if done.exists() and (out / "argv.json").exists() and json.loads((out / "argv.json").read_text()) == argv:
        return json.loads(done.read_text())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"suite run failed: {shlex.join(argv)}\n{proc.stderr[-2000:]}")
    from official_data import write_atomic
    write_atomic(out / "argv.json", lambda tmp: tmp.write_text(json.dumps(argv)))  # never half a file
    return json.loads(done.read_text())


def bench_suite(args):
    """Every set of data.SUITE x every seed: the method with its default flags (+ --args), plain fine-tuning
    (finetune.py + --plain_args) and 1-NN. Runs go to --root and are reused when repeated with the same flags."""
    import shlex
    from concurrent.futures import ThreadPoolExecutor
    import common
    import data
    sets, skipped = [], []
    for name in args.sets or data.SUITE:
        try:
            sets.append((name, data.get_task(name, args.data_dir)))
        except common.UserError as e:
            skipped.append(name)
            print(f"skipped {name}: {e}")
    extra, plain_extra = shlex.split(args.args), shlex.split(args.plain_args)
    scripts = [(f"{args.method}.py", extra)] + ([("finetune.py", plain_extra)] if args.method != "finetune" else [])
    jobs = [(s, e, name, seed) for name, _ in sets for seed in args.seeds for s, e in scripts]
    threads = max(1, args.threads // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: suite_run(j[0], j[2], j[3], j[1], args.root, threads), jobs))
    scores = {}
    for (script, _, name, _), r in zip(jobs, results):
        scores.setdefault((script, name), []).append(r)

    def stats(rs):
        v = [r["test_score"] for r in rs]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return statistics.mean(v), sd, statistics.mean(r["seconds"] for r in rs)

    rows = {}
    print(f"\nsuite: {args.method} {args.args}".rstrip() + f" | seeds {args.seeds} | test error, mean ± std")
    print(f"{'set':<21}{'classes':>8}{'chance':>8}{'1-NN':>8}{'plain':>16}{args.method:>16}{'s/run':>8}  vs 1-NN")
    for name, task in sets:
        chance = 1 - 1 / task.num_outputs
        knn = knn_error(task)
        m, sd, sec = stats(scores[(f"{args.method}.py", name)])
        pm, psd, _ = stats(scores[("finetune.py" if args.method != "finetune" else f"{args.method}.py", name)])
        rows[name] = dict(classes=task.num_outputs, chance=round(chance, 4), knn=round(knn, 4), plain=round(pm, 4),
                          plain_std=round(psd, 4), method=round(m, 4), method_std=round(sd, 4), seconds=round(sec, 1),
                          learns=m <= chance / 2, beats_knn=m < knn)
        verdict = "beats" if m < knn else "ties" if m == knn else "loses"
        print(f"{name:<21}{task.num_outputs:>8}{chance:>8.3f}{knn:>8.3f}{pm:>9.3f} ± {psd:.3f}{m:>9.3f} ± {sd:.3f}"
              f"{sec:>8.0f}  {verdict}")
    summary = dict(section="suite", method=args.method, args=args.args, seeds=args.seeds, skipped=skipped,
                   sets=rows, beats_knn=sum(r["beats_knn"] for r in rows.values()),
                   learns=sum(r["learns"] for r in rows.values()), threads=args.threads, jobs=args.jobs)
    print("BENCH " + json.dumps(summary))


# ---- ddp ----------------------------------------------------------------------------------------------------------

def bench_ddp(args):
    """Training throughput of finetune.py under torchrun with 2 processes against 1 (gloo on the CPU, nccl on GPUs),
    the same global batch: synthetic task, --body with random weights (the architecture is what costs), each process
    given threads / processes CPU threads. Each setting runs for 1 and 1 + E epochs; steps/s is the difference of steps
    over the difference of wall times, so start-up (imports, process group, model) cancels."""
    import os
    import platform
    import subprocess
    import sys
    import tempfile
    cpus, gpus = os.cpu_count(), torch.cuda.device_count() if args.device == "cuda" else 0
    threads = args.threads_flag or cpus  # in all, shared by the processes
    extra_epochs = 2 * args.repeats

    def timed_run(nproc, epochs, out):
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // nproc)), HF_HUB_OFFLINE="1")
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "finetune.py", "--task", "synthetic", "--body", args.body, "--no-pretrained", "--epochs", str(epochs),
                "--batch_size", "16", "--target_seq_len", "64", "--device", args.device, "--out_dir", out,
                "--log_interval", "1000"]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"bench ddp: run failed ({nproc} processes)\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
        steps = max(json.loads(line).get("step", 0) for line in open(os.path.join(out, "log.jsonl")))
        return time.perf_counter() - t0, steps

    rate = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            (t1, s1), (t2, s2) = (timed_run(nproc, e, os.path.join(tmp, f"p{nproc}e{e}"))
                                  for e in (1, 1 + extra_epochs))
            rate[nproc] = (s2 - s1) / (t2 - t1)
    machine = f"{platform.machine()} {platform.processor() or platform.node()}, {cpus} CPU cores, {gpus} GPUs"
    print(f"machine: {machine}; torch {torch.__version__}; device {args.device}; body {args.body} (random weights), "
          f"synthetic, 64 tokens, global batch 16; {threads} CPU threads in all")
    print(f"{'processes':<10}{'steps/s':>10}{'x 1':>8}")
    for nproc, r in rate.items():
        print(f"{nproc:<10}{r:>10.2f}{r / rate[1]:>8.2f}")
    summary = dict(section="ddp", machine=machine, device=args.device, threads=threads, body=args.body,
                   steps_per_s_1=rate[1], steps_per_s_2=rate[2], speedup_2=rate[2] / rate[1])
    print("BENCH " + json.dumps(summary))


# ---- main ---------------------------------------------------------------------------------------------------------

BENCHES = {"otdd": bench_otdd, "pare": bench_pare, "mona": bench_mona, "suite": bench_suite, "ddp": bench_ddp}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=sorted(BENCHES), help="which benchmark to run")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of the slowest variant")
    parser.add_argument("--body", default="minilm", help="pare, mona, ddp: the body the steps run (tiny, minilm, ...)")
    g = parser.add_argument_group("suite")
    g.add_argument("--method", default="finetune", help="finetune | orca | pare | mona | proposed")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--sets", nargs="*", default=None, help="a subset of data.SUITE (default: all)")
    g.add_argument("--args", default="", help="extra flags of the method runs, one string")
    g.add_argument("--plain_args", default="", help="extra flags of the plain fine-tuning runs")
    g.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets threads / jobs CPU threads)")
    g.add_argument("--root", default="runs/suite", help="where the runs go (finished runs are reused)")
    g.add_argument("--data_dir", default="./datasets")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.threads_flag = args.threads
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    BENCHES[args.section](args)
