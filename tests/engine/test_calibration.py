"""BlockwiseCalibration through Lightning: GPTQ/E-PMQ equivalences, the expert path, errors."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from callbacks.block_metrics import BlockMetrics, BlockProgressBar
from epmq.core.anchor import relaxed_target
from epmq.core.gptq import gptq
from epmq.core.stats import LayerStatistics
from epmq.engine.calibration import BlockwiseCalibration
from epmq.engine.targets import ExpertTargets
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.io.pool import ExpertPool

from helpers.tiny import (ADAPTER, SPEC, SPEC_ARGS, TASKS, CalibrationData, CalibrationSet, calibrate, calibration_set,
                          load_state, solver, trainer_for)

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
          "mlp.fc1", "mlp.fc2")


def block_weights(module: BlockwiseCalibration) -> dict[str, torch.Tensor]:
    return {k: r.weight() for k, r in module.quant_results.items()}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum((a[k] - b[k]).double().square().sum().item() for k in a))


def shifts(module: BlockwiseCalibration, block: int) -> dict[str, float]:
    """layer -> ‖W* − W_m‖ / ‖W_m‖ of one block, as the solver reported it."""
    prefix = f"encoder.layers.{block}."
    return {k[len(prefix):]: m["anchor_shift"] for k, m in module.layer_metrics.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def data():
    return calibration_set((5, 4))


@pytest.fixture(scope="module")
def pool(zoo):
    return ExpertPool(zoo["root"] / "base", zoo["paths"])


@pytest.fixture(scope="module")
def gptq_run(zoo, data):
    return calibrate(zoo["merged"], "gptq", data)


def test_strength_inf_is_exactly_gptq_and_finite_strengths_approach_it(zoo, data, pool, gptq_run):
    reference = block_weights(gptq_run)
    inf_run = calibrate(zoo["merged"], "epmq", data, pool=pool, strength=float("inf"))
    assert reference.keys() == block_weights(inf_run).keys() and len(reference) == 12
    for key, W in reference.items():
        assert torch.equal(block_weights(inf_run)[key], W), key

    # the continuous targets W* move monotonically toward W_m, and the rounded weights follow
    strengths = [0.0, 1.0, 100.0, 1e6]
    dists, moved = [], []
    for strength in strengths:
        module = calibrate(zoo["merged"], "epmq", data, pool=pool, strength=strength)
        dists.append(distance(block_weights(module), reference))
        moved.append(sum(shifts(module, 0).values()))
    assert all(a > b for a, b in zip(moved, moved[1:])), moved
    assert all(a >= b for a, b in zip(dists, dists[1:])), dists
    assert dists[0] > 0 and dists[-1] < dists[0] / 10, dists


def _block_statistics(block, linears, block_inputs, tasks):
    """Independent H per layer: hooks on the block's linears, batches of 3 samples, w = 1 / n_t."""
    tokens = torch.bincount(tasks, minlength=len(TASKS)).double() * block_inputs[0].shape[1]  # n_t
    stats = {n: LayerStatistics(lin.in_features) for n, lin in linears.items()}
    current = {}
    handles = [lin.register_forward_hook(lambda m, a, o, n=n: stats[n].add(a[0], weight=current["w"]))
               for n, lin in linears.items()]
    for b, hidden in enumerate(block_inputs):
        current["w"] = (1.0 / tokens)[tasks[3 * b: 3 * b + 3]]
        block(hidden, None)
    for h in handles:
        h.remove()
    return stats


def test_gptq_through_the_loop_matches_core_gptq_on_independent_statistics(zoo, data, gptq_run):
    model = load_state(zoo["merged"])
    with torch.no_grad():
        # block 0's inputs straight from the embeddings, not through the adapter's capture
        hidden = [model.pre_layrnorm(model.embeddings(data.pixel_values[i: i + 3])) for i in range(0, 9, 3)]
        for i, layer in enumerate(model.encoder.layers):
            linears = {n: layer.get_submodule(n) for n in LAYERS}
            stats = _block_statistics(layer, linears, hidden, data.tasks)
            for name, lin in linears.items():
                expected = gptq(lin.weight, stats[name].H, SPEC)
                got = gptq_run.quant_results[f"encoder.layers.{i}.{name}"]
                assert torch.equal(got.weight(), expected.weight), (i, name)
                assert torch.equal(got.codes(), expected.qweight), (i, name)
                assert got.loss == pytest.approx(expected.loss, rel=1e-9)
                lin.weight.copy_(expected.weight)
            hidden = [layer(h, None) for h in hidden]  # the next inputs come from the quantized block
    assert torch.equal(gptq_run.task_tokens[(0, "self")], torch.tensor([5.0 * 17, 4.0 * 17], dtype=torch.float64))


def test_epmq_with_experts_equal_to_merged_gives_gptq_first_block(zoo, data, gptq_run, tmp_path):
    merged = load_state(zoo["merged"])
    for task in TASKS:
        merged.save_pretrained(tmp_path / task)
    same = ExpertPool(tmp_path / TASKS[0], {t: tmp_path / t for t in TASKS})
    module = calibrate(zoo["merged"], "epmq", data, pool=same, strength=0.0)  # pure expert guidance
    # C = W_m H up to the float32 rounding of the layer outputs and batch products (~1e-5)
    assert max(shifts(module, 0).values()) < 1e-4, shifts(module, 0)
    for name in LAYERS:
        key = f"encoder.layers.0.{name}"
        ours, ref = module.quant_results[key], gptq_run.quant_results[key]
        agree = ours.codes() == ref.codes()
        assert agree.float().mean() >= 0.999, name
        # same codes; grids fitted on W* instead of W_m differ only by that rounding
        torch.testing.assert_close(ours.weight()[agree], ref.weight()[agree], rtol=1e-4, atol=1e-5)
    # later blocks differ: the targets come from the full-precision path (as in GPTAQ)
    assert max(shifts(module, 1).values()) > 10 * max(shifts(module, 0).values())


def test_expert_cache_follows_each_experts_own_path(zoo, data, pool):
    """X^e of task t's samples follows expert t's own hidden states, block after block."""
    cache = ExpertTargets(pool)
    seen = {}

    class Probe(BlockMetrics):  # after each block: the output of each expert's block, per batch and task
        def on_train_epoch_end(self, trainer, pl_module):
            seen[pl_module.finished[-1].index] = {key: trace.replay.clone() for key, trace in cache._traces.items()}

    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("epmq", 1.0), TASKS, targets=cache)
    keys_before = set(module.state_dict())
    trainer_for(module, [Probe()]).fit(module, datamodule=CalibrationData(data))
    assert set(module.state_dict()) == keys_before  # no expert weights were registered on the module
    for t, task in enumerate(TASKS):
        expert = zoo["experts"][task]
        with torch.no_grad():
            for b in range(3):
                idx = (data.tasks[3 * b: 3 * b + 3] == t).nonzero().flatten()
                if not idx.numel():
                    continue
                states = expert(pixel_values=data.pixel_values[3 * b: 3 * b + 3][idx],
                                output_hidden_states=True).hidden_states
                for block in (0, 1):  # block i's output is the expert's hidden state i + 1
                    torch.testing.assert_close(seen[block][(b, t)], states[block + 1], rtol=1e-5, atol=1e-5)
    # the expert path is not the merged path
    merged_states = load_state(zoo["merged"])(pixel_values=data.pixel_values[:3], output_hidden_states=True).hidden_states
    t0 = data.tasks[0].item()
    assert not torch.allclose(seen[0][(0, t0)], merged_states[1][data.tasks[:3] == t0], atol=1e-3)


def test_progress_and_metrics_read_as_blocks_and_tasks(zoo, data):
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("gptq"), TASKS)
    metrics = BlockMetrics()
    descriptions = []

    class Bar(BlockProgressBar):
        def on_train_batch_start(self, *args):
            super().on_train_batch_start(*args)
            descriptions.append(self.train_progress_bar.desc)

    trainer = trainer_for(module, [metrics, Bar()], enable_progress_bar=True)
    trainer.fit(module, datamodule=CalibrationData(data))
    # batches of 3 interleaved samples: "block 1/2 · tasks mnist,svhn" or "... · task svhn"
    assert len(descriptions) == 6 and all(d.startswith("block 1/2 · task") for d in descriptions[:3])
    assert all(d.startswith("block 2/2 · task") for d in descriptions[3:]), descriptions
    assert any("mnist" in d for d in descriptions) and any("svhn" in d for d in descriptions)
    logged = trainer.callback_metrics
    for i in (0, 1):
        for name in LAYERS:
            expected = module.layer_metrics[f"encoder.layers.{i}.{name}"]
            assert logged[f"calib/block_{i}/{name}/loss"].item() == pytest.approx(expected["loss"])
            assert logged[f"calib/block_{i}/{name}/rtn_loss"].item() == pytest.approx(expected["rtn_loss"])
        assert logged[f"calib/block_{i}/time_s"] > 0
        assert logged[f"calib/block_{i}/peak_mem_mb"] > 0
    assert [h["block"] for h in metrics.history] == ["block_0", "block_1"]


def test_rtn_needs_no_data_and_rounds_each_layer(zoo, data):
    module = calibrate(zoo["merged"], "rtn", data)
    assert len(module.quant_results) == 12 and module._traces == {} and module._inputs == {}
    W = load_state(zoo["merged"]).encoder.layers[1].mlp.fc1.weight
    assert torch.equal(module.model.encoder.layers[1].mlp.fc1.weight,
                       module.quant_results["encoder.layers.1.mlp.fc1"].weight())
    assert not torch.equal(module.model.encoder.layers[1].mlp.fc1.weight, W)


def test_bad_configurations_fail_before_calibration(zoo, data):
    with pytest.raises(ValueError, match="solver"):
        BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, "awq", TASKS)
    with pytest.raises(ValueError, match="task_weights"):
        BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("gptq"), TASKS, task_weights={"cifar": 1.0})
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("gptq"), TASKS)
    with pytest.raises(ValueError, match="max_epochs"):
        trainer_for(module, max_epochs=1).fit(module, datamodule=CalibrationData(data))
    with pytest.raises(ValueError, match="needs expert targets"):
        BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("epmq", 1.0), TASKS)
    with pytest.raises(ValueError, match="adapter must be an epmq.engine.adapters.ModelAdapter"):
        BlockwiseCalibration(load_state(zoo["merged"]), None, solver("gptq"), TASKS)
    # the experts' targets come through the callback that forwards the fit hooks to the provider: without it,
    # a clear refusal at setup, before any batch
    pool = ExpertPool(zoo["root"] / "base", zoo["paths"])
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("epmq", 1.0), TASKS, targets=pool)
    bare = L.Trainer(accelerator="cpu", max_epochs=len(module.schedule), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    with pytest.raises(ValueError, match=r"add callbacks.expert_cache.ExpertActivationCache\(module.targets\)"):
        bare.fit(module, datamodule=CalibrationData(data))
    assert module.finished == [] and module.statistics is None
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("gptq"), ["mnist"])
    with pytest.raises(ValueError, match="out of range"):
        trainer_for(module).fit(module, datamodule=CalibrationData(data))


def test_shuffled_loader_is_refused(zoo, data):
    class Shuffled(CalibrationData):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(len(self.__dict__.setdefault("calls", [])))
            self.calls.append(1)
            return torch.utils.data.DataLoader(self.dataset, batch_size=3, shuffle=True, generator=g)

    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("gptq"), TASKS)
    with pytest.raises(ValueError, match="deterministic"):
        trainer_for(module).fit(module, datamodule=Shuffled(data))


class TokenSet(torch.utils.data.Dataset):
    def __init__(self, input_ids, tasks):
        self.input_ids, self.tasks = input_ids, tasks

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "task": self.tasks[i]}


def test_llama_adapter_block_kwargs_reproduce_the_models_own_layer_inputs():
    """A decoder family through the same loop: rotary tables and causal mask come from the captured
    kwargs; H from a plain model forward (no adapter) gives the same GPTQ weights, block by block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    merged = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(3)
    tasks = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    data = TokenSet(torch.randint(0, 64, (7, 8), generator=gen), tasks)
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=False)
    module = BlockwiseCalibration(copy.deepcopy(merged), LlamaAdapter(), solver("gptq"), TASKS, true_sequential=False)
    trainer_for(module).fit(module, train_dataloaders=loader)  # no datamodule: fit's own loader

    reference = copy.deepcopy(merged)
    tokens = torch.bincount(tasks).double() * 8
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            names = list(module.adapter.linear_layers(layer, module.stages[0]))
            stats = {n: LayerStatistics(layer.get_submodule(n).in_features) for n in names}
            current = {}
            handles = [layer.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n: stats[n].add(a[0], weight=current["w"])) for n in names]
            for b in range(0, 7, 3):
                current["w"] = (1.0 / tokens)[tasks[b: b + 3]]
                reference(input_ids=data.input_ids[b: b + 3], use_cache=False)
            for h in handles:
                h.remove()
            for n in names:
                lin = layer.get_submodule(n)
                expected = gptq(lin.weight, stats[n].H, SPEC)
                assert torch.equal(module.quant_results[f"model.layers.{i}.{n}"].weight(), expected.weight), (i, n)
                lin.weight.copy_(expected.weight)


def _epmq(merged_state, data, cache, strength=1.0):
    module = BlockwiseCalibration(load_state(merged_state), ADAPTER, solver("epmq", strength), TASKS, targets=cache)
    trainer_for(module).fit(module, datamodule=CalibrationData(data))
    return module


def test_kept_expert_targets_replay_exactly_and_only_for_the_same_batches(zoo, data, pool, monkeypatch):
    live = _epmq(zoo["merged"], data, ExpertTargets(pool), strength=0.5)
    cache = ExpertTargets(pool, keep=True)
    first = _epmq(zoo["merged"], data, cache, strength=0.5)
    assert len(cache.recorded) == len(first.schedule)
    for key, W in block_weights(live).items():
        assert torch.equal(block_weights(first)[key], W), key

    # a replaying fit never reads the pool, and still gives the live weights (other strength too)
    calls = []
    monkeypatch.setattr(pool, "expert_subset", lambda *a, **k: calls.append(a) or {})
    replayed = _epmq(zoo["merged"], data, cache, strength=0.5)
    other = _epmq(zoo["base"].state_dict(), data, cache, strength=3.0)  # another merged model
    assert calls == []
    for key, W in block_weights(live).items():
        assert torch.equal(block_weights(replayed)[key], W), key
    reference = _epmq(zoo["base"].state_dict(), data, ExpertTargets(ExpertPool(zoo["root"] / "base",
                                                                                         zoo["paths"])), 3.0)
    for key, W in block_weights(reference).items():
        assert torch.equal(block_weights(other)[key], W), key
    monkeypatch.undo()

    # other samples with the same task layout: the targets are recorded anew, not replayed
    moved = CalibrationSet(data.pixel_values + 0.5, data.tasks)
    fresh = _epmq(zoo["merged"], moved, ExpertTargets(pool), strength=0.5)
    again = _epmq(zoo["merged"], moved, cache, strength=0.5)
    for key, W in block_weights(fresh).items():
        assert torch.equal(block_weights(again)[key], W), key


def test_gptq_beats_rtn_on_every_layer(gptq_run):
    """GPTQ's loss under H never exceeds rounding the same weights to nearest under the same H."""
    metrics = gptq_run.layer_metrics
    assert len(metrics) == 12
    for name, m in metrics.items():
        assert 0 <= m["loss"] <= m["rtn_loss"] * (1 + 1e-9), name
    assert sum(m["loss"] for m in metrics.values()) < 0.9 * sum(m["rtn_loss"] for m in metrics.values())


def test_offloaded_blocks_and_a_cpu_cache_give_the_same_weights(zoo, data, pool):
    """offload_blocks (blocks on the CPU until their turn) and cache_device only move tensors."""
    reference = block_weights(calibrate(zoo["merged"], "epmq", data, pool=pool, strength=1.0))
    for options in ({"offload_blocks": True}, {"cache_device": "cpu"}, {"offload_blocks": True, "true_sequential": True}):
        module = calibrate(zoo["merged"], "epmq", data, pool=pool, strength=1.0, **options)
        if options.get("true_sequential"):
            assert len(module.schedule) == 8  # four groups per block
            continue
        for key, W in reference.items():
            assert torch.equal(block_weights(module)[key], W), (options, key)


def test_automatic_offload_keeps_a_cpu_model_whole_and_refuses_other_values(zoo, data, pool):
    module = calibrate(zoo["merged"], "gptq", data, offload_blocks="auto")
    assert module.placement.offload_blocks is False  # decided in setup: a CPU device never offloads
    with pytest.raises(ValueError, match="offload_blocks must be true, false or auto"):
        calibrate(zoo["merged"], "gptq", data, offload_blocks="sometimes")


def test_kept_targets_over_their_budget_are_dropped_and_computed_again(zoo, data, pool, monkeypatch):
    cache = ExpertTargets(pool, keep=True, keep_budget_gb=1e-6)  # about 1 KiB: less than one batch
    first = _epmq(zoo["merged"], data, cache, strength=0.5)
    assert cache.recorded == {} and not cache.keep
    calls = []
    read = pool.expert_subset
    monkeypatch.setattr(pool, "expert_subset", lambda *a, **k: calls.append(a) or read(*a, **k))
    second = _epmq(zoo["merged"], data, cache, strength=0.5)
    assert calls  # the pool was read again: nothing was replayed
    for key, W in block_weights(first).items():
        assert torch.equal(block_weights(second)[key], W), key


def test_a_recording_that_would_outgrow_its_budget_stops_after_the_first_step(zoo, data, pool):
    """The budget holds one step's targets but not all of them: the first step projects past it, so
    the recording is dropped then, not when it has filled the budget."""
    probe = ExpertTargets(pool, keep=True, keep_budget_gb=1.0)
    _epmq(zoo["merged"], data, probe, strength=0.5)
    sizes = [sum(Y.numel() * Y.element_size() for b in step.values() for Y in b.values())
             for step in probe.recorded.values()]
    assert len(sizes) >= 2 and max(sizes) < 1.5 * min(sizes)  # the steps hold alike amounts
    budget = 1.5 * sizes[0]  # one step fits, all of them do not
    held = []
    cache = ExpertTargets(pool, keep=True, keep_budget_gb=budget / 2**30)
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver("epmq", 0.5), TASKS, targets=cache)

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            held.append(len(cache.recorded))

    trainer_for(module, [Watch()]).fit(module, datamodule=CalibrationData(data))
    assert held[0] <= 1 and all(h == 0 for h in held[1:]) and not cache.keep


def test_the_fp_calibrated_merge_writes_the_unrounded_targets(zoo, data, pool):
    """RelaxedEPMQ runs E-PMQ's calibration and writes W* itself: at the first block (whose inputs
    are the merged model's own in both runs) its weights are E-PMQ's targets, not grid values, and
    the engine keeps no codes for it."""
    from epmq.core.solvers import RelaxedEPMQ

    seen = {}

    class Keeping(RelaxedEPMQ):
        def solve(self, W_m, stats):
            solution = super().solve(W_m, stats)
            seen.setdefault("block", (W_m.clone(), relaxed_target(stats.H, stats.C, W_m, 1.0, residual=True),
                                      solution.result.weight.clone()))
            return solution

    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, Keeping(strength=1.0, **SPEC_ARGS), TASKS,
                                  targets=ExpertTargets(pool))
    trainer_for(module).fit(module, datamodule=CalibrationData(data))
    W_m, W_star, written = seen["block"]
    assert torch.equal(written, W_star.float()) and not torch.equal(W_star, W_m)
    assert module.quant_results == {}
    # per row far more distinct values than a 4-bit grid of group 128 holds (16 per group)
    first = module.schedule[0].prefix + module.schedule[0].layers[0]
    weight = module.model.state_dict()[first + ".weight"]
    assert min(len(row.unique()) for row in weight) > 16 * -(-weight.shape[1] // 128)
