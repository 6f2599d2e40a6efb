"""Suites: which base, which experts, which tasks and data, and how a model is evaluated on each task.

A suite is what a run's `suite:` config group instantiates (`_target_`). The jobs ask it:

    tasks                   the task names, in report order
    base, experts, merged   model sources for epmq.io.pool.ExpertPool (folders, files or hub ids;
                            merged: None unless the user brings a merged model)
    model(state_dict)       a model of the suite's family holding the given weights (what is calibrated)
    datamodule(**data)      the per-task data (calibration, selection, test loaders)
    evaluator(models, p)    a LightningModule for trainer.test: models maps each task to a model (or a
                            function building one, for experts loaded one at a time); after the test,
                            .results (task -> metric, and "avg") and .nll (task -> mean negative
                            log-likelihood, and "avg", which chooses the anchor); logs <p>/<task>/<metric>
    metric                  the name of the per-task metric ("acc": accuracy in [0, 1], higher is better)
    describe()              what report.json records about the suite

Optional members (defaults in brackets): higher_is_better [True] (False for perplexity: anchor
choice by the metric then takes the lowest), metric_scale [100] (how tables print the metric: 100 for
percentages, 1 for perplexity), extra_evaluation(model) [none] (more scores of the quantized model for
report.json's "extra_metrics", e.g. lm-eval tasks).

Families: `offline` (epmq.families.offline.suite.OfflineSuite, the embedded default); `flan_t5`
(epmq.families.flan_t5.suite.FlanT5Suite: FLAN-T5 on GLUE as text to text, exact match and STS-B's Spearman);
`clip` (epmq.families.clip.suite.ClipSuite: CLIP ViT experts from the hub or disk, TA8/TALL14/TALL20, zero-shot accuracy);
`causal_lm` (epmq.families.causal_lm.suite.CausalLMSuite: decoder-only experts of the model types that
epmq.families.causal_lm.architectures declares, each task's perplexity on its own text).
A new suite is a class with these members and a conf/suite/<name>.yaml whose `_target_` names it.
"""
