"""Shared by the tools: a model, its tokenizer and a prompt encoder from our checkpoint or a Hugging Face folder.

Ours: checkpoints/step_XXXXXXXX/ (model.safetensors, config.yaml, tokenizer/) or a run folder (its newest
complete checkpoint). Hugging Face: a Qwen2.5-VL folder (config.json, safetensors, tokenizer files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from vlm_train.data.config import DataConfig
from vlm_train.data.encode import Encoder
from vlm_train.data.image import PatchSpec
from vlm_train.model.vlm import VLM

try:
    from tools.convert_hf import load_checkpoint_model, resolve_checkpoint
except ModuleNotFoundError:  # run as a script: tools/ is on the path, the repository root may not be
    from convert_hf import load_checkpoint_model, resolve_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Loaded:
    """What a tool needs to run a checkpoint: the model (on its device), tokenizer, encoder and data settings."""

    model: VLM
    tokenizer: Any
    encoder: Encoder
    path: Path  # the checkpoint folder actually read
    kind: str  # "vlm_train" or "hf"
    data: DataConfig | None  # the training data config (ours only)


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face folder has config.json; ours has config.yaml beside model.safetensors (or is a run folder)."""
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def read_data_config(checkpoint: Path) -> DataConfig | None:
    """The `data` section of a checkpoint's config.yaml as a DataConfig (None if it has none)."""
    config = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    if "data" not in config:
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), config["data"])
    except Exception as exc:  # an older or newer schema: report it rather than guess
        raise ValueError(f"{checkpoint}/config.yaml: its data section does not fit this version: {exc}") from exc
    return OmegaConf.to_object(merged)


def _hf_pixel_range(path: Path) -> tuple[int, int] | None:
    """min/max pixels from a Hugging Face preprocessor_config.json, when it states them."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    size = config.get("size") or {}
    low = config.get("min_pixels", size.get("shortest_edge"))
    high = config.get("max_pixels", size.get("longest_edge"))
    return (int(low), int(high)) if low and high else None


def load(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    attn_backend: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    system_prompt: str | None = None,
) -> Loaded:
    """Load a checkpoint for inference (eval mode). Pixel range and system prompt default to the training ones."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    data = None
    if is_hf_folder(path):
        from transformers import AutoTokenizer

        from vlm_train.model.hf import from_hf

        model = from_hf(path, attn_backend=attn_backend or "auto", dtype=DTYPES[dtype])
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{path}: no usable tokenizer files beside the weights ({exc})") from exc
        kind, checkpoint, pixels, prompt = "hf", path, _hf_pixel_range(path), ""
    else:
        checkpoint = resolve_checkpoint(path)
        tokenizer, image_token_id = None, None
        data = read_data_config(checkpoint) if (checkpoint / "config.yaml").is_file() else None
        if not (checkpoint / "tokenizer").is_dir() and data is not None:
            # Older checkpoints without tokenizer/: rebuild the tokenizer the run was configured with.
            from vlm_train.data.synthetic import corpus_lines
            from vlm_train.data.tokenizer import load_tokenizer, special_ids

            tokenizer = load_tokenizer(data.tokenizer, corpus=corpus_lines())
            image_token_id = special_ids(tokenizer).image_pad
        model, saved_tokenizer = load_checkpoint_model(checkpoint, image_token_id)
        tokenizer = saved_tokenizer or tokenizer
        if attn_backend:
            model.set_attn_backend(attn_backend)
        model = model.to(DTYPES[dtype])
        kind = "vlm_train"
        pixels = (data.image.min_pixels, data.image.max_pixels) if data is not None else None
        prompt = data.system_prompt if data is not None else ""
    vision = model.cfg.vision
    low, high = pixels or (PatchSpec.min_pixels, PatchSpec.max_pixels)
    spec = PatchSpec(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=min_pixels or low,
        max_pixels=max_pixels or high,
    )
    encoder = Encoder(tokenizer, spec, system_prompt=prompt if system_prompt is None else system_prompt)
    return Loaded(model.to(device).eval(), tokenizer, encoder, checkpoint, kind, data)


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, model: VLM) -> torch.autocast:
    """bf16 autocast on CUDA (as in training) or when the weights are bf16; a no-op otherwise."""
    bf16 = model.llm.embed_tokens.weight.dtype == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or bf16)
