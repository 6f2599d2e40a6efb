"""Plain GPTQ calibration of a causal LM, epmq against GPTQModel: CPU time and identical codes.

    python benchmarks/gptq_vs_gptqmodel.py                  # epmq alone (no GPTQModel in this Python)
    EPMQ_GPTQ_PYTHON=/path/to/gptq-venv/bin/python \\
        python benchmarks/gptq_vs_gptqmodel.py --act-order off on --repeats 2
                                                            # side by side: about 20 minutes on 2 cores
    python benchmarks/gptq_vs_gptqmodel.py --small          # a 2-block miniature: about 1 minute

The model (built once, cached under $EPMQ_CACHE/gptq_vs_gptqmodel, or ~/.cache/epmq/...): a
LlamaForCausalLM of hidden 512, MLP 1536, 8 heads, 6 blocks and a vocabulary of 8192 (28.8 M
parameters), with a byte-level BPE tokenizer trained on the Python standard library's sources and
the model trained briefly on them (--train-steps Adam steps on 16 windows of 128 tokens: about 3
minutes on 2 idle cores, 26 minutes on a machine shared with other jobs; the loss falls from 9.1 to
about 7): real text, so that layer inputs have the correlations and outliers GPTQ deals
with. The calibration windows (--windows of --seq-len tokens) are cut from held-out source files
as epmq.families.causal_lm.data cuts the causal_lm suite's (texts in a seeded order, EOS between
them, consecutive windows), and saved beside the model so that both sides read the same tokens.

What runs, each in a fresh process with torch.set_num_threads(1):

    epmq      BlockwiseCalibration with the GPTQ solver, through a Lightning Trainer, as the main job
              runs it (epmq.jobs.steps.calibrate): true-sequential, one H per shared input
    gptqmodel GPTQModel.load(..., QuantizeConfig(...)).quantize(windows) in the Python named by
              $EPMQ_GPTQ_PYTHON, with the settings that match epmq's: the same bits, group size,
              symmetric grids, damping and act-order, true-sequential, act_group_aware=False,
              offload_to_disk=False, float32 weights, calibration_sort=None, the same batches
              (GPTQMODEL_CPU_WORKERS=2 is set for it: it refuses to start on 2 cores without)

Each process first calibrates the same model on two windows, untimed (lazy imports, library start-up and
GPTQModel's one-off build of its packing extension stay out), then times the real calibration with
time.process_time(): the CPU time of every thread of the process, so that GPTQModel's worker threads
count. GPTQModel's figure includes its packing of the codes into int32 words; epmq's includes its own
(QuantizedLayer). Repeats are interleaved (epmq, gptqmodel, epmq, ...) so both see the same machine load;
the printout gives the median per side and their ratio, and the share of identical integer codes layer by
layer (GPTQModel's saved qweight unpacked with epmq.io.packing) and whether the g_idx agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

FORMAT = 1  # bump when the model build changes: the cache folder's name carries it

SIZES = {  # hidden, MLP, heads, blocks, vocabulary, train steps, windows, window length
    "full": dict(hidden=512, intermediate=1536, heads=8, layers=6, vocab=8192, train_steps=60, windows=64, seq_len=512),
    "small": dict(hidden=256, intermediate=768, heads=4, layers=2, vocab=2048, train_steps=10, windows=16, seq_len=256),
}


# -- the model and the windows, cached ---------------------------------------------------------------
def cache_root() -> Path:
    root = os.environ.get("EPMQ_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "epmq") / "gptq_vs_gptqmodel"


def source_files(seed: int) -> tuple[list[Path], list[Path]]:
    """The standard library's .py files (tests left out) in a seeded order: (training files, held-out files)."""
    import torch

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in stdlib.rglob("*.py")
                   if not {"test", "tests", "site-packages", "idlelib"} & set(f.relative_to(stdlib).parts))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    files = [files[i] for i in order]
    cut = int(0.8 * len(files))
    return files[:cut], files[cut:]


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def build_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer of `vocab` entries trained on `texts` (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def build(args, folder: Path) -> None:
    """Train the tokenizer and the model, cut the calibration windows; write them into `folder`."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from epmq.families.causal_lm.data import token_windows

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.build_threads)
    train_files, held_out = source_files(args.seed)
    train_texts = read_texts(train_files)
    tokenizer = build_tokenizer(train_texts, args.vocab)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.seq_len, 128),
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    batch, length = 16, 128
    order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(args.seed + 1))
    train = token_windows(train_texts, tokenizer, length, args.train_steps * batch, order)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = max(1, args.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    t0 = time.perf_counter()
    for step in range(args.train_steps):
        ids = train[step * batch:(step + 1) * batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.train_steps - 1:
            print(f"  train step {step + 1}/{args.train_steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(args.seed + 2))
    windows = token_windows(read_texts(held_out), tokenizer, args.seq_len, args.windows, order)
    if len(windows) < args.windows:
        raise ValueError(f"--windows {args.windows}: the held-out sources give only {len(windows)} windows of "
                         f"{args.seq_len} tokens")
    save_file({"input_ids": windows.contiguous()}, str(folder / "windows.safetensors"))
    (folder / "build.json").write_text(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                                                   "final_loss": loss.item(), "build_s": time.perf_counter() - t0}))


def model_folder(args) -> Path:
    """The cached build for these settings (built now when missing)."""
    keys = ("hidden", "intermediate", "heads", "layers", "vocab", "train_steps", "windows", "seq_len", "seed")
    settings = {"format": FORMAT, "python": sys.version.split()[0], **{k: getattr(args, k) for k in keys}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"llama{args.hidden}x{args.layers}-{digest}"
    if (folder / "build.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    print(f"building the model into {folder} (cached for later runs)", flush=True)
    build(args, tmp)
    tmp.rename(folder)
    return folder


# -- epmq's side (runs in its own process) -------------------------------------------------------------
def windows_loader(folder: Path, count: int, batch_size: int):
    """The first `count` calibration windows as the causal_lm suite's batches: input_ids, attention_mask, task."""
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    ids = load_file(str(folder / "windows.safetensors"))["input_ids"][:count]
    rows = [{"input_ids": r, "attention_mask": r.new_ones(r.shape), "task": r.new_zeros(())} for r in ids]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def epmq_calibrate(args, folder: Path, windows: int):
    """(module, CPU seconds, wall seconds) of one GPTQ calibration, wired as epmq.jobs.steps.calibrate wires it."""
    import lightning as L
    import torch
    from transformers import AutoModelForCausalLM

    from epmq.core.solvers import GPTQ
    from epmq.engine.calibration import BlockwiseCalibration
    from epmq.families.base import adapter_for

    model = AutoModelForCausalLM.from_pretrained(str(folder / "model"), dtype=torch.float32).eval()
    solver = GPTQ(bits=args.bits, group_size=args.group_size, sym=True, act_order=args.worker_act_order,
                  percdamp=args.damp)
    module = BlockwiseCalibration(model, adapter_for(model), solver, ["text"], true_sequential=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=len(module.schedule), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = windows_loader(folder, windows, args.batch_size)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return module, time.process_time() - cpu, time.perf_counter() - wall


def epmq_worker(args) -> dict:
    import logging
    import warnings

    import torch
    from safetensors.torch import save_file

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    folder = Path(args.worker_model)
    epmq_calibrate(args, folder, 2)  # warm-up, untimed
    module, cpu, wall = epmq_calibrate(args, folder, args.windows)
    codes = {}
    for name, layer in module.quant_results.items():
        codes[name + ".codes"] = layer.codes().contiguous()
        codes[name + ".g_idx"] = layer.g_idx.to(torch.int64).contiguous()
    save_file(codes, args.worker_out)
    return {"cpu_s": cpu, "wall_s": wall}


# -- GPTQModel's side: a script for the other interpreter ----------------------------------------------
GPTQMODEL_SCRIPT = r'''
import json, sys, time
import torch
from safetensors.torch import load_file
from gptqmodel import GPTQModel, QuantizeConfig

model_dir, windows_file, out_dir, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.set_num_threads(1)
ids = load_file(windows_file)["input_ids"]


def calibrate(count):
    config = QuantizeConfig(bits=options["bits"], group_size=options["group_size"], sym=True,
                            desc_act=options["act_order"], damp_percent=options["damp"], true_sequential=True,
                            act_group_aware=False, offload_to_disk=False)
    model = GPTQModel.load(model_dir, config, dtype=torch.float32, device="cpu")
    data = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids[:count]]
    cpu, wall = time.process_time(), time.perf_counter()
    model.quantize(data, batch_size=options["batch_size"], calibration_sort=None)
    return model, time.process_time() - cpu, time.perf_counter() - wall


calibrate(2)  # warm-up, untimed (the first run also builds GPTQModel's packing extension)
model, cpu, wall = calibrate(ids.shape[0] if options["windows"] is None else options["windows"])
model.save(out_dir)
print(json.dumps({"cpu_s": cpu, "wall_s": wall}))
'''


def gptqmodel_python() -> str | None:
    """$EPMQ_GPTQ_PYTHON when it imports gptqmodel, else None."""
    exe = os.environ.get("EPMQ_GPTQ_PYTHON")
    if not exe:
        return None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('gptqmodel') is None)"
    return exe if subprocess.run([exe, "-c", probe], capture_output=True, timeout=300).returncode == 0 else None


def last_json(proc: subprocess.CompletedProcess, what: str) -> dict:
    if proc.returncode != 0:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_epmq(args, folder: Path, act_order: bool, out: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker-model", str(folder),
            "--worker-out", str(out), "--worker-act-order", "on" if act_order else "off"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return last_json(subprocess.run(argv, capture_output=True, text=True, env=env), "epmq's calibration")


def run_gptqmodel(args, exe: str, folder: Path, act_order: bool, out: Path, script: Path) -> dict:
    options = {"bits": args.bits, "group_size": args.group_size, "damp": args.damp, "act_order": act_order,
               "batch_size": args.batch_size, "windows": args.windows}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", GPTQMODEL_CPU_WORKERS="2")
    proc = subprocess.run([exe, str(script), str(folder / "model"), str(folder / "windows.safetensors"), str(out),
                           json.dumps(options)], capture_output=True, text=True, env=env, cwd=out.parent)
    return last_json(proc, "GPTQModel's calibration")


def compare_codes(ours: Path, theirs: Path, bits: int) -> tuple[float, tuple[int, int], int]:
    """(share of identical codes over every quantized layer, (g_idx entries that differ, entries), layers)."""
    import torch
    from safetensors.torch import load_file

    from epmq.io.load import read_quantize_config, read_tensors
    from epmq.io.packing import unpack_layer

    mine = load_file(str(ours))
    packed = read_tensors(theirs)
    fmt = read_quantize_config(theirs)["checkpoint_format"]
    same = total = layers = g_same = g_total = 0
    for key in sorted(k for k in mine if k.endswith(".codes")):
        name = key[:-len(".codes")]
        codes = mine[key]
        out_features, in_features = codes.shape
        tensors = {k: packed[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        their_codes, _, _, g_idx = unpack_layer(tensors, bits, in_features, out_features, fmt)
        same += int((their_codes.to(torch.int64) == codes.to(torch.int64)).sum())
        total += codes.numel()
        g_same += int((g_idx == mine[name + ".g_idx"]).sum())
        g_total += g_idx.numel()
        layers += 1
    if not layers:
        sys.exit("no quantized layers to compare")
    return same / total, (g_total - g_same, g_total), layers


# -- the driver ----------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a 2-block, 256-wide miniature with 16 windows of 256 tokens "
                   "(a quick check; the full model is hidden 512, 6 blocks, 64 windows of 512 tokens)")
    p.add_argument("--act-order", nargs="+", choices=("off", "on"), default=["off", "on"],
                   help="act-order settings to measure (default: off on)")
    p.add_argument("--repeats", type=int, default=3, help="calibrations per side and setting, interleaved (median)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a share of mean diag H (default 0.01)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per calibration batch, both sides (default 8)")
    p.add_argument("--windows", type=int, default=None, help="calibration windows (default 64; --small 16)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps of the model (default 60; --small 10)")
    p.add_argument("--build-threads", type=int, default=2, help="torch threads while building the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gptqmodel", action="store_true", help="run epmq alone even when GPTQModel is there")
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-act-order", choices=("off", "on"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    for key, value in size.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.worker_act_order = args.worker_act_order == "on"
    for name in ("repeats", "windows", "train_steps", "batch_size", "build_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.windows < 2:
        p.error(f"--windows must be at least 2 (the warm-up calibrates on two), got {args.windows}")
    if not 0 < args.damp < 1:
        p.error(f"--damp must be in (0, 1), got {args.damp}")
    return args


def main():
    args = parse()
    if args.worker_model:
        print(json.dumps(epmq_worker(args)))
        return
    t0 = time.perf_counter()
    folder = model_folder(args)
    info = json.loads((folder / "build.json").read_text())
    print(f"model: {folder} ({info['params'] / 1e6:.1f} M parameters, final training loss {info['final_loss']:.2f}; "
          f"ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    exe = None if args.no_gptqmodel else gptqmodel_python()
    if exe is None:
        print("GPTQModel: not measured (" + ("--no-gptqmodel" if args.no_gptqmodel else
              "set EPMQ_GPTQ_PYTHON to a Python that imports gptqmodel") + "); epmq alone", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="epmq_gptq_vs_gptqmodel_") as tmp:
        tmp = Path(tmp)
        script = tmp / "gptqmodel_client.py"
        script.write_text(GPTQMODEL_SCRIPT)
        for setting in args.act_order:
            act_order = setting == "on"
            times = {"epmq": [], "gptqmodel": []}
            for r in range(args.repeats):
                ours = tmp / f"epmq_{setting}_{r}.safetensors"
                times["epmq"].append(run_epmq(args, folder, act_order, ours))
                print(f"  act-order {setting} [{r + 1}/{args.repeats}] epmq      "
                      f"{times['epmq'][-1]['cpu_s']:7.1f} s CPU", flush=True)
                if exe:
                    theirs = tmp / f"gptqmodel_{setting}_{r}"
                    times["gptqmodel"].append(run_gptqmodel(args, exe, folder, act_order, theirs, script))
                    print(f"  act-order {setting} [{r + 1}/{args.repeats}] gptqmodel "
                          f"{times['gptqmodel'][-1]['cpu_s']:7.1f} s CPU", flush=True)
            row = {"act_order": setting, "epmq": statistics.median(t["cpu_s"] for t in times["epmq"])}
            if exe:
                row["gptqmodel"] = statistics.median(t["cpu_s"] for t in times["gptqmodel"])
                row["share"], row["g_idx"], row["layers"] = compare_codes(ours, theirs, args.bits)
            rows.append(row)
    print(f"\nLlama hidden {args.hidden}, MLP {args.intermediate}, {args.layers} blocks; {args.windows} windows of "
          f"{args.seq_len} tokens, batch {args.batch_size}; {args.bits} bits, group {args.group_size}, symmetric, "
          f"damp {args.damp:g}, true-sequential, float32; 1 thread; CPU seconds of the calibration, median of "
          f"{args.repeats}")
    for row in rows:
        line = f"act-order {row['act_order']:<3}  epmq {row['epmq']:7.1f} s"
        if "gptqmodel" in row:
            line += (f"   GPTQModel {row['gptqmodel']:7.1f} s   epmq/GPTQModel x{row['epmq'] / row['gptqmodel']:.2f}"
                     f"   identical codes {100 * row['share']:.1f} % ({row['layers']} layers), g_idx differs in "
                     f"{row['g_idx'][0]} of {row['g_idx'][1]} columns")
        print(line)


if __name__ == "__main__":
    main()
