"""suite=causal_lm end to end on a tiny LlamaForCausalLM: sharded experts, two text tasks, true-sequential
E-PMQ, perplexity that equals exp(mean token NLL) computed here independently."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from epmq.jobs.run import run
from epmq.jobs.steps import prepare

from helpers import llm_world
from helpers.config import ROOT, make_cfg
from helpers.llm_world import SEQ_LEN, TEXTS, tiny_tokenizer
from helpers.staged import choice_is_plain_epmq


@pytest.fixture(scope="module")
def llm_zoo(tmp_path_factory):
    return llm_world.build(tmp_path_factory.mktemp("llm"))


def options(root, *extra):
    return ["suite=causal_lm", f"suite.base={root / 'base'}",
            f"suite.experts={{alpha: {root / 'alpha'}, beta: {root / 'beta'}}}",
            f"suite.datasets={{alpha: {root / 'alpha_text'}, beta: {root / 'beta_text'}}}",
            f"suite.seq_len={SEQ_LEN}", "data.calib_samples=6", "data.select_samples=2", "data.test_samples=4",
            "data.batch_size=3", "quant.bits=3", "quant.group_size=16", *extra]


def reference_windows(task: str, protocol: str, n: int = 4) -> torch.Tensor:
    """The first n held-out windows (n, SEQ_LEN) of a task, cut here from its texts by the protocol."""
    tok = tiny_tokenizer()
    texts = TEXTS[task][45:]
    if protocol == "gptq":
        stream = tok("\n\n".join(texts))["input_ids"]
    else:
        stream = [i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    return torch.tensor(stream[: n * SEQ_LEN]).view(n, SEQ_LEN)


def independent_perplexity(model_dir, task: str, protocol: str = "gptq") -> float:
    """exp(mean NLL) of the expert's next-token predictions on the task's first four held-out windows, computed
    from the texts here. gptq: the GPTQ reference's protocol (datautils.get_wikitext2 and its eval loop): the
    test texts joined with "\n\n", tokenised once with special tokens, cut into SEQ_LEN windows; packed: each
    text tokenised alone, EOS after each."""
    windows = reference_windows(task, protocol)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    nlls = []
    with torch.no_grad():
        for window in windows:  # one window at a time, as the reference loops
            logits = model(input_ids=window[None]).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], window[1:]))
    return math.exp(torch.stack(nlls).mean().item())


def test_true_sequential_epmq_and_perplexity_of_every_model(llm_zoo, zoo_cache, tmp_path, capsys):
    report = run(make_cfg(tmp_path, zoo_cache, *options(llm_zoo, "quant.strength=1.0", "quant.form=output")))
    assert "perplexity, lower is better; avg: the mean over tasks" in capsys.readouterr().out
    assert report["metric"] == "perplexity" and report["suite"]["higher_is_better"] is False
    metrics = report["metrics"]
    for model in ("experts", "merged", "quantized"):
        assert set(metrics[model]) == {"alpha", "beta", "avg"}
        assert all(v > 1 for v in metrics[model].values())
        assert metrics[model]["avg"] == pytest.approx((metrics[model]["alpha"] + metrics[model]["beta"]) / 2)
    for task in ("alpha", "beta"):  # the reported perplexity is the GPTQ reference's, computed independently
        assert metrics["experts"][task] == pytest.approx(independent_perplexity(llm_zoo / task, task), rel=1e-4)
        assert metrics["experts"][task] < metrics["merged"][task]  # each expert knows its own text best
    # true-sequential by default for this family: four steps (q/k/v, o, gate/up, down) per decoder layer
    steps = json.loads((tmp_path / "calibration" / "epmq" / "output" / "strength_1" / "progress.json").read_text())
    assert [s["layers"][0].rsplit(".", 1)[-1] for s in steps["steps"][:4]] == ["q_proj", "o_proj", "gate_proj", "down_proj"]
    assert len(steps["steps"]) == 8  # two layers
    assert report["calibration"][0]["layers"]["self_attn.q_proj"]["anchor_shift"] > 0
    # the family deploys symmetric grids by default, saved as the v1 layout every GPTQ client reads
    assert report["quant"]["spec"]["sym"] is True and report["config"]["quant"]["sym"] is True
    saved = json.loads((tmp_path / "quantized_model" / "quantize_config.json").read_text())
    assert (saved["sym"], saved["checkpoint_format"]) == (True, "gptq")
    # a GPTQ client needs the tokenizer beside the weights: the folder holds it, and it tokenizes as the suite's
    from transformers import AutoTokenizer

    folder, text = tmp_path / "quantized_model", "the quick brown fox"
    assert (folder / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(llm_zoo / "base"))(text)["input_ids"]


def test_block_choice_scores_each_true_sequential_step_by_the_selection_perplexity(llm_zoo, zoo_cache, tmp_path):
    cfg = make_cfg(tmp_path, zoo_cache, *options(llm_zoo, "anchor.select=block", "quant.form=output",
                                                 "anchor.candidates.strength=[0.0,.inf]", "evaluate_references=false"))
    prepared = prepare(cfg)
    experts = {t: LlamaForCausalLM.from_pretrained(llm_zoo / t).eval() for t in ("alpha", "beta")}
    evaluator = prepared.suite.evaluator(experts, "check")  # each task's own expert
    expected = [math.log(independent_perplexity(llm_zoo / t, t)) for t in prepared.suite.tasks]
    # the loss a candidate is scored by: the mean over tasks of the mean token NLL (log perplexity)
    assert evaluator.mean_loss(prepared.data.test_dataloader(), torch.device("cpu")) == pytest.approx(
        sum(expected) / 2, rel=1e-4)
    report = run(cfg)
    strengths = report["quant"]["layer_strengths"]
    assert report["quant"]["select"] == "block" and len(strengths) == 14  # 7 linears in each of 2 layers
    assert set(strengths.values()) <= {0.0, math.inf}
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):  # one choice per true-sequential step
        for layer in (0, 1):
            assert len({v for k, v in strengths.items() if f"layers.{layer}." in k and k.rsplit(".", 1)[-1] in group}) == 1


def test_the_staged_choice_runs_true_sequentially_and_keeps_plain_epmq(llm_zoo, zoo_cache, tmp_path):
    cfg = make_cfg(tmp_path, zoo_cache, *options(llm_zoo, "anchor.select=staged", "quant.form=output",
                                                 "anchor.candidates.strength=[0.0,1.0,.inf]",
                                                 "anchor.rounds=[{fidelity: open_loop, keep: 2}]"))
    strength, (record,) = choice_is_plain_epmq(cfg, tmp_path)
    assert len(record["scores"]) == 3 and f"epmq/output/strength_{strength:g}" in record["kept"]


@pytest.mark.parametrize("protocol", ["gptq", "packed"])
def test_held_out_windows_follow_the_perplexity_protocol(llm_zoo, zoo_cache, tmp_path, protocol):
    cfg = make_cfg(tmp_path, zoo_cache, *options(llm_zoo, f"suite.perplexity={protocol}"))
    data = prepare(cfg).data
    assert torch.equal(data._test[1].ids, reference_windows("beta", protocol))
    other = reference_windows("beta", "packed" if protocol == "gptq" else "gptq")
    assert not torch.equal(data._test[1].ids, other)  # the two protocols cut different windows here


def test_bad_causal_lm_options_are_refused_by_name(llm_zoo, zoo_cache, tmp_path):
    for override, match in (("suite.dtype=int8", "suite.dtype"), ("suite.text_columns=body", "text column 'body'"),
                            ("suite.perplexity=wikitext", "suite.perplexity must be one of"),
                            (f"suite.base={llm_zoo / 'nowhere'}", "does not exist"),
                            ("suite.seq_len=4096", "gives 0 windows of suite.seq_len = 4096 tokens, fewer than "
                                                   "data.calib_samples")):
        with pytest.raises(ValueError, match=match):
            run(make_cfg(tmp_path, zoo_cache, *options(llm_zoo, override)))


@pytest.mark.slow
def test_train_py_runs_the_causal_lm_suite(llm_zoo, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *options(llm_zoo, "quant=gptq"), "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metric"] == "perplexity" and report["metrics"]["quantized"]["avg"] > 1


def test_lm_eval_tasks_are_skipped_with_a_warning_without_lm_eval(llm_zoo, caplog):
    import importlib.util

    from epmq.families.causal_lm.suite import CausalLMSuite

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    suite = CausalLMSuite(str(llm_zoo / "base"), {"alpha": str(llm_zoo / "alpha")},
                          datasets=str(llm_zoo / "alpha_text"), lm_eval_tasks=["hellaswag"])
    assert suite.extra_evaluation(suite.model()) == {}
    assert "lm-eval is not installed" in caplog.text


def test_choosing_by_the_metric_takes_the_lowest_perplexity():
    from epmq.core.anchor_choice import selection_key

    candidates = [{"select_avg_acc": ppl, "select_avg_nll": math.log(ppl)} for ppl in (9.0, 7.5, 8.2)]
    by_metric = max(candidates, key=lambda s: selection_key(s, "acc", higher_is_better=False))
    by_nll = max(candidates, key=lambda s: selection_key(s, "nll"))
    assert by_metric is by_nll is candidates[1]
