"""What `python train.py` runs: `run(cfg)` calls the job `job._target_` names (quantize: the main job;
compare: every method side by side), each a short sequence of the shared steps in steps.py."""
