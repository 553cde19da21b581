"""Model configs: plain dataclasses so Hydra can register them as structured configs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .attention import ATTENTION_BACKENDS


@dataclass
class VisionConfig:
    """NaViT / Qwen2.5-VL vision tower."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    spatial_merge_size: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02  # std of the normal init of the tower's and the projector's weights
    # Qwen2.5-VL window attention: blocks not listed in fullatt_block_indexes attend within windows of
    # window_size x window_size pixels (112 in Qwen2.5-VL); 0 turns windows off, every block attends per image.
    window_size: int = 0
    fullatt_block_indexes: list[int] = field(default_factory=list)
    # Qwen2.5-VL: M-RoPE time steps per second of video; the data side's temporal positions use it (PatchSpec).
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_units(self) -> int:
        """Window side in merge units (LLM tokens); 0 when window attention is off."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    def uses_window(self, block: int) -> bool:
        """Whether block `block` attends within windows rather than over the whole image."""
        return self.window_size > 0 and block not in self.fullatt_block_indexes

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * t * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def validate(self) -> None:
        """Raise ValueError if the shapes do not fit together."""
        _positive(
            self,
            "vision",
            (
                "patch_size",
                "temporal_patch_size",
                "in_channels",
                "hidden_size",
                "depth",
                "num_heads",
                "intermediate_size",
                "spatial_merge_size",
            ),
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision.hidden_size ({self.hidden_size}) must be divisible by vision.num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            # head_dim/2 rotary dims per axis (h, w), each rotated in pairs.
            raise ValueError(
                f"vision head_dim (hidden_size/num_heads = {self.head_dim}) must be divisible by 4 for the 2D rotary"
            )
        unit_px = self.patch_size * self.spatial_merge_size
        if self.window_size < 0 or self.window_size % unit_px:
            raise ValueError(
                f"vision.window_size ({self.window_size}) must be 0 (off) or a positive multiple of "
                f"patch_size * spatial_merge_size = {unit_px} pixels"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision.fullatt_block_indexes {bad} are not blocks of a depth-{self.depth} tower")
        if not self.initializer_range > 0:
            raise ValueError(f"vision.initializer_range must be > 0, got {self.initializer_range}")


# Rotary variants and the rope_scaling keys each needs (the names transformers uses).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class LLMConfig:
    """Decoder of the Qwen2 / Qwen2.5 / Qwen3 / Llama family."""

    vocab_size: int = 0  # 0: taken from the tokenizer when the model is built
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_heads (Qwen3 sets it explicitly)
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])  # t, h, w; sums to head_dim / 2
    rope_type: str = "default"  # default | llama3 (Llama 3.x frequency scaling, parameters in rope_scaling)
    rope_scaling: dict[str, float] = field(default_factory=dict)
    qkv_bias: bool = True
    qk_norm: bool = False
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # std of the normal init of the LLM's weights

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError if the shapes do not fit together."""
        _positive(self, "llm", ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"))
        if self.vocab_size < 0:
            raise ValueError(f"llm.vocab_size must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
        if self.head_dim < 0:
            raise ValueError(f"llm.head_dim must be >= 0 (0 = hidden_size // num_heads), got {self.head_dim}")
        if not self.head_dim and self.hidden_size % self.num_heads:
            raise ValueError(
                f"llm.hidden_size ({self.hidden_size}) must be divisible by "
                f"llm.num_heads ({self.num_heads}), or set llm.head_dim"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"llm.num_heads ({self.num_heads}) must be a multiple of llm.num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"llm.rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        missing = sorted(set(ROPE_TYPES[self.rope_type]) - set(self.rope_scaling))
        if missing:
            raise ValueError(f"llm.rope_type={self.rope_type} needs llm.rope_scaling keys {missing}")
        head_dim = self.resolved_head_dim
        if head_dim % 2:
            raise ValueError(f"llm head_dim ({head_dim}) must be even for rotary embeddings")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != head_dim // 2:
            raise ValueError(
                f"llm.mrope_section ({list(self.mrope_section)}) must be 3 numbers (t, h, w) summing to "
                f"head_dim/2 = {head_dim // 2}"
            )
        if not self.initializer_range > 0:
            raise ValueError(f"llm.initializer_range must be > 0, got {self.initializer_range}")


@dataclass
class ModelConfig:
    """The whole VLM: vision tower, projector (shaped by both), LLM and runtime switches."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    attn_backend: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each ViT block and decoder layer
    # Hugging Face folders (safetensors) to start from; see vlm_train.model.hf. Shapes must match this config.
    init_from_hf: str = ""  # a whole Qwen2.5-VL checkpoint
    init_llm_from_hf: str = ""  # a Qwen2 / Qwen2.5 / Qwen3 / Llama LLM, or the LLM of a Qwen2.5-VL
    init_vision_from_hf: str = ""  # the vision tower of a Qwen2.5-VL, and its merger when its width is the LLM's
    # The vision tower (vision.*) of one of our checkpoints: a checkpoint folder, or a run folder (its newest)
    init_vision_from: str = ""

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        self.vision.validate()
        self.llm.validate()
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a nested mapping (a plain dict or an OmegaConf DictConfig); unknown keys are an error."""
        data = dict(data)
        vision = _build(VisionConfig, data.pop("vision", {}), "vision")
        llm = _build(LLMConfig, data.pop("llm", {}), "llm")
        top = _build(cls, data, "model")
        top.vision, top.llm = vision, llm
        return top


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {where} config keys {unknown}; valid keys: {sorted(names)}")
    values = {k: (list(v) if k in ("mrope_section", "fullatt_block_indexes") else v) for k, v in data.items()}
    if "rope_scaling" in values:
        values["rope_scaling"] = {str(k): float(v) for k, v in dict(values["rope_scaling"]).items()}
    return cls(**values)


def _positive(cfg: Any, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{where}.{name} must be positive, got {getattr(cfg, name)}")
