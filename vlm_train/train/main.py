"""The `vlm-train` entry point (also `python -m vlm_train.train`, so `torchrun -m vlm_train.train` works)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from vlm_train.train.config import Config, register_configs
from vlm_train.train.trainer import run

register_configs()


@hydra.main(version_base=None, config_path="pkg://vlm_train.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Compose the config from conf/ and the command-line overrides, then train."""
    config: Config = OmegaConf.to_object(cfg)  # typed dataclasses; interpolations resolved
    run(config)


if __name__ == "__main__":
    main()
