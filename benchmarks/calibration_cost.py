"""Seconds per block and peak memory of RTN, GPTQ and E-PMQ calibration on the same merged model.

    python benchmarks/calibration_cost.py --hidden 768 --layers 2 --image 224 --patch 32 --experts 2 4 8 --per-task 16 128
                                                                # ViT-B/32 blocks (issue 17): about 30 minutes
    python benchmarks/calibration_cost.py                       # defaults: about 2 minutes on 2 cores
    python benchmarks/calibration_cost.py --hidden 768 --layers 2 --image 224 --patch 32 --experts 2 4 8 16 --samples 64
                                                                # ViT-B/32 blocks, 2-16 experts: about 4 minutes
    python benchmarks/calibration_cost.py --family llama --hidden 1024 --layers 2 --experts 2 4 8 --samples 32
                                                                # a Llama-shaped decoder (true-sequential)
    python benchmarks/calibration_cost.py --experts 2 4 8 --samples 256 --repeats 3
    python benchmarks/calibration_cost.py --device cuda --hidden 768 --layers 12 --threads 0

What it builds, in a temporary folder: a random CLIPVisionModel base (--family clip; or a
LlamaForCausalLM with --family llama: --hidden, --layers, --vocab, --seq-len), T
experts = base + random task vectors, and for every T in --experts the task-arithmetic merge of the
first T experts, all saved with save_pretrained (safetensors), so that ExpertPool reads the experts
lazily, one block at a time, exactly as in a real run. Calibration data are random pixels (random
token ids for llama, calibrated true-sequentially as the causal_lm suite does by default).

Methods: rtn; gptq (one H per distinct layer input: q/k/v share); gptq-unshared (every layer its
own H, the engine before issue 17: same codes, for the time ratio); epmq at a fixed λ; epmq-keep,
E-PMQ recording the experts' targets for later anchor candidates and a second fit replaying them,
as the default automatic anchor choice does (its peak memory is the one that choice holds; its
time is that of the first fit). --methods picks some.

What it measures: every (T, method) pair runs `trainer.fit` of BlockwiseCalibration in a fresh
Python process (a process's peak RSS only ever grows, so one process per measurement), wired as
epmq.jobs.run.calibrate wires a run. The process loads the merged model, the pool (E-PMQ only) and the
calibration data, then records its resident memory (the baseline) and resets the kernel's peak
counter (/proc/self/clear_refs), so that the peak it reports afterwards is that of calibration alone.
On CUDA the memory figures are torch.cuda's allocated bytes instead (baseline: the model on the
device). Times are of trainer.fit only (setup, one epoch per block, the solves); before it, each
process calibrates a one-block miniature untimed, so lazy imports and library initialisation are
not counted. Workers run torch with one thread by default: on 2 cores shared with other jobs, two
threads per process stall each other and made GPTQ's time swing 2-8x between identical runs.

Allocator: with glibc's adaptive mmap threshold, freed tensors stay in the heap and the peak RSS of
identical runs varied by +-50 MiB, more than the 12 MiB per expert in question. The workers
therefore run with MALLOC_MMAP_THRESHOLD_=128 KiB (--mmap-threshold): every tensor of that size or
more is mapped and unmapped on its own, so RSS follows live tensors and repeats agree to 0.1 MiB.
The price is a page fault per large allocation: measured here, GPTQ ran about 30% and E-PMQ about
50% slower than with glibc's default (E-PMQ/GPTQ x1.6-1.8 became x1.9-2.1). Pass --mmap-threshold 0
to time the allocator of a normal run.

Samples: with --per-task n (one setting per value), every task gets n samples, so T tasks give
T x n. Without it, the total number of calibration samples (--samples) is the same for every T,
split evenly over the T tasks, so between T = 2, 4, 8 only the number of experts changes. E-PMQ keeps hidden
states for every sample (merged and expert paths), which grows with the number of samples but not
with T; with samples fixed, what grows with T is what E-PMQ holds per expert (its scratch blocks).

Goals (issue 17): E-PMQ at a fixed λ at most 1.4x GPTQ's time, GPTQ with shared H faster than
without, E-PMQ's peak memory (default anchor choice: epmq-keep) at most 1.5x GPTQ's at 8 experts.
The printout gives the ratios measured side by side in this run; on a machine shared with other
jobs, run --repeats 2 or more (best time, median memory) and read the ratios rather than the seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("rtn", "gptq-unshared", "gptq", "epmq", "epmq-keep")  # the module docstring says what each is
MiB = 2**20


# -- the model zoo of this benchmark ------------------------------------------------------------
def model_class(args):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    return LlamaForCausalLM if args.family == "llama" else CLIPVisionModel


def model_config(args):
    from transformers import CLIPVisionConfig, LlamaConfig

    if args.family == "llama":
        return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.heads, max_position_embeddings=max(args.seq_len, 64))
    return CLIPVisionConfig(image_size=args.image, patch_size=args.patch, num_channels=args.channels,
                            hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads)


def build_models(args, root: Path) -> dict:
    """Save base/, experts/task_<k>/ and merged_<T>/ under root; returns sizes in MiB."""
    import torch
    from transformers.utils import logging as hf_logging

    from epmq.core.merge import task_arithmetic

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per saved model otherwise
    torch.manual_seed(args.seed)
    base = model_class(args)(model_config(args)).eval()
    base.save_pretrained(root / "base")
    base_sd = base.state_dict()
    gen = torch.Generator().manual_seed(args.seed + 1)
    experts = {}
    for k in range(max(args.experts)):
        # task vector: noise scaled to 5% of each tensor's mean magnitude (fine-tunes move weights a little)
        experts[task_name(k)] = {n: v + 0.05 * v.abs().mean().clamp_min(1e-3) * torch.randn(v.shape, generator=gen)
                                 if v.is_floating_point() else v for n, v in base_sd.items()}
        save_state(base, experts[task_name(k)], root / "experts" / task_name(k))
    for T in args.experts:
        merged = task_arithmetic(base_sd, {task_name(k): experts[task_name(k)] for k in range(T)},
                                 scaling_factor=0.3)
        save_state(base, merged, root / f"merged_{T}")
    # a one-block miniature of the same layout, calibrated untimed first in every worker
    tiny = argparse.Namespace(**{**vars(args), "hidden": 32, "intermediate": 64, "heads": 2, "layers": 1})
    torch.manual_seed(args.seed)
    warm = model_class(args)(model_config(tiny)).eval()
    warm.save_pretrained(root / "warmup" / "base")
    for k in range(2):
        warm.save_pretrained(root / "warmup" / "experts" / task_name(k))
    return sizes_of(base)


def sizes_of(model) -> dict:
    """Float32 weight sizes in MiB of one block and of the whole model."""
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters()) / MiB  # noqa: E731
    blocks = model.model.layers if hasattr(model, "model") else model.encoder.layers
    return {"block_mb": size(blocks[0]), "model_mb": size(model)}


def save_state(template, state: dict, folder: Path) -> None:
    template.load_state_dict(state)
    template.save_pretrained(folder)


def task_name(k: int) -> str:
    return f"task_{k}"


# -- one measurement (runs in its own process) ---------------------------------------------------
def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def calibration_batches(args, T: int):
    """Random pixels, --samples in total split evenly over T tasks; single-task batches, task-major
    (as epmq.families.images.TaskDataModule orders them). Returns a DataLoader of {"pixel_values", "task"}."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    counts = [args.samples // T + (t < args.samples % T) for t in range(T)]
    if min(counts) == 0:
        raise ValueError(f"--samples {args.samples} leaves a task without samples at T={T}")
    gen = torch.Generator().manual_seed(args.seed + 2)
    if args.family == "llama":
        inputs = {"input_ids": torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=gen)}
    else:
        inputs = {"pixel_values": torch.randn(args.samples, args.channels, args.image, args.image, generator=gen)}
    tasks = torch.repeat_interleave(torch.arange(T), torch.tensor(counts))

    class Samples(Dataset):
        def __len__(self):
            return len(tasks)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in inputs.items()}, "task": tasks[i]}

    batches, start = [], 0
    for n in counts:
        batches += [list(range(start + k, start + min(k + args.batch_size, n))) for k in range(0, n, args.batch_size)]
        start += n
    return DataLoader(Samples(), batch_sampler=batches)


def expert_pool(experts_dir: Path, T: int):
    """The ExpertPool of the first T experts under experts_dir (base/ beside it)."""
    from epmq.io.pool import ExpertPool

    return ExpertPool(experts_dir.parent / "base", {task_name(k): experts_dir / task_name(k) for k in range(T)})


def setup_run(args, merged_dir: Path, experts_dir: Path, T: int, method: str, cache=None):
    """(trainer, module) wired as epmq.jobs.steps.calibrate wires a run: merged model, solver, pool.

    The pool reads base/ next to experts_dir and experts_dir/task_<k> for the first T tasks;
    cache: an ExpertTargets to use instead (epmq-keep).
    """
    import lightning as L

    from callbacks.expert_cache import ExpertActivationCache
    from epmq.core.solvers import EPMQ, GPTQ, RTN
    from epmq.engine.calibration import BlockwiseCalibration
    from epmq.engine.targets import ExpertTargets
    from epmq.families.base import adapter_for

    tasks = [task_name(k) for k in range(T)]
    model = model_class(args).from_pretrained(merged_dir).eval()
    cuda = args.device.startswith("cuda")
    if cuda:
        model.to(args.device)
    spec = dict(bits=args.bits, group_size=args.group_size)
    epmq = method.startswith("epmq")
    solver = EPMQ(args.strength, "output", **spec) if epmq else (RTN if method == "rtn" else GPTQ)(**spec)
    targets = None if not epmq else cache if cache is not None else ExpertTargets(expert_pool(experts_dir, T))
    module = BlockwiseCalibration(model, adapter_for(model), solver, tasks, targets=targets,
                                  share_statistics=method != "gptq-unshared", tf32=args.tf32)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=len(module.schedule),
                        logger=False, enable_checkpointing=False,
                        callbacks=[ExpertActivationCache(targets)] if targets is not None else [],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, precision=args.precision)
    return trainer, module


def measure(args) -> dict:
    """Calibrate merged_<T> with one method; returns seconds and memory (MiB) of trainer.fit.

    An untimed calibration of a one-block miniature runs first: the first calls of a fresh
    process import modules lazily and initialise the linear-algebra libraries (seconds of fixed
    cost that would blur the ratios); what is timed is the calibration itself.
    """
    import logging
    import warnings

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if args.threads:
        torch.set_num_threads(args.threads)
    root, T, method = Path(args.workdir), args.worker_experts, args.worker_method
    cuda = args.device.startswith("cuda")

    warm = argparse.Namespace(**{**vars(args), "samples": 4, "batch_size": 2})
    trainer, module = setup_run(args, root / "warmup" / "base", root / "warmup" / "experts", 2, method)
    trainer.fit(module, train_dataloaders=calibration_batches(warm, 2))
    del trainer, module

    cache = None
    if method == "epmq-keep":  # as epmq.jobs.steps.target_provider builds it for the anchor candidates
        from epmq.engine.targets import ExpertTargets

        cache = ExpertTargets(expert_pool(root / "experts", T), keep=True, keep_budget_gb=args.keep_gb,
                              keep_device="cpu")
    trainer, module = setup_run(args, root / f"merged_{T}", root / "experts", T, method, cache)
    loader = calibration_batches(args, T)
    gc.collect()
    baseline, _ = rss_mb()
    exact_peak = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated() / MiB
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if method == "epmq-keep":  # the next candidate: a fresh merged model, the kept targets replayed
        del trainer, module
        gc.collect()
        trainer, module = setup_run(args, root / f"merged_{T}", root / "experts", T, method, cache)
        trainer.fit(module, train_dataloaders=loader)
    _, peak = rss_mb()
    result = {"method": method, "experts": T, "per_task": args.worker_per_task, "seconds": seconds,
              "kept": bool(cache.recorded) if cache is not None else None, "rss_baseline_mb": baseline,
              "rss_peak_mb": peak, "rss_peak_exact": exact_peak}
    if cuda:
        result.update(gpu_baseline_mb=gpu_baseline, gpu_peak_mb=torch.cuda.max_memory_allocated() / MiB)
    return result


# -- the driver ----------------------------------------------------------------------------------
def run_worker(args, T: int, method: str, per_task: int | None) -> dict:
    """One measurement in a fresh interpreter; the worker prints its result as the last line."""
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--workdir", args.workdir,
            "--worker-experts", str(T), "--worker-method", method]
    if per_task:
        argv += ["--worker-per-task", str(per_task)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.mmap_threshold:  # glibc: every allocation of this size or more is its own mapping
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"measurement {method} T={T} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def increase(r: dict, gpu: bool) -> float:
    """Memory that calibration added on top of the loaded model and data, in MiB."""
    if gpu:
        return r["gpu_peak_mb"] - r["gpu_baseline_mb"]
    return r["rss_peak_mb"] - r["rss_baseline_mb"]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(args, sizes: dict, results: dict) -> None:
    """Print the table and the ratios. results: (samples per task or None, T, method) -> measurements."""
    gpu = args.device.startswith("cuda")
    best = {key: min(r["seconds"] for r in rs) for key, rs in results.items()}
    grow = {key: statistics.median(increase(r, gpu) for r in rs) for key, rs in results.items()}
    peak = {key: statistics.median(r["gpu_peak_mb" if gpu else "rss_peak_mb"] for r in rs)
            for key, rs in results.items()}
    base = {key: statistics.median(r["gpu_baseline_mb" if gpu else "rss_baseline_mb"] for r in rs)
            for key, rs in results.items()}
    tokens = args.seq_len if args.family == "llama" else (args.image // args.patch) ** 2 + 1
    memory = "GPU memory allocated (torch.cuda)" if gpu else "process RSS"
    print(f"\n{model_class(args).__name__}: hidden {args.hidden}, mlp {args.intermediate}, {args.layers} blocks, "
          f"{tokens} tokens per sample")
    print(f"one block's weights {sizes['block_mb']:.1f} MiB, whole model {sizes['model_mb']:.1f} MiB (float32)")
    amount = (f"{', '.join(map(str, args.per_task))} samples per task" if args.per_task else
              f"{args.samples} samples in total for every T (split evenly over the T tasks)")
    print(f"calibration: {amount}, batch {args.batch_size}; {args.bits}-bit, group {args.group_size}; "
          f"E-PMQ output anchor, strength {args.strength:g}; forwards "
          f"{args.precision}{' + TF32' if args.tf32 else ''}")
    allocator = (f"glibc mmap threshold {args.mmap_threshold} B" if args.mmap_threshold
                 else "glibc's adaptive allocator")
    print(f"device {args.device}, {args.threads or 'default'} thread(s); memory = {memory} ({allocator}); "
          f"{args.repeats} repeat(s): best time, median memory")
    if not gpu and not all(r["rss_peak_exact"] for rs in results.values() for r in rs):
        print("note: /proc/self/clear_refs refused: peaks include the loading before calibration")
    kept = {key: rs[0].get("kept") for key, rs in results.items() if key[2] == "epmq-keep"}
    print(f"epmq-keep: the first of two fits (the second replays the kept targets, budget {args.keep_gb:g} GiB); "
          f"its peak covers both; targets kept: "
          + (", ".join(f"{n or '-'}/task T={T} {'yes' if k else 'no'}" for (n, T, _), k in kept.items()) or "-")
          + "\n")
    print(f"{'per task':>8} {'method':<14}{'experts':>8}{'s/block':>10}{'base MiB':>10}{'peak MiB':>10}"
          f"{'+calib MiB':>12}")
    settings = sorted({(n, T) for n, T, _ in results}, key=lambda x: (x[0] or 0, x[1]))
    for n, T in settings:
        for m in args.methods:
            key = (n, T, m)
            print(f"{n or '-':>8} {m:<14}{T:>8}{best[key] / args.layers:>10.2f}{base[key]:>10.0f}{peak[key]:>10.0f}"
                  f"{grow[key]:>12.1f}")
    print()

    def ratios(num: str, den: str, table: dict, what: str) -> None:
        if num in args.methods and den in args.methods:
            print(f"{what:<38}" + ", ".join(f"{n or '-'}/task T={T} x{table[(n, T, num)] / table[(n, T, den)]:.2f}"
                                            for n, T in settings))

    ratios("gptq", "gptq-unshared", best, "GPTQ shared H / GPTQ unshared, time:")
    ratios("epmq", "gptq", best, "E-PMQ (fixed λ) / GPTQ, time:")
    ratios("epmq", "gptq", peak, "E-PMQ (fixed λ) / GPTQ, peak memory:")
    ratios("epmq-keep", "gptq", peak, "E-PMQ keeping targets / GPTQ, peak:")
    Ts = sorted({T for _, T in settings})
    if not args.per_task and len(Ts) >= 2 and "epmq" in args.methods:
        per_expert = slope([float(T) for T in Ts], [grow[(None, T, "epmq")] for T in Ts])
        print(f"E-PMQ peak growth per added expert (samples fixed): {per_expert:+.1f} MiB = "
              f"{per_expert / sizes['block_mb']:.2f} blocks ({sizes['block_mb']:.1f} MiB each)")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("clip", "llama"), default="clip",
                   help="clip: a CLIPVisionModel tower; llama: a LlamaForCausalLM decoder (default clip)")
    p.add_argument("--vocab", type=int, default=4096, help="llama: vocabulary size (default 4096)")
    p.add_argument("--seq-len", type=int, default=128, help="llama: tokens per sample (default 128)")
    p.add_argument("--hidden", type=int, default=512, help="hidden width (default 512)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    p.add_argument("--image", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--patch", type=int, default=4, help="patch side (default 4: 65 tokens at 32 pixels)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="numbers of experts T")
    p.add_argument("--samples", type=int, default=128, help="calibration samples in total, for every T "
                   "(ignored with --per-task)")
    p.add_argument("--per-task", type=int, nargs="+", default=[],
                   help="calibration samples per task, one setting each (e.g. 16 128): T x n samples in all")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to measure")
    p.add_argument("--keep-gb", type=float, default=None,
                   help="epmq-keep: budget of the kept targets in GiB (default: conf/targets/default.yaml's "
                        "keep_budget_gb)")
    p.add_argument("--precision", default="32-true",
                   help="the Trainer's precision: 32-true (default), bf16-mixed or 16-mixed (autocast forwards)")
    p.add_argument("--tf32", action="store_true", help="TF32 products in block forwards (CUDA)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--strength", type=float, default=1.0, help="E-PMQ anchor strength λ (finite)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per (T, method), interleaved")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1; 0: torch's choice)")
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="glibc MALLOC_MMAP_THRESHOLD_ of the workers in bytes (default 128 KiB; 0: glibc's "
                        "adaptive default, the allocator of a normal run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="build the models in this folder and keep them (default: a temporary folder)")
    # internal: one measurement
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--worker-experts", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-per-task", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.intermediate = args.intermediate or 4 * args.hidden
    args.heads = args.heads or max(1, args.hidden // 64)
    for name in ("hidden", "intermediate", "layers", "heads", "image", "patch", "channels", "samples",
                 "batch_size", "bits", "group_size", "repeats"):
        if getattr(args, name) < 1 and not (name == "group_size" and getattr(args, name) == -1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.image % args.patch:
        p.error(f"--image {args.image} is not divisible by --patch {args.patch}")
    if min(args.experts) < 1 or len(set(args.experts)) != len(args.experts):
        p.error(f"--experts must be distinct positive numbers, got {args.experts}")
    if args.keep_gb is None:  # the run's own default
        from omegaconf import OmegaConf

        args.keep_gb = float(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "targets" / "default.yaml")
                             .keep_budget_gb)
    if args.per_task and min(args.per_task) < 1:
        p.error("--per-task values must be positive")
    if args.worker_per_task:
        args.samples = args.worker_per_task * args.worker_experts
    if not args.per_task and max(args.experts) > args.samples:
        p.error(f"--samples {args.samples} is fewer than --experts {max(args.experts)}: a task would get none")
    if not args.strength >= 0 or args.strength == float("inf"):
        p.error("--strength must be finite and >= 0 (inf is plain GPTQ)")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    return args


def main():
    args = parse()
    if args.worker_method:
        print(json.dumps(measure(args)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device available")
    with tempfile.TemporaryDirectory(prefix="epmq_calibration_cost_") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        args.workdir = str(root)
        t0 = time.perf_counter()
        sizes = build_models(args, root)
        print(f"built base, {max(args.experts)} experts and {len(args.experts)} merged models in "
              f"{time.perf_counter() - t0:.0f} s under {root}", flush=True)
        results: dict[tuple, list[dict]] = {}
        for r in range(args.repeats):  # repeats interleaved so every method sees the same machine load
            for n in args.per_task or [None]:
                for T in sorted(args.experts):
                    for m in args.methods:
                        result = run_worker(args, T, m, n)
                        results.setdefault((n, T, m), []).append(result)
                        print(f"  [{r + 1}/{args.repeats}] {f'{n}/task ' if n else ''}T={T} {m:<13} "
                              f"{result['seconds']:7.2f} s", flush=True)
        report(args, sizes, results)


if __name__ == "__main__":
    main()
