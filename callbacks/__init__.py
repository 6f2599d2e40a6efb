"""Lightning shells around the calibration: they observe it or forward its hooks, and never solve.

    expert_cache   ExpertActivationCache: forwards the fit hooks to the experts' targets provider
                   (epmq.engine.targets.ExpertTargets)
    block_metrics  BlockMetrics (each block's time and peak memory) and BlockProgressBar
    eval_progress  EvaluationProgress: an evaluation's samples, rate and time left, in the log and on a bar
    step_saver     StepSaver: every finished step into the run folder's step store, for resuming

Callbacks import the engine and io only.
"""
