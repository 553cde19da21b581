"""The `vlm-train` entry point (also `python -m vlm_train.train`, so `torchrun -m vlm_train.train` works)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from vlm_train.train import distributed as D
from vlm_train.train.config import Config, register_configs, set_start_time
from vlm_train.train.trainer import run

register_configs()


@hydra.main(version_base=None, config_path="pkg://vlm_train.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """Compose the config from conf/ and the command-line overrides, then train."""
    config: Config = OmegaConf.to_object(cfg)  # typed dataclasses; interpolations resolved
    run(config)


def main() -> None:
    """Under torchrun, join the process group first so that every rank names the same run folder."""
    if D.env_info().active:
        D.init_process_group()
        set_start_time(D.shared_start_time())
    _hydra_main()


if __name__ == "__main__":
    main()
