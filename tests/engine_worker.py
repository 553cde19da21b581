"""Run under torchrun by test_engine.py: one optimizer step of DeepSpeed ZeRO-K over fixed packs, 2 micro-batches
per rank, and write the global loss, the reduced gradients, the grad norm and the updated weights per stage.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/engine_worker.py OUT_DIR STAGE [STAGE ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from vlm_train.train import distributed as D
from vlm_train.train.config import EngineConfig, GuardConfig, TrainConfig
from vlm_train.train.engines.deepspeed_zero import DeepSpeedEngine
from vlm_train.train.guards import Guard
from vlm_train.train.step import finish_step, forward_backward

from engine_cases import LOSS, make_model, rank_packs, start_full_stage


def main(out: Path, stages: list[int]) -> None:
    dist = D.init_process_group()
    torch.set_num_threads(1)
    packs = rank_packs(dist.rank, dist.world_size)
    train = TrainConfig(micro_batches=len(packs), grad_clip=1.0)
    for zero_stage in stages:
        engine = DeepSpeedEngine(
            EngineConfig(name="deepspeed", zero_stage=zero_stage),
            train,
            make_model(),
            make_model,
            torch.device("cpu"),
            dist,
            bf16=False,
        )
        start_full_stage(engine, train)
        result = forward_backward(engine, packs, LOSS)
        loss = float(D.all_reduce(torch.tensor(result.loss, dtype=torch.float64)))
        grads = engine.full_grads()  # the reduced gradients, before the update
        result = finish_step(engine, result, Guard(GuardConfig()), stop=False)
        model = engine.export_model()
        if dist.is_main:
            assert model is not None
            tensors = {f"grad/{k}": v for k, v in grads.items()}
            tensors.update({f"weight/{k}": v.detach().clone() for k, v in model.named_parameters()})
            tensors["loss"] = torch.tensor([loss, result.loss, result.grad_norm], dtype=torch.float64)
            save_file(tensors, str(out / f"zero{zero_stage}.safetensors"))
        engine.close()
    D.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
