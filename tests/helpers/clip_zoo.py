"""A tiny CLIP zoo on disk for the clip suite's tests: a real CLIPModel with a tiny config, its tokenizer
(a character-level CLIP BPE vocabulary written here) and image processor; three experts that differ
in the vision tower, saved three ways; three tiny image datasets saved with save_to_disk.

Nothing is downloaded: every file is written by the tests.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers import families

TASKS = ["shapes", "colors", "sizes"]
CLASSES = {"shapes": ["circle", "square", "triangle"], "colors": ["red", "green", "blue", "yellow"],
           "sizes": ["small", "large"]}
IMAGE = 16  # pixels; the vision tower sees 2 x 2 patches of 8 plus the class token
ROWS = {"train": 24, "test": 12}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tokenizer():
    """A CLIPTokenizer over single characters: every printable ASCII character, alone and as a word's
    last character ("x</w>"), no merges; the special tokens last, so no id is 2 (the legacy eos rule)."""
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=48)


def image_processor():
    """A CLIP image processor for IMAGE x IMAGE inputs, the PIL implementation (no torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


def clip_config(tok):
    from transformers import CLIPConfig

    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=48, **special),
        vision_config=dict(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)


def base_model(seed: int = 0):
    """(CLIPModel, tokenizer, image processor), random weights from `seed`."""
    from transformers import CLIPModel

    tok = tokenizer()
    torch.manual_seed(seed)
    return CLIPModel(clip_config(tok)).eval(), tok, image_processor()


def save_base(root: Path, seed: int = 0):
    """root/base: the CLIPModel with its processor (tokenizer + image processor) via save_pretrained."""
    from transformers import CLIPProcessor

    model, tok, proc = base_model(seed)
    model.save_pretrained(root / "base")
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(root / "base")
    return model


def save_experts(root: Path, base, scale: float = 0.3) -> dict:
    """root/experts/<task>: base's vision tower + a task vector, saved three ways:
    shapes: CLIPVisionModel.save_pretrained (no prefix, transformers 5);
    colors: the same tensors with every key prefixed 'vision_model.' (as transformers 4 saved them);
    sizes: a whole CLIPModel (the base's text tower beside the expert's vision tower).
    Returns task -> the expert's vision tower (a CLIPVisionModel)."""
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPVisionModel

    towers = {}
    for i, task in enumerate(TASKS):
        tower = families.with_task_vector(base.vision_model, CLIPVisionModel(base.config.vision_config),
                                          seed=100 + i, scale=scale)
        towers[task] = tower
        folder = root / "experts" / task
        if task == "shapes":
            tower.save_pretrained(folder)
        elif task == "colors":
            tower.config.save_pretrained(folder)
            save_file({f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
        else:
            whole = CLIPModel(base.config)
            whole.load_state_dict(base.state_dict())
            whole.vision_model.load_state_dict(tower.state_dict())
            whole.save_pretrained(folder)
    return towers


def images(n: int, seed: int, grayscale_every: int = 5) -> list:
    """n random PIL images of 20 x 20 pixels (resized and cropped to IMAGE by the processor); every
    `grayscale_every`-th one grayscale, to exercise the RGB conversion."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        out.append(image.convert("L") if i % grayscale_every == 0 else image)
    return out


def save_datasets(root: Path) -> None:
    """root/data/<task>: DatasetDict {train, test} with an Image column "image" and a ClassLabel "label"."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    for t, task in enumerate(TASKS):
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES[task])})
        splits = {}
        for s, (split, n) in enumerate(ROWS.items()):
            labels = [i % len(CLASSES[task]) for i in range(n)]
            splits[split] = Dataset.from_dict({"image": images(n, seed=10 * t + s), "label": labels}, features=features)
        DatasetDict(splits).save_to_disk(str(root / "data" / task))


def build(root: Path) -> dict:
    """The whole zoo under root; returns {"base": CLIPModel, "towers": task -> expert tower}."""
    base = save_base(root)
    towers = save_experts(root, base)
    save_datasets(root)
    return {"base": base, "towers": towers}
