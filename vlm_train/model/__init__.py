"""The model: NaViT vision tower -> patch merger -> decoder LM, all over packed varlen sequences."""

from .attention import ATTENTION_BACKENDS, resolve_backend, varlen_attention
from .config import LLMConfig, ModelConfig, VisionConfig
from .flops import PackFlops, TrainedParts, flops_cost, pack_flops, sizes_flops
from .llm import DecoderLM
from .projector import PatchMerger
from .vit import VisionTransformer
from .vlm import VLM, VLMOutput

__all__ = [
    "ATTENTION_BACKENDS",
    "VLM",
    "DecoderLM",
    "LLMConfig",
    "ModelConfig",
    "PackFlops",
    "PatchMerger",
    "TrainedParts",
    "VLMOutput",
    "VisionConfig",
    "VisionTransformer",
    "flops_cost",
    "pack_flops",
    "resolve_backend",
    "sizes_flops",
    "varlen_attention",
]
