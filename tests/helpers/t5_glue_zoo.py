"""A tiny FLAN-T5-shaped zoo built in code: a word-level T5 tokenizer, a tiny T5ForConditionalGeneration
base (untied lm_head, as FLAN-T5), experts fine-tuned from it for 60 steps, and GLUE-shaped
datasets (the `datasets` library's GLUE columns and splits) saved with save_to_disk. No downloads.

Synthetic tasks with the GLUE columns, learnable by a 2-layer T5 in seconds:
    sst2  sentence: fillers around one sentiment word; label 1 (positive) for a positive word
    rte   sentence1: four nouns, sentence2: two nouns; label 0 (entailment) when both occur in sentence1
    stsb  sentence1, sentence2: four nouns each; label 5 x (shared nouns / 4), a float
Prompts and targets are FusionBench's (epmq.families.flan_t5.glue), so the experts learn the real label words.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from epmq.families.flan_t5.glue import glue_task

POSITIVE = ["good", "great", "nice", "fine"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLERS = ["the", "movie", "film", "story", "cast", "plot", "was", "is", "very", "quite", "really", "so"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "car", "house", "river", "road", "book", "lamp", "door"]
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5: pad (also the decoder start), eos, unk


def sst2_rows(n: int, rng: random.Random) -> dict:
    rows = {"sentence": [], "label": [], "idx": []}
    for i in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLERS, rng.randrange(3, 6))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows["sentence"].append(" ".join(words))
        rows["label"].append(label)
        rows["idx"].append(i)
    return rows


def rte_rows(n: int, rng: random.Random) -> dict:
    rows = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    for i in range(n):
        text = rng.sample(NOUNS, 4)
        label = rng.randrange(2)  # 0 entailment, 1 not_entailment
        outside = [w for w in NOUNS if w not in text]
        claim = rng.sample(text, 2) if label == 0 else [rng.choice(text), rng.choice(outside)]
        rows["sentence1"].append(" ".join(text))
        rows["sentence2"].append(" ".join(claim))
        rows["label"].append(label)
        rows["idx"].append(i)
    return rows


def stsb_rows(n: int, rng: random.Random) -> dict:
    rows = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    for i in range(n):
        a = rng.sample(NOUNS, 4)
        shared = rng.randrange(5)
        b = rng.sample(a, shared) + rng.sample([w for w in NOUNS if w not in a], 4 - shared)
        rng.shuffle(b)
        rows["sentence1"].append(" ".join(a))
        rows["sentence2"].append(" ".join(b))
        rows["label"].append(5.0 * shared / 4)
        rows["idx"].append(i)
    return rows


MAKERS = {"sst2": sst2_rows, "rte": rte_rows, "stsb": stsb_rows}
FEATURES = {
    "sst2": Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                      "idx": Value("int32")}),
    "rte": Features({"sentence1": Value("string"), "sentence2": Value("string"),
                     "label": ClassLabel(names=["entailment", "not_entailment"]), "idx": Value("int32")}),
    "stsb": Features({"sentence1": Value("string"), "sentence2": Value("string"), "label": Value("float32"),
                      "idx": Value("int32")}),
}


def glue_like(task: str, seed: int = 0, train: int = 96, validation: int = 40) -> DatasetDict:
    """A GLUE-shaped DatasetDict (train, validation) of `task` with the library's columns and features."""
    rng = random.Random(f"{task}/{seed}")
    return DatasetDict({split: Dataset.from_dict(MAKERS[task](n, rng), features=FEATURES[task])
                        for split, n in (("train", train), ("validation", validation))})


def word_tokenizer(datasets: dict[str, DatasetDict]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every rendered prompt and target (whitespace-split words), with T5's
    special tokens and an </s> appended to every sequence, as T5's tokenizer does."""
    texts = []
    for task, dd in datasets.items():
        for split in dd.values():
            for example in split:
                texts += list(glue_task(task).render(example))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    """A 2+2-block T5 (width 32) with its own lm_head, as FLAN-T5 (T5 v1.1) has."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, tie_word_embeddings=False))
    if model.lm_head.weight is model.shared.weight:  # transformers 5 ties it whatever the config says
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    return model.eval()


def encode(tokenizer, task: str, split, limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    rows = split if limit is None else split.select(range(min(limit, len(split))))
    pairs = [glue_task(task).render(example) for example in rows]
    return [(tokenizer(p).input_ids, tokenizer(t).input_ids) for p, t in pairs]


def fine_tune(base: T5ForConditionalGeneration, tokenizer, task: str, train, steps: int = 60,
              lr: float = 5e-3, batch_size: int = 16, seed: int = 0) -> T5ForConditionalGeneration:
    """A copy of `base` fine-tuned on the task's rendered train rows (AdamW, teacher forcing)."""
    model = tiny_t5(base.config.vocab_size)
    model.load_state_dict(base.state_dict())
    pairs = encode(tokenizer, task, train)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = [pairs[i] for i in torch.randint(len(pairs), (batch_size,), generator=gen).tolist()]
        ids = nn.utils.rnn.pad_sequence([torch.tensor(p) for p, _ in batch], batch_first=True, padding_value=0)
        labels = nn.utils.rnn.pad_sequence([torch.tensor(t) for _, t in batch], batch_first=True, padding_value=-100)
        loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def build_zoo(root: Path, tasks=("sst2", "rte", "stsb"), steps: int = 60) -> dict:
    """base/ (model + tokenizer), one folder per expert, data/<task> (save_to_disk). Returns the paths,
    the tokenizer and the models."""
    root = Path(root)
    datasets = {t: glue_like(t) for t in tasks}
    tokenizer = word_tokenizer(datasets)
    base = tiny_t5(len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    experts = {}
    for k, task in enumerate(tasks):
        datasets[task].save_to_disk(str(root / "data" / task))
        experts[task] = fine_tune(base, tokenizer, task, datasets[task]["train"], steps=steps, seed=k)
        experts[task].save_pretrained(root / "experts" / task)
    return {"root": root, "base": root / "base", "experts": str(root / "experts" / "{task}"),
            "data": root / "data", "tokenizer": tokenizer, "base_model": base, "expert_models": experts,
            "datasets": datasets}
