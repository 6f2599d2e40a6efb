"""A CLIP zoo on disk for the clip suite's tests: a real CLIPModel with a tiny config (or ViT-B/32's shapes,
for the benchmarks), its tokenizer (a character-level CLIP BPE vocabulary written here) and image processor;
experts that differ in the vision tower, saved three ways; image datasets saved with save_to_disk.

Nothing is downloaded: every file is written by the tests.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import families

TASKS = ["shapes", "colors", "sizes"]
CLASSES = {"shapes": ["circle", "square", "triangle"], "colors": ["red", "green", "blue", "yellow"],
           "sizes": ["small", "large"]}
ROWS = {"train": 24, "test": 12}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class Shape:
    """The towers' sizes, the processor's input side and the stored images' side (pixels)."""
    image: int = 16          # the vision tower sees 2 x 2 patches of 8 plus the class token
    patch: int = 8
    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    text_hidden: int = 32
    text_intermediate: int = 64
    text_layers: int = 2
    text_heads: int = 4
    projection: int = 16
    stored: int = 20         # side of the dataset's images, resized and cropped to `image`


TINY = Shape()
B32 = Shape(image=224, patch=32, hidden=768, intermediate=3072, layers=12, heads=12, text_hidden=512,
            text_intermediate=2048, text_layers=12, text_heads=8, projection=512, stored=256)
IMAGE = TINY.image


def tokenizer(max_length: int = 48):
    """A CLIPTokenizer over single characters: every printable ASCII character, alone and as a word's
    last character ("x</w>"), no merges; the special tokens last, so no id is 2 (the legacy eos rule)."""
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def image_processor(side: int = IMAGE):
    """A CLIP image processor for side x side inputs, the PIL implementation (no torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def clip_config(tok, shape: Shape = TINY):
    from transformers import CLIPConfig

    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
                         num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                         max_position_embeddings=tok.model_max_length, **special),
        vision_config=dict(image_size=shape.image, patch_size=shape.patch, num_channels=3, hidden_size=shape.hidden,
                           intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                           num_attention_heads=shape.heads),
        projection_dim=shape.projection)


def base_model(seed: int = 0, shape: Shape = TINY):
    """(CLIPModel, tokenizer, image processor), random weights from `seed`."""
    from transformers import CLIPModel

    tok = tokenizer(48 if shape == TINY else 77)
    torch.manual_seed(seed)
    return CLIPModel(clip_config(tok, shape)).eval(), tok, image_processor(shape.image)


def save_base(root: Path, seed: int = 0, shape: Shape = TINY):
    """root/base: the CLIPModel with its processor (tokenizer + image processor) via save_pretrained."""
    from transformers import CLIPProcessor

    model, tok, proc = base_model(seed, shape)
    model.save_pretrained(root / "base")
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(root / "base")
    return model


LAYOUTS = ("plain", "prefixed", "whole")


def save_experts(root: Path, base, scale: float = 0.3, tasks=TASKS, layout: str | None = None) -> dict:
    """root/experts/<task>: base's vision tower + a task vector, saved three ways (`layout`; None: task k
    the k-th way, cyclically):
    plain (shapes): CLIPVisionModel.save_pretrained (no prefix, transformers 5);
    prefixed (colors): the same tensors with every key prefixed 'vision_model.' (as transformers 4 saved
        them, and as FusionBench's experts are on the hub);
    whole (sizes): a whole CLIPModel (the base's text tower beside the expert's vision tower).
    Returns task -> the expert's vision tower (a CLIPVisionModel) when it is tiny (TINY), else {}."""
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPVisionModel

    towers = {}
    keep = base.config.vision_config.hidden_size <= TINY.hidden
    for i, task in enumerate(tasks):
        tower = families.with_task_vector(base.vision_model, CLIPVisionModel(base.config.vision_config),
                                          seed=100 + i, scale=scale)
        if keep:
            towers[task] = tower
        folder = root / "experts" / task
        way = layout or LAYOUTS[i % len(LAYOUTS)]
        if way == "plain":
            tower.save_pretrained(folder)
        elif way == "prefixed":
            tower.config.save_pretrained(folder)
            save_file({f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
        else:
            whole = CLIPModel(base.config)
            whole.load_state_dict(base.state_dict())
            whole.vision_model.load_state_dict(tower.state_dict())
            whole.save_pretrained(folder)
    return towers


def images(n: int, seed: int, grayscale_every: int = 5, side: int = TINY.stored) -> list:
    """n random PIL images of side x side pixels (resized and cropped by the processor); every
    `grayscale_every`-th one grayscale, to exercise the RGB conversion."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        out.append(image.convert("L") if i % grayscale_every == 0 else image)
    return out


def save_datasets(root: Path, classes=CLASSES, rows=ROWS, side: int = TINY.stored) -> None:
    """root/data/<task>: DatasetDict {train, test} with an Image column "image" and a ClassLabel "label"."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    for t, (task, names) in enumerate(classes.items()):
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
        splits = {}
        for s, (split, n) in enumerate(rows.items()):
            labels = [i % len(names) for i in range(n)]
            splits[split] = Dataset.from_dict({"image": images(n, seed=10 * t + s, side=side), "label": labels},
                                              features=features)
        DatasetDict(splits).save_to_disk(str(root / "data" / task))


def build(root: Path, shape: Shape = TINY, classes=CLASSES, rows=ROWS, layout: str | None = None) -> dict:
    """The whole zoo under root, one task per entry of `classes` (task -> class names); returns
    {"base": CLIPModel, "towers": task -> expert tower (TINY only)}."""
    base = save_base(root, shape=shape)
    towers = save_experts(root, base, tasks=list(classes), layout=layout)
    save_datasets(root, classes, rows, shape.stored)
    return {"base": base, "towers": towers}
