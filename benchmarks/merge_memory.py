"""Peak memory of merging experts loaded whole vs through the pool's lazy views, side by side.

    python benchmarks/merge_memory.py                                  # about 200 MB on disk, ~1 min
    python benchmarks/merge_memory.py --experts 8 --layers 2 --merges ties
    python benchmarks/merge_memory.py --dtype float32 --hidden 768 --vocab 16000

What it builds, in a temporary folder (deleted afterwards): a random Llama-shaped base (embedding,
--layers decoder blocks of attention with grouped key/value projections and a gated MLP, RMSNorm
weights, an untied LM head) and --experts experts = base + small random task vectors, each one
.safetensors file in --dtype. Nothing is downloaded; transformers is not needed.

What it measures: for every merge in --merges, two ways of merging the same files, each in a fresh
Python process (a process's peak resident set only ever grows):

    loaded  merger(pool.base_state_dict(), {t: pool.expert_state_dict(t) for t in pool.tasks})
            -- what epmq.jobs.run.merge does today: every expert's full state dict at once;
    lazy    pool.merge(merger) -- base and experts through lazy views, one tensor at a time.

Each worker opens the ExpertPool (which validates the files), records its resident memory (the
baseline), resets the kernel's peak counter (/proc/self/clear_refs) and merges; the growth reported
is peak minus baseline, so it is the merge's own memory, the returned state dict included. The peak
is read from /proc/self/status (VmHWM), not from getrusage's ru_maxrss: on Linux a child's ru_maxrss
starts at the peak of the process that spawned it (the parent's memory image is accounted to the
child at exec), and clear_refs does not reset it; ru_maxrss is used only where /proc is missing.

Allocator: workers run with MALLOC_MMAP_THRESHOLD_=128 KiB (--mmap-threshold) so that every tensor
from 128 KiB up is mapped and unmapped on its own and resident memory follows live tensors rather
than glibc's retained heap; pass --mmap-threshold 0 for glibc's default.

safetensors (0.8 here) hands out tensors that map the file privately: a loaded state dict is file
pages until the merge touches it, and then counts in the resident set like any other memory.

The last column checks that both ways give the same tensors, bit for bit (a SHA-256 of every
tensor's bytes, in key order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20
MERGES = ("simple_average", "task_arithmetic", "ties")


# -- the experts of this benchmark ---------------------------------------------------------------
def llama_shapes(args) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Llama-style decoder: V x H embedding and head, H x H query/output,
    kv x H key/value (grouped-query attention), I x H gate/up and H x I down projections."""
    H, I, V, kv = args.hidden, args.intermediate, args.vocab, args.kv_dim
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I),
                       p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
    shapes.update({"model.norm.weight": (H,), "lm_head.weight": (V, H)})
    return shapes


def build_models(args, root: Path) -> dict:
    """Save base.safetensors and expert_<k>.safetensors under root, one model in memory at a time;
    returns P (entries per model), the largest tensor's entries and the MiB of one file."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, args.dtype)
    shapes = llama_shapes(args)
    gen = torch.Generator().manual_seed(args.seed)
    # base: N(0, 0.02) weights, as Llama initialises them; norms at 1
    base = {k: torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    save_file({k: v.to(dtype) for k, v in base.items()}, str(root / "base.safetensors"))
    for t in range(args.experts):
        # task vector: 10% of the weights' scale, different for every expert
        expert = {k: (v + 0.002 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
        save_file(expert, str(root / f"expert_{t}.safetensors"))
        del expert
    P = sum(v.numel() for v in base.values())
    return {"P": P, "largest": max(v.numel() for v in base.values()),
            "file_mb": (root / "base.safetensors").stat().st_size / MiB}


# -- one measurement (runs in its own process) ---------------------------------------------------
def memory_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB; peak from ru_maxrss without /proc."""
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return peak, peak


def reset_peak() -> bool:
    """Set the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_merger(name: str, args):
    from epmq.core.merge import SimpleAverage, TaskArithmetic, TiesMerging

    return {"simple_average": lambda: SimpleAverage(),
            "task_arithmetic": lambda: TaskArithmetic(scaling_factor=0.3),
            "ties": lambda: TiesMerging(scaling_factor=0.3, threshold=args.threshold)}[name]()


def measure(args) -> dict:
    """Merge the experts under args.root one way (args.mode); peak growth in MiB, seconds, digest."""
    import hashlib

    import torch

    from epmq.io.pool import ExpertPool

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    experts = {p.stem: p for p in sorted(root.glob("expert_*.safetensors"))}
    pool = ExpertPool(root / "base.safetensors", experts)
    merger = make_merger(args.merge, args)
    before, _ = memory_mb()
    reset = reset_peak()
    start = time.perf_counter()
    if args.mode == "loaded":
        merged = merger(pool.base_state_dict(), {t: pool.expert_state_dict(t) for t in pool.tasks})
    else:
        merged = pool.merge(merger)
    seconds = time.perf_counter() - start
    _, peak = memory_mb()
    digest = hashlib.sha256()
    for key, t in merged.items():  # after the peak was read: hashing allocates nothing large
        digest.update(key.encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().data)
    return {"growth_mb": peak - before, "seconds": seconds, "digest": digest.hexdigest(), "reset": reset}


def run_worker(args, root: Path, merge: str, mode: str) -> dict:
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    cmd = [sys.executable, __file__, "--worker", "--root", str(root), "--merge", merge, "--mode", mode,
           "--threshold", str(args.threshold), "--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {merge}/{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=3, help="T, the number of experts")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--kv-dim", type=int, default=128, help="rows of k_proj / v_proj")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--merges", nargs="+", default=list(MERGES), choices=MERGES)
    parser.add_argument("--threshold", type=float, default=20, help="TIES: percent of each task vector kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                        help="MALLOC_MMAP_THRESHOLD_ of the workers in bytes; 0 leaves glibc's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--merge", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("loaded", "lazy"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return

    with tempfile.TemporaryDirectory(prefix="merge_memory_") as tmp:
        root = Path(tmp)
        sizes = build_models(args, root)
        model_mb, T = sizes["file_mb"], args.experts
        print(f"Llama-shaped: hidden {args.hidden}, intermediate {args.intermediate}, layers {args.layers}, "
              f"vocab {args.vocab}, {args.dtype}; P = {sizes['P'] / 1e6:.1f}M entries, "
              f"{model_mb:.0f} MiB per model, largest tensor {sizes['largest'] / 1e6:.2f}M entries; "
              f"T = {T} experts, {(T + 1) * model_mb:.0f} MiB on disk")
        print(f"peak RSS growth of the merge (MiB; the returned state dict alone is {model_mb:.0f} MiB), "
              f"one fresh process each:")
        print(f"{'merge':<16} {'loaded':>8} {'lazy':>8} {'loaded/lazy':>12} {'loaded s':>9} {'lazy s':>7}  bit-identical")
        for merge in args.merges:
            loaded = run_worker(args, root, merge, "loaded")
            lazy = run_worker(args, root, merge, "lazy")
            ratio = loaded["growth_mb"] / max(lazy["growth_mb"], 1e-9)
            same = "yes" if loaded["digest"] == lazy["digest"] else "NO"
            print(f"{merge:<16} {loaded['growth_mb']:8.1f} {lazy['growth_mb']:8.1f} {ratio:11.2f}x "
                  f"{loaded['seconds']:9.2f} {lazy['seconds']:7.2f}  {same}")
            if not (loaded["reset"] and lazy["reset"]):
                print("  (peak counter could not be reset: growth includes opening the pool)")


if __name__ == "__main__":
    main()
