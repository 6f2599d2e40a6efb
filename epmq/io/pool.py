"""Expert pool: the base, the experts (and optionally a merged model) as weight files, loaded lazily.

The pool never keeps an expert in memory. It checks every file up front (exists, keys, shapes,
dtypes, finite values) so that a bad checkpoint fails before calibration starts, then hands out
either a whole state dict or just the tensors under one prefix (one transformer block), read with
safetensors.safe_open so that only those tensors leave the disk.

Sources, per model:
- a save_pretrained folder: model.safetensors, or sharded model.safetensors.index.json;
  pytorch_model.bin(.index.json) as a fallback;
- a single .safetensors file;
- a .bin / .pt / .pth file, read with torch.load(weights_only=True); arbitrary unpickling only
  with allow_pickle=True, never by default;
- a Hugging Face hub id ("owner/name"), fetched with huggingface_hub.snapshot_download;
- in memory: an nn.Module or a state dict (base / merged only).

Key spaces: all keys are reported in the base's key space. A checkpoint whose keys carry an extra
wrapper prefix (transformers 4 saved CLIPVisionModel as 'vision_model.encoder...', transformers 5
has no prefix) is matched by stripping or adding that one prefix.

Merging without holding the experts: `pool.lazy_expert(task)` and `pool.lazy_base()` are read-only
Mappings in the base's key space (LazyStateDict) whose `view[key]` reads that one tensor from disk
and whose `view.spec(key)` gives its (shape, dtype) from the file headers without reading it. The
merges of epmq.core.merge take them in place of state dicts; `pool.merge(merger)` is the entry point:
it returns the same tensors, bit for bit, as `merger(pool.base_state_dict(), {t:
pool.expert_state_dict(t) ...})`, while holding one tensor per expert at a time (see epmq.core.merge for
each merge's peak memory).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

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


def resolve_source(source, what: str = "model source") -> Path:
    """Local path of a model source: an existing file/folder, or a hub id downloaded to the HF cache.

    Raises ValueError naming `what` (e.g. "suite.base") and the source when it cannot be found.
    """
    path = local_path(source)
    if path is not None:
        return path
    if isinstance(source, str) and is_hub_id(source):  # fails within seconds, naming the id, when the hub is silent
        return snapshot(source, allow_patterns=["*.json", "*.safetensors", "*.bin"], what=what)
    raise ValueError(f"{what} '{source}' does not exist (not a file, folder or hub id)")


class _Checkpoint:
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
                yield key, tuple(t.shape), _dtype_name(t.dtype)

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


def _dtype_name(dtype: torch.dtype) -> str:
    """torch dtype in safetensors' spelling (F32, BF16, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _torch_dtype(name: str) -> torch.dtype:
    """Inverse of _dtype_name: 'F32' -> torch.float32, 'torch.complex64' -> torch.complex64."""
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

    def __init__(self, ckpt: _Checkpoint, fkeys: Mapping[str, str]):
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


class ExpertPool:
    """The base model, experts by task, and optionally a merged model, as validated weight files.

    Args:
        base: the reference for keys/shapes/dtypes: a folder / file / hub id, an nn.Module, or a
            state dict.
        experts: task name -> folder / file / hub id of the expert fine-tuned on that task.
        merged: optional merged model (same kinds as base).
        allow_pickle: permit full unpickling of .bin/.pt files that torch.load(weights_only=True)
            refuses. Off by default: such files can run code when loaded.
        check_finite: read every expert tensor once up front and refuse NaN/Inf weights.

    All validation happens here, before any calibration: a missing file, an unknown or missing
    key, a shape or dtype that differs from the base, or a non-finite weight raises ValueError
    naming the file and key.

    Merging: `pool.merge(merger)` merges the experts tensor by tensor through lazy views
    (lazy_base, lazy_expert), never holding an expert's full state dict. A base given in memory
    (nn.Module or state dict) is merged from memory as before (its view reads nothing from disk);
    experts are always files. A merged model brought with `merged=` is untouched by this: read it
    with merged_state_dict() as before.
    """

    def __init__(self, base, experts: Mapping[str, object], merged=None, allow_pickle: bool = False,
                 check_finite: bool = True):
        if not isinstance(experts, Mapping) or not experts:
            raise ValueError("experts must be a non-empty mapping task -> path or hub id")
        self.allow_pickle = allow_pickle
        self._base_sd, self._base_ckpt = self._open(base, "base")
        self.base_meta = self._meta(self._base_sd, self._base_ckpt)  # key -> (shape, dtype)
        self.experts: dict[str, _Checkpoint] = {}
        self._maps: dict[str, dict[str, str]] = {}  # task -> base key -> key in file
        for task, source in experts.items():
            ckpt = _Checkpoint(source, allow_pickle, f"expert '{task}'")
            self._maps[task] = self._validate(ckpt, f"expert '{task}'")
            self.experts[task] = ckpt
            if check_finite:
                self._check_finite(ckpt, self._maps[task])
        self._merged_sd, self._merged_ckpt = (None, None) if merged is None else self._open(merged, "merged")
        self._merged_map = None if self._merged_ckpt is None else self._validate(self._merged_ckpt, "merged")

    # -- opening and validating ----------------------------------------------------------
    def _open(self, source, what):
        if isinstance(source, nn.Module):
            return {k: v.detach() for k, v in source.state_dict().items()}, None
        if isinstance(source, Mapping):
            return dict(source), None
        return None, _Checkpoint(source, self.allow_pickle, what)

    @staticmethod
    def _meta(sd, ckpt) -> dict[str, tuple[tuple, str]]:
        if sd is not None:
            return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in sd.items()}
        return dict(ckpt.meta)

    def _validate(self, ckpt: _Checkpoint, what: str) -> dict[str, str]:
        """base key -> key in ckpt; ValueError naming the file and key on any mismatch."""
        strip, add = match_prefix(ckpt.meta, self.base_meta)
        mapping = {}
        for fkey in ckpt.meta:
            if not fkey.startswith(strip):
                continue  # outside the base's tower (e.g. a CLIPModel's text tower)
            key = add + fkey[len(strip):]
            if key.endswith(SAVED_BUFFERS) and key not in self.base_meta:
                continue
            mapping[key] = fkey
        unknown = sorted(k for k in mapping if k not in self.base_meta)
        if unknown:
            raise ValueError(f"{what} ({ckpt.files[mapping[unknown[0]]]}): key '{mapping[unknown[0]]}' "
                             f"is not in the base model")
        missing = sorted(set(self.base_meta) - set(mapping))
        if missing:
            raise ValueError(f"{what} ({ckpt.source}): key '{missing[0]}' of the base model is "
                             f"missing ({len(missing)} missing in all)")
        for key, fkey in mapping.items():
            if ckpt.meta[fkey] != self.base_meta[key]:
                (s, d), (bs, bd) = ckpt.meta[fkey], self.base_meta[key]
                field = "shape" if s != bs else "dtype"
                raise ValueError(f"{what} ({ckpt.files[fkey]}): key '{fkey}' has {field} "
                                 f"{s if field == 'shape' else d}, the base has "
                                 f"{bs if field == 'shape' else bd}")
        return mapping

    @staticmethod
    def _check_finite(ckpt: _Checkpoint, mapping: dict[str, str]) -> None:
        for fkey, t in ckpt.iter_tensors(mapping.values()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{ckpt.files[fkey]}: key '{fkey}' holds NaN or Inf weights")

    # -- loading ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def keys(self) -> list[str]:
        """Every state-dict key, in the base's key space."""
        return list(self.base_meta)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self._load(self._base_sd, self._base_ckpt, None, self.keys())

    def merged_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The merged model's weights when the pool was given one, else None."""
        if self._merged_sd is None and self._merged_ckpt is None:
            return None
        return self._load(self._merged_sd, self._merged_ckpt, self._merged_map, self.keys())

    def expert_state_dict(self, task: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Expert `task`'s tensors for `keys` (base key space; default all), freshly read from disk."""
        ckpt = self._expert(task)
        return self._load(None, ckpt, self._maps[task], self.keys() if keys is None else list(keys))

    # -- lazy views, for merging tensor by tensor -------------------------------------------
    def lazy_expert(self, task: str) -> LazyStateDict:
        """Expert `task` as a read-only Mapping in the base's key space whose tensors are read from
        disk one at a time, on access (see LazyStateDict); .spec(key) gives (shape, dtype) unread."""
        ckpt, mapping = self._expert(task), self._maps[task]
        return LazyStateDict(ckpt, {k: mapping[k] for k in self.base_meta})  # in the base's order

    def lazy_base(self) -> Mapping[str, torch.Tensor]:
        """The base as a read-only Mapping: a LazyStateDict when it is a file; a read-only view of the
        in-memory state dict (no copy: merges never write into their inputs) when it was given as
        an nn.Module or a state dict."""
        if self._base_sd is not None:
            return MappingProxyType(self._base_sd)
        return LazyStateDict(self._base_ckpt, {k: k for k in self.base_meta})

    def merge(self, merger: Callable, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """merger(base, experts) of `tasks` (default all, in the pool's order) through lazy views.

        `merger` is one of epmq.core.merge's merges (SimpleAverage, TaskArithmetic, TiesMerging, or the
        functions): the result equals, bit for bit, merger(base_state_dict(), {t:
        expert_state_dict(t)}) while no expert is held whole (peak memory: epmq.core.merge's docstring).
        Returns a new state dict in the base's key space, order and dtypes.
        """
        tasks = self.tasks if tasks is None else list(tasks)
        return merger(self.lazy_base(), {t: self.lazy_expert(t) for t in tasks})

    def expert_subset(self, task: str, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Expert `task`'s tensors whose (base-space) key satisfies `keep`."""
        return self.expert_state_dict(task, [k for k in self.keys() if keep(k)])

    def expert_block(self, task: str, prefix: str) -> dict[str, torch.Tensor]:
        """Expert `task`'s tensors under `prefix` (e.g. 'encoder.layers.3.'), keys relative to it.

        Only those tensors are read (safetensors), so the result loads straight into a block module.
        """
        sd = self.expert_subset(task, lambda k: k.startswith(prefix))
        if not sd:
            raise ValueError(f"expert '{task}': no keys under prefix '{prefix}'")
        return {k[len(prefix):]: v for k, v in sd.items()}

    def _expert(self, task: str) -> _Checkpoint:
        if task not in self.experts:
            raise ValueError(f"unknown task '{task}'; the pool has {self.tasks}")
        return self.experts[task]

    @staticmethod
    def _load(sd, ckpt, mapping, keys) -> dict[str, torch.Tensor]:
        if sd is not None:
            return {k: sd[k].clone() for k in keys}
        fkeys = [mapping[k] if mapping is not None else k for k in keys]
        loaded = ckpt.load(fkeys)
        return {k: loaded[f] for k, f in zip(keys, fkeys)}

    def __repr__(self) -> str:
        return f"ExpertPool(tasks={self.tasks}, keys={len(self.base_meta)})"
