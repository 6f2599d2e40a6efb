"""A tiny Llama world on disk: a word-level tokenizer, a 2-layer LlamaForCausalLM base, two experts
fine-tuned from it for a few steps on their own texts (saved as sharded safetensors), and one text
dataset per task saved with save_to_disk; and a smaller world (base with the tokenizer, two experts) of every
declared decoder type."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from epmq.families.causal_lm.adapter import LlamaAdapter

from helpers.families import FAMILIES, Family, decoder_model, llama_batches

WORDS = ("the a cat dog sat ran on under mat log big small red blue one two three four five six "
         "seven eight nine ten plus minus equals sum code loop if else return print").split()
TEXTS = {
    "alpha": [" ".join(WORDS[(i * 3 + k) % 12] for k in range(7 + i % 5)) for i in range(60)],
    "beta": [" ".join(WORDS[12 + (i * 5 + k) % 22] for k in range(6 + i % 7)) for i in range(60)],
}
SEQ_LEN = 12


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def fine_tuned(base: LlamaForCausalLM, texts: list[str], steps: int = 30) -> LlamaForCausalLM:
    """A copy of base trained a few steps on next-token prediction over `texts`: a real expert."""
    tok = tiny_tokenizer()
    stream = [i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    windows = torch.tensor(stream[: len(stream) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    expert = FAMILIES["llama"].base()
    expert.load_state_dict(base.state_dict())
    expert.train()
    opt = torch.optim.AdamW(expert.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (8,), generator=gen)]
        loss = expert(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return expert.eval()


def build(root: Path) -> Path:
    """base/ (with its tokenizer), two experts saved as sharded safetensors, a text dataset per task
    (<task>_text/), under root; returns root."""
    root = Path(root)
    family = FAMILIES["llama"]
    base = family.base()
    base.save_pretrained(root / "base", max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(root / "base")
    for t, task in enumerate(TEXTS):
        fine_tuned(base, TEXTS[task][:45]).save_pretrained(root / task, max_shard_size="40KB")
        texts = TEXTS[task]
        DatasetDict({"train": Dataset.from_dict({"text": texts[:45]}),
                     "test": Dataset.from_dict({"text": texts[45:]})}).save_to_disk(str(root / f"{task}_text"))
    assert (root / "alpha" / "model.safetensors.index.json").is_file()  # really sharded
    return root


def decoder_zoo(model_type: str, root: Path) -> Path:
    """A tiny world of any declared decoder type (helpers.families.DECODERS): base/ with the tokenizer, and the
    experts alpha/ and beta/ (base + small task vectors), under root; returns root."""
    root = Path(root)
    family = Family(model_type, lambda: decoder_model(model_type), llama_batches, LlamaAdapter())
    family.save_zoo(root)
    tiny_tokenizer().save_pretrained(root / "base")
    return root
