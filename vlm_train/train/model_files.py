"""The model's files in a checkpoint folder: the VLM alone in model.safetensors (what inference, export and merging
read), and each module attached to it (model/attachments.py) in the file it names."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_model
from torch import nn

from vlm_train.model.attachments import detached

MODEL_FILE = "model.safetensors"


def write_model_files(model: nn.Module, folder: Path) -> None:
    """Write model.safetensors and the attachments' files of a whole (unsharded) model into `folder`."""
    with detached(model) as parts:
        save_model(model, str(folder / MODEL_FILE))  # handles tied embeddings
    for part in parts:
        save_model(part.module, str(folder / part.file))
