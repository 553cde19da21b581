"""Save and restore the whole training state across ranks: model, optimizer, RNG, data loader, curriculum position
and guards. A resumed run continues exactly where the checkpoint was taken (same losses, on CPU, bit for bit)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from vlm_train.train import checkpoint as C
from vlm_train.train import distributed as D
from vlm_train.train.engine import Engine

log = logging.getLogger("vlm_train")


@dataclass
class Resume:
    """A checkpoint to continue from; `state` is None for weights only (e.g. one converted from Hugging Face)."""

    folder: Path
    state: dict[str, Any] | None


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """train.resume: auto (the newest complete checkpoint of the run folder, if any), never, or a folder."""
    if resume in ("", "never", "none", "false"):
        return None
    if resume == "auto":
        found = C.complete_checkpoints(run_dir)
        return found[-1] if found else None
    folder = Path(resume).expanduser()
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"train.resume={resume}: not a complete checkpoint folder (no model.safetensors); "
            "use auto, never, or a checkpoints/step_XXXXXXXX folder"
        )
    return folder


def open_resume(run_dir: Path, resume: str, world_size: int, engine_name: str, zero_stage: int) -> Resume | None:
    """The checkpoint rank 0 picked (every rank gets the same), checked against this launch."""
    folder = D.broadcast_object(find_checkpoint(run_dir, resume))
    if folder is None:
        return None
    state_file = folder / C.TRAINER_STATE
    state = C.read_json(state_file) if state_file.is_file() else {}
    if "position" not in state:
        log.info("initialising the weights from %s (it holds no training state)", folder)
        return Resume(folder, None)
    saved = (state["world_size"], state["engine"], state["zero_stage"])
    if saved != (world_size, engine_name, zero_stage):
        raise ValueError(
            f"checkpoint {folder} was saved by {saved[0]} rank(s) with engine={saved[1]} zero_stage={saved[2]}, but "
            f"this launch has {world_size} rank(s) with engine={engine_name} zero_stage={zero_stage}: the optimizer "
            "and data-loader state are per rank, so resume with the same launch (or train.resume=never)"
        )
    return Resume(folder, state)


def save_training_state(
    run_dir: Path,
    step: int,
    engine: Engine,
    loader_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_yaml: str,
    tokenizer: Any,
    keep_last: int,
) -> Path:
    """Every rank writes its part into one temporary folder; rank 0 makes it visible when all are done."""
    rank, is_main = D.env_info().rank, D.env_info().rank == 0
    tmp = C.staging_folder(run_dir, step)
    if is_main:
        C.begin(run_dir, step)
    D.barrier()
    model = engine.export_model()  # collective under ZeRO-3
    if is_main:
        assert model is not None
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        C.write_json(tmp / C.TRAINER_STATE, trainer_state)
        (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
    engine.save_optimizer(tmp)
    C.save_rng(tmp, rank)
    C.write_json(C.rank_file(tmp, "loader", rank, "json"), loader_state)
    D.barrier()
    final = C.commit(run_dir, step, keep_last) if is_main else C.checkpoint_dir(run_dir) / f"{C.PREFIX}{step:08d}"
    D.barrier()
    return final


def loader_state(folder: Path, rank: int) -> dict[str, Any]:
    path = C.rank_file(folder, "loader", rank, "json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was saved by fewer ranks than this launch has")
    return C.read_json(path)
