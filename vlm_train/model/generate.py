"""Greedy generation for a pack of prompts: all samples decode together as one varlen sequence."""
from __future__ import annotations

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.model.vlm import VLM


@torch.no_grad()
def greedy_generate(model: VLM, prompts: PackedBatch, max_new_tokens: int, stop_token_id: int) -> list[list[int]]:
    """New tokens for every prompt of the pack, up to and excluding `stop_token_id`.

    The vision tower runs once; each step re-runs the LLM over the prompts and the tokens so far
    (no KV cache: for short answers and small models this is simple and fast enough).
    """
    cu = prompts.cu_seqlens.tolist()
    embeds = model.embed(prompts)
    sequences = [embeds[cu[i] : cu[i + 1]] for i in range(prompts.num_samples)]
    positions = [prompts.position_ids[:, cu[i] : cu[i + 1]] for i in range(prompts.num_samples)]
    generated: list[list[int]] = [[] for _ in sequences]
    active = list(range(len(sequences)))
    for _ in range(max_new_tokens):
        if not active:
            break
        lengths = torch.tensor([sequences[i].shape[0] for i in active])
        cu_seqlens = torch.zeros(len(active) + 1, dtype=torch.int32, device=embeds.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0).to(embeds.device)
        hidden = model.llm.forward_embeds(
            torch.cat([sequences[i] for i in active]),
            torch.cat([positions[i] for i in active], dim=1),
            cu_seqlens,
            int(lengths.max()),
        )
        next_tokens = model.llm.logits(hidden[cu_seqlens[1:].long() - 1]).argmax(-1)
        token_embeds = model.llm.embed(next_tokens)
        still_active = []
        for row, i in enumerate(active):
            token = int(next_tokens[row])
            if token == stop_token_id:
                continue
            generated[i].append(token)
            sequences[i] = torch.cat([sequences[i], token_embeds[row : row + 1]])
            next_position = positions[i].max() + 1
            positions[i] = torch.cat([positions[i], next_position.expand(3, 1)], dim=1)
            still_active.append(i)
        active = still_active
    return generated
