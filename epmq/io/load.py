"""Loading a GPTQ-layout checkpoint (epmq.io.export, or any GPTQ checkpoint of a family transformers
builds) back into a model, in pure torch: no GPTQ kernel, no GPU.

    model = load_quantized("logs/.../quantized_model")   # a transformers model, in eval mode

Every layer the checkpoint stores as <name>.qweight / .qzeros / .scales / .g_idx becomes a
QuantLinear that keeps the packed tensors and dequantizes its weight on the fly, in the input's
dtype, at every forward; every other tensor is loaded as stored. A layer's bits are quantize_config's, or
those its "dynamic" entry gives (GPTQModel's per-module overrides, epmq.core.overrides.match_dynamic); a
layer "dynamic" leaves unquantized ("-:") is read as the float layer it is stored as. It works for every
model class transformers can build from the checkpoint's config.json ("architectures"), vision towers included
(transformers' own GPTQ loading takes text models only).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from epmq.core.overrides import match_dynamic
from epmq.io.export import CONFIG_NAME, INDEX_NAME, QUANT_FIELDS, WEIGHTS_NAME
from epmq.io.packing import BITS, CHECKPOINT_FORMATS, packed_length, unpack_rows, unpack_zeros


class QuantLinear(nn.Module):
    """A linear layer held in the GPTQ layout (epmq.io.packing); its weight is dequantized at each use.

    Buffers: qweight int32 [packed_length(in), out], qzeros int32 [n_groups, packed_length(out)],
    scales [n_groups, out] (float16 in GPTQ checkpoints), g_idx int32 [in], bias [out] or None.
    weight[o, i] = (code[o, i] - zero[o, g_idx[i]]) * scale[o, g_idx[i]], computed in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int, bias: bool = False,
                 checkpoint_format: str = "gptq", scales_dtype: torch.dtype = torch.float16,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"QuantLinear: bits must be one of {BITS}, got {bits!r}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"QuantLinear: checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                             f"got {checkpoint_format!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.n_groups, self.checkpoint_format = bits, n_groups, checkpoint_format
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits),
                                                   dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    def codes(self) -> torch.Tensor:
        """(out, in) integer codes (int64)."""
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def zeros(self) -> torch.Tensor:
        """(out, n_groups) zero points (int64), the v1 offset undone."""
        return unpack_zeros(self.qzeros, self.bits, self.out_features, self.checkpoint_format).t()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (None: float32)."""
        dtype = dtype or torch.float32
        g = self.g_idx.long()
        zeros, scales = self.zeros().to(dtype), self.scales.t().to(dtype)
        return (self.codes().to(dtype) - zeros[:, g]) * scales[:, g]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in float32, for code that reads .weight (T5 checks its dtype)."""
        return self.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"n_groups={self.n_groups}, bias={self.bias is not None}, format={self.checkpoint_format}")


def read_quantize_config(path: str | Path) -> dict:
    """The checkpoint's quantization settings: config.json's "quantization_config", else quantize_config.json."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    qc = config.get("quantization_config")
    if qc is None and (path / CONFIG_NAME).exists():
        qc = json.loads((path / CONFIG_NAME).read_text())
    if qc is None:
        raise ValueError(f"{path} is not a quantized checkpoint: no quantization_config in config.json "
                         f"and no {CONFIG_NAME}")
    method = str(qc.get("quant_method", qc.get("method", ""))).lower()
    if method != "gptq":
        raise ValueError(f"{path}: quant_method is {method!r}; load_quantized reads GPTQ checkpoints")
    if qc.get("bits") not in BITS:
        raise ValueError(f"{path}: bits {qc.get('bits')!r} is not one of {BITS}")
    if str(qc.get("pack_dtype", "int32")).replace("torch.", "") != "int32":
        raise ValueError(f"{path}: pack_dtype {qc['pack_dtype']!r}; only int32 words are read")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"{path}: checkpoint_format {fmt!r} is not one of {CHECKPOINT_FORMATS}")
    return {**qc, "checkpoint_format": fmt}


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: model.safetensors, or the shards model.safetensors.index.json names."""
    path = Path(path)
    if (path / INDEX_NAME).exists():
        files = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(f"{path} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    absent = [name for name in files if not (path / name).is_file()]
    if absent:
        raise ValueError(f"{path}: {INDEX_NAME} names shards that are not there: {absent[:4]}")
    tensors = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def checkpoint_folder(path: str | Path) -> Path:
    """The local folder of a checkpoint: `path` itself, or a hub id ("owner/name") fetched through
    epmq.io.hub (the local cache when the hub does not answer). ValueError when it is neither."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"{folder} is a file; load_quantized reads a checkpoint folder (config.json, "
                         f"{WEIGHTS_NAME} or its shards)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):  # looks like a hub id
        from epmq.io.hub import snapshot

        return snapshot(str(path), allow_patterns=["*.json", "*.safetensors"], what="load_quantized")
    raise ValueError(f"load_quantized: {folder} is no folder (nor a hub id 'owner/name')")


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `path` (a GPTQ-layout folder, or a hub id), with QuantLinear layers, in eval
    mode on `device`.

    The class is config.json's first "architectures" entry, looked up in transformers; the model's
    config has no quantization_config (the settings are on `model.quantize_config`), so that
    transformers never treats it as a model for its own GPTQ integration.
    """
    import transformers

    path = checkpoint_folder(path)
    qc = read_quantize_config(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: load_quantized needs the model's config to build it")
    config_dict = json.loads((path / "config.json").read_text())
    config_dict.pop("quantization_config", None)
    architectures = config_dict.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(f"{path}/config.json: architectures {architectures} names no transformers model class")
    config = cls.config_class.from_dict(config_dict)
    tensors = read_tensors(path)

    with _parameters_on_meta():
        model = cls(config)
    layers = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if not layers:
        raise ValueError(f"{path}: no '<layer>.qweight' tensor; is this a GPTQ checkpoint?")
    for name in layers:
        _replace(model, name, _quant_linear(model, name, tensors, qc, path))

    # missing tensors are found below, as parameters left on the meta device
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}: tensors {unexpected[:8]} have no place in {cls.__name__}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    empty += [n for n, b in model.named_buffers() if b.is_meta]
    if empty:
        raise ValueError(f"{path}: no tensor for {empty[:8]} of {cls.__name__} (missing from the checkpoint)")
    model.quantize_config = qc
    return model.to(device).eval()


def _quant_linear(model: nn.Module, name: str, tensors: dict, qc: dict, path: Path) -> QuantLinear:
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{path}: '{name}' is packed, but it is a {type(linear).__name__} in "
                         f"{type(model).__name__}, not an nn.Linear")
    missing = [f"{name}.{f}" for f in QUANT_FIELDS if f"{name}.{f}" not in tensors]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    out_features, in_features = linear.out_features, linear.in_features
    override = match_dynamic(qc.get("dynamic"), name)
    if override is False:
        raise ValueError(f"{path}: '{name}' is packed, but quantize_config's dynamic leaves it unquantized")
    bits = (override or {}).get("bits", qc["bits"])
    if bits not in BITS:
        raise ValueError(f"{path}: dynamic gives '{name}' {bits!r} bits, not one of {BITS}")
    qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
    expected = (packed_length(in_features, bits), out_features)
    if tuple(qweight.shape) != expected:
        raise ValueError(f"{path}: {name}.qweight has shape {tuple(qweight.shape)}; a ({out_features} x "
                         f"{in_features}) layer at {bits} bits needs {expected}")
    bias = tensors.get(f"{name}.bias")
    return QuantLinear(in_features, out_features, bits, n_groups=scales.shape[0], bias=bias is not None,
                       checkpoint_format=qc["checkpoint_format"], scales_dtype=scales.dtype,
                       bias_dtype=bias.dtype if bias is not None else torch.float32)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialisation cost) and
    their buffers on the CPU (rotary tables, position ids: computed in __init__, often not saved)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
