"""A trained model for inference: the VLM, its tokenizer and a prompt encoder, from one of our checkpoints or a
Hugging Face Qwen2.5-VL folder. Used by the generate, evaluate, convert and merge tools.

Ours: checkpoints/step_XXXXXXXX/ (model.safetensors, config.yaml, tokenizer/) or a run folder (its newest
complete checkpoint). Hugging Face: a Qwen2.5-VL folder (config.json, safetensors, tokenizer files). A checkpoint of a
run with a draft stage also holds its Eagle3 draft (draft.safetensors): `load_draft`.
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
from vlm_train.devices import dtype_of
from vlm_train.model.config import ModelConfig
from vlm_train.model.draft import DRAFT_FILE, DraftShapeConfig, Eagle3Draft
from vlm_train.model.hf_weights import SafetensorsFolder, load_hf_weights
from vlm_train.model.vlm import VLM
from vlm_train.train.checkpoint import MODEL_FILE, read_checkpoint_file, resolve_checkpoint
from vlm_train.train.config import Eagle3Config


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


def read_config(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's config.yaml as plain data."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.yaml (the training config saved with every checkpoint)")
    return read_checkpoint_file(path, lambda p: yaml.safe_load(p.read_text()) or {}, "training config")


def read_data_config(checkpoint: Path) -> DataConfig | None:
    """The `data` section of a checkpoint's config.yaml as a DataConfig (None if it has none)."""
    config = read_config(checkpoint)
    if "data" not in config:
        return None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), config["data"])
    except Exception as exc:  # an older or newer schema: report it rather than guess
        raise ValueError(f"{checkpoint}/config.yaml: its data section does not fit this version: {exc}") from exc
    return OmegaConf.to_object(merged)


def load_checkpoint_model(checkpoint: Path, image_token_id: int | None = None) -> tuple[VLM, Any]:
    """Our VLM and tokenizer (or None) from a training checkpoint folder, built on meta then filled."""
    config = read_config(checkpoint)
    if "model" not in config:
        raise ValueError(f"{checkpoint / 'config.yaml'} has no model section")
    cfg = ModelConfig.from_dict(config["model"])
    for field in ("init_from_hf", "init_llm_from_hf", "init_vision_from_hf", "init_vision_from"):
        setattr(cfg, field, "")  # the checkpoint's own weights are what we want
    weights = read_checkpoint_file(checkpoint / MODEL_FILE, lambda p: SafetensorsFolder(p.parent), "weights")
    if "llm.embed_tokens.weight" not in weights.keys():
        raise ValueError(f"{checkpoint / MODEL_FILE} has no llm.embed_tokens.weight: not a vlm_train checkpoint")
    vocab_size = weights.shape("llm.embed_tokens.weight")[0]
    tokenizer = None
    if (checkpoint / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        from vlm_train.data.tokenizer import special_ids

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint / "tokenizer"), local_files_only=True)
        image_token_id = special_ids(tokenizer).image_pad if image_token_id is None else image_token_id
    if image_token_id is None:
        raise ValueError(f"{checkpoint} has no tokenizer/ folder: pass --image-token-id")
    cfg.llm.vocab_size = vocab_size
    with torch.device("meta"):
        model = VLM(cfg, vocab_size=vocab_size, image_token_id=image_token_id)
    load_hf_weights(model, weights, lambda name: name, dtype=weights.tensor("llm.embed_tokens.weight").dtype)
    return model, tokenizer


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
    torch_dtype = dtype_of(dtype)
    data = None
    if is_hf_folder(path):
        from transformers import AutoTokenizer

        from vlm_train.model.hf import from_hf

        model = from_hf(path, attn_backend=attn_backend or "auto", dtype=torch_dtype)
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
            from vlm_train.data.config import tokenizer_corpus
            from vlm_train.data.tokenizer import load_tokenizer, special_ids

            tokenizer = load_tokenizer(data.tokenizer, corpus=tokenizer_corpus(data))
            image_token_id = special_ids(tokenizer).image_pad
        model, saved_tokenizer = load_checkpoint_model(checkpoint, image_token_id)
        tokenizer = saved_tokenizer or tokenizer
        if attn_backend:
            model.set_attn_backend(attn_backend)
        model = model.to(torch_dtype)
        kind = "vlm_train"
        pixels = (data.image.min_pixels, data.image.max_pixels) if data is not None else None
        prompt = data.system_prompt if data is not None else ""
    vision = model.cfg.vision
    low, high = pixels or (PatchSpec.min_pixels, PatchSpec.max_pixels)
    spec = PatchSpec(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        tokens_per_second=vision.tokens_per_second,
        min_pixels=min_pixels or low,
        max_pixels=max_pixels or high,
    )
    encoder = Encoder(tokenizer, spec, system_prompt=prompt if system_prompt is None else system_prompt)
    return Loaded(model.to(device).eval(), tokenizer, encoder, checkpoint, kind, data)


def read_eagle3_config(checkpoint: Path) -> Eagle3Config:
    """The `eagle3` section of a checkpoint's config.yaml (the draft's shape and hidden_dtype)."""
    config = read_config(checkpoint)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Eagle3Config), config.get("eagle3") or {})
    except Exception as exc:  # an older or newer schema: report it rather than guess
        raise ValueError(f"{checkpoint}/config.yaml: its eagle3 section does not fit this version: {exc}") from exc
    return OmegaConf.to_object(merged)


def load_draft(checkpoint: str | Path, target: VLM) -> Eagle3Draft:
    """The Eagle3 draft saved beside a checkpoint's VLM (draft.safetensors, with its vocabulary maps), built from
    config.yaml's eagle3.draft and the target's LLM config, on the target's device and dtype, in eval mode."""
    checkpoint = resolve_checkpoint(Path(checkpoint).expanduser())
    path = checkpoint / DRAFT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {DRAFT_FILE}: train one with curriculum=eagle3")
    from safetensors.torch import load_file

    shape: DraftShapeConfig = read_eagle3_config(checkpoint).draft
    llm = target.llm.cfg
    draft = Eagle3Draft(llm, shape, llm.vocab_size, target.cfg.attn_backend)
    weights = read_checkpoint_file(path, load_file, "draft")
    where = f"{path} does not fit the draft that {checkpoint}/config.yaml (eagle3.draft) and the target describe"
    try:
        missing, unexpected = draft.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise ValueError(f"{where}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    weight = target.llm.embed_tokens.weight
    # Float weights follow the target; the vocabulary maps (integer and bool buffers) keep their types.
    return draft.to(device=weight.device, dtype=weight.dtype).eval()
