"""The model: NaViT vision tower -> patch merger -> decoder LM, all over packed varlen sequences."""

from .attention import ATTENTION_BACKENDS, resolve_backend, varlen_attention
from .config import LLMConfig, ModelConfig, VisionConfig
from .flops import PackFlops, pack_flops
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
    "VLMOutput",
    "VisionConfig",
    "VisionTransformer",
    "pack_flops",
    "resolve_backend",
    "varlen_attention",
]
