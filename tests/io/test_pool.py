"""ExpertPool: up-front validation naming file and key, lazy block loading, no silent unpickling."""

from __future__ import annotations

import gc
import itertools
import json
import weakref
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.core.merge import SimpleAverage, TaskArithmetic, TiesMerging, check_experts
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.io.pool import ExpertPool
from epmq.io.weights import WeightFiles, match_prefix

from helpers.tiny import TASKS, tiny_model


class NotATensor:
    """Something torch.load(weights_only=True) must refuse to build."""

    def __init__(self):
        self.payload = "would run code on load"


def _sd(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_loads_whole_experts_and_single_blocks(zoo):
    pool = ExpertPool(zoo["root"] / "base", zoo["paths"])
    assert pool.tasks == TASKS
    expert = zoo["experts"]["svhn"].state_dict()
    full = pool.expert_state_dict("svhn")
    assert full.keys() == expert.keys() and all(torch.equal(full[k], expert[k]) for k in expert)

    adapter = CLIPVisionAdapter()
    prefix = adapter.block_prefix(adapter.stages(zoo["base"])[0], 1)
    block = pool.expert_block("svhn", prefix)
    # exactly block 1's tensors, relative names that load strictly into a block module
    assert set(block) == {k[len(prefix):] for k in expert if k.startswith(prefix)}
    scratch = tiny_model().encoder.layers[1]
    scratch.load_state_dict(block, strict=True)
    assert torch.equal(scratch.mlp.fc2.weight, expert[prefix + "mlp.fc2.weight"])
    assert torch.equal(pool.base_state_dict()["pre_layrnorm.weight"], zoo["base"].pre_layrnorm.weight)
    assert pool.merged_state_dict() is None


def test_base_and_experts_from_modules_files_and_shards(zoo, tmp_path):
    single = tmp_path / "mnist.safetensors"
    save_file(_sd(zoo["experts"]["mnist"]), str(single))
    # a sharded save_pretrained folder: two shards and an index
    sd = _sd(zoo["experts"]["svhn"])
    keys = sorted(sd)
    shard_dir = tmp_path / "svhn"
    shard_dir.mkdir()
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(shard_dir / name))
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    pool = ExpertPool(zoo["base"], {"mnist": single, "svhn": shard_dir}, merged=zoo["merged"])
    got = pool.expert_block("svhn", "encoder.layers.0.")
    assert torch.equal(got["self_attn.q_proj.weight"], sd["encoder.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(pool.expert_state_dict("mnist")["embeddings.class_embedding"],
                       zoo["experts"]["mnist"].embeddings.class_embedding)
    assert torch.equal(pool.merged_state_dict()["post_layernorm.bias"], zoo["merged"]["post_layernorm.bias"])


def test_a_merged_model_alone_is_its_own_reference(zoo, tmp_path):
    """One model to quantize, no base and no experts: its own keys, and nothing to merge or extrapolate from."""
    single = tmp_path / "merged.safetensors"
    save_file(_sd(zoo["experts"]["svhn"]), str(single))
    pool = ExpertPool(None, None, merged=single)
    merged, expected = pool.merged_state_dict(), _sd(zoo["experts"]["svhn"])
    assert pool.tasks == [] and merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="no base model"):
        pool.base_state_dict()
    with pytest.raises(ValueError, match="no experts to merge"):
        pool.merge(SimpleAverage())
    with pytest.raises(ValueError, match="a base model or a merged model"):
        ExpertPool(None, {"svhn": single})


def test_wrapper_prefix_of_older_checkpoints_is_matched(zoo, tmp_path):
    """transformers 4 saved CLIPVisionModel keys as 'vision_model.*'; transformers 5 has none."""
    old = tmp_path / "old.safetensors"
    save_file({"vision_model." + k: v for k, v in _sd(zoo["experts"]["mnist"]).items()}, str(old))
    assert match_prefix(load_file(str(old)), zoo["base"].state_dict()) == ("vision_model.", "")
    pool = ExpertPool(zoo["base"], {"mnist": old})
    block = pool.expert_block("mnist", "encoder.layers.1.")
    assert torch.equal(block["mlp.fc1.bias"], zoo["experts"]["mnist"].encoder.layers[1].mlp.fc1.bias)


def test_validation_names_file_and_key(zoo, tmp_path):
    good = _sd(zoo["experts"]["mnist"])
    with pytest.raises(ValueError, match="nowhere"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "nowhere"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no weights file"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "empty"})

    shape = dict(good, **{"mlp.fc1.weight": None})
    shape.pop("mlp.fc1.weight")
    shape["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    save_file(shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"shape\.safetensors.*'encoder\.layers\.0\.mlp\.fc1\.weight'.*shape"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "shape.safetensors"})

    dtype = dict(good, **{"pre_layrnorm.bias": good["pre_layrnorm.bias"].half()})
    save_file(dtype, str(tmp_path / "dtype.safetensors"))
    with pytest.raises(ValueError, match=r"dtype\.safetensors.*'pre_layrnorm\.bias'.*dtype"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "dtype.safetensors"})

    missing = {k: v for k, v in good.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"'encoder\.layers\.1\.mlp\.fc2\.bias'.*missing"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "missing.safetensors"})

    extra = dict(good, **{"encoder.layers.0.lora_A": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors.*'encoder\.layers\.0\.lora_A'.*not in the base"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "extra.safetensors"})

    nan = dict(good)
    nan["encoder.layers.1.self_attn.v_proj.weight"] = good["encoder.layers.1.self_attn.v_proj.weight"].clone()
    nan["encoder.layers.1.self_attn.v_proj.weight"][3, 4] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"nan\.safetensors.*'encoder\.layers\.1\.self_attn\.v_proj\.weight'.*NaN"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "nan.safetensors"})
    # the finite check can be skipped, the structural checks cannot
    assert ExpertPool(zoo["base"], {"mnist": tmp_path / "nan.safetensors"}, check_finite=False).tasks == ["mnist"]
    with pytest.raises(ValueError, match="unknown task 'svhn'"):
        ExpertPool(zoo["base"], {"mnist": tmp_path / "nan.safetensors"}, check_finite=False).expert_block("svhn", "x.")


def test_pickles_load_weights_only_and_full_unpickling_needs_opt_in(zoo, tmp_path):
    plain = tmp_path / "plain.bin"
    torch.save(_sd(zoo["experts"]["mnist"]), plain)
    pool = ExpertPool(zoo["base"], {"mnist": plain})  # tensors only: torch.load(weights_only=True) is fine
    assert torch.equal(pool.expert_block("mnist", "encoder.layers.0.")["mlp.fc1.weight"],
                       zoo["experts"]["mnist"].encoder.layers[0].mlp.fc1.weight)

    rigged = tmp_path / "rigged.pt"
    torch.save({"state_dict": _sd(zoo["experts"]["mnist"]), "extra": NotATensor()}, rigged)
    with pytest.raises(ValueError, match=r"rigged\.pt: refused to unpickle.*allow_pickle=True"):
        ExpertPool(zoo["base"], {"mnist": rigged})
    pool = ExpertPool(zoo["base"], {"mnist": rigged}, allow_pickle=True)
    assert set(pool.expert_state_dict("mnist")) == set(zoo["base"].state_dict())


# -- merging through lazy views ----------------------------------------------------------------
class LiveReads:
    """Spy on the pool's tensor reader (WeightFiles.read): every tensor it returns is followed until
    it is garbage. Records reads per (file, key) and, at each read, how many distinct keys and how
    many tensors of each checkpoint are alive; a merge that holds whole experts shows up as many keys."""

    def __init__(self, monkeypatch):
        self.reads = Counter()                  # (source, base key) -> times read
        self.alive: dict[int, tuple[str, str]] = {}
        self.peak_keys, self.peak_alive = 0, Counter()  # source -> most tensors alive at once
        tokens = itertools.count()
        real = WeightFiles.read

        def read(ckpt, key, cache=None):
            t = real(ckpt, key, cache)
            where = (ckpt.source, key.removeprefix("vision_model."))
            self.reads[where] += 1
            token = next(tokens)
            self.alive[token] = where
            weakref.finalize(t, self.alive.pop, token, None)
            self.peak_keys = max(self.peak_keys, len({k for _, k in self.alive.values()}))
            self.peak_alive |= Counter(s for s, _ in self.alive.values())  # |: elementwise max
            return t

        monkeypatch.setattr(WeightFiles, "read", read)

    def reset(self):
        gc.collect()
        self.reads.clear()
        self.peak_keys, self.peak_alive = 0, Counter()

    def peak_per_expert(self) -> int:
        return max(n for source, n in self.peak_alive.items() if "base" not in source)


def _model(seed, dtype, scale=1.0):
    """A small model with an integer buffer, a scalar and several tensor shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (10, 8), "layers.0.attn.weight": (8, 8), "layers.0.attn.bias": (8,),
              "layers.0.mlp.weight": (16, 8), "layers.1.attn.weight": (8, 8), "layers.1.mlp.weight": (16, 8),
              "logit_scale": ()}
    sd = {"embed.position_ids": torch.arange(6).unsqueeze(0)}
    sd.update({k: (scale * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()})
    return sd


def _save_experts(root, base, dtype):
    """Three experts in three layouts: one file, a 'vision_model.'-prefixed file, a sharded folder."""
    experts = {}
    for i, task in enumerate(("mnist", "svhn", "dtd")):
        noise = _model(10 + i, dtype, scale=0.1)
        experts[task] = {k: (v + noise[k]).to(dtype) if v.is_floating_point() else v.clone() for k, v in base.items()}
    save_file(experts["mnist"], str(root / "mnist.safetensors"))
    save_file({"vision_model." + k: v for k, v in experts["svhn"].items()}, str(root / "svhn.safetensors"))
    shards, keys = root / "dtd", sorted(experts["dtd"])
    shards.mkdir()
    halves = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: experts["dtd"][k] for k in ks}, str(shards / name))
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {"mnist": root / "mnist.safetensors", "svhn": root / "svhn.safetensors", "dtd": shards}


MERGERS = [(SimpleAverage(), 1), (TaskArithmetic(0.4), 1), (TiesMerging(0.5, 30, "mean"), 3)]


@pytest.mark.parametrize("base_on_disk", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_merge_equals_loaded_merge_and_reads_one_tensor_at_a_time(tmp_path, monkeypatch, dtype, base_on_disk):
    base = _model(0, dtype)
    paths = _save_experts(tmp_path, base, dtype)
    save_file(base, str(tmp_path / "base.safetensors"))
    pool = ExpertPool(tmp_path / "base.safetensors" if base_on_disk else base, paths)
    float_keys = {k for k, v in base.items() if v.is_floating_point()}
    spy = LiveReads(monkeypatch)

    view = pool.lazy_expert("svhn")  # keys in the base's space, though the file says 'vision_model.'
    assert list(view) == pool.keys() and len(view) == len(base) and "embed.weight" in view
    assert "vision_model.embed.weight" not in view
    assert view.spec("layers.0.mlp.weight") == (torch.Size([16, 8]), dtype)
    assert not spy.reads  # keys, membership and specs come from the headers
    assert torch.equal(view["embed.weight"], load_file(str(paths["svhn"]))["vision_model.embed.weight"])

    # the checks read the integer buffer, nothing else
    spy.reset()
    assert set(check_experts(pool.lazy_base(), {t: pool.lazy_expert(t) for t in pool.tasks})) == float_keys
    assert {k for _, k in spy.reads} == {"embed.position_ids"}

    for merger, reads_per_tensor in MERGERS:
        loaded = merger(pool.base_state_dict(), {t: pool.expert_state_dict(t) for t in pool.tasks})
        spy.reset()
        merged = pool.merge(merger)
        # (a) bit for bit the merge of the loaded state dicts
        assert list(merged) == list(loaded)
        for k in loaded:
            assert merged[k].dtype == loaded[k].dtype and torch.equal(merged[k], loaded[k]), (merger, k)
        # (b) only one key's tensors alive at any time, at most one per expert (two of the base's,
        # for a moment, when a loop reads the next copy before dropping the last)
        assert spy.peak_keys == 1, merger
        assert spy.peak_per_expert() == 1, merger
        assert max(spy.peak_alive.values()) <= 2, merger
        expert_reads = {k: n for (source, k), n in spy.reads.items() if "base" not in source}
        assert set(expert_reads) == set(base)  # every expert tensor was needed ...
        assert max(expert_reads.values()) == reads_per_tensor  # ... and read only per pass

    # the spy is not blind: merging loaded copies of the same views holds every key at once
    spy.reset()
    TaskArithmetic(0.4)(pool.lazy_base(), {t: dict(pool.lazy_expert(t)) for t in pool.tasks})
    assert spy.peak_keys == len(base) and spy.peak_per_expert() == len(base)


def test_lazy_pickle_expert_is_loaded_once_and_merges_the_same(tmp_path, monkeypatch):
    base = _model(0, torch.float32)
    paths = _save_experts(tmp_path, base, torch.float32)
    torch.save(load_file(str(paths["mnist"])), tmp_path / "mnist.bin")
    pool = ExpertPool(base, {"mnist": tmp_path / "mnist.bin", "svhn": paths["svhn"]})
    loads, real = Counter(), WeightFiles._load_pickle

    def counted(ckpt, file):
        loads[file.name] += 1
        return real(ckpt, file)

    monkeypatch.setattr(WeightFiles, "_load_pickle", counted)
    for merger, _ in MERGERS:
        loaded = merger(pool.base_state_dict(), {t: pool.expert_state_dict(t) for t in pool.tasks})
        loads.clear()
        merged = pool.merge(merger)
        assert loads == {"mnist.bin": 1}  # one view per merge, the file loaded once and kept by it
        assert all(torch.equal(merged[k], loaded[k]) for k in loaded)
