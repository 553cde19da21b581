"""Checkpoints that count only once complete: written under a temporary name, renamed last, last k kept.

Layout of checkpoints/step_XXXXXXXX/:
  model.safetensors            full model weights (rank 0)
  optimizer_rankNNNNN.pt       each rank's optimizer state (tensors and numbers: torch.load(weights_only=True))
  rng_rankNNNNN.pt             each rank's RNG states (tensors)
  loader_rankNNNNN.json        each rank's data-loader state
  trainer_state.json           step, curriculum position, guard state, world size, engine
  config.yaml, tokenizer/      the resolved config as YAML text, the tokenizer
Nothing is pickled. Every rank writes into the same temporary folder (run.dir must be on a filesystem all ranks
share); rank 0 renames it once every rank is done.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file(folder: Path, kind: str, rank: int, suffix: str) -> Path:
    return folder / f"{kind}_rank{rank:05d}.{suffix}"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX) :])


def staging_folder(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{TMP_PREFIX}{PREFIX}{step:08d}"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh, empty temporary folder for the checkpoint of `step` (call on one rank)."""
    tmp = staging_folder(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Make the checkpoint of `step` visible (one rename) and prune older ones (call on one rank)."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_folder(run_dir, step), final)  # the checkpoint becomes visible only now, complete
    prune_checkpoints(root, keep_last)
    return final


def save_rng(folder: Path, rank: int) -> None:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, rank_file(folder, "rng", rank, "pt"))


def load_rng(folder: Path, rank: int) -> None:
    state = torch.load(rank_file(folder, "rng", rank, "pt"), weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    tokenizer=None,
    keep_last: int = 2,
) -> Path:
    """A complete single-process checkpoint for `step` (model, optimizer, RNG, state); returns its folder."""
    tmp = begin(run_dir, step)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    if optimizer is not None:
        torch.save(optimizer.state_dict(), rank_file(tmp, "optimizer", 0, "pt"))
    save_rng(tmp, 0)
    write_json(tmp / TRAINER_STATE, trainer_state)
    (tmp / "config.yaml").write_text(config_yaml)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return commit(run_dir, step, keep_last)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are not listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_model_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load model.safetensors into `model`; missing or unexpected weights are an error naming them."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in checkpoint {checkpoint}")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not match the model: missing {missing}, unexpected {unexpected}"
        )
