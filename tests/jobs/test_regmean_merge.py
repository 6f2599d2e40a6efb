"""The comparison job's RegMean merge on the tiny CLIP zoo: one expert at a time, float32 Grams shared by the
query, key and value projections, against the in-memory merge with every expert's float64 Grams."""

from __future__ import annotations

import torch

from epmq.core.regmean import gram_matrices, regmean
from epmq.families.clip.suite import ClipSuite
from epmq.io.pool import ExpertPool
from epmq.jobs.compare import regmean_layers, regmean_merge, task_batches

from helpers import clip_zoo
from helpers.clip_zoo import TASKS


def test_streamed_regmean_matches_the_in_memory_merge(tmp_path):
    clip_zoo.build(tmp_path)
    suite = ClipSuite(base=str(tmp_path / "base"), experts=str(tmp_path / "experts" / "{task}"),
                      datasets=str(tmp_path / "data" / "{task}"), tasks=TASKS, cache_dir=str(tmp_path / "cache"))
    pool = ExpertPool(suite.base, suite.experts)
    data = suite.datamodule(calib_samples=8, select_samples=0, batch_size=8, num_workers=0, test_samples=4, seed=0)
    data.setup("fit")

    streamed = regmean_merge(suite, pool, data, alpha=0.6)

    by_task = task_batches(data, len(TASKS))
    experts, grams = {}, {}
    for t, task in enumerate(TASKS):
        tower = suite.model(pool.expert_state_dict(task))
        layers = regmean_layers(suite, tower)
        shared = gram_matrices(tower, layers, [suite.regmean_inputs(b) for b in by_task[t]])
        q, k = (next(key for key in layers if key.endswith(f"layers.0.self_attn.{n}.weight")) for n in ("q_proj", "k_proj"))
        assert shared[q] is shared[k]  # one input, one Gram
        grams[task] = {key: G.clone() for key, G in shared.items()}  # the old layout: a copy per weight
        experts[task] = tower.state_dict()
    reference = regmean(suite.model(pool.base_state_dict()).state_dict(), experts, grams, alpha=0.6)

    assert list(streamed) == list(reference)
    for key in reference:
        assert streamed[key].dtype == reference[key].dtype
        torch.testing.assert_close(streamed[key], reference[key], rtol=1e-4, atol=1e-6)
    fc1 = next(key for key in layers if key.endswith("layers.0.mlp.fc1.weight"))
    mean = torch.stack([experts[t][fc1] for t in TASKS]).mean(0)
    assert not torch.allclose(streamed[fc1], mean, atol=1e-4)  # the regression, not the average
