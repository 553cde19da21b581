"""Hugging Face configs <-> our ModelConfig: which checkpoints we can express, and the config.json we write.

Reading goes through `transformers.AutoConfig` (local folder only), so both the released flat Qwen2.5-VL
config.json and transformers 5's nested one are understood. Writing uses the released flat layout, which
transformers 4.x, 5.x and serving stacks all read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ROPE_TYPES, LLMConfig, ModelConfig, VisionConfig

VLM_TYPES = ("qwen2_5_vl",)
LLM_TYPES = ("qwen2", "qwen3", "llama")
HF_VISION_EPS = 1e-6  # Qwen2.5-VL hard-codes the vision and merger RMSNorm eps
HF_VISION_THETA = 10000.0


class UnsupportedCheckpoint(ValueError):
    """A checkpoint folder whose architecture or settings this model cannot express."""


def read_hf_config(path: str | Path) -> Any:
    """The transformers config of a local checkpoint folder; clear errors for a missing or foreign folder."""
    from transformers import AutoConfig

    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face checkpoint folder: no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in VLM_TYPES + LLM_TYPES:
        raise UnsupportedCheckpoint(
            f"{folder}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(VLM_TYPES)} (whole VLM) and {', '.join(LLM_TYPES)} (LLM only)"
        )
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def default_mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's t/h/w split ([16, 24, 24] for head_dim 128) scaled to another head_dim."""
    half = head_dim // 2
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def _rope(cfg: Any, where: str) -> tuple[float, list[int] | None, str, dict[str, float]]:
    """(theta, mrope_section or None, rope_type, rope_scaling) of a text config."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = "default" if rope_type == "mrope" else rope_type
    if rope_type not in ROPE_TYPES:
        raise UnsupportedCheckpoint(
            f"{where}: rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(ROPE_TYPES)} (M-RoPE is default with an mrope_section)"
        )
    scaling = {key: float(params[key]) for key in ROPE_TYPES[rope_type]}
    section = params.get("mrope_section")
    return float(params.get("rope_theta", 10000.0)), list(section) if section else None, rope_type, scaling


def llm_config_from_hf(cfg: Any, tie_word_embeddings: bool | None = None) -> LLMConfig:
    """Our LLMConfig for a Qwen2 / Qwen3 / Llama config, or the text part of a Qwen2.5-VL config."""
    model_type = cfg.model_type
    where = f"{model_type} config"
    problems = []
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (only silu)")
    if getattr(cfg, "use_sliding_window", False):
        problems.append("use_sliding_window=true (sliding-window attention is not supported)")
    if getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=true (adds an o_proj bias, which this decoder does not have)")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=true (the decoder MLP has no biases)")
    if problems:
        raise UnsupportedCheckpoint(f"{where}: unsupported settings: {'; '.join(problems)}")
    theta, section, rope_type, scaling = _rope(cfg, where)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qwen2_like = model_type in ("qwen2", "qwen2_5_vl_text")  # q/k/v always carry a bias there
    return LLMConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=cfg.num_key_value_heads or heads,
        head_dim=0 if head_dim * heads == cfg.hidden_size else head_dim,
        intermediate_size=cfg.intermediate_size,
        rope_theta=theta,
        mrope_section=section or default_mrope_section(head_dim),
        rope_type=rope_type,
        rope_scaling=scaling,
        qkv_bias=qwen2_like,
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(cfg.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings),
        rms_norm_eps=float(cfg.rms_norm_eps),
        initializer_range=float(getattr(cfg, "initializer_range", 0.02)),
    )


def vision_config_from_hf(cfg: Any) -> VisionConfig:
    """Our VisionConfig for the vision_config of a Qwen2.5-VL config."""
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedCheckpoint(f"qwen2_5_vl vision_config: hidden_act={cfg.hidden_act!r} (only silu)")
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    full = sorted(int(i) for i in cfg.fullatt_block_indexes)
    every_block_full = set(range(cfg.depth)) <= set(full)
    return VisionConfig(
        patch_size=int(cfg.patch_size),
        temporal_patch_size=int(cfg.temporal_patch_size),
        in_channels=cfg.in_channels,
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        spatial_merge_size=cfg.spatial_merge_size,
        rms_norm_eps=HF_VISION_EPS,
        rope_theta=float(params.get("rope_theta", HF_VISION_THETA)),
        initializer_range=float(getattr(cfg, "initializer_range", 0.02)),
        window_size=0 if every_block_full else int(cfg.window_size),
        fullatt_block_indexes=[] if every_block_full else full,
        tokens_per_second=int(getattr(cfg, "tokens_per_second", 2)),
    )


def model_config_from_hf(cfg: Any) -> ModelConfig:
    """Our ModelConfig for a Qwen2.5-VL config (the merger's output width is the LLM's hidden size)."""
    if cfg.model_type not in VLM_TYPES:
        raise UnsupportedCheckpoint(f"a whole VLM needs a {' or '.join(VLM_TYPES)} checkpoint, got {cfg.model_type!r}")
    llm = llm_config_from_hf(cfg.text_config, tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.vision_config.out_hidden_size != llm.hidden_size:
        raise UnsupportedCheckpoint(
            f"vision_config.out_hidden_size ({cfg.vision_config.out_hidden_size}) differs "
            f"from the LLM hidden_size ({llm.hidden_size})"
        )
    return ModelConfig(vision=vision_config_from_hf(cfg.vision_config), llm=llm)


def differences(ours: Any, theirs: Any, names: tuple[str, ...], where: str) -> list[str]:
    """'where.name: model has A, checkpoint has B' for every listed field that differs."""
    return [
        f"{where}.{n}: model has {getattr(ours, n)!r}, checkpoint has {getattr(theirs, n)!r}"
        for n in names
        if getattr(ours, n) != getattr(theirs, n)
    ]


# Settings that change the function but not the weight shapes: loading must check them explicitly.
LLM_SEMANTIC_FIELDS = (
    "rope_theta",
    "rope_type",
    "rope_scaling",
    "rms_norm_eps",
    "qk_norm",
    "qkv_bias",
    "tie_word_embeddings",
    "resolved_head_dim",
)
VISION_SEMANTIC_FIELDS = (
    "rope_theta",
    "rms_norm_eps",
    "window_size",
    "fullatt_block_indexes",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
)


def hf_config_dict(cfg: ModelConfig, image_token_id: int, tokens: dict[str, int | None], dtype: str) -> dict:
    """config.json of Qwen2_5_VLForConditionalGeneration for our model, in the released flat layout."""
    llm, vision = cfg.llm, cfg.vision
    problems = []
    if llm.qk_norm:
        problems.append("llm.qk_norm=true (Qwen2.5-VL has no qk-norm)")
    if llm.rope_type != "default":
        problems.append(f"llm.rope_type={llm.rope_type} (Qwen2.5-VL uses plain M-RoPE)")
    if llm.resolved_head_dim * llm.num_heads != llm.hidden_size:
        problems.append(f"llm.head_dim={llm.head_dim} (Qwen2.5-VL needs hidden_size / num_heads)")
    if vision.rms_norm_eps != HF_VISION_EPS:
        problems.append(f"vision.rms_norm_eps={vision.rms_norm_eps} (Qwen2.5-VL hard-codes {HF_VISION_EPS})")
    if problems:
        raise UnsupportedCheckpoint(f"this model cannot be written as Qwen2.5-VL: {'; '.join(problems)}")
    windowed = vision.window_size > 0
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(llm.mrope_section)},
        "max_position_embeddings": 128000,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": llm.num_layers,
        "attention_dropout": 0.0,
        "initializer_range": llm.initializer_range,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": dtype,
        "image_token_id": image_token_id,
        "vision_config": {
            "depth": vision.depth,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "hidden_act": "silu",
            "in_channels": vision.in_channels,
            "in_chans": vision.in_channels,  # the key name transformers 4.x used
            "out_hidden_size": llm.hidden_size,
            "patch_size": vision.patch_size,
            "spatial_patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
            # Windows off is expressed as every block attending in full.
            "window_size": vision.window_size if windowed else 112,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes) if windowed else list(range(vision.depth)),
            "tokens_per_second": vision.tokens_per_second,
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
            "initializer_range": vision.initializer_range,
        },
    }
    config.update({name: value for name, value in tokens.items() if value is not None})
    return config
