"""The CLIP suite: CLIP ViT experts (FusionBench's from the hub, or folders on disk) merged, quantized and
evaluated zero-shot through the base's frozen text tower.

- base: a full CLIPModel (both towers) with its tokenizer and image processor: hub id or folder.
  Its vision tower is the pool's base (what is merged and calibrated); its text tower, visual
  projection and logit_scale make the zero-shot heads (epmq.families.clip.evaluate).
- experts: a pattern with {task}: hub ids or folders of CLIPVisionModel checkpoints (FusionBench's,
  saved by transformers 4 with a `vision_model.` prefix, load as they are), or of full CLIPModels
  whose vision tower is taken; or open_clip ViT tower files (the task-vectors release), converted
  once into the cache (epmq.families.clip.openclip; pickled whole modules only with allow_pickle=true).
- datasets: a pattern with {task}: a hub id or a folder written by DatasetDict.save_to_disk. Under
  the default `tanganke/{task}` the tasks FusionBench loads from elsewhere use its sources (the
  "datasets" map of tasks.json: e.g. stanford-cars -> tanganke/stanford_cars, svhn ->
  ufldl-stanford/svhn, config cropped_digits); `dataset_overrides.<task>` replaces any of them.
  Calibration and selection samples come from the train split, evaluation from the test split.
- tasks: a list, or TA8 / TALL14 / TALL20 (FusionBench's names and order).
- heads: for FusionBench's tasks its class names and templates (tasks.json), otherwise the
  dataset's ClassLabel names with "a photo of a {}."; `classnames.<task>` / `templates.<task>`
  override either. Cached under cache_dir/heads, named by a fingerprint of the base and prompts.

Nothing is read or downloaded when the suite is made: the base is opened when the pool first asks
for it (`suite.base`), so a config can be built and checked offline, and an unreachable hub id fails
there within seconds (epmq.io.hub), naming the id.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from epmq.engine.adapters import ModelAdapter
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.clip.data import (HUB_NAMESPACE, TASK_DATA, TASK_SETS, DatasetSource, ImageTransform, dataset_spec,
                                     image_processor)
from epmq.families.clip.evaluate import (DEFAULT_TEMPLATES, PLACEHOLDER, HeadCache, ZeroShotClassifier, fingerprint,
                                         text_embeddings)
from epmq.families.images import ImageSuite, TaskDataModule
from epmq.io.files import write_atomic
from epmq.io.fingerprint import file_digest
from epmq.io.hub import PICKLE_SUFFIXES, SAFE_SUFFIXES, is_hub_id, local_path, snapshot

log = logging.getLogger(__name__)

BASE_FILES = ["*.json", "*.txt", "*.safetensors"]  # config, tokenizer, processor and weights (no TF/Flax copies)


def resolve_tasks(tasks) -> list[str]:
    """A task list, or the name of one of FusionBench's task sets (TA8, TALL14, TALL20)."""
    if isinstance(tasks, str):
        if tasks not in TASK_SETS:
            raise ValueError(f"suite.tasks: '{tasks}' is not a task set ({', '.join(TASK_SETS)}); "
                             f"give one of those or a list of task names")
        return list(TASK_SETS[tasks])
    tasks = list(tasks or [])
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"suite.tasks must be a task set name or a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"suite.tasks has duplicates: {tasks}")
    return tasks


def _folder_digest(folder: Path) -> str:
    """sha256 over the names and digests (epmq.io.fingerprint.file_digest) of a model folder's files."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.name}|{file_digest(f)}|".encode())
    return h.hexdigest()


def no_init_weights():
    """transformers' context that builds a model without initialising its weights (4.x and 5.x)."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:
        from transformers.modeling_utils import no_init_weights as context
    return context()


class ClipSuite(ImageSuite):
    """CLIP ViT experts evaluated zero-shot (see the module docstring for every option).

    Args:
        base: hub id or folder of a full CLIPModel with its tokenizer and image processor.
        experts: pattern with {task}: hub id, folder or file of each task's expert.
        datasets: pattern with {task}: hub id or save_to_disk folder of each task's data.
        tasks: a list of task names or "TA8" / "TALL14" / "TALL20".
        dataset_overrides: task -> a source (hub id or folder), or a mapping with any of path, name,
            train_split, test_split, image_column, label_column.
        image_column, label_column: the columns read (label: ints, ideally a ClassLabel).
        train_split, test_split: calibration / selection samples come from the first, test from the second.
        classnames, templates: task -> class names / prompt templates ("{}" stands for the class name).
        cache_dir: where heads and converted open_clip experts are kept (None: $EPMQ_CACHE/clip).
        allow_pickle: unpickle whole-module expert files (open_clip's); off by default.
        merged: a merged model to quantize as is (merge=none): a CLIPVisionModel folder, file or hub id.
        text_batch_size: prompts per text-tower forward when building heads.
    """

    name = "clip"

    def __init__(self, base: str = "openai/clip-vit-base-patch32",
                 experts: str = "tanganke/clip-vit-base-patch32_{task}", datasets: str = HUB_NAMESPACE,
                 tasks: str | Sequence[str] = "TA8", dataset_overrides: Mapping | None = None,
                 image_column: str = "image", label_column: str = "label", train_split: str = "train",
                 test_split: str = "test", classnames: Mapping[str, Sequence[str]] | None = None,
                 templates: Mapping[str, Sequence[str]] | None = None, cache_dir: str | None = None,
                 allow_pickle: bool = False, merged: str | None = None, text_batch_size: int = 256):
        self.tasks = resolve_tasks(tasks)
        for option, pattern in (("suite.experts", experts), ("suite.datasets", datasets)):
            if not isinstance(pattern, str) or "{task}" not in pattern:
                raise ValueError(f"{option} must be a pattern with {{task}} (e.g. 'tanganke/{{task}}'), "
                                 f"got {pattern!r}")
        if not isinstance(base, str) or not base:
            raise ValueError(f"suite.base must be a hub id or a folder, got {base!r}")
        self.base_source, self.experts_pattern, self.datasets_pattern = base, experts, datasets
        self.classname_overrides = self._per_task("suite.classnames", classnames)
        self.template_overrides = self._per_task("suite.templates", templates)
        for task, ts in self.template_overrides.items():
            bad = [t for t in ts if PLACEHOLDER not in t]
            if bad:
                raise ValueError(f"suite.templates.{task}: template {bad[0]!r} has no '{{}}' for the class name")
        overrides = self._per_task("suite.dataset_overrides", dataset_overrides, sequences=False)
        defaults = {"name": None, "train_split": train_split, "test_split": test_split,
                    "image_column": image_column, "label_column": label_column}
        self.dataset_specs = {t: dataset_spec(t, datasets, defaults, overrides.get(t)) for t in self.tasks}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.allow_pickle, self.merged, self.text_batch_size = bool(allow_pickle), merged, int(text_batch_size)
        self._base: dict | None = None      # opened base: tower state, projection, text side, processor
        self._experts: dict[str, str] | None = None
        self._heads: dict[str, torch.Tensor] = {}
        self._head_info: dict[str, dict] = {}
        self._data = DatasetSource(self.dataset_specs)

    # -- options ----------------------------------------------------------------------------------
    def _per_task(self, option: str, values, sequences: bool = True) -> dict:
        values = dict(values or {})
        unknown = [t for t in values if t not in self.tasks]
        if unknown:
            raise ValueError(f"{option}: task {unknown[0]!r} is not in suite.tasks {self.tasks}")
        if sequences:
            for task, v in values.items():
                if isinstance(v, str) or not v or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"{option}.{task} must be a non-empty list of strings, got {v!r}")
            return {t: list(v) for t, v in values.items()}
        return values

    def _cache(self) -> Path:
        if self.cache_dir is None:
            return Path(os.environ.get("EPMQ_CACHE", Path.home() / ".cache" / "epmq")).expanduser() / "clip"
        return self.cache_dir

    # -- the base ----------------------------------------------------------------------------------
    def _resolve_base(self) -> Path:
        path = local_path(self.base_source)
        if path is not None:
            if not path.is_dir():
                raise ValueError(f"suite.base: {path} is a file; give the folder of a full CLIPModel "
                                 f"(config, weights, tokenizer, preprocessor_config.json)")
            return path
        if not is_hub_id(self.base_source):
            raise ValueError(f"suite.base: '{self.base_source}' is neither a folder nor a hub id")
        folder = snapshot(self.base_source, allow_patterns=BASE_FILES, what="suite.base")
        if not any(folder.glob("*.safetensors")):  # an older repo with pickled torch weights only
            folder = snapshot(self.base_source, allow_patterns=["*.json", "*.txt", "*.bin"], what="suite.base")
        return folder

    def _open_base(self) -> dict:
        if self._base is not None:
            return self._base
        from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPModel

        folder = self._resolve_base()
        try:
            config = AutoConfig.from_pretrained(str(folder))
        except Exception as e:
            raise ValueError(f"suite.base ({folder}): no readable config.json: {e}") from None
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"suite.base ({folder}) is a {type(config).__name__}, not a full CLIPModel: the zero-shot "
                             f"heads need its text tower (give e.g. openai/clip-vit-base-patch32)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise ValueError(f"suite.base ({folder}): no tokenizer files: {type(e).__name__}: {e}") from None
        processor = image_processor(folder)
        try:
            clip = CLIPModel.from_pretrained(str(folder)).eval()
        except Exception as e:
            raise ValueError(f"suite.base ({folder}): cannot load the CLIPModel: {type(e).__name__}: {e}") from None
        clip.requires_grad_(False)
        self._base = {
            "folder": folder, "digest": _folder_digest(folder), "vision_config": clip.config.vision_config,
            "tower": {k: v.detach() for k, v in clip.vision_model.state_dict().items()},
            "projection": clip.visual_projection, "logit_scale": clip.logit_scale.detach().clone(),
            "text": (clip.text_model, clip.text_projection, tokenizer), "processor": processor,
        }
        return self._base

    @property
    def base(self) -> dict[str, torch.Tensor]:
        """The base's vision tower (CLIPVisionModel state dict): what the pool merges and validates against."""
        return self._open_base()["tower"]

    # -- the experts -------------------------------------------------------------------------------
    @property
    def experts(self) -> dict[str, str]:
        """task -> expert source for the pool (open_clip files replaced by their converted folders)."""
        if self._experts is None:
            self._experts = {t: self._expert_source(t, self.experts_pattern.replace("{task}", t))
                             for t in self.tasks}
        return self._experts

    def _expert_source(self, task: str, source: str) -> str:
        path = local_path(source)
        if path is None and not is_hub_id(source):  # say which task and option, before the pool opens it
            raise ValueError(f"suite.experts ({task}): '{source}' is not a file, a folder or a hub id")
        if path is None or not path.is_file() or not path.name.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
            return source  # folders and hub ids: the pool reads them
        from epmq.families.clip import openclip

        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if not openclip.is_openclip(f.keys()):
                    return source
            state = openclip.load_state(path)
        else:
            unpickled = False
            try:
                state = openclip.load_state(path)  # a plain state dict (weights_only)
            except ValueError as e:
                if not self.allow_pickle:
                    raise ValueError(f"suite.experts ({task}): {e}; set suite.allow_pickle=true") from None
                state, unpickled = openclip.load_state(path, allow_pickle=True), True
            if not openclip.is_openclip(state):  # HF layout: the pool reads it, from a safetensors copy if unpickled
                return str(self._save_tensors(path, state)) if unpickled else source
        return str(self._convert_openclip(task, path, state))

    def _convert_openclip(self, task: str, path: Path, state: dict) -> Path:
        from epmq.families.clip import openclip

        out = self._cache() / "openclip" / file_digest(path)
        if not (out / "model.safetensors").is_file():
            log.info("converting open_clip expert %s (%s) to the HF CLIPVisionModel layout in %s", task, path, out)
            ours = self._open_base()["vision_config"]  # the expert is a fine-tune of this tower
            openclip.save_pretrained(state, out, str(path), hidden_act=ours.hidden_act,
                                     head_width=ours.hidden_size // ours.num_attention_heads)
        projection = out / openclip.PROJECTION_FILE
        if projection.is_file():
            from safetensors.torch import load_file

            theirs, ours = load_file(str(projection))["weight"], self._open_base()["projection"].weight
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours.to(theirs.dtype), atol=1e-6):
                log.warning("expert %s (%s) has its own visual projection; the zero-shot heads use the base's",
                            task, path)
        return out

    def _save_tensors(self, path: Path, state: dict) -> Path:
        """An unpickled (allow_pickle) HF-layout state dict, saved as safetensors for the pool's lazy reads."""
        from safetensors.torch import save_file

        out = self._cache() / "unpickled" / f"{file_digest(path)}.safetensors"
        if not out.is_file():
            tensors = {k: v.contiguous() for k, v in state.items()}
            write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return out

    # -- models and heads -------------------------------------------------------------------------
    def model(self, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A CLIPVisionModel in eval mode holding `state_dict` (None: the base's tower)."""
        from transformers import CLIPVisionModel

        base = self._open_base()
        with no_init_weights():  # every weight is overwritten next: skip the random init (10 s for a ViT-L/14 on a CPU)
            model = CLIPVisionModel(base["vision_config"])
        model.load_state_dict(base["tower"] if state_dict is None else state_dict, strict=True)
        return model.eval()

    def prompts(self, task: str) -> tuple[list[str], list[str], str]:
        """(class names, templates, where the names come from) of a task's head."""
        known = TASK_DATA["prompts"].get(task)
        if task in self.classname_overrides:
            names, where = self.classname_overrides[task], f"suite.classnames.{task}"
        elif known is not None:
            names, where = list(known["classnames"]), "FusionBench's class names"
        else:
            label = self._data(task)["test"].features["label"]
            if not hasattr(label, "names"):
                raise ValueError(f"task {task!r}: its label column is not a ClassLabel, so it has no class names; "
                                 f"give them with suite.classnames.{task}")
            names, where = list(label.names), "the dataset's ClassLabel names"
        templates = self.template_overrides.get(task) or list(known["templates"] if known else DEFAULT_TEMPLATES)
        return names, templates, where

    def heads(self) -> dict[str, torch.Tensor]:
        """task -> text embeddings E (K, P) of its zero-shot head, built once (or read from the cache).

        ValueError naming the task when the class names disagree with the dataset's ClassLabel."""
        if len(self._heads) == len(self.tasks):
            return self._heads
        base = self._open_base()
        cache = HeadCache(self._cache() / "heads")
        for task in self.tasks:
            names, templates, where = self.prompts(task)
            label = self._data(task)["test"].features["label"]
            if hasattr(label, "num_classes") and label.num_classes != len(names):
                raise ValueError(f"task {task!r}: {len(names)} class names ({where}) but its dataset's label has "
                                 f"{label.num_classes} classes; give the right ones with suite.classnames.{task}")
            key = fingerprint(base["digest"], names, templates)
            embeds = cache.load(key)
            if embeds is None:
                text_model, text_projection, tokenizer = base["text"]
                device = "cuda" if torch.cuda.is_available() else "cpu"  # thousands of prompts for TALL20
                log.info("zero-shot head of %s: %d classes x %d templates = %d prompts through the text tower ...",
                         task, len(names), len(templates), len(names) * len(templates))
                t0 = time.perf_counter()
                embeds = text_embeddings(text_model.to(device), text_projection.to(device), tokenizer, names,
                                         templates, self.text_batch_size, device, desc=f"head {task}")
                log.info("zero-shot head of %s: done in %.1f s (cached for later runs)", task, time.perf_counter() - t0)
                cache.save(key, embeds, {"task": task, "base": self.base_source, "classnames": names,
                                         "templates": templates})
            self._heads[task] = embeds
            self._head_info[task] = {"classes": len(names), "templates": len(templates), "classnames_from": where,
                                     "fingerprint": key}
        base["text"] = None  # every head is built: the text tower is not needed any more
        return self._heads

    def classifier(self, tower: nn.Module, task: str, projection: nn.Linear | None = None) -> ZeroShotClassifier:
        """Task t's zero-shot classifier on `tower` (the base's projection, logit scale and t's head)."""
        base = self._open_base()
        return ZeroShotClassifier(tower, projection or copy.deepcopy(base["projection"]), self.heads()[task],
                                  base["logit_scale"]).eval()

    def classifiers(self):
        """classify(tower, task) sharing one copy of the base's projection (trainers may cast it) per evaluator."""
        self.heads()
        projection = copy.deepcopy(self._open_base()["projection"])
        return lambda tower, task: self.classifier(tower, task, projection)

    @property
    def num_classes(self) -> dict[str, int]:
        return {t: head.shape[0] for t, head in self.heads().items()}

    def adapter(self, model: nn.Module) -> ModelAdapter:
        return CLIPVisionAdapter()

    # -- data --------------------------------------------------------------------------------------
    def datamodule(self, **data) -> TaskDataModule:
        """Per-task data through the base's image processor; the heads are built here too (they need
        the class names), so that a mismatch fails before the merge."""
        base = self._open_base()
        transform = ImageTransform(base["processor"], base["vision_config"].num_channels)
        named = {t: self.prompts(t) for t in self.tasks if t in self.classname_overrides or t in TASK_DATA["prompts"]}
        self._data.expect_classes({t: (len(names), where) for t, (names, _, where) in named.items()})
        datamodule = TaskDataModule(self.tasks, root_or_hub=self._data, transform=transform, **data)
        self.heads()
        return datamodule

    def describe(self) -> dict:
        """What the report records: the sources, the base's digest, each head's prompts and a short
        fingerprint of them all (base digest, expert sources, head fingerprints)."""
        digest = self._base["digest"] if self._base else None
        heads = [self._head_info[t]["fingerprint"] for t in self.tasks if t in self._head_info]
        experts = [self.experts_pattern.replace("{task}", t) for t in self.tasks]
        short = hashlib.sha256(json.dumps([digest, experts, heads]).encode()).hexdigest()[:16]
        return {"name": self.name, "fingerprint": short, "base": self.base_source, "base_digest": digest,
                "experts": {t: self.experts_pattern.replace("{task}", t) for t in self.tasks},
                "datasets": {t: {k: v for k, v in s.items() if v is not None} for t, s in self.dataset_specs.items()},
                "tasks": self.tasks, "heads": dict(self._head_info)}
