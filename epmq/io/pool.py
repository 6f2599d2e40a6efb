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

import logging
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from epmq.io.weights import SAVED_BUFFERS, LazyStateDict, WeightFiles, dtype_name, match_prefix

log = logging.getLogger(__name__)


class ExpertPool:
    """The base model, experts by task, and optionally a merged model, as validated weight files.

    Args:
        base: the reference for keys/shapes/dtypes: a folder / file / hub id, an nn.Module, or a
            state dict; None: `merged` is the reference (one model to quantize, nothing to merge).
        experts: task name -> folder / file / hub id of the expert fine-tuned on that task; empty or
            None: no experts (then nothing can be merged, and no solver that reads experts can run).
        merged: optional merged model (same kinds as base); needed when base is None.
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

    def __init__(self, base, experts: Mapping[str, object] | None, merged=None, allow_pickle: bool = False,
                 check_finite: bool = True):
        experts = {} if experts is None else experts
        if not isinstance(experts, Mapping):
            raise ValueError("experts must be a mapping task -> path or hub id")
        if base is None and merged is None:
            raise ValueError("the pool needs a base model or a merged model")
        self.allow_pickle = allow_pickle
        self.has_base = base is not None
        self._base_sd, self._base_ckpt = self._open(base, "base") if self.has_base else self._open(merged, "merged")
        self.base_meta = self._meta(self._base_sd, self._base_ckpt)  # key -> (shape, dtype)
        self.experts: dict[str, WeightFiles] = {}
        self._maps: dict[str, dict[str, str]] = {}  # task -> base key -> key in file
        for task, source in experts.items():
            ckpt = WeightFiles(source, allow_pickle, f"expert '{task}'")
            self._maps[task] = self._validate(ckpt, f"expert '{task}'")
            self.experts[task] = ckpt
            if check_finite:
                self._check_finite(ckpt, self._maps[task])
        if not self.has_base:  # the merged model is the reference itself: its own keys
            self._merged_sd, self._merged_ckpt, self._merged_map = self._base_sd, self._base_ckpt, None
        else:
            self._merged_sd, self._merged_ckpt = (None, None) if merged is None else self._open(merged, "merged")
            self._merged_map = None if self._merged_ckpt is None else self._validate(self._merged_ckpt, "merged")

    # -- opening and validating ----------------------------------------------------------
    def _open(self, source, what):
        if isinstance(source, nn.Module):
            return {k: v.detach() for k, v in source.state_dict().items()}, None
        if isinstance(source, Mapping):
            return dict(source), None
        return None, WeightFiles(source, self.allow_pickle, what)

    @staticmethod
    def _meta(sd, ckpt) -> dict[str, tuple[tuple, str]]:
        if sd is not None:
            return {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in sd.items()}
        return dict(ckpt.meta)

    def _validate(self, ckpt: WeightFiles, what: str) -> dict[str, str]:
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
    def _check_finite(ckpt: WeightFiles, mapping: dict[str, str]) -> None:
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
        self._need_base()
        return self._load(self._base_sd, self._base_ckpt, None, self.keys())

    def _need_base(self) -> None:
        if not self.has_base:
            raise ValueError("the pool holds no base model (suite.base): it was given a merged model alone")

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
        self._need_base()
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
        if not tasks:
            raise ValueError("the pool holds no experts to merge (suite.experts)")
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

    def _expert(self, task: str) -> WeightFiles:
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
