"""Model weights on disk, read lazily: a save_pretrained folder (safetensors, sharded or not; pickled
pytorch_model.bin as a fallback), a single weights file, or a hub id fetched first.

`WeightFiles` maps every key of one model to (file, key in file) from the files' headers, so that a tensor is
read only when asked for (safetensors.safe_open); pickled files are read with torch.load(weights_only=True)
and arbitrary unpickling needs allow_pickle=True. `LazyStateDict` is a read-only Mapping over one model's
tensors in another key space (`match_prefix`: the one wrapper prefix, such as transformers 4's
'vision_model.', that two key sets differ by).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from epmq.io.hub import PICKLE_SUFFIXES, SAFE_SUFFIXES, is_hub_id, local_path, snapshot

log = logging.getLogger(__name__)

# Files looked for inside a save_pretrained folder, in order of preference.
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
# Buffers that transformers < 4.31 saved beside the weights (CLIP's position_ids: an arange, not a
# weight): skipped in a checkpoint whose base has none, instead of refused as unknown keys.
SAVED_BUFFERS = (".position_ids",)


# a hub model's files that epmq reads: configs, weights, and the tokenizer's files (a sentencepiece model, BPE merges,
# a chat template saved as chat_template.jinja), so that a causal LM's tokenizer and its chat template come along
MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]


def resolve_source(source, what: str = "model source") -> Path:
    """Local path of a model source: an existing file/folder, or a hub id downloaded to the HF cache.

    Raises ValueError naming `what` (e.g. "suite.base") and the source when it cannot be found.
    """
    path = local_path(source)
    if path is not None:
        return path
    if isinstance(source, str) and is_hub_id(source):  # fails within seconds, naming the id, when the hub is silent
        return snapshot(source, allow_patterns=MODEL_FILES, what=what)
    raise ValueError(f"{what} '{source}' does not exist (not a file, folder or hub id)")


class WeightFiles:
    """One model's weights on disk: key -> (file, key in file), shapes and dtypes from headers."""

    def __init__(self, source, allow_pickle: bool = False, what: str = "model source"):
        self.source = str(source)
        self.allow_pickle = allow_pickle
        path = resolve_source(source, what)
        self.files = self._weight_files(path)  # key in file -> file path
        self.meta = {}  # key in file -> (shape, dtype)
        for file in sorted(set(self.files.values())):
            for key, shape, dtype in self._read_meta(file):
                self.meta[key] = (shape, dtype)
        missing = sorted(set(self.files) - set(self.meta))
        if missing:
            raise ValueError(f"{self.source}: index lists key '{missing[0]}' that its shard lacks")

    def _weight_files(self, path: Path) -> dict[str, Path]:
        if path.is_dir():
            for name in FOLDER_FILES:
                f = path / name
                if f.exists():
                    return self._weight_files(f)
            raise ValueError(f"{path}: no weights file found (looked for {', '.join(FOLDER_FILES)})")
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}: not a valid shard index (needs 'weight_map'): {e}") from None
            files = {}
            for key, shard in weight_map.items():
                f = path.parent / shard
                if not f.exists():
                    raise ValueError(f"{path}: shard '{shard}' of key '{key}' does not exist")
                files[key] = f
            return files
        if path.name.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
            return {key: path for key in self._keys_of(path)}
        raise ValueError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt, .pth "
                         f"or a save_pretrained folder)")

    def _keys_of(self, file: Path) -> list[str]:
        return [k for k, _, _ in self._read_meta(file)]

    def _read_meta(self, file: Path):
        if file.name.endswith(SAFE_SUFFIXES):
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        yield key, tuple(sl.get_shape()), sl.get_dtype()
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ValueError(f"{file}: cannot read safetensors header: {e}") from None
        else:
            for key, t in self._load_pickle(file).items():
                yield key, tuple(t.shape), dtype_name(t.dtype)

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:
            if not self.allow_pickle:
                lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
                reason = (lines or [str(e).splitlines()[0] if str(e) else type(e).__name__])[0]
                raise ValueError(f"{file}: refused to unpickle: it holds more than tensors "
                                 f"(torch.load(weights_only=True): {reason}); convert it to "
                                 f".safetensors, or pass allow_pickle=True if you trust the file"
                                 ) from None
            log.warning("%s: loading with full unpickling (allow_pickle=True)", file)
            sd = torch.load(str(file), map_location="cpu", weights_only=False)
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{file}: expected a state dict, found {type(sd).__name__}")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{file}: entry '{bad[0]}' is a {type(sd[bad[0]]).__name__}, not a tensor")
        return dict(sd)

    def iter_tensors(self, keys: Iterable[str]):
        """(key, tensor) for `keys` (the file's own key space), one file at a time; safetensors
        are read one tensor at a time, a pickle once per file."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        for file, ks in by_file.items():
            if file.name.endswith(SAFE_SUFFIXES):
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    for k in ks:
                        yield k, f.get_tensor(k)
            else:
                sd = self._load_pickle(file)
                for k in ks:
                    yield k, sd[k]

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys` (the file's own key space)."""
        return dict(self.iter_tensors(keys))

    def read(self, key: str, cache: dict | None = None) -> torch.Tensor:
        """The one tensor `key` (the file's own key space), on the CPU.

        safetensors: only that tensor leaves the disk, as a new tensor the caller owns (writes to
        it never reach the file). Pickles cannot be read in part: the whole file is loaded and kept
        in `cache` (at most one file: {path: state dict}) so that the next key of the same file
        does not load it again, and the tensor returned is the kept one: do not write into it.
        Without a cache every call loads the whole file.
        """
        file = self.files[key]
        if file.name.endswith(SAFE_SUFFIXES):
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(key)
        if cache is None:
            return self._load_pickle(file)[key]
        if file not in cache:
            cache.clear()  # drop the previous shard before loading the next one
            cache[file] = self._load_pickle(file)
        return cache[file][key]


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
# float8 and unsigned types, spelt as safetensors spells them, where this torch has them
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
        _DTYPE_NAMES[getattr(torch, _attr)] = _name


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype in safetensors' spelling (F32, BF16, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _torch_dtype(name: str) -> torch.dtype:
    """Inverse of dtype_name: 'F32' -> torch.float32, 'torch.complex64' -> torch.complex64."""
    if name in _DTYPES:
        return _DTYPES[name]
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype '{name}'")
    return dtype


class LazyStateDict(Mapping):
    """A read-only state dict of one checkpoint whose tensors stay on disk until asked for.

    `view[key]` reads just that tensor (base key space; a new CPU tensor) each time it is asked
    for: nothing is cached, so what the caller drops is freed. `view.spec(key)` is its
    (torch.Size, torch.dtype) from the file headers, with no read. Iterating, `len` and `in` use
    the key list only; `items()` and `values()` read every tensor, one per step.

    Pickle checkpoints (.bin/.pt/.pth) cannot be read in part: the first key of a file loads that
    whole file and the view keeps it (one file at a time: a sharded pickle holds one shard) until
    a key of another file is read or the view is dropped, and hands out that file's tensors
    themselves (read-only by contract, as for every input of epmq.core.merge). Convert to .safetensors
    to merge such experts one tensor at a time.

    Args:
        ckpt: the checkpoint on disk.
        fkeys: base key -> key in the file, in the base's order (the pool's key mapping).
    """

    def __init__(self, ckpt: WeightFiles, fkeys: Mapping[str, str]):
        self._ckpt, self._fkeys = ckpt, dict(fkeys)
        self._pickle_cache: dict = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._ckpt.read(self._fkeys[key], self._pickle_cache)

    def __contains__(self, key) -> bool:
        return key in self._fkeys  # Mapping's default would read the tensor to find out

    def __iter__(self):
        return iter(self._fkeys)

    def __len__(self) -> int:
        return len(self._fkeys)

    def spec(self, key: str) -> tuple[torch.Size, torch.dtype]:
        """(shape, dtype) of view[key], from the headers (safetensors) or the loaded pickle's meta."""
        shape, dtype = self._ckpt.meta[self._fkeys[key]]
        return torch.Size(shape), _torch_dtype(dtype)

    def __repr__(self) -> str:
        return f"LazyStateDict({self._ckpt.source!r}, keys={len(self)})"


def match_prefix(keys: Iterable[str], reference: Iterable[str]) -> tuple[str, str]:
    """(strip, add) such that add + k[len(strip):] maps `keys` into `reference`'s key space.

    ('', '') when the key spaces agree; otherwise one wrapper prefix is stripped from or added to
    every key (e.g. 'vision_model.'). Chosen as the mapping that covers the most reference keys.
    """
    keys, reference = set(keys), set(reference)
    best, best_hits = ("", ""), len(keys & reference)
    candidates = set()
    for k in keys:
        for r in reference:
            if k != r and k.endswith("." + r):
                candidates.add((k[: len(k) - len(r)], ""))
            elif k != r and r.endswith("." + k):
                candidates.add(("", r[: len(r) - len(k)]))
        if len(candidates) > 4:
            break
    for strip, add in candidates:
        hits = sum(1 for k in keys if k.startswith(strip) and add + k[len(strip):] in reference)
        if hits > best_hits:
            best, best_hits = (strip, add), hits
    return best
