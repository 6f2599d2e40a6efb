"""Hydra entry point: `python train.py [overrides]` (see conf/train.yaml and the README)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from epmq.run import run  # imported here so that `--help` and `--cfg job` stay fast

    return run(cfg)["objective"]


if __name__ == "__main__":
    main()
