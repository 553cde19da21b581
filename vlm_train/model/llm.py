"""Decoder LM of the Qwen2 / Qwen2.5 / Qwen3 / Llama family over packed sequences.

Parameter names mirror HF `Qwen2ForCausalLM` minus its `model.` prefix, so an HF state dict loads by a rename.
Training runs `forward_embeds` over a pack; generation runs `prefill` over a pack of prompts, then `decode_step`
one token per sequence against a `KVCache`; speculative decoding runs `extend` (several new tokens per sequence at
once) and rolls the cache back with `KVCache.truncate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import varlen_attention
from .config import LLMConfig
from .mlp import SwiGLU
from .norm import RMSNorm
from .rope import apply_rotary, inv_frequencies, llama3_inv_frequencies, mrope_cos_sin


def rotary_cos_sin(
    cfg: LLMConfig, position_ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] of `cfg`'s (M-)RoPE at position_ids [3, T] or [T]."""
    inv_freq = inv_frequencies(cfg.resolved_head_dim, cfg.rope_theta, device)
    if cfg.rope_type == "llama3":
        inv_freq = llama3_inv_frequencies(inv_freq, cfg.rope_scaling)
    return mrope_cos_sin(position_ids, inv_freq, cfg.mrope_section)


class Attention(nn.Module):
    """Causal grouped-query attention confined to each sample of the pack. q, k and v read `input_size` features
    (default the hidden size; an Eagle3 draft's read twice that)."""

    def __init__(self, cfg: LLMConfig, attn_backend: str, input_size: int | None = None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.attn_backend = attn_backend
        width = input_size or cfg.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm on q and k before the rotary
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] -> rotated q [..., Hq, hd], rotated k and v [..., Hkv, hd]; cos/sin [..., hd]."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=self.attn_backend)
        return self.o_proj(out.reshape(t, -1))

    def prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        """`forward` over a pack of prompts that also stores their keys and values in `cache`."""
        t = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        cache.store_prompts(layer, k, v, cu_seqlens)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend=self.attn_backend)
        return self.o_proj(out.reshape(t, -1))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """One new token per sequence, x [B, D], attending to its cached keys and values and itself."""
        q, k, v = self.project(x, cos, sin)
        keys, values, mask = cache.append(layer, k, v)
        # [B, H, 1, hd] queries over [B, Hkv, capacity, hd]; the mask hides unfilled cache slots.
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.flatten(1))

    def extend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """m new tokens per sequence, x [B, m, D], attending to the cache and causally to each other."""
        q, k, v = self.project(x, cos, sin)
        keys, values, mask = cache.append_many(layer, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


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

    def prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        cache: KVCache,
        layer: int,
    ) -> torch.Tensor:
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.self_attn.extend(self.input_layernorm(x), cos, sin, cache, layer)
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
        return self.forward_capture(embeds, position_ids, cu_seqlens, max_seqlen)[0]

    def forward_capture(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_embeds`, also returning the output of each decoder layer in `capture` (before the final norm;
        what an Eagle3 draft reads)."""
        if position_ids.shape[-1] != embeds.shape[0]:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match {embeds.shape[0]} tokens")
        cos, sin = self.rotary(position_ids, embeds.device)
        x, captured = embeds, {}
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
            if i in capture:
                captured[i] = x
        return self.norm(x), [captured[i] for i in capture]

    def rotary(self, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] of the (M-)RoPE at position_ids [3, T] or [T]."""
        return rotary_cos_sin(self.cfg, position_ids, device)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for sequences of up to `capacity` tokens (prompt and generated)."""
        return KVCache(len(self.layers), capacity)

    def prefill(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """`forward_embeds` over a pack of prompts, filling the empty `cache` with one row per prompt.

        Returns the final-normed hidden states [T, D]. Each row's next position is its prompt's largest
        position + 1, as in Qwen2-VL (an image spans fewer positions than it has tokens).
        """
        return self.prefill_capture(embeds, position_ids, cu_seqlens, max_seqlen, cache)[0]

    def prefill_capture(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        cache: KVCache,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`prefill`, also returning the output of each decoder layer in `capture` (as `forward_capture`)."""
        if position_ids.shape[-1] != embeds.shape[0]:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match {embeds.shape[0]} tokens")
        bounds = cu_seqlens.tolist()
        if max_seqlen is None:
            max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        rows = position_ids.view(-1, position_ids.shape[-1]).amax(0)  # per token, its largest M-RoPE row
        next_position = torch.stack([rows[a:b].max() + 1 for a, b in zip(bounds[:-1], bounds[1:])])
        cache.start(bounds, next_position)
        cos, sin = self.rotary(position_ids, embeds.device)
        x, captured = embeds, {}
        for i, layer in enumerate(self.layers):
            x = layer.prefill(x, cos, sin, cu_seqlens, max_seqlen, cache, i)
            if i in capture:
                captured[i] = x
        return self.norm(x), [captured[i] for i in capture]

    def decode_step(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embeddings [B, D] of one new token per cached sequence -> final-normed hidden states [B, D]."""
        if embeds.shape[0] != cache.batch_size:
            raise ValueError(f"{embeds.shape[0]} new tokens for a cache of {cache.batch_size} sequences")
        cos, sin = self.rotary(cache.next_position.to(embeds.device), embeds.device)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer.decode(x, cos, sin, cache, i)
        cache.advance()
        return self.norm(x)

    def extend(
        self, embeds: torch.Tensor, cache: KVCache, capture: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embeddings [B, m, D] of m new tokens per cached sequence (at its next m positions, each attending to
        the cache and causally to the others) -> final-normed hidden states [B, m, D] and the outputs of the
        layers in `capture`. What speculative decoding verifies a drafted chain with, in one forward."""
        if embeds.dim() != 3 or embeds.shape[0] != cache.batch_size:
            raise ValueError(f"extend takes [{cache.batch_size}, m, D] embeddings, got {tuple(embeds.shape)}")
        batch, m = embeds.shape[0], embeds.shape[1]
        positions = cache.next_position.to(embeds.device).unsqueeze(1) + torch.arange(m, device=embeds.device)
        cos, sin = self.rotary(positions.flatten(), embeds.device)
        cos, sin = cos.view(batch, m, -1), sin.view(batch, m, -1)
        x, captured = embeds, {}
        for i, layer in enumerate(self.layers):
            x = layer.extend(x, cos, sin, cache, i)
            if i in capture:
                captured[i] = x
        cache.advance(m)
        return self.norm(x), [captured[i] for i in capture]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, D] -> logits [T, V]."""
        return self.lm_head(hidden)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None
    ) -> torch.Tensor:
        """Text-only convenience: input_ids [T] -> logits [T, V]."""
        return self.logits(self.forward_embeds(self.embed(input_ids), position_ids, cu_seqlens, max_seqlen))


class KVCache:
    """Keys and values of every layer for a batch of sequences: [B, Hkv, capacity, head_dim] and a length per row.

    Filled by `DecoderLM.prefill`, grown one token per row by `DecoderLM.decode_step` (or several by
    `DecoderLM.extend`); `select` keeps only some rows (sequences that have not finished), `truncate` drops
    generated tokens (rejected guesses of speculative decoding).
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens held per row
        self.next_position = torch.zeros(0, dtype=torch.long)  # rotary position of each row's next token
        self.prompt_lengths = torch.zeros(0, dtype=torch.long)  # tokens of each row's prompt (never truncated)
        self._bounds: list[int] = [0]  # the prompts' cu_seqlens, while prefilling

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    def start(self, bounds: list[int], next_position: torch.Tensor) -> None:
        """Begin a batch of prompts with boundaries `bounds` (cu_seqlens as a list)."""
        lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.long)
        if int(lengths.max()) > self.capacity:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit a KV cache of {self.capacity}")
        self.lengths = lengths.to(next_position.device)
        self.prompt_lengths = self.lengths.clone()
        self.next_position = next_position.long()
        self._bounds = bounds

    def store_prompts(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """Scatter one layer's packed prompt keys/values [T, Hkv, hd] into rows [B, Hkv, capacity, hd]."""
        batch, heads, dim = self.batch_size, k.shape[1], k.shape[2]
        keys = k.new_zeros(batch, heads, self.capacity, dim)
        values = v.new_zeros(batch, heads, self.capacity, dim)
        for row, (a, b) in enumerate(zip(self._bounds[:-1], self._bounds[1:])):
            keys[row, :, : b - a] = k[a:b].transpose(0, 1)
            values[row, :, : b - a] = v[a:b].transpose(0, 1)
        self.keys[layer], self.values[layer] = keys, values

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write one token per row (k/v [B, Hkv, hd]) after each row's last; returns keys, values and the
        attention mask [B, 1, 1, capacity] of filled slots."""
        if int(self.lengths.max()) >= self.capacity:
            raise ValueError(f"KV cache full: a sequence reached its capacity of {self.capacity} tokens")
        keys, values = self.keys[layer], self.values[layer]
        if keys is None:
            raise RuntimeError("KV cache is empty: run DecoderLM.prefill before decode_step")
        rows = torch.arange(self.batch_size, device=keys.device)
        slots = self.lengths.to(keys.device)
        keys[rows, :, slots] = k.to(keys.dtype)
        values[rows, :, slots] = v.to(values.dtype)
        mask = torch.arange(self.capacity, device=keys.device) <= slots.unsqueeze(1)
        return keys, values, mask[:, None, None, :]

    def append_many(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write m tokens per row (k/v [B, m, Hkv, hd]) after each row's last; returns keys, values and the
        attention mask [B, 1, m, capacity]: new token i sees the row's filled slots and new tokens 0..i."""
        m = k.shape[1]
        if int(self.lengths.max()) + m > self.capacity:
            raise ValueError(f"KV cache full: {m} more tokens do not fit its capacity of {self.capacity} tokens")
        keys, values = self.keys[layer], self.values[layer]
        if keys is None:
            raise RuntimeError("KV cache is empty: run DecoderLM.prefill before extend")
        rows = torch.arange(self.batch_size, device=keys.device).unsqueeze(1)
        slots = self.lengths.to(keys.device).unsqueeze(1) + torch.arange(m, device=keys.device)  # [B, m]
        keys[rows, :, slots] = k.to(keys.dtype)
        values[rows, :, slots] = v.to(values.dtype)
        mask = torch.arange(self.capacity, device=keys.device) <= slots.unsqueeze(-1)  # [B, m, capacity]
        return keys, values, mask.unsqueeze(1)

    def advance(self, tokens: int = 1) -> None:
        """Every row now holds `tokens` more (called once per decode step or extend, after all layers)."""
        self.lengths = self.lengths + tokens
        self.next_position = self.next_position + tokens

    def truncate(self, lengths: int | torch.Tensor) -> None:
        """Keep the first `lengths` tokens of each row (one number for all rows, or one per row), dropping
        generated ones: their slots are masked from then on and overwritten by the next tokens."""
        new = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).expand_as(self.lengths)
        if bool((new > self.lengths).any()) or bool((new < self.prompt_lengths).any()):
            raise ValueError(
                f"KV cache truncate to {new.tolist()} tokens: each row must keep its prompt "
                f"({self.prompt_lengths.tolist()}) and cannot grow (it holds {self.lengths.tolist()})"
            )
        # Generated tokens take one position each, so dropping n of them moves the next position back by n.
        self.next_position = self.next_position - (self.lengths - new).to(self.next_position.device)
        self.lengths = new.clone()

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        self.lengths = self.lengths[index.to(self.lengths.device)]
        self.next_position = self.next_position[index.to(self.next_position.device)]
        self.prompt_lengths = self.prompt_lengths[index.to(self.prompt_lengths.device)]
        for store in (self.keys, self.values):
            for i, tensor in enumerate(store):
                if tensor is not None:
                    store[i] = tensor[index.to(tensor.device)]
