"""The `vlm-train` entry point (also `python -m vlm_train.train`, so `torchrun -m vlm_train.train` works)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vlm_train.train import distributed as D
from vlm_train.train.config import Config, RunConfig, register_configs, set_start_time
from vlm_train.train.trainer import run

register_configs()


def _sweep_dir(default: str, *, _root_: DictConfig) -> str:
    """hydra.sweep.dir: run.dir when it was set (on the command line or in a config), else `default`.

    run.dir names one run, so the jobs of a sweep cannot all train in it: each trains in the sweep folder's
    hydra.sweep.subdir (the job number). Hydra also writes the sweep's multirun.yaml there.
    """
    given = OmegaConf.to_container(_root_.run, resolve=False)["dir"]
    return default if given == RunConfig.dir else str(_root_.run.dir)


OmegaConf.register_new_resolver("sweep_dir", _sweep_dir, replace=True)


def sweep_job_dir(hydra_cfg: DictConfig) -> Path | None:
    """A sweep job's run folder, hydra.sweep.dir/hydra.sweep.subdir (multirun/<time>/<job number> by default); None
    outside a sweep (`-m`). It depends only on the config, so every rank of a torchrun launch names the same one
    (the default's time is rank 0's, as run.dir's is), and a relaunch of the sweep resumes each job in its folder."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hydra_cfg.runtime.output_dir))


@hydra.main(version_base=None, config_path="pkg://vlm_train.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """Compose the config from conf/ and the command-line overrides, then train."""
    job_dir = sweep_job_dir(HydraConfig.get())
    if job_dir is not None and D.env_info().active and not torch.distributed.is_initialized():
        # Rendezvousing again through torchrun's store hangs (the first group's keys are still there).
        raise RuntimeError(
            "a sweep under torchrun runs its jobs one after another in the same processes, and the previous job "
            "closed the process group: launch one torchrun per job (e.g. a shell loop over run.seed=...)"
        )
    if job_dir is not None:
        cfg.run.dir = str(job_dir)
        if not cfg.logger.wandb_name:  # the job number alone would not tell one sweep's runs from another's
            cfg.logger.wandb_name = f"{job_dir.parent.name}/{job_dir.name}"
    config: Config = OmegaConf.to_object(cfg)  # typed dataclasses; interpolations resolved
    run(config)


def main() -> None:
    """Under torchrun, join the process group first so that every rank names the same run folder, and keep it for
    every job of a sweep; leave it once, at the end (after an error, without waiting for the other ranks)."""
    if D.env_info().active:
        D.init_process_group()
        set_start_time(D.shared_start_time())
    try:
        _hydra_main()
    finally:
        D.shutdown(clean=sys.exc_info()[0] is None)


if __name__ == "__main__":
    main()
