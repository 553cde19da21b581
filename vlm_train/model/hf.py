"""Import and export Hugging Face checkpoints (local folders, safetensors only, never a download).

- `from_hf(path)`: a whole Qwen2.5-VL checkpoint -> our VLM.
- `llm_from_hf(path)` / `load_llm_from_hf(llm, path)`: a Qwen2 / Qwen2.5 / Qwen3 / Llama LLM (or the LLM of a
  Qwen2.5-VL) -> our decoder.
- `load_vision_from_hf(model, path)`: the vision tower of a Qwen2.5-VL, and its merger when the widths fit -> our
  VLM.
- `to_hf(model, path)`: our VLM -> a folder transformers loads as Qwen2_5_VLForConditionalGeneration.
Equal logits to transformers' implementation are what tests/test_hf.py checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..jsonio import dumps
from .config import ModelConfig
from .hf_config import (
    LLM_SEMANTIC_FIELDS,
    VISION_SEMANTIC_FIELDS,
    VLM_TYPES,
    UnsupportedCheckpoint,
    differences,
    hf_config_dict,
    llm_config_from_hf,
    model_config_from_hf,
    read_hf_config,
    vision_config_from_hf,
)
from .hf_weights import SafetensorsFolder, hf_state_dict, llm_to_hf_name, load_hf_weights, vlm_to_hf_name
from .llm import DecoderLM
from .vlm import VLM
from .vocab_resize import mean_resized

__all__ = [
    "UnsupportedCheckpoint",
    "apply_hf_init",
    "from_hf",
    "llm_from_hf",
    "load_llm_from_hf",
    "load_vision_from_hf",
    "load_vlm_from_hf",
    "to_hf",
]

log = logging.getLogger(__name__)


def from_hf(path: str | Path, attn_backend: str = "auto", dtype: torch.dtype = torch.float32) -> VLM:
    """Build our VLM from a Qwen2.5-VL checkpoint folder (config.json + safetensors)."""
    hf_cfg = read_hf_config(path)
    cfg = model_config_from_hf(hf_cfg)
    cfg.attn_backend = attn_backend
    folder = SafetensorsFolder(path)
    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = VLM(cfg, vocab_size=cfg.llm.vocab_size, image_token_id=hf_cfg.image_token_id)
    load_hf_weights(model, folder, vlm_to_hf_name, dtype=dtype)
    return model


def llm_from_hf(path: str | Path, attn_backend: str = "auto", dtype: torch.dtype = torch.float32) -> DecoderLM:
    """Build our decoder from a Qwen2 / Qwen2.5 / Qwen3 / Llama checkpoint (or a Qwen2.5-VL's LLM)."""
    hf_cfg = read_hf_config(path)
    cfg = _llm_config(hf_cfg)
    with torch.device("meta"):
        llm = DecoderLM(cfg, attn_backend)
    load_hf_weights(llm, SafetensorsFolder(path), llm_to_hf_name, ignore=_is_vision_key, dtype=dtype)
    return llm


def load_llm_from_hf(llm: DecoderLM, path: str | Path) -> None:
    """Initialise an existing decoder (e.g. `vlm.llm`) from an LLM checkpoint; its config must match. A decoder
    with more vocabulary rows than the checkpoint (a tokenizer that gained the chat tokens) gets the new rows at
    the stored rows' mean, as transformers' `resize_token_embeddings(n, mean_resizing=True)`."""
    hf_cfg = read_hf_config(path)
    theirs = _llm_config(hf_cfg)
    fields = LLM_SEMANTIC_FIELDS + (("mrope_section",) if hf_cfg.model_type in VLM_TYPES else ())
    _raise_if_different(path, differences(llm.cfg, theirs, fields, "llm"))
    load_hf_weights(llm, SafetensorsFolder(path), llm_to_hf_name, ignore=_is_vision_key, grow=_vocab_growth(""))


def load_vision_from_hf(model: VLM, path: str | Path, include_merger: bool | None = None) -> None:
    """Initialise the vision tower, and the merger when it fits, of our VLM from a Qwen2.5-VL checkpoint.

    `include_merger=None` loads the merger when its output width (vision_config.out_hidden_size) is our LLM's
    hidden size; otherwise the merger (our projector) keeps its fresh weights, which is logged. True insists on it
    (a width mismatch is an error), False never loads it.
    """
    hf_cfg = _vlm_hf_config(path)
    theirs = vision_config_from_hf(hf_cfg.vision_config)
    _raise_if_different(path, differences(model.cfg.vision, theirs, VISION_SEMANTIC_FIELDS, "vision"))
    if include_merger is None:
        out_width, llm_width = hf_cfg.vision_config.out_hidden_size, model.cfg.llm.hidden_size
        include_merger = out_width == llm_width
        if not include_merger:
            log.warning(
                "%s: its merger writes %d-wide tokens, the LLM is %d wide: loading the vision tower only; "
                "the merger (projector) starts from fresh weights, so train it (an align stage) before the rest",
                path,
                out_width,
                llm_width,
            )
    prefixes = ("vision.", "projector.") if include_merger else ("vision.",)
    params = [n for n, _ in model.named_parameters() if n.startswith(prefixes)]

    def ignore(key: str) -> bool:
        return not key.startswith("visual.") or (not include_merger and key.startswith("visual.merger."))

    load_hf_weights(model, SafetensorsFolder(path), vlm_to_hf_name, params=params, ignore=ignore)


def load_vlm_from_hf(model: VLM, path: str | Path) -> None:
    """Initialise every weight of an existing VLM from a Qwen2.5-VL checkpoint of the same shape and settings (a
    vocabulary grown past the checkpoint's is filled as in `load_llm_from_hf`)."""
    hf_cfg = _vlm_hf_config(path)
    theirs = model_config_from_hf(hf_cfg)
    problems = (
        []
        if hf_cfg.image_token_id == model.image_token_id
        else [
            f"image_token_id: model has {model.image_token_id}, checkpoint has {hf_cfg.image_token_id} "
            "(use the checkpoint's tokenizer: data.tokenizer=<the same folder>)"
        ]
    )
    problems += differences(model.cfg.llm, theirs.llm, LLM_SEMANTIC_FIELDS + ("mrope_section",), "llm")
    # tokens_per_second shapes the data's video positions, so a whole-model load must agree on it too.
    problems += differences(model.cfg.vision, theirs.vision, VISION_SEMANTIC_FIELDS + ("tokens_per_second",), "vision")
    _raise_if_different(path, problems)
    load_hf_weights(model, SafetensorsFolder(path), vlm_to_hf_name, grow=_vocab_growth("llm."))


def apply_hf_init(model: VLM, cfg: ModelConfig) -> None:
    """Load the Hugging Face checkpoints named by `model.init_*_from_hf` (whole model first, then parts)."""
    if cfg.init_from_hf:
        load_vlm_from_hf(model, cfg.init_from_hf)
    if cfg.init_llm_from_hf:
        load_llm_from_hf(model.llm, cfg.init_llm_from_hf)
    if cfg.init_vision_from_hf:
        load_vision_from_hf(model, cfg.init_vision_from_hf)


def to_hf(
    model: VLM,
    path: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a Qwen2_5_VLForConditionalGeneration folder: config.json, safetensors, and the tokenizer if given."""
    from huggingface_hub import save_torch_state_dict

    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.llm.embed_tokens.weight.dtype
    tokens = _special_tokens(tokenizer)
    config = hf_config_dict(model.cfg, model.image_token_id, tokens, str(dtype).removeprefix("torch."))
    vision = model.cfg.vision
    patch_shape = (
        vision.hidden_size,
        vision.in_channels,
        vision.temporal_patch_size,
        vision.patch_size,
        vision.patch_size,
    )
    state = hf_state_dict(model, vlm_to_hf_name, dtype, patch_shape)
    if not model.cfg.llm.qkv_bias:
        state.update(_zero_qkv_biases(model, dtype))  # Qwen2.5-VL always has q/k/v biases; zeros are exact
    for old in out.glob("model*.safetensors*"):
        old.unlink()  # stale shards of an earlier export would be picked up by the index-less loader
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    (out / "config.json").write_text(dumps(config, indent=2) + "\n")
    generation = {k: tokens[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if tokens.get(k) is not None}
    (out / "generation_config.json").write_text(dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        _write_image_processor(out, vision)
    return out


# ---------------------------------------------------------------- helpers


def _llm_config(hf_cfg: Any):
    if hf_cfg.model_type in VLM_TYPES:
        return llm_config_from_hf(hf_cfg.text_config, tie_word_embeddings=hf_cfg.tie_word_embeddings)
    return llm_config_from_hf(hf_cfg)


def _vlm_hf_config(path: str | Path) -> Any:
    hf_cfg = read_hf_config(path)
    if hf_cfg.model_type not in VLM_TYPES:
        raise UnsupportedCheckpoint(
            f"{path}: model_type {hf_cfg.model_type!r} has no vision tower; need {' or '.join(VLM_TYPES)}"
        )
    return hf_cfg


def _vocab_growth(prefix: str) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    """A model whose vocabulary outgrew the checkpoint's (see vocab_resize.py) loads its first rows; the rest of
    the embedding and the (untied) LM head are grown as transformers' mean resizing does, embedding first."""
    return {f"{prefix}embed_tokens.weight": mean_resized, f"{prefix}lm_head.weight": mean_resized}


def _is_vision_key(key: str) -> bool:
    return key.startswith("visual.")


def _raise_if_different(path: str | Path, problems: list[str]) -> None:
    if problems:
        raise UnsupportedCheckpoint(
            f"checkpoint {path} was built with other settings than the model:\n  " + "\n  ".join(problems)
        )


def _special_tokens(tokenizer: Any) -> dict[str, int | None]:
    """Token ids config.json records, from our chat-template tokenizer (none without one)."""
    if tokenizer is None:
        return {}
    from ..data.tokenizer import special_ids

    ids = special_ids(tokenizer)
    # Our data marks video tokens with the image pad (see data/encode.py); HF's processor writes <|video_pad|>,
    # so a tokenizer that has one (Qwen's do) names it as the exported model's video token.
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    has_video_pad = video_pad is not None and video_pad != tokenizer.unk_token_id
    return {
        "video_token_id": video_pad if has_video_pad else None,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
        "eos_token_id": ids.im_end,
        "pad_token_id": ids.pad,
        "bos_token_id": ids.pad,  # Qwen's tokenizers start nothing with a BOS; <|endoftext|> stands in
    }


def _zero_qkv_biases(model: VLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for i, layer in enumerate(model.llm.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            out_features = getattr(layer.self_attn, proj).out_features
            state[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(out_features, dtype=dtype)
    return state


def _write_image_processor(out: Path, vision) -> None:
    """preprocessor_config.json for Qwen2-VL's image processor with our patch geometry and CLIP normalisation."""
    from ..data.image import IMAGE_MEAN, IMAGE_STD

    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [float(x) for x in IMAGE_MEAN],
        "image_std": [float(x) for x in IMAGE_STD],
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    (out / "preprocessor_config.json").write_text(dumps(config, indent=2) + "\n")
