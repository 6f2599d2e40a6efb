"""open_clip ViT towers in the HF CLIPVisionModel layout (epmq.families.clip.openclip), checked against an independent
reference forward of open_clip's architecture (tests/helpers/openclip_reference.py), without open_clip."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import CLIPVisionModel

from epmq.families.clip import openclip
from epmq.families.clip.suite import no_init_weights
from epmq.io.pool import ExpertPool

from helpers import openclip_reference as ref


def hf_tower(state: dict, **config_options) -> tuple[CLIPVisionModel, torch.Tensor | None]:
    tower, projection = openclip.convert(state)
    with no_init_weights():  # every weight is loaded next (a ViT-B/32's random init costs seconds)
        model = CLIPVisionModel(openclip.vision_config(tower, projection, **config_options)).eval()
    model.load_state_dict(tower, strict=True)  # every HF key filled, no key left over
    return model, projection


def test_vit_b32_every_key_maps_and_outputs_match_the_reference_forward():
    shapes = ref.vit_b32_shapes()
    visual = ref.random_tower(shapes, seed=0)
    # the task-vectors release's ImageEncoder layout: the tower under model.visual., text-side keys beside it
    state = {f"model.visual.{k}": v for k, v in visual.items()}
    state |= {k: torch.zeros(s) for k, s in ref.IMAGE_ENCODER_TEXT_SIDE.items()}
    model, projection = hf_tower(state)

    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
            config.image_size, config.intermediate_size, config.projection_dim) == (768, 12, 12, 32, 224, 3072, 512)
    # every tower weight went somewhere: the HF tower plus the projection hold exactly as many numbers
    assert sum(p.numel() for p in model.state_dict().values()) + projection.numel() == \
        sum(v.numel() for v in visual.values())

    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens, pooled, features = ref.forward(visual, images, heads=ref.VIT_B32_HEADS)
    with torch.no_grad():
        out = model(pixel_values=images)
    torch.testing.assert_close(out.last_hidden_state, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output @ projection.t(), features, rtol=1e-5, atol=1e-5)


def test_saved_folder_loads_in_transformers_and_in_the_pool(tmp_path):
    visual = ref.random_tower(ref.tower_shapes(width=32, layers=2, patch=8, grid=2, mlp=64, embed=16), seed=2)
    out = openclip.save_pretrained({f"visual.{k}": v for k, v in visual.items()}, tmp_path / "expert",
                                   head_width=8)
    loaded = CLIPVisionModel.from_pretrained(str(out)).eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    _, pooled, _ = ref.forward(visual, images, heads=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=images).pooler_output, pooled, rtol=1e-5, atol=1e-5)
    assert (out / openclip.PROJECTION_FILE).is_file()
    pool = ExpertPool(loaded, {"t": out})
    assert pool.expert_state_dict("t").keys() == loaded.state_dict().keys()
    assert not list(tmp_path.glob(".expert.*"))  # the temporary folder was renamed into place


def test_unknown_or_missing_keys_are_refused_by_name():
    visual = ref.random_tower(ref.tower_shapes(width=32, layers=1, patch=8, grid=2, mlp=64, embed=16))
    extra = visual | {"transformer.resblocks.0.ls_1.gamma": torch.ones(32)}  # a LayerScale variant
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.ls_1\.gamma"):
        openclip.convert(extra)
    lacking = {k: v for k, v in visual.items() if k != "ln_post.bias"}
    with pytest.raises(ValueError, match="post_layernorm.bias"):
        openclip.convert(lacking)
    with pytest.raises(ValueError, match="no open_clip ViT visual tower"):
        openclip.convert({"encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)})


class PickledEncoder(torch.nn.Module):
    """Stands in for the release's pickled ImageEncoder: a whole module, not a state dict."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)


def test_pickled_modules_need_allow_pickle_and_open_clip(tmp_path):
    path = tmp_path / "finetuned.pt"
    torch.save(PickledEncoder(), path)
    with pytest.raises(ValueError, match="allow_pickle") as refused:
        openclip.load_state(path)
    assert str(path) in str(refused.value)
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(ValueError, match="open_clip"):
            openclip.load_state(path, allow_pickle=True)
    # a plain state dict loads with weights_only, no opt-in needed
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "state.pt")
    assert set(openclip.load_state(tmp_path / "state.pt")) == {"visual.conv1.weight"}
