"""Decoder LM of the Qwen2 / Qwen2.5 / Qwen3 / Llama family over packed sequences.

Parameter names mirror HF `Qwen2ForCausalLM` minus its `model.` prefix, so an HF state dict loads by a rename.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .config import LLMConfig
from .mlp import SwiGLU
from .norm import RMSNorm
from .rope import apply_rotary, inv_frequencies, llama3_inv_frequencies, mrope_cos_sin


class Attention(nn.Module):
    """Causal grouped-query attention confined to each sample of the pack."""

    def __init__(self, cfg: LLMConfig, attn_backend: str) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.attn_backend = attn_backend
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm on q and k before the rotary
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=self.attn_backend)
        return self.o_proj(out.reshape(t, -1))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block."""

    def __init__(self, cfg: LLMConfig, attn_backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """Token embeddings, decoder layers with (M-)RoPE, final norm and LM head over a packed sequence [T]."""

    def __init__(self, cfg: LLMConfig, attn_backend: str = "auto", activation_checkpointing: bool = False) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ValueError("llm.vocab_size is 0: set it, or build through VLM(...) which takes it from the tokenizer")
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn_backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> embeddings [T, D]."""
        return self.embed_tokens(input_ids)

    def forward_embeds(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None
    ) -> torch.Tensor:
        """Embeddings [T, D] with position_ids [3, T] or [T] -> final-normed hidden states [T, D]."""
        if position_ids.shape[-1] != embeds.shape[0]:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match {embeds.shape[0]} tokens")
        inv_freq = inv_frequencies(self.cfg.resolved_head_dim, self.cfg.rope_theta, embeds.device)
        if self.cfg.rope_type == "llama3":
            inv_freq = llama3_inv_frequencies(inv_freq, self.cfg.rope_scaling)
        cos, sin = mrope_cos_sin(position_ids, inv_freq, self.cfg.mrope_section)
        x = embeds
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, D] -> logits [T, V]."""
        return self.lm_head(hidden)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None
    ) -> torch.Tensor:
        """Text-only convenience: input_ids [T] -> logits [T, V]."""
        return self.logits(self.forward_embeds(self.embed(input_ids), position_ids, cu_seqlens, max_seqlen))
