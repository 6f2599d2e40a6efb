"""Quantizing one causal LM without base or experts (merge=none suite.merged=DIR quant=gptq), from calibration
text in the forms GPTQModel users bring: a .txt file, a .jsonl file (a text field or chat messages), a list of
strings in the config, a dataset."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from epmq import load_quantized
from epmq.families.causal_lm.data import token_windows
from epmq.families.causal_lm.suite import CausalLMSuite
from epmq.jobs.run import run

from helpers.config import make_cfg
from helpers.families import FAMILIES
from helpers.llm_world import SEQ_LEN, TEXTS, tiny_tokenizer

TEXT = TEXTS["alpha"]
# roles as words the tiny tokenizer knows, so that the rendering shows in the tokens
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}one {% else %}two {% endif %}{{ m['content'] }} " \
                "{% endfor %}"
CALIB = 4  # windows of SEQ_LEN tokens


def conversation(k: int) -> list[dict]:
    return [{"role": "user", "content": TEXT[2 * k]}, {"role": "assistant", "content": TEXT[2 * k + 1]}]


def rendered(k: int) -> str:
    """conversation(k) as CHAT_TEMPLATE renders it, written out here by hand."""
    return f"one {TEXT[2 * k]} two {TEXT[2 * k + 1]} "


@pytest.fixture(scope="module")
def one_model(tmp_path_factory):
    """A tiny Llama saved with its tokenizer (with a chat template), and its calibration text in every form."""
    root = tmp_path_factory.mktemp("one_model")
    FAMILIES["llama"].base().save_pretrained(root / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n".join(TEXT[:45]) + "\n\n")  # a blank line is no sample
    (root / "calib.jsonl").write_text("".join(json.dumps({"body": t, "id": k}) + "\n" for k, t in enumerate(TEXT[:45])))
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": conversation(k)}) + "\n" for k in range(22)))
    (root / "chat.txt").write_text("\n".join(rendered(k) for k in range(22)))
    DatasetDict({"train": Dataset.from_dict({"text": TEXT[:45]}),
                 "test": Dataset.from_dict({"text": TEXT[45:]})}).save_to_disk(str(root / "text"))
    return root


def one_model_cfg(root, out, datasets: str, *extra):
    return make_cfg(out, out / "unused_zoo", "suite=causal_lm", "merge=none", f"suite.merged={root / 'model'}",
                    "quant=gptq", f"suite.datasets={datasets}", f"suite.seq_len={SEQ_LEN}", "quant.bits=4",
                    "quant.group_size=16", f"data.calib_samples={CALIB}", "data.batch_size=4", "data.test_samples=4",
                    "calibration.true_sequential=false", *extra)


def perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over the windows (n, SEQ_LEN), one window at a time."""
    with torch.no_grad():
        nll = [F.cross_entropy(model(input_ids=w[None]).logits[0, :-1].float(), w[1:]) for w in windows]
    return math.exp(torch.stack(nll).mean().item())


def calibration_windows(root, datasets, column: str = "text") -> torch.Tensor:
    suite = CausalLMSuite(merged=str(root / "model"), datasets=datasets, text_columns=column, seq_len=SEQ_LEN)
    data = suite.datamodule(calib_samples=CALIB, select_samples=0, batch_size=4)
    data.setup()
    return data._calib[0].ids


@pytest.mark.parametrize("form", ["chat", "dataset", *(pytest.param(f, marks=pytest.mark.slow)
                                                           for f in ("txt", "jsonl", "list"))])
def test_one_model_is_quantized_from_each_form_of_calibration_text(one_model, tmp_path, caplog, form):
    """The same job from each form (test_text_forms_cut_the_same_windows: they calibrate on the same windows)."""
    datasets, extra = {"chat": (one_model / "chat.jsonl", ()), "txt": (one_model / "calib.txt", ()),
                       "jsonl": (one_model / "calib.jsonl", ("suite.text_columns=body",)),
                       "list": ("[" + ", ".join(f"'{t}'" for t in TEXT[:12]) + "]", ()),
                       "dataset": (one_model / "text", ())}[form]
    with caplog.at_level(logging.INFO):
        report = run(one_model_cfg(one_model, tmp_path, datasets, *extra))
    assert report["suite"]["tasks"] == ["calibration"] and report["suite"]["base"] is None
    assert "experts" not in report["metrics"] and "merged" not in report["metrics"]  # references only when asked
    assert "no selection samples drawn (data.select_samples=8 unused)" in caplog.text
    # the folder a GPTQ client loads: the tokenizer (with its chat template) beside the weights
    folder = tmp_path / "quantized_model"
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template == CHAT_TEMPLATE
    quantized = load_quantized(folder)
    if form == "dataset":  # held-out text: the quantized model's perplexity, as the reloaded model scores it
        windows = torch.tensor(tiny_tokenizer()("\n\n".join(TEXT[45:]))["input_ids"][: 4 * SEQ_LEN]).view(4, SEQ_LEN)
        assert report["objective"] == report["metrics"]["quantized"]["calibration"] > 1
        assert report["objective"] == pytest.approx(perplexity(quantized, windows), rel=1e-4)
    else:  # calibration text alone: nothing to score on, said so
        assert report["metrics"] == {} and report["objective"] is None
        assert "no held-out samples in the data" in caplog.text
        assert json.loads((tmp_path / "report.json").read_text())["objective"] is None


@pytest.mark.slow  # a second run with held-out text: 3 s
def test_references_are_the_fp_model_when_asked(one_model, tmp_path):
    report = run(one_model_cfg(one_model, tmp_path, one_model / "text", "evaluate_references=true",
                               "save_model=false"))
    assert set(report["metrics"]) == {"merged", "quantized"}
    assert report["metrics"]["merged"]["avg"] > 1 and report["metrics"]["quantized"]["avg"] > 1


def test_text_forms_cut_the_same_windows(one_model):
    """The calibration windows: the samples in a seeded order, joined with EOS, cut every SEQ_LEN tokens; a
    chat-messages JSONL gives exactly the windows of its conversations rendered by the template."""
    txt = calibration_windows(one_model, str(one_model / "calib.txt"))
    assert torch.equal(txt, calibration_windows(one_model, str(one_model / "calib.jsonl"), "body"))
    assert torch.equal(txt, calibration_windows(one_model, TEXT[:45]))
    assert torch.equal(txt, calibration_windows(one_model, str(one_model / "text")))
    chat = calibration_windows(one_model, str(one_model / "chat.jsonl"))
    assert torch.equal(chat, calibration_windows(one_model, str(one_model / "chat.txt")))
    tok = tiny_tokenizer()
    one, two = tok.convert_tokens_to_ids(["one", "two"])
    assert (chat == one).any() and (chat == two).any()  # the roles' markers are in the windows
    every = token_windows(TEXT[:45], tok, SEQ_LEN, 1000, torch.arange(45)).flatten().tolist()
    assert one not in every and two not in every  # and in no window of the plain text


def test_unreadable_text_is_refused_by_file_and_line(one_model):
    (one_model / "calib.csv").write_text("text\nthe cat sat\n")
    (one_model / "broken.jsonl").write_text('{"text": "the cat"}\n\n{"text": "a dog"}\n{"body": "sat on"}\n')
    (one_model / "plain.jsonl").write_text('{"text": "the cat"}\n[1, 2]\n')
    for datasets, match in (
        (one_model / "broken.jsonl",
         r"broken\.jsonl: line 4: no field 'text' \(suite\.text_columns\) and no chat 'messages'"),
        (one_model / "plain.jsonl", r"plain\.jsonl: line 2 must be a JSON object, got a list"),
        (one_model / "calib.csv", r"calib\.csv: unsupported file type '\.csv'"),
        (one_model / "absent.txt", r"'.*absent\.txt' does not exist"),
        (["the cat sat on the mat"],
         r"^task 'calibration': the list of samples in suite\.datasets \(1\) gives 0 windows of suite\.seq_len = 12 "
         r"tokens, fewer than data\.calib_samples = 4$"),
    ):
        with pytest.raises(ValueError, match=match):
            calibration_windows(one_model, datasets if isinstance(datasets, list) else str(datasets))


def test_missing_models_and_unusable_options_are_named(one_model, tmp_path):
    model, text = f"suite.merged={one_model / 'model'}", one_model / "calib.txt"
    for overrides, match in (
        (("merge=none", "quant=gptq"), r"^suite\.merged is not set: give the model to quantize"),
        (("merge=none", "quant=epmq", model), r"^suite\.experts is not set: E-PMQ needs the experts"),
        (("merge=task_arithmetic", "quant=gptq", model), r"^suite\.base and suite\.experts are not set: merge"),
        (("merge=none", "quant=gptq", model, "evaluate_references=true"),
         r"^evaluate_references=true needs held-out samples"),
    ):
        cfg = make_cfg(tmp_path, tmp_path / "unused_zoo", "suite=causal_lm", f"suite.seq_len={SEQ_LEN}",
                       f"suite.datasets={text}", *overrides)
        with pytest.raises(ValueError, match=match):
            run(cfg)
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "fingerprint.json").exists()
