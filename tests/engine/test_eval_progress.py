"""The evaluation's progress reaches the log: counts, rates and time left, per task when a task is long."""

from __future__ import annotations

import logging

from callbacks.eval_progress import EvaluationProgress
from epmq.jobs.steps import evaluate, prepare, trainer

from helpers.config import make_cfg


def test_every_task_and_the_whole_evaluation_are_counted_in_the_log(tmp_path, zoo_cache, caplog):
    cfg = make_cfg(tmp_path, zoo_cache, "quant=gptq")
    prepared = prepare(cfg)
    model = prepared.suite.model(prepared.merged_state)
    loaders = prepared.data.test_dataloader()
    with caplog.at_level(logging.DEBUG, logger="callbacks.eval_progress"):
        evaluate(cfg, prepared, model, loaders, "merged/test")
    lines = [r.getMessage() for r in caplog.records if r.name == "callbacks.eval_progress"]
    tasks = prepared.suite.tasks
    assert lines[0] == f"merged/test: evaluating {len(tasks)} task(s), {sum(len(loader) for loader in loaders)} batches"
    for k, task in enumerate(tasks):
        assert f"merged/test {task} ({k + 1}/{len(tasks)}): 48 samples" in lines
        assert any(line.startswith(f"merged/test {task}: 48 samples in ") for line in lines)
    assert lines[-1].startswith(f"merged/test: {48 * len(tasks)} samples in ") and lines[-1].endswith("samples/s)")


def test_a_long_task_logs_its_rate_and_time_left_as_it_goes(tmp_path, zoo_cache, caplog):
    cfg = make_cfg(tmp_path, zoo_cache, "quant=gptq", "data.batch_size=8")
    prepared = prepare(cfg)
    progress = EvaluationProgress("merged/test", bar=False, every_s=0.0)  # every batch counts as "long"
    evaluator = prepared.suite.evaluator({t: prepared.suite.model(prepared.merged_state) for t in prepared.suite.tasks},
                                         "merged/test")
    with caplog.at_level(logging.INFO, logger="callbacks.eval_progress"):
        trainer(cfg, prepared, enable_progress_bar=False, callbacks=[progress]).test(evaluator, dataloaders=list(prepared.data.test_dataloader()), verbose=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "callbacks.eval_progress"]
    first = prepared.suite.tasks[0]
    assert any(line.startswith(f"merged/test {first}: 8/48 samples, ") and line.endswith("s left") for line in lines)
    assert any(line.startswith(f"merged/test {first}: 48 samples in ") for line in lines)
