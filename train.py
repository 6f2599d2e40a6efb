"""Hydra entry point: `python train.py [overrides]` (see conf/train.yaml and the README)."""

import hydra
from omegaconf import DictConfig

import epmq  # noqa: F401  (registers the config resolvers that conf/hydra uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from epmq.jobs.errors import user_errors  # imported here so that `--help` and `--cfg job` stay fast
    from epmq.jobs.run import run

    with user_errors():
        return run(cfg)["objective"]


if __name__ == "__main__":
    main()
