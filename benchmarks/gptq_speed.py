"""Time epmq.core.gptq on CPU for typical layer shapes, optionally side by side with the reference.

    python benchmarks/gptq_speed.py                         # our solve times
    python benchmarks/gptq_speed.py --reference /tmp/gptq   # also IST-DASLab/gptq's gptq.py, and the ratio

The reference is imported only from the folder given (a scratch checkout of IST-DASLab/gptq
whose fasterquant has its torch.cuda.synchronize() call removed so that it runs on CPU); this
repository contains none of its code. Settings: 4 bits, group 128, act-order, float32,
H = 2/n X^T X from inputs with correlated columns. Times are the best of --repeats wall-clock
runs, ours and the reference's interleaved; on a CPU shared with other jobs, --threads 1 gives
steadier ratios (multi-threaded small ops stall when the cores are oversubscribed).
"""

import argparse
import sys
import time

import torch

from epmq.core.gptq import gptq
from epmq.core.quant import QuantSpec

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]  # (out, in)


def problem(out, inp, seed=0):
    """W (out, in) and a correlated H (in, in) = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * inp
    A = torch.randn(inp, inp, generator=g) / inp**0.5 + 0.3 * torch.randn(1, inp, generator=g)
    X = (torch.randn(n, inp, generator=g) @ A) * (torch.rand(inp, generator=g) + 0.5)
    H = 2 / n * X.t() @ X
    W = torch.randn(out, inp, generator=g) * 0.05
    return W, H


def time_best(fns, repeats):
    """Best wall time of each function over `repeats` rounds, the functions interleaved so that
    both see the same machine load."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def reference_solver(path):
    sys.path.insert(0, path)
    import torch.nn as nn
    from gptq import GPTQ  # the reference's gptq.py
    from quant import Quantizer

    def solve(W, H, spec):
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        q = GPTQ(layer)
        q.H = H.clone()
        q.quantizer = Quantizer()
        q.quantizer.configure(spec.bits, perchannel=True, sym=spec.sym, mse=False)
        q.fasterquant(blocksize=spec.blocksize, percdamp=spec.percdamp, groupsize=spec.group_size,
                      actorder=spec.act_order, static_groups=spec.static_groups)
        return layer.weight.data

    return solve


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="folder holding the reference gptq.py and quant.py (CPU-patched)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per shape")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="e.g. 768x768,4096x4096")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = QuantSpec(bits=4, group_size=128, act_order=True)
    ref = reference_solver(args.reference) if args.reference else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {spec}")
    W, H = problem(64, 256)  # warm-up: first calls initialise the linear algebra libraries
    for solve in [lambda: gptq(W, H, spec)] + ([lambda: ref(W, H, spec)] if ref else []):
        solve()
    for shape in args.shapes.split(","):
        out, inp = map(int, shape.split("x"))
        W, H = problem(out, inp)
        fns = [lambda: gptq(W, H, spec)] + ([lambda: ref(W, H, spec)] if ref else [])
        times = time_best(fns, args.repeats)
        line = f"{out:5d}x{inp:<5d} ours {times[0]:7.3f} s"
        if ref:
            line += f"   reference {times[1]:7.3f} s   speed-up x{times[1] / times[0]:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
