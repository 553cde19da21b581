"""Run under torchrun by test_fsdp2.py, on the fixed packs of engine_cases with the model built on the meta device.

  step OUT INIT RESHARD   one optimizer step from the weights in INIT (a safetensors file, streamed into the
                          shards); writes OUT/fsdp2.safetensors (rank 0): the global loss, the reduced gradients, the
                          grad norm and the updated weights (gathered one tensor at a time)
  save OUT INIT           the same step, then the sharded checkpoint files (model and optimizer) into OUT
  reshard SRC OUT         load SRC's shards (saved by any number of ranks) and save them again into OUT

Usage: python -m torch.distributed.run --nproc_per_node=N tests/fsdp2_worker.py MODE ARGS...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from vlm_train.train import distributed as D
from vlm_train.train.config import EngineConfig, FSDPConfig, GuardConfig, TrainConfig
from vlm_train.train.engines.fsdp2 import FSDP2Engine
from vlm_train.train.guards import Guard
from vlm_train.train.step import finish_step, forward_backward

from engine_cases import LOSS, make_model, rank_packs, start_full_stage


def engine_on_meta(train: TrainConfig, reshard: bool = True) -> FSDP2Engine:
    with torch.device("meta"):
        model = make_model()
    cfg = EngineConfig(name="fsdp2", fsdp=FSDPConfig(reshard_after_forward=reshard))
    return FSDP2Engine(cfg, train, model, torch.device("cpu"), D.env_info(), bf16=False)


def one_step(engine: FSDP2Engine, train: TrainConfig, packs: list):
    start_full_stage(engine, train)
    result = forward_backward(engine, packs, LOSS)
    loss = float(D.all_reduce(torch.tensor(result.loss, dtype=torch.float64)))
    grads = engine.full_grads()
    result = finish_step(engine, result, Guard(GuardConfig()), stop=False)
    return loss, grads, result


def main(mode: str, args: list[str]) -> None:
    dist = D.init_process_group()
    torch.set_num_threads(1)
    packs = rank_packs(dist.rank, dist.world_size) if dist.world_size <= 4 else []
    train = TrainConfig(micro_batches=max(len(packs), 1), grad_clip=1.0)
    out = Path(args[0])
    if mode in ("step", "save"):
        engine = engine_on_meta(train, reshard=mode == "save" or args[2] == "1")
        engine.draw_initial_weights(seed=0)
        initial = load_file(args[1])
        with torch.no_grad():
            for name, param in engine.model.named_parameters():
                engine.copy_whole(param, initial[name])
        loss, grads, result = one_step(engine, train, packs)
        if mode == "save":
            engine.save_weights(out)
        else:
            weights = {k: v.clone() for k, v in engine.whole_parameters()}
            if dist.is_main:
                tensors = {f"grad/{k}": v for k, v in grads.items()}
                tensors.update({f"weight/{k}": v for k, v in weights.items()})
                tensors["loss"] = torch.tensor([loss, result.loss, result.grad_norm], dtype=torch.float64)
                save_file(tensors, str(out / "fsdp2.safetensors"))
    else:  # reshard
        engine = engine_on_meta(train)
        engine.materialize(seed=1, checkpoint=out)  # the source folder
        engine.load_optimizer_shards(out)
        start_full_stage(engine, train)  # stage 0: the saved optimizer state is applied
        engine.save_weights(Path(args[1]))
    engine.close()
    D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
