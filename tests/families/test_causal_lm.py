"""suite=causal_lm end to end on a tiny LlamaForCausalLM: sharded experts, two text tasks, true-sequential
E-PMQ, perplexity that equals exp(mean token NLL) computed here independently; and every declared model type
(epmq.families.causal_lm.architectures) merged, calibrated with GPTQ, exported and reloaded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from epmq import load_quantized
from epmq.core.merge import task_arithmetic
from epmq.engine.calibration import BlockwiseCalibration
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.causal_lm.architectures import ARCHITECTURES
from epmq.families.causal_lm.suite import CausalLMSuite
from epmq.io.export import save_quantized
from epmq.io.load import QuantLinear
from epmq.io.pool import ExpertPool
from epmq.jobs.run import run
from epmq.jobs.steps import prepare

from helpers import llm_world
from helpers.config import ROOT, make_cfg
from helpers.families import DECODERS, llama_batches, loader
from helpers.llm_world import SEQ_LEN, TEXTS, decoder_zoo, tiny_tokenizer
from helpers.staged import choice_is_plain_epmq
from helpers.tiny import SPEC, solver, trainer_for


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


# -- every declared model type: merged, calibrated with GPTQ through the engine, exported, reloaded ------------
def test_every_declared_type_has_a_tiny_model_here():
    assert set(DECODERS) == set(ARCHITECTURES)


def grid_levels(weight: torch.Tensor, group_size: int) -> int:
    """The most distinct values in one (row, group of group_size inputs) of `weight` (out, in)."""
    groups = weight.reshape(weight.shape[0], -1, group_size).flatten(0, 1)
    return max(len(torch.unique(g)) for g in groups)


@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_each_declared_type_is_merged_calibrated_exported_and_reloaded(model_type, tmp_path):
    root = decoder_zoo(model_type, tmp_path)
    suite = CausalLMSuite(str(root / "base"), {t: str(root / t) for t in ("alpha", "beta")}, datasets="unused")
    pool = ExpertPool(suite.base, suite.experts)
    model = suite.model(pool.merge(task_arithmetic, tasks=suite.tasks))  # a tied head is tied again here
    module = BlockwiseCalibration(model, suite.adapter(model), solver("gptq"), suite.tasks)
    batches = llama_batches(torch.Generator().manual_seed(1))
    trainer_for(module).fit(module, train_dataloaders=loader(batches))

    # true-sequential in the declared groups, and every linear of the decoder is quantized onto its grid
    groups = ARCHITECTURES[model_type].groups
    assert [step.layers for step in module.schedule if step.block == 1] == list(groups)
    declared = {f"model.layers.{i}.{name}" for i in range(2) for group in groups for name in group}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(module.quant_results) == declared == linears
    for name, r in module.quant_results.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, r.weight()) and grid_levels(weight, SPEC.group_size) <= 2 ** SPEC.bits, name

    save_quantized(model, module.quant_results, tmp_path / "q", SPEC, checkpoint_format="gptq")
    loaded = load_quantized(tmp_path / "q")
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert type(loaded) is type(model) and set(quantized) == declared
    assert all(torch.equal(q.codes(), module.quant_results[n].codes().long()) for n, q in quantized.items())
    if model_type == "phi3":  # the fused projections are one layer each: (q + k + v heads) x 8, and 2 x 64 outputs
        attention, mlp = loaded.model.layers[0].self_attn, loaded.model.layers[0].mlp
        assert (attention.qkv_proj.out_features, mlp.gate_up_proj.out_features) == ((4 + 2 + 2) * 8, 2 * 64)
    if model.config.tie_word_embeddings:  # Gemma: the head is stored once, as the embeddings, and tied on loading
        assert "lm_head.weight" not in load_file(str(tmp_path / "q" / "model.safetensors"))
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    with torch.no_grad():
        got = torch.cat([loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])
        in_memory = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                               for b in batches])
    # the reloaded model computes the in-memory quantized one, up to the float16 rounding of its scales
    assert (got - in_memory).abs().max() <= 4e-3 * in_memory.abs().max()


def test_an_undeclared_model_type_is_refused_naming_the_known_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=48, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    config.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    known = ", ".join(sorted(ARCHITECTURES))
    with pytest.raises(ValueError, match=f"suite.base .*: model type 'gpt2' is not declared .*known: {known}") as refused:
        CausalLMSuite(str(tmp_path / "base"), {"alpha": str(tmp_path / "base")}, datasets="unused")
    message = str(refused.value)
    assert "\n" not in message and "ARCHITECTURES in epmq/families/causal_lm/architectures.py" in message
    with pytest.raises(ValueError, match="GPT2LMHeadModel: model type 'gpt2' is not declared"):
        LlamaAdapter().stages(GPT2LMHeadModel(config))
