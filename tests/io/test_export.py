"""Saved models in the GPTQ checkpoint layout (epmq.io.export) and their pure-torch loader (epmq.io.load).

Every family the engine calibrates (CLIP vision, T5, Llama) is saved and reloaded: the reloaded
model holds exactly the codes, zeros and group indices, and computes what the in-memory quantized
model computes with its scales rounded to float16. The main job's saved model scores the report's
accuracy on the offline suite. A tiny Llama is read back by an unpacking routine written here from
the format's description, and by a real GPTQ client (GPTQModel) when one is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

import epmq
from epmq import load_quantized
from epmq.core.gptq import gptq
from epmq.core.quant import QuantSpec
from epmq.io.export import checkpoint_size, save_quantized
from epmq.io.load import QuantLinear
from epmq.io.packing import pack_rows
from epmq.io.quantized_layer import QuantizedLayer

from helpers.config import ROOT, make_cfg
from helpers.families import FAMILIES, decoder_model, model_inputs


def quantize(model, spec: QuantSpec, seed: int = 0) -> dict[str, QuantizedLayer]:
    """GPTQ of every nn.Linear but the LM head, each on the Hessian of random inputs whose columns have
    unequal scales (so act-order permutes); the weights become their grid values, as the engine leaves
    them. Returns name -> QuantizedLayer, what BlockwiseCalibration.quant_results holds (the main job's
    export of the engine's results is checked on the offline suite below)."""
    gen = torch.Generator().manual_seed(seed)
    results = {}
    with torch.no_grad():
        for name, linear in model.named_modules():
            if isinstance(linear, nn.Linear) and not name.endswith("lm_head"):
                n = linear.in_features
                X = torch.randn(2 * n, n, generator=gen) * torch.linspace(0.2, 2, n)[torch.randperm(n, generator=gen)]
                results[name] = QuantizedLayer.from_result(gptq(linear.weight, X.t() @ X, spec), spec.bits)
                linear.weight.copy_(results[name].weight())
    return results


def fp16_scaled(model, results) -> torch.nn.Module:
    """`model` with every quantized layer's weight recomputed from float16-rounded scales."""
    with torch.no_grad():
        for name, r in results.items():
            scales = r.scales.to(torch.float16).float()
            g = r.g_idx.long()
            model.get_submodule(name).weight.copy_((r.codes().float() - r.zeros.float()[:, g]) * scales[:, g])
    return model


def outputs(name, model, batches):
    with torch.no_grad():
        out = [model(**model_inputs(name, b)) for b in batches]
    return torch.cat([(o.logits if name != "clip" else o.last_hidden_state).flatten() for o in out])


CASES = {  # family -> (spec, checkpoint_format)
    "clip": (QuantSpec(bits=4, group_size=16, act_order=True, blocksize=16), "gptq"),
    "t5": (QuantSpec(bits=3, group_size=-1, sym=True), "gptq_v2"),
    "llama": (QuantSpec(bits=2, group_size=16, act_order=True, static_groups=True, blocksize=16), "gptq"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_family_reloads_with_its_codes_and_computes_the_quantized_model(name, tmp_path):
    spec, fmt = CASES[name]
    family = FAMILIES[name]
    batches = family.batches(torch.Generator().manual_seed(1))
    model = family.base()
    results = quantize(model, spec)
    save_quantized(model, results, tmp_path / "q", spec, method="gptq", true_sequential=False, checkpoint_format=fmt)
    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is type(model) and not loaded.training

    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == set(results) and len(results) >= 12
    for layer, r in results.items():
        q = quantized[layer]
        assert torch.equal(q.codes(), r.codes().long()) and torch.equal(q.zeros(), r.zeros.long())
        assert torch.equal(q.g_idx, r.g_idx)
        assert torch.equal(q.scales, r.scales.t().to(torch.float16))
        # the record's packed words are written as they are: GPTQ's qweight of its codes
        assert torch.equal(q.qweight, r.qweight) and torch.equal(r.qweight, pack_rows(r.codes().t(), spec.bits))
        if model.get_submodule(layer).bias is not None:
            assert torch.equal(q.bias, model.get_submodule(layer).bias)
    # every other tensor as it was, in its dtype
    reference = model.state_dict()
    kept = {k: v for k, v in loaded.state_dict().items() if k.rpartition(".")[0] not in quantized}
    assert kept and all(torch.equal(v, reference[k]) and v.dtype == reference[k].dtype for k, v in kept.items())

    got = outputs(name, loaded, batches)
    in_memory = outputs(name, model, batches)
    # within float16 rounding of the scales of the in-memory model ...
    assert (got - in_memory).abs().max() <= 4e-3 * in_memory.abs().max()
    # ... and exactly the in-memory model once its scales are rounded so
    torch.testing.assert_close(got, outputs(name, fp16_scaled(model, results), batches), rtol=1e-5, atol=1e-6)


def test_the_folder_is_what_gptq_loaders_read(tmp_path):
    family = FAMILIES["llama"]
    spec = QuantSpec(bits=4, group_size=32, act_order=True)
    model = family.base().to(torch.bfloat16)
    results = quantize(model, spec)
    save_quantized(model, results, tmp_path / "q", spec, method="epmq", strength=float("inf"), form="output",
                   true_sequential=True)
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "quantize_config.json"]
    qc = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == qc and config["architectures"] == ["LlamaForCausalLM"]
    assert {k: qc[k] for k in ("bits", "group_size", "desc_act", "sym", "quant_method", "format", "checkpoint_format",
                               "pack_dtype", "true_sequential", "damp_percent", "static_groups")} == {
        "bits": 4, "group_size": 32, "desc_act": True, "sym": False, "quant_method": "gptq", "format": "gptq",
        "checkpoint_format": "gptq", "pack_dtype": "int32", "true_sequential": True, "damp_percent": 0.01,
        "static_groups": False}
    assert qc["meta"]["quantizer"] == [f"epmq:{epmq.__version__}"] and qc["meta"]["method"] == "epmq"
    assert qc["meta"]["anchor_strength"] == "inf" and qc["meta"]["anchor_form"] == "output"

    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    layer = "model.layers.0.mlp.down_proj"  # in 64, out 32
    assert f"{layer}.weight" not in tensors
    assert (tensors[f"{layer}.qweight"].dtype, tuple(tensors[f"{layer}.qweight"].shape)) == (torch.int32, (8, 32))
    assert (tensors[f"{layer}.qzeros"].dtype, tuple(tensors[f"{layer}.qzeros"].shape)) == (torch.int32, (2, 4))
    assert (tensors[f"{layer}.scales"].dtype, tuple(tensors[f"{layer}.scales"].shape)) == (torch.float16, (2, 32))
    assert (tensors[f"{layer}.g_idx"].dtype, tuple(tensors[f"{layer}.g_idx"].shape)) == (torch.int32, (64,))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # unquantized: its own dtype
    loaded = load_quantized(tmp_path / "q")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and loaded.model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():  # QuantLinear computes in the input's dtype
        assert loaded(input_ids=torch.tensor([[1, 5, 7]])).logits.dtype == torch.bfloat16

    # without act-order (or with static groups) g_idx is i // group_size: desc_act false
    spec = QuantSpec(bits=4, group_size=32, act_order=True, static_groups=True)
    model = family.base()
    save_quantized(model, quantize(model, spec), tmp_path / "s", spec)
    assert json.loads((tmp_path / "s" / "quantize_config.json").read_text())["desc_act"] is False


def test_four_bit_layers_take_under_0_3x_their_float32_size(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    spec = QuantSpec(bits=4, group_size=128)
    results = quantize(model, spec)
    size = checkpoint_size(save_quantized(model, results, tmp_path / "q", spec))
    assert size["quantized_layers_float32_bytes"] == 4 * sum(r.shape[0] * r.shape[1] for r in results.values())
    assert size["quantized_layers_ratio"] <= 0.3
    assert size["files_bytes"] >= size["quantized_layers_bytes"] + size["other_tensors_bytes"]


def test_shards_ties_and_atomic_replacement(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                                                tie_word_embeddings=True)).eval()
    spec = QuantSpec(bits=8, group_size=-1)
    results = quantize(model, spec)
    out = save_quantized(model, results, tmp_path / "q", spec, max_shard_size="2KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    stored = set(index["weight_map"])
    assert "shared.weight" in stored and "lm_head.weight" not in stored  # tied: stored once
    loaded = load_quantized(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.shared.weight.data_ptr()
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        a = fp16_scaled(model, results)(input_ids=ids, labels=ids).logits
        b = loaded(input_ids=ids, labels=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # a save that fails leaves the previous folder whole and no temporary folder behind
    import epmq.io.export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(epmq.io.export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, results, out, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and (out / "config.json").exists()
    assert load_quantized(out) is not None
    # a save that succeeds replaces the whole folder: no shard of the previous save is left
    monkeypatch.undo()
    save_quantized(model, results, out, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "quantize_config.json"]


def test_bad_input_is_refused_with_a_message_naming_it(tmp_path, monkeypatch):
    model = FAMILIES["llama"].base()
    # saving: impossible options, before anything is written
    with pytest.raises(ValueError, match="checkpoint_format"):
        save_quantized(model, {}, tmp_path / "x", QuantSpec(), checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="no quantized layer"):
        save_quantized(model, {}, tmp_path / "x", QuantSpec())
    spec = QuantSpec(bits=4, group_size=16)
    results = quantize(model, spec)
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(model, results, tmp_path / "x", spec, max_shard_size="lots")
    with pytest.raises(ValueError, match="group_size 32 over 32 inputs makes 1"):
        save_quantized(model, results, tmp_path / "x", QuantSpec(bits=4, group_size=32))
    with pytest.raises(ValueError, match="'lm_head' is not an nn.Linear|quantized layer 'nope'"):
        save_quantized(model, {"nope": next(iter(results.values()))}, tmp_path / "x", spec)
    with pytest.raises(ValueError, match="quantized to 4 bits, but the spec says 8"):
        save_quantized(model, results, tmp_path / "x", QuantSpec(bits=8, group_size=16))
    assert list(tmp_path.iterdir()) == []

    # loading: no folder, a file, a hub id that cannot be reached
    with pytest.raises(ValueError, match="is no folder"):
        load_quantized(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        load_quantized(tmp_path / "file")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="'someone/no-such-model' is not a local folder"):
        load_quantized("someone/no-such-model")

    # loading: a float checkpoint, another quantization method, a damaged GPTQ checkpoint
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="reads GPTQ checkpoints"):
        load_quantized(tmp_path / "plain")
    out = save_quantized(model, results, tmp_path / "q", spec)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.qweight"] = tensors["model.layers.1.mlp.up_proj.qweight"][:2]
    del tensors["model.layers.0.self_attn.o_proj.scales"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.o_proj.scales'\]"):
        load_quantized(out)
    tensors["model.layers.0.self_attn.o_proj.scales"] = torch.ones(2, 32, dtype=torch.float16)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"up_proj.qweight has shape \(2, 64\).*needs \(4, 64\)"):
        load_quantized(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds neither model.safetensors"):
        load_quantized(out)


def test_import_epmq_stays_light_and_exposes_load_quantized():
    import epmq.io.load

    assert load_quantized is epmq.io.load.load_quantized  # `from epmq import load_quantized`, at the top
    code = "import sys, epmq; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


# -- the main job's saved model on the offline suite --------------------------------------------------
@pytest.mark.parametrize("options", [("quant=gptq",),
                                     pytest.param(("quant=rtn", "quant.bits=3", "checkpoint_format=gptq_v2"),
                                                  marks=pytest.mark.slow),
                                     pytest.param(("quant=gptq", "quant.bits=2", "quant.act_order=true"),
                                                  marks=pytest.mark.slow)])
def test_the_saved_model_scores_the_reports_accuracy(tmp_path, zoo_cache, options):
    from epmq.jobs.run import run
    from epmq.jobs.steps import evaluate, prepare

    cfg = make_cfg(tmp_path, zoo_cache, *options, "evaluate_references=false")
    report = run(cfg)
    loaded = load_quantized(report["model_dir"])
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    prepared = prepare(cfg)
    scores = evaluate(cfg, prepared, loaded, prepared.data.test_dataloader(), "exported").results
    assert scores == report["metrics"]["quantized"]
    assert report["model_size"]["quantized_layers_ratio"] <= (0.3 if cfg.quant.bits == 4 else 0.25)
    # the default format is the one GPTQ clients load for these grids: v2 for asymmetric ones, v1 for symmetric
    written = json.loads((Path(report["model_dir"]) / "quantize_config.json").read_text())["checkpoint_format"]
    asked = next((o.split("=")[1] for o in options if o.startswith("checkpoint_format=")), None)
    assert written == (asked or ("gptq" if cfg.quant.sym else "gptq_v2"))


def test_format_choice():
    from epmq.io.export import chosen_format

    assert (chosen_format("auto", sym=True), chosen_format("auto", sym=False)) == ("gptq", "gptq_v2")
    assert (chosen_format("gptq", sym=False), chosen_format("gptq_v2", sym=True)) == ("gptq", "gptq_v2")
    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        chosen_format("v2", sym=True)


def test_the_main_job_refuses_what_it_could_not_save_before_calibrating(tmp_path, zoo_cache):
    from epmq.jobs.run import run

    refused = {("checkpoint_format=gptq_v3",): "checkpoint_format must be one of",
               ("quant=rtn", "quant.bits=5"): "quant.bits=5: the GPTQ checkpoint layout stores 2, 3, 4, 8"}
    for options, message in refused.items():
        with pytest.raises(ValueError, match=message):
            run(make_cfg(tmp_path / "run", zoo_cache, *options))
    assert not list(tmp_path.rglob("report.json")) and not list(tmp_path.rglob("*.safetensors"))


# -- a tiny Llama read by a reference unpacker and by a real GPTQ client --------------------------------
def wide_llama() -> LlamaForCausalLM:
    """Every quantized dimension a multiple of 32 (GPTQModel's 3-bit and CPU kernels need it)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


IDS = [[1, 5, 7, 9, 11, 3, 2, 4], [4, 8, 15, 16, 23, 42, 6, 0]]
CLIENT_CASES = {"4-bit sym gptq": (QuantSpec(bits=4, group_size=32, sym=True), "gptq"),
                "8-bit sym act-order gptq": (QuantSpec(bits=8, group_size=64, sym=True, act_order=True), "gptq"),
                "3-bit asym act-order gptq_v2": (QuantSpec(bits=3, group_size=32, act_order=True), "gptq_v2"),
                "2-bit asym gptq_v2": (QuantSpec(bits=2, group_size=32), "gptq_v2"),
                "3-bit sym gptq": (QuantSpec(bits=3, group_size=-1, sym=True), "gptq")}


def export_llama(folder, spec, fmt):
    model = wide_llama()
    results = quantize(model, spec)
    save_quantized(model, results, folder, spec, true_sequential=True, checkpoint_format=fmt)
    return model, results


def reference_weight(tensors: dict, layer: str, qc: dict, in_features: int, out_features: int) -> torch.Tensor:
    """From the format's description, not from epmq.io.packing: qweight's column o, read as one
    little-endian bit stream (word r at bit 32r), holds input i's code at bit i*bits; qzeros' row g
    likewise holds output o's zero point; "gptq" zero points are stored minus one (GPTQModel adds
    0x...0101 to each word for 2/4/8 bits, and one to each field for 3 bits); scales fp16 [g, o]."""
    bits = qc["bits"]
    mask = (1 << bits) - 1

    def stream(words):  # one column of int32 words -> a Python integer
        return sum((w & 0xFFFFFFFF) << (32 * k) for k, w in enumerate(words))

    qweight, qzeros = tensors[f"{layer}.qweight"].tolist(), tensors[f"{layer}.qzeros"].tolist()
    codes = []
    for o in range(out_features):
        column = stream([row[o] for row in qweight])
        codes.append([(column >> (i * bits)) & mask for i in range(in_features)])
    zeros = []
    for row in qzeros:
        if qc["checkpoint_format"] == "gptq" and bits != 3:
            ones = sum(1 << (k * bits) for k in range(32 // bits))
            row = [(w + ones) & 0xFFFFFFFF for w in row]
        fields = [(stream(row) >> (o * bits)) & mask for o in range(out_features)]
        if qc["checkpoint_format"] == "gptq" and bits == 3:
            fields = [(f + 1) & mask for f in fields]
        zeros.append(fields)
    g_idx = tensors[f"{layer}.g_idx"].long()  # (in,)
    zero, scale = torch.tensor(zeros)[g_idx].t(), tensors[f"{layer}.scales"].float()[g_idx].t()  # (out, in)
    return (torch.tensor(codes) - zero) * scale


@pytest.mark.parametrize("case", ["3-bit asym act-order gptq_v2", "4-bit sym gptq"])
def test_a_reference_unpacker_from_the_format_description_reads_the_tiny_llama(tmp_path, case):
    spec, fmt = CLIENT_CASES[case]
    _, results = export_llama(tmp_path / "q", spec, fmt)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    qc = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    plain = wide_llama()  # a float model holding the reference's weights
    state = {k: v for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    for layer in results:
        linear = plain.get_submodule(layer)
        state[f"{layer}.weight"] = reference_weight(tensors, layer, qc, linear.in_features, linear.out_features)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = load_quantized(tmp_path / "q")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


CLIENT = textwrap.dedent("""
    import sys, torch
    path, out, how = sys.argv[1:4]
    if how == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel
        model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    else:  # transformers + optimum (GPTQModel's kernels underneath)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16)
    weights, kernels = {}, set()
    for name, module in model.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            weights[name] = module.dequantize_weight().detach().float().t().contiguous()
            kernels.add(type(module).__name__)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(%r)).logits.float()
    torch.save({"logits": logits, "weights": weights, "kernels": sorted(kernels)}, out)
""" % (IDS,))


def client_python(module: str) -> str | None:
    """A Python that imports `module`: $EPMQ_GPTQ_PYTHON if set (GPTQModel wants a newer torch than the
    pinned one, so it may live in its own environment), else this one."""
    for exe in filter(None, [os.environ.get("EPMQ_GPTQ_PYTHON"), sys.executable]):
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        if subprocess.run([exe, "-c", probe], capture_output=True, timeout=120).returncode == 0:
            return exe
    return None


def save_tokenizer(folder):
    """GPTQ clients load a tokenizer with the model: a word-level one over the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(48)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(str(folder))


@pytest.mark.parametrize("how", ["gptqmodel", "optimum"])
@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_a_real_gptq_client_loads_the_tiny_llama(tmp_path, case, how):
    exe = client_python("gptqmodel") if how == "gptqmodel" else client_python("optimum")
    if exe is None:
        pytest.skip(f"no {how} installed (see README, Deploying; EPMQ_GPTQ_PYTHON names a Python that has it)")
    spec, fmt = CLIENT_CASES[case]
    export_llama(tmp_path / "q", spec, fmt)
    save_tokenizer(tmp_path / "q")
    (tmp_path / "client.py").write_text(CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([exe, str(tmp_path / "client.py"), str(tmp_path / "q"), str(tmp_path / "out.pt"), how],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = torch.load(tmp_path / "out.pt")
    loaded = load_quantized(tmp_path / "q")
    assert len(client["weights"]) == 14, client["kernels"]
    for layer, weight in client["weights"].items():  # the same float16 weights, bit for bit
        assert torch.equal(loaded.get_submodule(layer).dequantize(torch.float16).float(), weight), layer
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor(IDS)).logits
    # the client computes in float16, load_quantized in float32
    assert (client["logits"] - logits).abs().max() <= 4e-3 * logits.abs().max()


#: declared decoder types beyond Llama (epmq.families.causal_lm.architectures) -> the client that loads them. Phi-3
#: goes through transformers + optimum (GPTQModel's kernels): GPTQModel 7.7's own Phi-3 definition asks for a split
#: mlp.gate_proj / mlp.up_proj that transformers' Phi3MLP (one fused gate_up_proj) does not have.
CLIENT_TYPES = {"qwen3": "gptqmodel", "gemma2": "gptqmodel", "phi3": "optimum"}


@pytest.mark.parametrize("model_type", sorted(CLIENT_TYPES))
def test_a_real_gptq_client_loads_other_declared_types(tmp_path, model_type):
    how = CLIENT_TYPES[model_type]
    exe = client_python(how)
    if exe is None:
        pytest.skip(f"no {how} installed (see README, Deploying; EPMQ_GPTQ_PYTHON names a Python that has it)")
    torch.manual_seed(0)
    model = decoder_model(model_type, hidden=64).eval()
    spec = QuantSpec(bits=4, group_size=32, sym=True)
    results = quantize(model, spec)
    save_quantized(model, results, tmp_path / "q", spec, true_sequential=True, checkpoint_format="gptq")
    save_tokenizer(tmp_path / "q")
    (tmp_path / "client.py").write_text(CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"GPTQMODEL_CPU_WORKERS": "2"}
    proc = subprocess.run([exe, str(tmp_path / "client.py"), str(tmp_path / "q"), str(tmp_path / "out.pt"), how],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = torch.load(tmp_path / "out.pt")
    loaded = load_quantized(tmp_path / "q")
    # the client quantizes the layers epmq wrote, no more, no fewer: Phi-3's fused qkv_proj and gate_up_proj as one each
    assert set(client["weights"]) == set(results), client["kernels"]
    for layer, weight in client["weights"].items():  # the same float16 weights, bit for bit
        assert torch.equal(loaded.get_submodule(layer).dequantize(torch.float16).float(), weight), layer
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor(IDS)).logits
    assert (client["logits"] - logits).abs().max() <= 4e-3 * logits.abs().max()  # float16 there, float32 here
