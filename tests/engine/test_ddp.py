"""Two CPU processes (DDP, gloo) calibrate exactly like one: same summed statistics, same weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from epmq.core.solvers import EPMQ
from epmq.engine.calibration import BlockwiseCalibration
from epmq.io.pool import ExpertPool

from helpers.tiny import ADAPTER, SPEC_ARGS, TASKS, CalibrationData, calibration_set, load_state, trainer_for


class RecordingEPMQ(EPMQ):
    """E-PMQ that keeps the rank-summed statistics it solves from (layer -> [H, C, tokens])."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {}

    def solve(self, W_m, stats):
        # H, C and the token count (stats.buffers() leaves out an H borrowed from a q/k/v neighbour)
        self.seen[len(self.seen)] = [stats.H.clone(), stats.C.clone(), torch.tensor(stats.tokens)]
        return super().solve(W_m, stats)


class Recorder(L.Callback):
    """Saves each block's rank-summed H, C and token counts, and the final weights, per rank."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_epoch_end(self, trainer, pl_module):
        step = pl_module.finished[-1]
        stats = dict(zip(step.layers, pl_module.solver.seen.values()))
        pl_module.solver.seen = {}
        torch.save({"stats": stats, "task_tokens": pl_module.task_tokens[(0, "self")].clone()},
                   self.out_dir / f"block{step.index}_rank{trainer.global_rank}.pt")

    def on_fit_end(self, trainer, pl_module):
        torch.save({"state": {k: v.clone() for k, v in pl_module.model.state_dict().items()},
                    "codes": {k: r.codes() for k, r in pl_module.quant_results.items()}},
                   self.out_dir / f"final_rank{trainer.global_rank}.pt")


def _run(zoo, out_dir, devices, shard_by_rank=False):
    out_dir.mkdir()
    pool = ExpertPool(zoo["root"] / "base", zoo["paths"])
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, RecordingEPMQ(strength=1.0, **SPEC_ARGS), TASKS,
                                  targets=pool, shard_batches=not shard_by_rank)
    callbacks = [Recorder(out_dir)]
    strategy = "ddp_spawn" if devices > 1 else "auto"
    data = CalibrationData(calibration_set((6, 4)), batch_size=3, shard_by_rank=shard_by_rank)
    trainer_for(module, callbacks, devices=devices, strategy=strategy).fit(module, datamodule=data)


def _check_against(one_dir, two_dir, rtol=1e-6):
    for block in (0, 1):
        one = torch.load(one_dir / f"block{block}_rank0.pt")
        assert torch.equal(one["task_tokens"], torch.tensor([6.0 * 17, 4.0 * 17], dtype=torch.float64))
        for rank in (0, 1):
            two = torch.load(two_dir / f"block{block}_rank{rank}.pt")
            assert torch.equal(two["task_tokens"], one["task_tokens"])  # n_t counted over all ranks
            for name, (H1, C1, n1) in one["stats"].items():
                H2, C2, n2 = two["stats"][name]
                assert n1 == n2 == 10 * 17, name  # every token exactly once over the two ranks
                assert (H2 - H1).norm() <= rtol * H1.norm(), name
                # C holds the residual R = Σ w (Ỹ − X̂W_mᵀ)ᵀX̂: the float32 rounding of the block's outputs, which
                # changes with the thread count, is relative to the outputs and so larger relative to R
                assert (C2 - C1).norm() <= 10 * rtol * C1.norm(), name
    # Processes of a 2-rank run get half the threads, so float32 matmuls inside the block round
    # differently (H then agrees to ~1e-7, not bit for bit): compare the integer codes.
    final_one = torch.load(one_dir / "final_rank0.pt")
    final = [torch.load(two_dir / f"final_rank{r}.pt") for r in (0, 1)]
    assert len(final_one["codes"]) == 12
    for key in final_one["state"]:  # every rank ends with the same weights
        assert torch.equal(final[0]["state"][key], final[1]["state"][key]), key
    for key, codes in final_one["codes"].items():
        same = final[0]["codes"][key] == codes
        assert same.float().mean().item() >= 0.999, key
        W1, W2 = final_one["state"][key + ".weight"], final[0]["state"][key + ".weight"]
        torch.testing.assert_close(W2[same], W1[same], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two spawned processes: 13 s of the fast suite's budget
def test_two_processes_match_one(zoo, tmp_path):
    _run(zoo, tmp_path / "one", devices=1)
    # the module splits the full loader: batches 0, 2 (6 samples) on rank 0, 1, 3 (4 samples) on rank 1
    _run(zoo, tmp_path / "two", devices=2)
    _check_against(tmp_path / "one", tmp_path / "two")
    # a loader already sharded by rank (5 samples each, 2 batches each), shard_batches=False; its
    # batches hold other samples, so the float32 batch products round differently (~1e-6)
    _run(zoo, tmp_path / "presharded", devices=2, shard_by_rank=True)
    _check_against(tmp_path / "one", tmp_path / "presharded", rtol=1e-5)


def test_uneven_rank_loaders_are_refused_before_calibration(zoo, tmp_path):
    """9 samples sharded by rank in batches of 2: 3 batches on rank 0, 2 on rank 1. Lightning
    broadcasts every step, so this would hang; the module refuses it in setup on every rank."""
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, EPMQ(strength=float("inf"), **SPEC_ARGS), TASKS,
                                  shard_batches=False)
    data = CalibrationData(calibration_set((5, 4)), batch_size=2, shard_by_rank=True)
    with pytest.raises(Exception, match="different numbers of calibration batches"):
        trainer_for(module, devices=2, strategy="ddp_spawn").fit(module, datamodule=data)
