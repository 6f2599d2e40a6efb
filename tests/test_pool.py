"""ExpertPool: up-front validation naming file and key, lazy block loading, no silent unpickling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TASKS, tiny_model
from epmq.adapters import CLIPVisionAdapter
from epmq.pool import ExpertPool, match_prefix


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

    prefix = CLIPVisionAdapter().block_prefix(zoo["base"], 1)
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
