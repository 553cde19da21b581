"""Run under torchrun by test_vision_stage.py: one vision-stage step of DeepSpeed ZeRO-K over the fixed packs, two
micro-batches per rank, and write the global loss and the reduced gradients per stage.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/vision_worker.py OUT_DIR STAGE [STAGE ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from vision_cases import all_packs, make_model, objective_config, start_vision_stage, vocabulary

from vlm_train.train import distributed as D
from vlm_train.train.config import EngineConfig, GuardConfig, TrainConfig
from vlm_train.train.engines.deepspeed_zero import DeepSpeedEngine
from vlm_train.train.guards import Guard
from vlm_train.train.step import finish_step
from vlm_train.train.vision_step import vision_forward_backward

from helpers import encoder


def main(out: Path, stages: list[int]) -> None:
    dist = D.init_process_group()
    torch.set_num_threads(1)
    packs = all_packs()[2 * dist.rank : 2 * dist.rank + 2]
    train = TrainConfig(micro_batches=len(packs), grad_clip=1.0)
    image_pad = encoder().special.image_pad
    for zero_stage in stages:
        cfg = EngineConfig(name="deepspeed", zero_stage=zero_stage)
        engine = DeepSpeedEngine(cfg, train, make_model(), make_model, torch.device("cpu"), dist, False)
        start_vision_stage(engine, train)
        result = vision_forward_backward(
            engine, packs, objective_config(), vocabulary(), image_pad, dist.rank, dist.world_size
        )
        grads = engine.full_grads()
        result = finish_step(engine, result, Guard(GuardConfig()), stop=False)
        if dist.is_main:
            tensors = {f"grad/{k}": v for k, v in grads.items()}
            tensors["loss"] = torch.tensor([result.loss], dtype=torch.float64)
            save_file(tensors, str(out / f"zero{zero_stage}.safetensors"))
        engine.close()
    D.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
