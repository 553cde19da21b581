"""Checkpoints that count only once complete: written under a temporary name, renamed last, last k kept.

Layout of checkpoints/step_XXXXXXXX/: model.safetensors, optimizer.pt (tensors and numbers only, loads with
torch.load(weights_only=True)), rng.pt (tensors), trainer_state.json, config.yaml, tokenizer/.
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


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


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
    """Write a complete checkpoint for `step` and prune older ones; returns its folder."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the checkpoint becomes visible only now, complete
    prune_checkpoints(root, keep_last)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are not listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


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
        raise ValueError(f"checkpoint {checkpoint} does not match the model: missing {missing}, unexpected {unexpected}")
