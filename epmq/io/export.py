"""Saving a quantized model in the GPTQ checkpoint layout, which GPTQModel, transformers + optimum and
vLLM read (README "Deploying" says which of them loads what).

The folder (written under a temporary name beside `out_dir`, then renamed, so it is never half-written):

    config.json              the model's config, with "quantization_config" (the same as quantize_config.json)
    quantize_config.json     bits, group_size, desc_act, sym, quant_method "gptq", format and
                             checkpoint_format, pack_dtype "int32", true_sequential, damp_percent,
                             static_groups, lm_head (whether the head is quantized), "dynamic" (the per-module
                             overrides as GPTQModel reads them, epmq.core.overrides) when there are any, and
                             "meta" (epmq and its version, the method, the anchor)
    generation_config.json   when the model has one
    tokenizer files          what the suite saves beside the weights (its tokenizer, with any chat template), so
                             that a GPTQ client loads the folder as it is
    model.safetensors        or model-00001-of-0000N.safetensors ... + model.safetensors.index.json

Every quantized linear L is stored as L.qweight, L.qzeros, L.scales, L.g_idx (epmq.io.packing), at its own
bits and group size (an override's, else the spec's), and L.bias when it has one; every other tensor of the
model's state dict as it is, in its float dtype (layers an override skips among them).
Tied tensors (one storage under several names) are stored once, under their first name.
epmq.io.load.load_quantized rebuilds the model from the folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from epmq import __version__
from epmq.core.overrides import ModuleOverrides
from epmq.io.packing import BITS, check_format, pack_grids
from epmq.io.quantized_layer import QuantizedLayer

log = logging.getLogger(__name__)

QUANT_FIELDS = ("qweight", "qzeros", "scales", "g_idx")
CONFIG_NAME = "quantize_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "4GB"


def save_quantized(model: nn.Module, results: Mapping[str, QuantizedLayer], out_dir: str | Path, spec,
                   *, method: str = "gptq", strength: float | None = None, form: str | None = None,
                   true_sequential: bool | None = None, checkpoint_format: str = "gptq",
                   max_shard_size: int | str = DEFAULT_SHARD_SIZE, companions=None,
                   overrides: Mapping | None = None, lm_head: bool = False) -> Path:
    """Write the quantized `model` (a transformers PreTrainedModel) to `out_dir` in the GPTQ layout.

    results: full layer name -> QuantizedLayer of every quantized nn.Linear (BlockwiseCalibration.quant_results);
        their packed codes are written as they are (the same words as GPTQ's qweight).
    spec: the QuantSpec (or a mapping with its fields: bits, group_size, sym, act_order, static_groups,
        percdamp) every layer was quantized with.
    method, strength, form: the solver ("rtn", "gptq", "epmq") and, for E-PMQ, the anchor; recorded in "meta".
    true_sequential: how calibration walked the blocks (recorded; None: unknown).
    checkpoint_format: "gptq" (zero points stored minus one, the historical layout) or "gptq_v2".
    max_shard_size: bytes per safetensors file (an int, or "500MB", "4GB", "2GiB", ...).
    companions: companions(folder) writes what a client loads beside the weights (the tokenizer's files, a chat
        template: Suite.save_companions), into the folder before it is put in place.
    overrides: the per-module rules the layers were quantized with (pattern -> {bits, group_size} or {skip: true},
        epmq.core.overrides; the solver's describe()["overrides"]): each layer is checked against its rule, and the
        rules are recorded as quantize_config's "dynamic".
    lm_head: whether the model's head is among the quantized layers (recorded as "lm_head"; a tied head must
        have been untied, as the calibration does).
    Replaces an existing `out_dir` only once the new folder is complete. Returns `out_dir`.
    """
    check_format(checkpoint_format)
    spec = _spec_dict(spec)
    limit = _parse_size(max_shard_size)
    if checkpoint_format == "gptq" and not spec["sym"]:
        log.warning("asymmetric grids in checkpoint_format 'gptq' (v1), as asked: epmq.load_quantized reads them, "
                    "but GPTQModel refuses asymmetric v1 checkpoints it did not write, and a zero point of 0 borrows "
                    "from the next field; checkpoint_format 'gptq_v2' (the default for asymmetric grids) avoids both")
    rules = ModuleOverrides(overrides, "overrides")
    tensors, desc_act = state_tensors(model, results, spec, checkpoint_format, rules)
    quant_config = quantization_config(spec, desc_act=desc_act, checkpoint_format=checkpoint_format,
                                       method=method, strength=strength, form=form,
                                       true_sequential=true_sequential, dynamic=rules.dynamic() or None,
                                       lm_head=lm_head)
    config = json.loads(model.config.to_json_string(use_diff=True))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quant_config

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
        write_shards(tensors, tmp, limit)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(quant_config, indent=2) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None and _can_generate(model):
            generation.save_pretrained(str(tmp))
        if companions is not None:
            companions(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_in(new: Path, out_dir: Path) -> None:
    """Rename the finished folder `new` to `out_dir`. An existing `out_dir` is first renamed aside
    (a directory cannot be replaced by one rename), and removed only once `new` is in place, so
    a crash leaves either folder whole under some name."""
    if not out_dir.exists():
        new.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
    out_dir.rename(old / out_dir.name)
    try:
        new.rename(out_dir)
    except BaseException:
        (old / out_dir.name).rename(out_dir)
        old.rmdir()
        raise
    shutil.rmtree(old)


def chosen_format(checkpoint_format: str, sym: bool) -> str:
    """The checkpoint format to write: as given, or for "auto" the one every GPTQ client reads for these grids:
    "gptq" for symmetric grids, "gptq_v2" for asymmetric ones (v1 stores zero points minus one, so a zero
    point of 0 borrows from the next field, and GPTQModel refuses asymmetric v1 checkpoints it did not write)."""
    if checkpoint_format == "auto":
        return "gptq" if sym else "gptq_v2"
    return check_format(checkpoint_format)


def check_exportable(bits: int, checkpoint_format: str, option: str = "quant.bits") -> None:
    """ValueError, naming the option (`option`, where the bits come from), when save_quantized cannot write these
    settings (the main job calls it before calibrating)."""
    check_format(checkpoint_format)
    if bits not in BITS:
        raise ValueError(f"{option}={bits}: the GPTQ checkpoint layout stores {', '.join(map(str, BITS))} bits "
                         f"per weight; choose one of them, or save_model=false")


def state_tensors(model: nn.Module, results: Mapping[str, QuantizedLayer], spec: dict,
                  checkpoint_format: str = "gptq",
                  overrides: ModuleOverrides | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors to save, in state-dict order, and desc_act (some layer's g_idx is not i // group_size).

    A quantized layer's weight is replaced by its packed tensors; tied tensors appear once. overrides: the
    per-module rules; each layer must have its rule's bits and group size (and none may be one it skips).
    """
    if not results:
        raise ValueError("no quantized layer to save (results is empty)")
    overrides = overrides or ModuleOverrides()
    modules = dict(model.named_modules())
    layer_spec = {}  # name -> (bits, group_size) it must have
    for name, r in results.items():
        rule = overrides.rule_for(name)
        if rule is not None and rule.skip:
            raise ValueError(f"quantized layer '{name}' is one that overrides[{rule.pattern!r}] leaves in float")
        fields = {**{k: spec[k] for k in ("bits", "group_size")}, **(rule.fields() if rule else {})}
        bits, group_size = layer_spec[name] = fields["bits"], fields["group_size"]
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized layer '{name}' is not an nn.Linear of {type(model).__name__} "
                             f"(found {type(linear).__name__})")
        out_features, in_features = linear.weight.shape
        if tuple(r.shape) != (out_features, in_features):
            raise ValueError(f"'{name}': codes of shape {tuple(r.shape)} for a "
                             f"({out_features} x {in_features}) layer")
        if r.bits != bits:
            raise ValueError(f"'{name}' was quantized to {r.bits} bits, but the spec says {bits}"
                             + (f" (overrides[{rule.pattern!r}])" if rule else ""))
        check_exportable(bits, checkpoint_format, f"the bits of '{name}'")
        expected = n_groups(in_features, group_size)
        if r.n_groups != expected:
            raise ValueError(f"'{name}': {r.n_groups} groups, but group_size {group_size} over "
                             f"{in_features} inputs makes {expected}")

    desc_act = False
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, r in results.items():
        bits, group_size = layer_spec[name]
        # the record's words are GPTQ's qweight already (epmq.io.packing.pack_bits = pack_rows for these bits)
        layer = {"qweight": r.qweight, **pack_grids(r.scales, r.zeros, r.g_idx, bits, checkpoint_format)}
        if not torch.equal(layer["g_idx"], trivial_g_idx(r.shape[1], group_size)):
            desc_act = True
        packed[name] = layer
    _warn_borrowed_zeros(results, checkpoint_format)

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        module, _, field = key.rpartition(".")
        if module in packed and field == "weight":
            tensors.update({f"{module}.{f}": packed[module][f] for f in QUANT_FIELDS})
            continue
        ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and ident in seen:  # a tied tensor: stored once, under its first name
            continue
        seen[ident] = key
        tensors[key] = value.detach().to("cpu").contiguous()
    _unshare(tensors)
    return tensors, desc_act


def quantization_config(spec: dict, *, desc_act: bool, checkpoint_format: str = "gptq", method: str = "gptq",
                        strength: float | None = None, form: str | None = None,
                        true_sequential: bool | None = None, dynamic: dict | None = None,
                        lm_head: bool = False) -> dict:
    """quantize_config.json (also config.json's "quantization_config") for GPTQ loaders; dynamic: GPTQModel's
    per-module overrides (ModuleOverrides.dynamic()), written when given."""
    meta = {"quantizer": [f"epmq:{__version__}"], "method": method,
            "anchor_strength": _json_number(strength), "anchor_form": form,
            "act_order": bool(spec.get("act_order", False)), "blocksize": spec.get("blocksize")}
    config = {"bits": spec["bits"], "group_size": spec["group_size"], "desc_act": bool(desc_act),
              "sym": bool(spec["sym"]), "lm_head": bool(lm_head), "quant_method": "gptq",
              "format": checkpoint_format, "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
              "true_sequential": true_sequential, "damp_percent": spec.get("percdamp", 0.01),
              "static_groups": bool(spec.get("static_groups", False)), "meta": meta}
    if true_sequential is None:  # unknown: left to the loader's default rather than written as null
        del config["true_sequential"]
    if dynamic:
        config["dynamic"] = dynamic
    return config


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> list[str]:
    """Save `tensors` as model.safetensors, or as numbered shards with an index when they exceed
    max_shard_size bytes (a tensor larger than that gets a shard of its own). Returns the file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        os.chmod(folder / name, 0o644)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def n_groups(in_features: int, group_size: int) -> int:
    """Grids per row: ceil(in / group_size), 1 for group_size -1 (what GPTQ loaders allocate)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order: input i in group i // group_size (int32)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def _spec_dict(spec) -> dict:
    d = dict(spec) if isinstance(spec, Mapping) else dict(vars(spec))
    missing = [k for k in ("bits", "group_size", "sym") if k not in d]
    if missing:
        raise ValueError(f"spec lacks {missing}: pass the QuantSpec the layers were quantized with")
    return d


def _json_number(x):
    """A float for JSON: inf (plain GPTQ's anchor strength) as the string "inf", which strict JSON allows."""
    if x is None:
        return None
    x = float(x)
    return "inf" if math.isinf(x) else x


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or e.g. '4GB', got {size!r}")
    return int(float(m.group(1)) * units[m.group(2) or ""])


def _unshare(tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors that share memory: copy any that overlap another kept one."""
    owners: dict[tuple, str] = {}
    for key, t in tensors.items():
        if not t.numel():
            continue
        storage = (t.untyped_storage().data_ptr(), t.device)
        if storage in owners:
            tensors[key] = t.clone()
        else:
            owners[storage] = key


def _warn_borrowed_zeros(results: Mapping[str, QuantizedLayer], checkpoint_format: str) -> None:
    if checkpoint_format != "gptq":
        return
    count = sum(int((r.zeros == 0).sum()) for r in results.values() if r.bits != 3)
    if count:
        log.warning("%d zero points are 0: checkpoint_format 'gptq' stores them minus one with a borrow from "
                    "the next field, as GPTQModel does; GPTQModel and epmq read them back exactly, loaders that "
                    "add one to each unpacked field do not. checkpoint_format 'gptq_v2' stores them as they are.",
                    count)


def _can_generate(model: nn.Module) -> bool:
    try:
        return bool(model.can_generate())
    except Exception:  # noqa: BLE001 - older/other model classes
        return False


def checkpoint_size(path: str | Path) -> dict:
    """Bytes in a saved folder, from the safetensors headers: the files, the quantized layers' packed
    tensors (qweight, qzeros, scales, g_idx; not their biases), what those layers' weights take in
    float32, and the ratio of the two."""
    from safetensors import safe_open

    path = Path(path)
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                shapes[key] = (tuple(t.get_shape()), _DTYPE_BYTES[t.get_dtype()])

    def nbytes(key):
        shape, item = shapes[key]
        return math.prod(shape) * item

    layers = [k[: -len(".qweight")] for k in shapes if k.endswith(".qweight")]
    packed = sum(nbytes(f"{layer}.{f}") for layer in layers for f in QUANT_FIELDS)
    float32 = sum(4 * shapes[f"{layer}.g_idx"][0][0] * shapes[f"{layer}.scales"][0][1] for layer in layers)
    files = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"files_bytes": files, "quantized_layers_bytes": packed, "quantized_layers_float32_bytes": float32,
            "quantized_layers_ratio": packed / float32 if float32 else None,
            "other_tensors_bytes": sum(nbytes(k) for k in shapes) - packed}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
