"""What the engine feeds every block and every step equals what the unmodified models compute.

For CLIP vision, T5 (encoder, then decoder) and Llama, tiny models of the real classes with two
experts saved to disk: a solver that leaves every weight as it is lets the engine walk the whole
schedule; forward hooks record the inputs its merged blocks and layers receive, and the targets its
expert cache provides. References come from forward hooks in the unmodified merged model and in
each expert model, run on the same batches. True-sequential on Llama then shows that a step sees the
steps before it quantized, and that a quantized block's output is what running the model gives.
"""

from __future__ import annotations

import copy

import pytest
import torch

from epmq.core.gptq import QuantResult
from epmq.core.merge import task_arithmetic
from epmq.core.quant import QuantSpec
from epmq.core.solvers import GPTQ, Requirements, Solution
from epmq.engine.calibration import BlockwiseCalibration
from epmq.io.pool import ExpertPool

from helpers.families import FAMILIES, TASKS, loader, model_inputs
from helpers.tiny import trainer_for


class Unchanged:
    """A solver that keeps W: the engine walks the model, nothing is quantized."""

    name = "unchanged"
    spec = QuantSpec(bits=8)  # the width the engine stores the (all-zero) codes with

    def __init__(self, needs_targets: bool):
        self.requirements = Requirements(targets=needs_targets)

    def solve(self, W, stats):
        z = torch.zeros(W.shape[0], 1)
        return Solution(QuantResult(W.detach().clone(), torch.zeros_like(W, dtype=torch.uint8), z + 1, z,
                                    torch.zeros(W.shape[1], dtype=torch.long), 0.0))


def record_layer_inputs(model, adapter, store: dict, key_fn):
    """Forward hooks on every quantized linear: store[key_fn(stage, block, name)] += [its input]."""
    handles = []
    for stage in adapter.stages(model):
        for i, block in enumerate(adapter.blocks(model, stage)):
            for name, linear in adapter.linear_layers(block, stage).items():
                handles.append(linear.register_forward_hook(
                    lambda m, a, o, k=(stage.name, i, name): store.setdefault(key_fn(*k), []).append(a[0].detach())))
    return handles


def layer_io(model, adapter, batches, name, which: str):
    """(stage, block, layer) -> [per batch: the layer's input (which="in") or output ("out")] from
    one plain forward of the unmodified model per batch."""
    store, handles = {}, []
    for stage in adapter.stages(model):
        for i, block in enumerate(adapter.blocks(model, stage)):
            for lname, linear in adapter.linear_layers(block, stage).items():
                handles.append(linear.register_forward_hook(
                    lambda m, a, o, k=(stage.name, i, lname): store.setdefault(k, []).append(
                        (a[0] if which == "in" else o).detach())))
    with torch.no_grad():
        for batch in batches:
            model(**model_inputs(name, batch))
    for h in handles:
        h.remove()
    return store


@pytest.mark.parametrize("name", ["clip", "t5", "llama"])
@pytest.mark.parametrize("true_sequential", [False, True])
def test_every_step_sees_the_models_own_layer_inputs_and_expert_outputs(name, true_sequential, tmp_path):
    family = FAMILIES[name]
    base, experts, paths = family.save_zoo(tmp_path)
    merged_state = task_arithmetic(base.state_dict(), {t: e.state_dict() for t, e in experts.items()}, 0.5)
    merged = family.base()
    merged.load_state_dict(merged_state)
    batches = family.batches(torch.Generator().manual_seed(1))
    pool = ExpertPool(tmp_path / "base", paths)

    module = BlockwiseCalibration(copy.deepcopy(merged), family.adapter, Unchanged(needs_targets=True), TASKS, targets=pool,
                                  true_sequential=true_sequential)
    fed, targets = {}, {}  # fed: (layer, step index) -> the layer's inputs in that step's forwards

    def grab_targets(m, a, o, k):  # what the targets provider hands the statistics for this layer and batch
        stats = module.statistics  # (none while the finished block runs once more to advance)
        if stats is not None:
            fed.setdefault((k, module.step_index), []).append(a[0].detach())
        if stats is not None and k[2] in stats.batch_targets:
            targets.setdefault(k, []).append(stats.batch_targets[k[2]].clone())

    handles = [linear.register_forward_hook(lambda m, a, o, k=(stage.name, i, lname): grab_targets(m, a, o, k))
               for stage in module.stages for i, block in enumerate(module.adapter.blocks(module.model, stage))
               for lname, linear in module.adapter.linear_layers(block, stage).items()]
    trainer_for(module, max_epochs=len(module.schedule)).fit(module, train_dataloaders=loader(batches))
    for h in handles:
        h.remove()
    steps_per_block = {(s.stage.name, s.block): 0 for s in module.schedule}
    for s in module.schedule:
        steps_per_block[(s.stage.name, s.block)] += 1
    if true_sequential:
        assert max(steps_per_block.values()) >= 4  # several steps per block really ran

    reference = layer_io(merged, module.adapter, batches, name, "in")
    expert_out = {t: layer_io(e, module.adapter, batches, name, "out") for t, e in experts.items()}
    assert {key for key, _ in fed} == set(reference) and len(reference) >= 12
    for key, ref in reference.items():
        # each step runs the block once per batch: the layer's input at its own step
        own = next(s for s in module.schedule if (s.stage.name, s.block) == key[:2] and key[2] in s.layers)
        assert len(targets[key]) == len(batches)  # the layer's own step only
        got = fed[(key, own.index)]
        assert len(got) == len(batches)
        if own.last:  # a step's forward ends after its last layer: the block's last layers run in their own step only
            assert [step for k, step in fed if k == key] == [own.index]
        for b, (x, y) in enumerate(zip(got, ref)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} batch {b}: {m}")
        # targets: expert t's own output for its samples (padding included: it is weighted out)
        for b, Y in enumerate(targets[key]):
            tasks = batches[b]["task"]
            for t, task in enumerate(TASKS):
                rows = tasks == t
                torch.testing.assert_close(Y[rows], expert_out[task][key][b][rows], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{key} batch {b} task {task}: {m}")


def test_true_sequential_steps_see_earlier_steps_quantized_and_blocks_chain(monkeypatch):
    """Tiny Llama, GPTQ at 2 bits, true-sequential: step k's inputs are those of the block with the
    groups before k quantized, and the next block receives the quantized block's real output."""
    import epmq.engine.calibration

    family = FAMILIES["llama"]
    merged = family.base()
    batches = family.batches(torch.Generator().manual_seed(2))
    module = BlockwiseCalibration(copy.deepcopy(merged), family.adapter, GPTQ(bits=2, group_size=16, blocksize=16), TASKS,
                                  true_sequential=True)
    fed = {}
    handles = record_layer_inputs(module.model, module.adapter, fed, lambda s, i, n: (i, n))
    blocks = list(module.adapter.blocks(module.model, module.stages[0]))
    block_inputs = {}  # block -> the hidden states of every call the engine makes of it
    run_block = epmq.engine.calibration.run_block

    def recording_run_block(block, inputs):
        block_inputs.setdefault(blocks.index(block), []).append(inputs.hidden.clone())
        return run_block(block, inputs)

    monkeypatch.setattr(epmq.engine.calibration, "run_block", recording_run_block)
    trainer_for(module, max_epochs=len(module.schedule)).fit(module, train_dataloaders=loader(batches))
    for h in handles:
        h.remove()
    results = module.quant_results
    stage = module.stages[0]

    # the final quantized model, run normally: each block's input must be what the engine fed it
    quantized = copy.deepcopy(merged)
    with torch.no_grad():
        for key, r in results.items():
            quantized.get_submodule(key).weight.copy_(r.weight())
    normal_inputs = {}
    hooks = [b.register_forward_pre_hook(
        lambda m, a, kw, i=i: normal_inputs.setdefault(i, []).append((a[0] if a else kw["hidden_states"]).clone()),
        with_kwargs=True) for i, b in enumerate(module.adapter.blocks(quantized, stage))]
    with torch.no_grad():
        for batch in batches:
            quantized(**model_inputs("llama", batch))
    for h in hooks:
        h.remove()
    for i in (0, 1):
        first_calls = block_inputs[i][:len(batches)]  # the block's first step captures its inputs
        for x, y in zip(first_calls, normal_inputs[i]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # block 1's inputs differ from the float model's: block 0 really is quantized
    float_in = layer_io(merged, module.adapter, batches, "llama", "in")[("decoder", 1, "self_attn.q_proj")]
    assert (fed[(1, "self_attn.q_proj")][0] - float_in[0]).abs().max() > 1e-3

    # step k of block i: the block with groups < k quantized, groups >= k float, on the block's inputs
    for i, block in enumerate(module.adapter.blocks(merged, stage)):
        captured = []  # the arguments the (final, quantized) model passes to block i
        h0 = module.model.get_submodule(stage.blocks)[i].register_forward_pre_hook(
            lambda m, a, kw: captured.append((a, kw)), with_kwargs=True)
        with torch.no_grad():
            for batch in batches:
                module.model(**model_inputs("llama", batch))
        h0.remove()
        steps = [s for s in module.schedule if s.block == i]
        for k, step in enumerate(steps):
            partial = copy.deepcopy(block)
            with torch.no_grad():
                for earlier in steps[:k]:
                    for lname in earlier.layers:
                        partial.get_submodule(lname).weight.copy_(results[earlier.prefix + lname].weight())
            expected = run_recording(partial, captured, step.layers)
            all_float = run_recording(copy.deepcopy(block), captured, step.layers)
            for lname in step.layers:
                got = fed[(i, lname)][k * len(batches):(k + 1) * len(batches)]
                for x, y, z in zip(got, expected[lname], all_float[lname]):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"block {i} {lname}: {m}")
                    if k > 0:  # the earlier groups' 2-bit weights really changed what this step sees
                        assert (x - z).abs().max() > 1e-3, (i, lname)


def run_recording(block, calls, layers) -> dict[str, list[torch.Tensor]]:
    """Inputs of `layers` when `block` runs on each recorded call (args, kwargs)."""
    seen = {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0]))
             for n in layers]
    with torch.no_grad():
        for a, kw in calls:
            block(*a, **kw)
    for h in hooks:
        h.remove()
    return seen


class Keeping(Unchanged):
    """Unchanged, and keeps every solved layer's statistics in solve order."""

    def __init__(self):
        super().__init__(needs_targets=False)
        self.stats = []

    def solve(self, W, stats):
        self.stats.append(stats)
        return super().solve(W, stats)


def test_t5_labels_padded_further_change_no_decoder_statistics():
    """From labels alone, a decoder position counts when its own label is real (what T5's loss
    scores): an extra -100 column reaches the layers with weight 0."""
    family = FAMILIES["t5"]
    batches = [{k: v for k, v in b.items()} for b in family.batches(torch.Generator().manual_seed(0))]
    padded = [b | {"labels": torch.cat([b["labels"], torch.full((len(b["labels"]), 2), -100)], dim=1)}
              for b in batches]
    runs = []
    for data in (batches, padded):
        solver = Keeping()
        module = BlockwiseCalibration(family.base(), family.adapter, solver, TASKS)
        trainer_for(module, max_epochs=len(module.schedule)).fit(module, train_dataloaders=loader(data))
        runs.append(solver.stats)
    assert len(runs[0]) == len(runs[1]) == 2 * 7 + 2 * 11  # every linear of the two stages
    assert sum(b.tokens > a.tokens for a, b in zip(*runs)) == 2 * 7 + 4  # the pad rows reach the decoder's
    for a, b in zip(*runs):  # ... self-attention and MLP layers, with weight 0
        torch.testing.assert_close(b.H, a.H, rtol=1e-4, atol=1e-6 * a.H.abs().max().item())
