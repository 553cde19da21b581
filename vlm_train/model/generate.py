"""Batched generation for a pack of prompts: the vision tower runs once, then one token per prompt per step.

With the KV cache (the default) the prompts are prefilled once as a varlen pack and every later step feeds only
the newest token of each unfinished prompt. Without it each step re-runs the LLM over the prompts and the tokens
so far: slower, but the reference the cache is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.model.vlm import VLM


@dataclass
class SamplingConfig:
    """How the next token is chosen: greedy when temperature is 0, else sampled from the top-p nucleus."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling seed; None draws from torch's global generator

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V]: argmax, or a draw from the tempered top-p distribution."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the most likely one).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    if cfg.temperature == 0 or cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


@torch.no_grad()
def generate(
    model: VLM, prompts: PackedBatch, cfg: SamplingConfig, stop_token_ids: int | Iterable[int], use_cache: bool = True
) -> list[list[int]]:
    """New tokens for every prompt of the pack, each up to and excluding its first stop token."""
    cfg.validate()
    stops = {stop_token_ids} if isinstance(stop_token_ids, int) else set(stop_token_ids)
    run = _generate_cached if use_cache else _generate_uncached
    return run(model, prompts, cfg, stops)


def greedy_generate(model: VLM, prompts: PackedBatch, max_new_tokens: int, stop_token_id: int) -> list[list[int]]:
    """Greedy answers for every prompt of the pack (with the KV cache), up to and excluding `stop_token_id`."""
    return generate(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), stop_token_id)


def _finish_step(
    chosen: torch.Tensor, active: list[int], generated: list[list[int]], stops: set[int]
) -> tuple[list[int], list[int]]:
    """Record the step's tokens; returns the rows (into `active`) still going and their prompt indices."""
    keep_rows, still_active = [], []
    for row, (i, token) in enumerate(zip(active, chosen.tolist())):
        if token in stops:
            continue
        generated[i].append(token)
        keep_rows.append(row)
        still_active.append(i)
    return keep_rows, still_active


def _generate_cached(model: VLM, prompts: PackedBatch, cfg: SamplingConfig, stops: set[int]) -> list[list[int]]:
    embeds = model.embed(prompts)
    generator = _generator(cfg, embeds.device)
    generated: list[list[int]] = [[] for _ in range(prompts.num_samples)]
    if cfg.max_new_tokens == 0:
        return generated
    llm = model.llm
    cache = llm.new_cache(prompts.max_seqlen + cfg.max_new_tokens)
    hidden = llm.prefill(embeds, prompts.position_ids, prompts.cu_seqlens, prompts.max_seqlen, cache)
    last = hidden[prompts.cu_seqlens[1:].long() - 1]  # each prompt's last token predicts its first answer token
    active = list(range(prompts.num_samples))
    for step in range(cfg.max_new_tokens):
        chosen = next_tokens(llm.logits(last), cfg, generator)
        keep_rows, active = _finish_step(chosen, active, generated, stops)
        if not active or step == cfg.max_new_tokens - 1:
            break
        if len(keep_rows) < cache.batch_size:
            cache.select(keep_rows)
            chosen = chosen[keep_rows]
        last = llm.decode_step(llm.embed(chosen), cache)
    return generated


def _generate_uncached(model: VLM, prompts: PackedBatch, cfg: SamplingConfig, stops: set[int]) -> list[list[int]]:
    embeds = model.embed(prompts)
    generator = _generator(cfg, embeds.device)
    cu = prompts.cu_seqlens.tolist()
    sequences = [embeds[cu[i] : cu[i + 1]] for i in range(prompts.num_samples)]
    positions = [prompts.position_ids[..., cu[i] : cu[i + 1]] for i in range(prompts.num_samples)]
    generated: list[list[int]] = [[] for _ in sequences]
    active = list(range(len(sequences)))
    for _ in range(cfg.max_new_tokens):
        if not active:
            break
        lengths = torch.tensor([sequences[i].shape[0] for i in active])
        cu_seqlens = torch.zeros(len(active) + 1, dtype=torch.int32, device=embeds.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0).to(embeds.device)
        hidden = model.llm.forward_embeds(
            torch.cat([sequences[i] for i in active]),
            torch.cat([positions[i] for i in active], dim=-1),
            cu_seqlens,
            int(lengths.max()),
        )
        chosen = next_tokens(model.llm.logits(hidden[cu_seqlens[1:].long() - 1]), cfg, generator)
        token_embeds = model.llm.embed(chosen)
        keep_rows, still_active = _finish_step(chosen, active, generated, stops)
        for row, i in zip(keep_rows, still_active):
            sequences[i] = torch.cat([sequences[i], token_embeds[row : row + 1]])
            # Qwen2-VL: the next position is one past the largest so far (over the t, h, w rows).
            next_position = positions[i].max() + 1
            positions[i] = torch.cat([positions[i], next_position.expand(*positions[i].shape[:-1], 1)], dim=-1)
        active = still_active
    return generated
