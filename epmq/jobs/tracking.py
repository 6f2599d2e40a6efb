"""Ending experiment-tracker runs so that what they logged is on disk when the job returns.

W&B's `Run.finish()` only asks the wandb-core service to close the run's stream; the service
writes the rest of the run file (the last history rows, the summary, the exit record) on its own
time. An offline run read right after `run(cfg)` returns can therefore lack its last metrics:
measured here, a run file was 8192 bytes when `finish()` returned and 15299 bytes a second later.
`wandb.teardown()` waits for the service to shut down, which closes the stream and flushes it.
"""

from __future__ import annotations


def close_logger(logger, status: str = "success") -> None:
    """Finalize a Lightning logger; for W&B, finish the run and wait until its file is written.

    The service is only torn down when no other W&B run of this process is still active (a user's
    own run in a notebook keeps going; the next wandb.init starts a new service).
    """
    logger.finalize(status)
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    logger.experiment.finish(exit_code=0 if status == "success" else 1)
    if wandb.run is None:
        wandb.teardown()
