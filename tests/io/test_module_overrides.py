"""Per-module overrides (quant.overrides) and the quantized LM head (quant.lm_head), through the engine, the
saved GPTQ checkpoint and both loaders.

One calibration of a tiny Llama with tied embeddings (every dimension a multiple of 32, as GPTQModel's CPU
kernel wants): GPTQ at 4 bits in groups of 32, layer 0's down_proj at 8 bits in groups of 64, every o_proj
skipped, the head quantized. The saved tensors have the shapes those options give, the skipped layers and the
embeddings are the float weights they were, epmq.load_quantized (and GPTQModel, when EPMQ_GPTQ_PYTHON names a
Python that has it) computes the in-memory model, and the head's GPTQ beats rounding it to nearest under the H of
its own inputs, gathered here independently. Bad options are refused by name before any work.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from epmq import load_quantized
from epmq.core.anchor_choice import BlockChoiceEPMQ, LayerwiseEPMQ
from epmq.core.gptq import rtn
from epmq.core.merge import task_arithmetic
from epmq.core.quant import QuantSpec
from epmq.core.solvers import EPMQ, GPTQ, RTN
from epmq.engine.calibration import BlockwiseCalibration
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.io.export import save_quantized
from epmq.io.load import QuantLinear
from epmq.io.pool import ExpertPool

from helpers.config import make_cfg
from helpers.families import FAMILIES, TASKS, loader
from helpers.llm_world import tiny_tokenizer
from helpers.tiny import trainer_for

RULES = {r"model\.layers\.0\.mlp\.down_proj": {"bits": 8, "group_size": 64}, r".*\.o_proj": {"skip": True}}
SPEC_ARGS = dict(bits=4, group_size=32, sym=True, blocksize=32)
SKIPPED = ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
IDS = [[1, 5, 7, 9, 11, 3, 2, 4], [4, 8, 15, 16, 23, 42, 6, 0]]


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        tie_word_embeddings=True)).eval()


def batches() -> list[dict]:
    return FAMILIES["llama"].batches(torch.Generator().manual_seed(1))


def calibrated(solver) -> BlockwiseCalibration:
    module = BlockwiseCalibration(tied_llama(), LlamaAdapter(), solver, TASKS)
    trainer_for(module).fit(module, train_dataloaders=loader(batches()))
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The calibrated module, its solver and the saved folder."""
    solver = GPTQ(**SPEC_ARGS, overrides=RULES, lm_head=True)
    module = calibrated(solver)
    folder = tmp_path_factory.mktemp("overrides") / "q"
    save_quantized(module.model, module.quant_results, folder, solver.spec, true_sequential=True,
                   checkpoint_format="gptq", overrides=solver.describe()["overrides"], lm_head=True)
    tiny_tokenizer().save_pretrained(str(folder))  # GPTQ clients load one with the model
    return module, solver, folder


def test_each_override_is_what_the_checkpoint_stores(run):
    module, _, folder = run
    tensors = load_file(str(folder / "model.safetensors"))
    # (qweight rows = in * bits / 32, scales rows = in / group_size), out columns
    expected = {"model.layers.0.mlp.down_proj": ((128 * 8 // 32, 64), (128 // 64, 64)),   # the rule's 8 bits, 64
                "model.layers.1.mlp.down_proj": ((128 * 4 // 32, 64), (128 // 32, 64)),   # the spec's 4 bits, 32
                "model.layers.0.mlp.gate_proj": ((64 * 4 // 32, 128), (64 // 32, 128)),
                "lm_head": ((64 * 4 // 32, 64), (64 // 32, 64))}                          # the head, at the spec's
    for layer, (qweight, scales) in expected.items():
        assert tuple(tensors[f"{layer}.qweight"].shape) == qweight, layer
        assert tuple(tensors[f"{layer}.scales"].shape) == scales, layer
    fresh = tied_llama()
    for layer in SKIPPED:  # the float weights they were, and nothing packed
        assert f"{layer}.qweight" not in tensors
        assert torch.equal(tensors[f"{layer}.weight"], fresh.get_submodule(layer).weight)
    assert module.float_layers == SKIPPED
    # the head was untied: the embeddings are stored, in float, as they were
    assert torch.equal(tensors["model.embed_tokens.weight"], fresh.model.embed_tokens.weight)
    assert "lm_head.weight" not in tensors and module.model.model.embed_tokens.weight.data_ptr() != \
        module.model.lm_head.weight.data_ptr()
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert qc["lm_head"] is True and (qc["bits"], qc["group_size"]) == (4, 32)
    assert qc["dynamic"] == {r"+:^(?:model\.layers\.0\.mlp\.down_proj)$": {"bits": 8, "group_size": 64},
                             r"-:^(?:.*\.o_proj)$": {}}
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False


def test_load_quantized_computes_the_in_memory_model(run):
    module, _, folder = run
    loaded = load_quantized(folder)
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == set(module.quant_results) and "lm_head" in quantized
    assert quantized["model.layers.0.mlp.down_proj"].bits == 8 and quantized["model.layers.1.mlp.down_proj"].bits == 4
    assert all(type(loaded.get_submodule(n)) is nn.Linear for n in SKIPPED)
    for name, r in module.quant_results.items():
        assert torch.equal(quantized[name].codes(), r.codes().long()), name
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor(IDS)).logits
        in_memory = module.model(input_ids=torch.tensor(IDS)).logits
    assert (got - in_memory).abs().max() <= 4e-3 * in_memory.abs().max()  # float16 scales


def test_gptq_of_the_head_beats_rtn_of_it_under_the_H_of_its_inputs(run):
    """H gathered here from the final normed hidden states of the calibrated model, each real token of task t
    weighing 1 / n_t, as the engine weighs them."""
    module, solver, _ = run
    inputs = []
    hook = module.model.lm_head.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    with torch.no_grad():
        for b in batches():
            module.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    hook.remove()
    masks = [b["attention_mask"].bool() for b in batches()]
    tasks = [b["task"][:, None].expand_as(m) for b, m in zip(batches(), masks)]
    X = torch.cat([x[m] for x, m in zip(inputs, masks)]).double()       # (tokens, hidden)
    t = torch.cat([tk[m] for tk, m in zip(tasks, masks)])
    w = 1.0 / torch.bincount(t).double()[t]
    H = (X * w[:, None]).t() @ X
    W = tied_llama().lm_head.weight.detach().double()                    # the head before calibration

    def error(Q):
        D = Q.double() - W
        return float(((D @ H) * D).sum())

    gptq_error = error(module.quant_results["lm_head"].weight())
    rtn_error = error(rtn(W.float(), QuantSpec(**SPEC_ARGS)).weight)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    # the engine's own number is the same objective (H's scale aside): its ratio to RTN's is this one
    metrics = module.layer_metrics["lm_head"]
    assert math.isclose(metrics["loss"] / metrics["rtn_loss"], gptq_error / rtn_error, rel_tol=1e-3)


@pytest.mark.parametrize("method", ["rtn", "epmq"])
def test_rtn_and_epmq_follow_the_overrides_too(method, tmp_path):
    """A whole block skipped (its forward still feeds the next block, and the experts' path runs their own) and an
    8-bit rule, with round-to-nearest and with E-PMQ on the experts' targets."""
    family = FAMILIES["llama"]
    base, experts, paths = family.save_zoo(tmp_path)
    merged = family.base()
    merged.load_state_dict(task_arithmetic(base.state_dict(), {t: e.state_dict() for t, e in experts.items()}, 0.5))
    float_state = {k: v.clone() for k, v in merged.state_dict().items()}
    rules = {r"model\.layers\.0\..*": {"skip": True}, r".*\.down_proj": {"bits": 8, "group_size": 32}}
    spec = dict(bits=4, group_size=16, blocksize=16, overrides=rules)
    solver = RTN(**spec) if method == "rtn" else EPMQ(strength=1.0, **spec)
    module = BlockwiseCalibration(merged, family.adapter, solver, TASKS,
                                  targets=ExpertPool(tmp_path / "base", paths) if method == "epmq" else None)
    trainer_for(module).fit(module, train_dataloaders=loader(batches()))
    results = module.quant_results
    assert len(module.float_layers) == 7 and not any(n.startswith("model.layers.0.") for n in results)
    assert all(torch.equal(merged.get_submodule(n).weight, float_state[f"{n}.weight"]) for n in module.float_layers)
    assert {n: (r.bits, r.n_groups) for n, r in results.items() if r.bits == 8} == {
        "model.layers.1.mlp.down_proj": (8, 2)}
    assert all((r.bits, r.n_groups) == (4, 2) for n, r in results.items() if not n.endswith("down_proj"))
    for name, r in results.items():  # what the model holds is what is saved
        assert torch.equal(merged.get_submodule(name).weight, r.weight()), name
    if method == "epmq":  # the experts' targets moved the solution off the merged weights
        assert all(m["anchor_shift"] > 0 for m in module.layer_metrics.values())


@pytest.mark.parametrize("overrides, message", [
    ({"(": {"bits": 8}}, r"overrides\['\('\]: not a valid regular expression"),
    ({"x": {"bitz": 8}}, r"overrides\['x'\]: unknown key\(s\) \['bitz'\]"),
    ({"x": {"bits": 9}}, r"overrides\['x'\]: bits must be an integer in 2..8"),
    ({"x": {"group_size": 0}}, r"overrides\['x'\]: group_size must be -1"),
    ({"x": {"skip": True, "bits": 8}}, r"overrides\['x'\]: skip=true leaves the module in float"),
    ({"x": {"skip": "yes"}}, r"overrides\['x'\]\.skip must be true or false"),
    ({"x": 8}, r"overrides\['x'\] must be a mapping"),
    ([("x", {})], r"overrides must be a mapping"),
])
def test_bad_overrides_are_refused_by_name(overrides, message):
    for make in (RTN, GPTQ, lambda **kw: EPMQ(strength=1.0, **kw)):
        with pytest.raises(ValueError, match=message):
            make(overrides=overrides)


def test_what_cannot_be_done_is_refused_before_calibrating(run, tmp_path):
    model = tied_llama()
    with pytest.raises(ValueError, match=r"rule\(s\) \['model\\\\.layers\\\\.7\\\\..\*'\] match no quantized module"):
        BlockwiseCalibration(model, LlamaAdapter(), GPTQ(overrides={r"model\.layers\.7\..*": {"bits": 8}}), TASKS)
    with pytest.raises(ValueError, match=r"rule\(s\) \['lm_head'\] match no quantized module"):  # lm_head is off
        BlockwiseCalibration(model, LlamaAdapter(), GPTQ(overrides={"lm_head": {"bits": 8}}), TASKS)
    with pytest.raises(ValueError, match="lm_head=true: CLIPVisionAdapter declares no head"):
        BlockwiseCalibration(FAMILIES["clip"].base(), CLIPVisionAdapter(), GPTQ(lm_head=True), TASKS)
    with pytest.raises(ValueError, match="lm_head must be true or false"):
        GPTQ(lm_head="yes")
    with pytest.raises(ValueError, match="lm_head=true takes no expert targets: E-PMQ at strength=1"):
        EPMQ(strength=1.0, lm_head=True)
    assert EPMQ(strength=math.inf, lm_head=True).requirements.head  # GPTQ of the merged head: no targets
    for choice in (lambda **kw: BlockChoiceEPMQ([1.0, math.inf], **kw), lambda **kw: LayerwiseEPMQ([0.0], **kw)):
        with pytest.raises(ValueError, match=r"takes no per-module options \['overrides'\]"):
            choice(overrides=RULES)
        with pytest.raises(ValueError, match=r"takes no per-module options \['lm_head'\]"):
            choice(lm_head=True)
    module, solver, _ = run  # results that do not follow the rules given to the export
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj' was quantized to 8 bits, but the spec says"):
        save_quantized(module.model, module.quant_results, tmp_path / "q", solver.spec,
                       overrides={r".*\.o_proj": {"skip": True}})
    with pytest.raises(ValueError, match=r"quantized layer 'model.layers.0.mlp.down_proj' is one that overrides"):
        save_quantized(module.model, module.quant_results, tmp_path / "q", solver.spec,
                       overrides={r".*\.down_proj": {"skip": True}})
    assert not (tmp_path / "q").exists()


def test_the_main_job_refuses_override_bits_it_could_not_save(tmp_path, zoo_cache):
    from epmq.jobs.run import run

    with pytest.raises(ValueError, match=r"quant.overrides\['.\*fc2'\].bits=5: the GPTQ checkpoint layout stores"):
        run(make_cfg(tmp_path / "run", zoo_cache, "quant=gptq", "quant.overrides={.*fc2:{bits:5}}"))
    assert not list(tmp_path.rglob("report.json"))


@pytest.mark.slow
def test_the_main_job_refuses_rules_and_heads_the_model_lacks_before_the_references(tmp_path, zoo_cache):
    from epmq.jobs.run import run

    refused = {"quant.overrides={.*fc3:{bits:8}}": r"quant.overrides: rule\(s\) \['.\*fc3'\] match no quantized",
               "quant.lm_head=true": "quant.lm_head=true: CLIPVisionModel has no head that CLIPVisionAdapter quantizes"}
    for option, message in refused.items():  # once the merge is there: the model's layers are known
        with pytest.raises(ValueError, match=message):
            run(make_cfg(tmp_path / "run", zoo_cache, "quant=gptq", option))
    assert not list(tmp_path.rglob("report.json"))


@pytest.mark.slow
def test_the_main_job_reports_and_saves_the_overrides(tmp_path, zoo_cache):
    from epmq.jobs.run import run

    rules = r"quant.overrides={.*layers\.0\.mlp\.fc2:{bits:8,group_size:32},.*layers\.1\..*:{skip:true}}"
    report = run(make_cfg(tmp_path / "run", zoo_cache, "quant=gptq", rules))
    quant = report["quant"]
    assert quant["overrides"] == {r".*layers\.0\.mlp\.fc2": {"bits": 8, "group_size": 32},
                                  r".*layers\.1\..*": {"skip": True}}
    assert quant["float_layers"] and all(".layers.1." in n for n in quant["float_layers"])
    assert list(quant["layer_specs"].values()) == [{"bits": 8, "group_size": 32}]
    qc = json.loads((tmp_path / "run" / "quantized_model" / "quantize_config.json").read_text())
    assert list(qc["dynamic"]) == [r"+:^(?:.*layers\.0\.mlp\.fc2)$", r"-:^(?:.*layers\.1\..*)$"]
    loaded = load_quantized(tmp_path / "run" / "quantized_model")
    assert all(type(loaded.get_submodule(n)) is nn.Linear for n in quant["float_layers"])
    (fc2,) = quant["layer_specs"]
    assert loaded.get_submodule(fc2).bits == 8


CLIENT = textwrap.dedent("""
    import sys, torch
    from gptqmodel import BACKEND, GPTQModel
    path, out = sys.argv[1:3]
    model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    weights, linear = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            weights[name] = module.dequantize_weight().detach().float().t().contiguous()
        elif type(module) is torch.nn.Linear:
            linear.append(name)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(%r)).logits.float()
    torch.save({"logits": logits, "weights": weights, "linear": linear}, out)
""" % (IDS,))


def test_gptqmodel_reads_the_overrides_skips_and_head(run, tmp_path):
    from test_export import client_python

    exe = client_python("gptqmodel")
    if exe is None:
        pytest.skip("no gptqmodel installed (see README, Deploying; EPMQ_GPTQ_PYTHON names a Python that has it)")
    module, _, folder = run
    (tmp_path / "client.py").write_text(CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([exe, str(tmp_path / "client.py"), str(folder), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = torch.load(tmp_path / "out.pt")
    assert set(client["weights"]) == set(module.quant_results) and set(SKIPPED) <= set(client["linear"])
    loaded = load_quantized(folder)
    for layer, weight in client["weights"].items():  # the same float16 weights, bit for bit, at each layer's bits
        assert torch.equal(loaded.get_submodule(layer).dequantize(torch.float16).float(), weight), layer
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor(IDS)).logits
    assert (client["logits"] - logits).abs().max() <= 4e-3 * logits.abs().max()
