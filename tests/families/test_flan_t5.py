"""suite=flan_t5 on a tiny FLAN-T5-shaped zoo built here (tests/helpers/t5_glue_zoo.py): a real
T5ForConditionalGeneration (2+2 blocks, width 32, own lm_head), a word-level T5 tokenizer, experts
fine-tuned for 60 steps on GLUE-shaped sst2 / rte / stsb datasets saved with save_to_disk.

What is checked: the job merges, calibrates the encoder's blocks then the decoder's and writes
report.json with the exact-match score per task, its average and the metric's name (compose API and
the command line); an expert's reported exact match equals one computed here with model.generate on
the rendered prompts; STS-B's Spearman and the teacher-forced NLL equal independent computations;
padding a batch with extra pad tokens changes neither H nor C; the decoder's cross-attention sees the
quantized encoder's output; E-PMQ at strength inf is GPTQ exactly, and E-PMQ's layer error to the
experts' targets is below GPTQ's; the comparison job runs without RegMean and refuses it clearly; bad
options (hub ids offline too) fail early, naming the option.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoTokenizer, T5ForConditionalGeneration

from epmq.core.quant import QuantSpec
from epmq.core.solvers import EPMQ, GPTQ, Requirements, Solution
from epmq.core.stats import LayerStatistics
from epmq.engine.calibration import BlockwiseCalibration
from epmq.families.base import adapter_for
from epmq.families.flan_t5.evaluate import parse_number
from epmq.families.flan_t5.glue import GLUE_TASKS, glue_task
from epmq.families.flan_t5.suite import FlanT5Suite
from epmq.jobs.run import run
from epmq.jobs.steps import calibrate, prepare

from helpers.config import ROOT, make_cfg
from helpers.staged import choice_is_plain_epmq
from helpers.t5_glue_zoo import build_zoo
from helpers.tiny import trainer_for

TASKS = ["sst2", "rte"]
SPEC = dict(bits=4, group_size=16, blocksize=16)
BLOCKS = ["encoder/block_0", "encoder/block_1", "decoder/block_0", "decoder/block_1"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny zoo, built with one thread (2-thread kernels on a shared 2-core machine run 30x slower);
    the module's tests run with one thread too, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_zoo(tmp_path_factory.mktemp("flan_t5_zoo"))
    finally:
        torch.set_num_threads(threads)


def t5_cfg(out_dir, zoo, *overrides):
    """The composed train config on the tiny zoo (tasks sst2, rte; whole validation splits)."""
    return make_cfg(out_dir, out_dir / "cache" / "zoo", "suite=flan_t5", f"suite.base={zoo['base']}",
                    f"suite.experts='{zoo['experts']}'", f"suite.data={zoo['data']}",
                    f"suite.tasks=[{','.join(TASKS)}]", "data.test_samples=null", "quant.group_size=16",
                    *overrides)


@pytest.fixture(scope="module")
def epmq_run(zoo, tmp_path_factory):
    """One main-job run through the compose API: task arithmetic, E-PMQ at strength 0, 4 bits, CSV log."""
    out = tmp_path_factory.mktemp("flan_t5_run")
    report = run(t5_cfg(out, zoo, "quant.strength=0.0", "quant.form=output", "logger=csv", "save_model=false"))
    return out, report


def independent_exact_match(model, tokenizer, task: str, split) -> float:
    """FusionBench's way, one prompt at a time (no padding): generate(max_length=10), decode both sides."""
    right = 0
    for example in split:
        prompt, target = glue_task(task).render(example)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_length=10, do_sample=False, num_beams=1)
        answer = tokenizer.decode(out[0], skip_special_tokens=True)
        right += answer == tokenizer.decode(tokenizer(target).input_ids, skip_special_tokens=True)
    return right / len(split)


def test_templates_render_fusionbench_prompts_and_label_words():
    rows = {
        "cola": ({"sentence": "He left.", "label": 1},
                 "Indicate if the following sentence is grammatically correct or not: \"He left.\". "
                 "Answere 'acceptable' or 'unacceptable'.", "acceptable"),
        "mnli": ({"premise": "P.", "hypothesis": "H.", "label": 2},
                 "Does the premise: 'P.' logically imply, contradict, or is neutral to the hypothesis: 'H.'? "
                 "Answere with 'entailment', 'contradiction', or 'neutral'.", "contradiction"),
        "mrpc": ({"sentence1": "A.", "sentence2": "B.", "label": 0},
                 "Are the following sentences 'A.' and 'B.' conveying the same meaning? Answere with 'yes' or 'no'.",
                 "no"),
        "qnli": ({"question": "Q?", "sentence": "S.", "label": 0},
                 "Given the context: 'S.', does the question 'Q?' have an answer based on the information "
                 "provided? Answer with 'yes' or 'no'.", "yes"),
        "qqp": ({"question1": "A?", "question2": "B?", "label": 1},
                "Do the questions 'A?' and 'B?' have the same intent? Answere with 'yes' or 'no'.", "yes"),
        "rte": ({"sentence1": "T.", "sentence2": "H.", "label": 1},
                "Does the text: 'T.' entail that 'H.' is true? Provide 'yes' or 'no'.", "no"),
        "sst2": ({"sentence": "a fine film", "label": 0},
                 "Given the sentence 'a fine film', determine the sentiment. Is it positive or negative?", "negative"),
        "stsb": ({"sentence1": "A.", "sentence2": "B.", "label": 3.799999952316284},  # GLUE's float32 3.8
                 "Consider the sentences 'A.' and 'B.'. On a scale from 1 (completely different) to 5 "
                 "(completely similar), rate the similarity.", "3.8"),
    }
    assert sorted(rows) == sorted(GLUE_TASKS)
    for task, (example, prompt, target) in rows.items():
        assert glue_task(task).render(example) == (prompt, target), task
    assert glue_task("mnli").eval_split == "validation_matched"
    assert {glue_task(t).eval_split for t in GLUE_TASKS if t != "mnli"} == {"validation"}
    assert [t for t in GLUE_TASKS if glue_task(t).metric == "spearman"] == ["stsb"]
    with pytest.raises(ValueError, match="label -1"):  # GLUE's unlabelled test rows
        glue_task("rte").render({"sentence1": "T.", "sentence2": "H.", "label": -1})


def test_run_calibrates_encoder_then_decoder_and_reports_exact_match(epmq_run):
    out, report = epmq_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metric"] == "exact_match" and on_disk["suite"]["metrics"] == dict.fromkeys(TASKS, "exact_match")
    for model in ("experts", "merged", "quantized"):
        scores = on_disk["metrics"][model]
        assert set(scores) == {*TASKS, "avg"}
        assert all(0.0 <= s <= 1.0 for s in scores.values())
        assert scores["avg"] == pytest.approx(sum(scores[t] for t in TASKS) / len(TASKS))
    assert on_disk["metrics"]["experts"]["avg"] > 0.5  # the experts learned their tasks
    # encoder blocks first, then decoder blocks; the decoder's cross-attention keys/values are quantized
    assert [b["block"] for b in on_disk["calibration"]] == BLOCKS
    assert {"layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v", "layer.2.DenseReluDense.wo"} <= set(
        on_disk["calibration"][2]["layers"])
    # E-PMQ at strength 0 regresses toward the experts: it moved the weights off the merge
    assert all(m["anchor_shift"] > 0 for b in on_disk["calibration"] for m in b["layers"].values())
    with open(next((out / "csv").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if v}
    for task in TASKS:
        assert logged[f"test/{task}/exact_match"] == pytest.approx(report["metrics"]["quantized"][task])
    assert logged["experts/test/avg_score"] == pytest.approx(report["metrics"]["experts"]["avg"])


def test_reported_expert_exact_match_equals_generate_on_the_rendered_prompts(epmq_run, zoo):
    _, report = epmq_run
    tokenizer = AutoTokenizer.from_pretrained(str(zoo["base"]))
    for task in TASKS:
        expert = T5ForConditionalGeneration.from_pretrained(zoo["experts"].format(task=task)).eval()
        expected = independent_exact_match(expert, tokenizer, task, zoo["datasets"][task]["validation"])
        assert 0.0 < expected  # not a vacuous 0 == 0
        assert report["metrics"]["experts"][task] == pytest.approx(expected, abs=1e-6), task


def test_stsb_spearman_and_teacher_forced_nll_equal_independent_computations(zoo):
    suite = FlanT5Suite(base=str(zoo["base"]), experts=zoo["experts"], data=str(zoo["data"]), tasks=["stsb"])
    assert suite.metric == "exact_match (stsb: spearman)"
    data = suite.datamodule(calib_samples=4, select_samples=0, batch_size=7, seed=0)  # odd size: several pad lengths
    data.setup("fit")
    expert = T5ForConditionalGeneration.from_pretrained(zoo["experts"].format(task="stsb")).eval()
    evaluator = suite.evaluator({"stsb": expert}, "experts/test")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        evaluator, dataloaders=data.test_dataloader(), verbose=False)

    tokenizer, answers, truths, nll_sum, tokens = suite.tokenizer, [], [], 0.0, 0
    for example in zoo["datasets"]["stsb"]["validation"]:
        prompt, target = glue_task("stsb").render(example)
        ids, labels = tokenizer(prompt, return_tensors="pt").input_ids, tokenizer(target, return_tensors="pt").input_ids
        with torch.no_grad():
            answers.append(tokenizer.decode(expert.generate(ids, max_length=10)[0], skip_special_tokens=True))
            nll_sum += expert(input_ids=ids, labels=labels).loss.item() * labels.numel()
        truths.append(float(target))
        tokens += labels.numel()
    parsed = [parse_number(a) for a in answers]
    assert len(set(parsed)) > 2  # the expert answers with several numbers: the correlation means something
    rho = spearmanr(parsed, truths)[0]  # reported as it is, whatever its sign
    assert evaluator.results["stsb"] == pytest.approx(rho, abs=1e-5)
    assert evaluator.nll["stsb"] == pytest.approx(nll_sum / tokens, rel=1e-4)
    # the same token NLL without a Trainer (what anchor.select=block scores candidates by)
    assert evaluator.mean_loss(data.test_dataloader(), torch.device("cpu")) == pytest.approx(nll_sum / tokens, rel=1e-4)
    assert parse_number("yes") == 0.0 and parse_number("nan") == 0.0 and parse_number("2.5") == 2.5


class Recording:
    """A solver wrapper that asks for expert targets (so that C is gathered whatever the inner solver
    needs) and keeps every solved layer's statistics and final weight, in solve order (and in
    `merged`, the weight W_m each layer had before it was solved)."""

    name = "recording"
    requirements = Requirements(targets=True)

    def __init__(self, inner=None):
        self.inner, self.solved, self.merged = inner, [], []
        self.spec = inner.spec if inner is not None else QuantSpec(bits=8)  # the width the engine stores codes with

    def solve(self, W, stats):
        solution = self.inner.solve(W, stats) if self.inner else Solution(_unchanged(W))
        self.solved.append((stats, solution.result.weight.double()))
        self.merged.append(W.double())
        return solution

    def by_layer(self, module: BlockwiseCalibration) -> dict:
        names = [module.schedule[s.index].prefix + n for s in module.finished for n in s.layers]
        assert len(names) == len(self.solved)
        return dict(zip(names, self.solved))


def _unchanged(W):
    from epmq.core.gptq import QuantResult

    z = torch.zeros(W.shape[0], 1)
    return QuantResult(W.detach().clone(), torch.zeros_like(W, dtype=torch.uint8), z + 1, z,
                       torch.zeros(W.shape[1], dtype=torch.long), 0.0)


def padded_more(batch: dict, prompt_pads: int, label_pads: int, pad_id: int) -> dict:
    """The same samples with extra pad columns: pad ids (mask 0) after the prompts, -100 after the
    targets and pad ids (mask 0) after the decoder inputs."""
    B = len(batch["input_ids"])
    more = lambda key, n, value: torch.cat([batch[key], torch.full((B, n), value)], 1)  # noqa: E731
    return {"input_ids": more("input_ids", prompt_pads, pad_id),
            "attention_mask": more("attention_mask", prompt_pads, 0),
            "labels": more("labels", label_pads, -100),
            "decoder_input_ids": more("decoder_input_ids", label_pads, pad_id),
            "decoder_attention_mask": more("decoder_attention_mask", label_pads, 0), "task": batch["task"]}


def test_extra_padding_changes_neither_H_nor_C(zoo, tmp_path):
    prepared = prepare(t5_cfg(tmp_path, zoo, "data.batch_size=3", "data.calib_samples=5"))
    batches = list(prepared.data.train_dataloader())
    pad_id = prepared.suite.tokenizer.pad_token_id
    runs = {}
    for name, bs in (("tight", batches), ("padded", [padded_more(b, 6, 3, pad_id) for b in batches])):
        recorder = Recording()
        model = prepared.suite.model(prepared.merged_state)
        module = BlockwiseCalibration(model, adapter_for(model), recorder, prepared.suite.tasks,
                                      targets=prepared.pool)
        trainer_for(module).fit(module, train_dataloaders=torch.utils.data.DataLoader(bs, batch_size=None))
        runs[name] = recorder.by_layer(module)
    assert set(runs["tight"]) == set(runs["padded"]) and len(runs["tight"]) == 2 * 7 + 2 * 11  # every T5 linear
    for layer, (tight, _) in runs["tight"].items():
        padded = runs["padded"][layer][0]
        assert padded.tokens > tight.tokens  # the pad rows did reach the layer ...
        for what, got, want in (("H", padded.H, tight.H), ("C", padded.C, tight.C)):
            # equal up to float32 rounding (attention sums over more, masked, keys in the padded run)
            scale = want.abs().max().item()
            assert scale > 0  # ... with weight 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale,
                                       msg=lambda m, where=f"{layer} {what}": f"{where}: {m}")


def test_decoder_blocks_see_the_quantized_encoders_output(zoo, tmp_path):
    """Decoder block 0's cross-attention keys read the encoder's output: their H is the token Gram
    Σ_t (1/n_t) Σ e eᵀ over task t's real prompt tokens (n_t of them) of the calibrated, quantized
    encoder's output e, computed here by running the final model, and not the FP merged encoder's."""
    cfg = t5_cfg(tmp_path, zoo, "data.batch_size=3", "data.calib_samples=5")
    prepared = prepare(cfg)
    recorder = Recording(GPTQ(**SPEC))
    calib = calibrate(cfg, prepared, recorder)
    H = recorder.by_layer(calib.module)["decoder.block.0.layer.1.EncDecAttention.k"][0].H.double()

    def encoder_gram(model) -> torch.Tensor:
        sums, tokens = {}, {}
        for batch in prepared.data.train_dataloader():  # every batch holds one task
            t = int(batch["task"][0])
            with torch.no_grad():
                e = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            e = e[batch["attention_mask"].bool()].double()  # (real tokens, d_model)
            sums[t], tokens[t] = sums.get(t, 0) + e.T @ e, tokens.get(t, 0) + len(e)
        return sum(sums[t] / tokens[t] for t in sums)

    quantized, merged = encoder_gram(calib.model), encoder_gram(prepared.suite.model(prepared.merged_state))
    torch.testing.assert_close(H, quantized, rtol=1e-4, atol=1e-6 * quantized.abs().max().item())
    assert (H - merged).norm() > 100 * (H - quantized).norm()  # the encoder's quantization is visible


def test_strength_inf_is_gptq_exactly_on_t5(zoo, tmp_path):
    cfg = t5_cfg(tmp_path, zoo)
    prepared = prepare(cfg)
    gptq = calibrate(cfg, prepared, GPTQ(**SPEC)).module.quant_results
    inf = calibrate(cfg, prepared, EPMQ(strength="inf", **SPEC)).module.quant_results
    assert set(gptq) == set(inf) and any(k.startswith("decoder.") for k in gptq)
    for key in gptq:
        for field in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(gptq[key], field), getattr(inf[key], field)), (key, field)
        assert torch.equal(gptq[key].weight(), inf[key].weight()), key


def test_the_staged_choice_runs_through_encoder_and_decoder_and_keeps_plain_epmq(zoo, tmp_path):
    cfg = t5_cfg(tmp_path, zoo, "anchor.select=staged", "quant.form=output", "anchor.candidates.strength=[0.0,1.0,.inf]",
                 "anchor.rounds=[{fidelity: open_loop, pivot: 1.0, select_share: 0.5, keep: 1}]")
    strength, (record,) = choice_is_plain_epmq(cfg, tmp_path)
    assert record["kept"] == [f"epmq/output/strength_{strength:g}"] and len(record["scores"]) == 3


def test_epmq_layer_error_to_the_experts_targets_is_below_gptqs(zoo, tmp_path, monkeypatch):
    """Per layer, E(Q) = Σ_t w_t ||Q X̂_t − Ỹ_t||² over the real tokens of task t's calibration samples
    (w_t = 1/n_t per token), from the engine's own statistics of that run. The engine sums the
    residual cross term R = Σ w (Ỹ − X̂W_mᵀ)ᵀX̂, so with D = Q − W_m:
        E(Q) = tr(D H Dᵀ) − 2 tr(D Rᵀ) + K,   K = Σ w ||Ỹ − X̂W_mᵀ||²
    (H, R as LayerStatistics sums them; K summed beside them from the same residuals and weights).
    X̂ differs between the runs (earlier layers are quantized differently), the targets do not."""
    add = LayerStatistics.add

    def add_with_K(self, X, Y=None, weight=1.0, with_H=True):
        add(self, X, Y, weight, with_H)
        w = self._token_weights(weight, X.shape[:-1], X.device)
        self.K = getattr(self, "K", 0.0) + float((w * Y.double().pow(2).sum(-1)).sum())

    monkeypatch.setattr(LayerStatistics, "add", add_with_K)
    cfg = t5_cfg(tmp_path, zoo)
    prepared = prepare(cfg)
    errors = {}
    for name, solver in (("gptq", GPTQ(**SPEC)), ("epmq", EPMQ(strength=0.0, form="output", **SPEC))):
        recorder = Recording(solver)
        module = calibrate(cfg, prepared, recorder).module
        assert all(s.residual for s, _ in recorder.solved)
        errors[name] = {layer: float(torch.trace((Q - W) @ s.H @ (Q - W).T) - 2 * torch.trace((Q - W) @ s.C.T) + s.K)
                        for (layer, (s, Q)), W in zip(recorder.by_layer(module).items(), recorder.merged)}
    gptq, epmq = errors["gptq"], errors["epmq"]
    assert min(min(gptq.values()), min(epmq.values())) > -1e-6  # squared errors: never negative
    below = [layer for layer in gptq if epmq[layer] < gptq[layer]]
    assert sum(epmq.values()) < 0.5 * sum(gptq.values())
    assert len(below) >= 0.9 * len(gptq), sorted(set(gptq) - set(below))


def test_compare_runs_without_regmean_and_refuses_it_clearly(zoo, tmp_path):
    with pytest.raises(ValueError, match="regmean_gptq is not available for suite .*FlanT5Suite.*padded tokens"):
        run(t5_cfg(tmp_path / "refused", zoo, "experiment=compare"))
    assert not (tmp_path / "refused" / "fingerprint.json").exists()
    results = run(t5_cfg(tmp_path / "ok", zoo, "experiment=compare", "compare.methods=[rtn,gptq,epmq]",
                         "compare.bits=[4]", "compare.ablation.strength=[0.0,.inf]", "compare.ablation.form=[output]",
                         "anchor.candidates.strength=[0.0,.inf]"))
    assert {e["method"] for e in results["methods"]} == {"rtn", "gptq", "epmq"}
    assert all(set(e["test"]) == {*TASKS, "avg"} for e in results["methods"])
    assert (tmp_path / "ok" / "results.json").is_file() and "regmean" not in results["references"]


@pytest.mark.parametrize("override,match", [
    ("suite.tasks=[sst2,wnli]", "suite.tasks.*wnli"),
    ("suite.tasks=[]", "suite.tasks is empty"),
    ("suite.data=nyu-mll/glue", "suite.data 'nyu-mll/glue' \\(config 'sst2'\\).*save_to_disk"),  # hub offline
    ("suite.data='someone/glue-{task}'", "suite.data 'someone/glue-sst2'"),
    ("suite.experts=/nowhere/expert", "suite.experts.*\\{task\\}"),
    ("suite.tasks=[sst2,cola]", "cola"),                   # no expert folder for cola
    ("suite.tokenizer=/nowhere/tokenizer", "suite.tokenizer"),
    ("suite.max_new_tokens=0", "suite.max_new_tokens"),
    ("data.calib_samples=500", "calib_samples"),
])
def test_bad_options_fail_early_naming_the_option(zoo, tmp_path, monkeypatch, override, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub ids are refused at once, whatever the network
    with pytest.raises(ValueError, match=match):
        run(t5_cfg(tmp_path, zoo, override))
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "calibration").exists()


def test_suite_options_name_tasks_and_experts():
    assert FlanT5Suite().tasks == list(GLUE_TASKS)  # null: all eight, in report order
    one = FlanT5Suite(tasks="rte", experts="org/t5-{task}")  # one name is one task, not its letters
    assert one.tasks == ["rte"] and one.experts == {"rte": "org/t5-rte"} and one.metric == "exact_match"
    both = FlanT5Suite(tasks=["stsb", "sst2"], experts={"sst2": "a", "stsb": "b", "cola": "c"})
    assert both.experts == {"stsb": "b", "sst2": "a"} and both.metrics == {"stsb": "spearman", "sst2": "exact_match"}
    with pytest.raises(ValueError, match="duplicates"):
        FlanT5Suite(tasks=["rte", "rte"])


def test_a_data_folder_without_the_task_names_it(zoo, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=r"no saved dataset for task\(s\) \[.sst2., .rte.\]"):
        run(t5_cfg(tmp_path, zoo, f"suite.data={tmp_path / 'data'}"))


@pytest.mark.slow
def test_command_line_run_writes_the_report(zoo, tmp_path):
    """`python train.py suite=flan_t5 ...` in a subprocess: merge, encoder then decoder, exact match."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", "suite=flan_t5", f"suite.base={zoo['base']}", f"suite.experts='{zoo['experts']}'",
         f"suite.data={zoo['data']}", "suite.tasks=[sst2,rte]", "data.calib_samples=8", "data.select_samples=8",
         "data.batch_size=8", "quant.group_size=16", "anchor.candidates.strength=[0.0,1.0,.inf]",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "EPMQ_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "exact_match" and [b["block"] for b in report["calibration"]] == BLOCKS
    assert len(report["selection"]) == 3 and report["quant"]["strength"] in (0.0, 1.0, math.inf)
    for model in ("experts", "merged", "quantized"):
        assert set(report["metrics"][model]) == {*TASKS, "avg"}
        assert all(0.0 <= s <= 1.0 for s in report["metrics"][model].values())
    assert "epmq 4-bit" in done.stdout and "sst2" in done.stdout
