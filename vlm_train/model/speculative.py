"""Speculative decoding with an Eagle3 draft (Leviathan et al. 2023, Chen et al. 2023; EAGLE-3), one prompt at a time.

Each round the draft proposes a chain of K tokens; the target runs its newest token and the K guesses in one forward
over its KV cache (`DecoderLM.extend`), keeps the longest prefix it agrees with plus a token of its own, and both
caches drop the rest. Greedy: a guess is kept when it is the target's argmax, so the output is the target's greedy
output. Sampling: a guess x drawn from q is kept with probability min(1, p(x) / q(x)), else a token is drawn from
normalize(max(0, p - q)); the output then follows the target's distribution p exactly.

The draft reads what it read in training (draft.py): at sequence index t, the embedding of token t + 1 and the
target's three captured layers at t (in the training's storage dtype, then fused), at t's rotary position; chain
step j reads its own guess and its own previous hidden state at that position + j.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vlm_train.data.batch import PackedBatch
from vlm_train.model.draft import DraftCache, Eagle3Draft
from vlm_train.model.generate import SamplingConfig, next_tokens
from vlm_train.model.llm import rotary_cos_sin
from vlm_train.model.vlm import VLM


@dataclass
class Proposal:
    """A drafted chain: k target token ids and, when sampling, the distribution each was drawn from [k, V]."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, k: int) -> Proposal:
        """Take the indices verified since the last call (token t + 1 [m], target features at t [m, 3D], rotary
        positions of t [3, m]) and draft the k tokens after the newest token."""
        ...


class Eagle3Proposer:
    """Drafts chains with an Eagle3 draft for one sequence. Its cache holds one entry per verified index; the
    entries of a chain are dropped at the next call, when the target has judged it."""

    def __init__(self, draft: Eagle3Draft, temperature: float = 0.0, generator: torch.Generator | None = None):
        self.draft, self.temperature, self.generator = draft, temperature, generator
        self.cache = DraftCache()
        self.verified = 0  # cache entries that are verified indices (the rest: the last chain)
        self.to_target = draft.draft_to_target
        self.target_vocab_size = int(draft.t2d.numel())

    def extend(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Add the newly verified indices to the cache; returns the draft's hidden state at the last one [1, D]."""
        self.cache.truncate(self.verified)
        hidden = self.draft.fuse(features)
        cos, sin = rotary_cos_sin(self.draft.cfg, positions, hidden.device)
        embeds = self.draft.embed_tokens(tokens).to(hidden.dtype)
        out = self.draft.midlayer.forward_cached(embeds, hidden, cos, sin, self.cache)
        self.verified = self.cache.length
        return out[-1:]

    def step(self, token: torch.Tensor, hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One chain step: its own guess [1] and previous hidden state [1, D] at rotary position [3, 1]."""
        cos, sin = rotary_cos_sin(self.draft.cfg, position, hidden.device)
        embeds = self.draft.embed_tokens(token).to(hidden.dtype)
        return self.draft.midlayer.forward_cached(embeds, hidden, cos, sin, self.cache)

    def propose(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, k: int) -> Proposal:
        hidden = self.extend(tokens, features, positions)
        last = positions[:, -1:]
        chosen: list[int] = []
        probs = []
        for j in range(k):
            logits = self.draft.logits(hidden)[0].float()
            if self.temperature == 0:
                draft_id = logits.argmax()
            else:
                q = torch.softmax(logits / self.temperature, dim=-1)
                draft_id = torch.multinomial(q, 1, generator=self.generator)[0]
                # q over target ids: zero outside the draft vocabulary, which the draft can never propose.
                probs.append(q.new_zeros(self.target_vocab_size).index_copy(0, self.to_target, q))
            token = self.to_target[draft_id].view(1)
            chosen.append(int(token))
            if j < k - 1:
                hidden = self.step(token, hidden, last + j + 1)
        return Proposal(chosen, torch.stack(probs) if probs else None)


@dataclass
class SpeculativeStats:
    """How often the target kept the draft's guesses, over verification forwards."""

    draft_tokens: int
    verifications: int = 0
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # per draft position: verifications that judged it
    kept: list[int] = field(default_factory=list)  # per draft position: of those, the ones that kept it

    def __post_init__(self) -> None:
        self.reached = self.reached or [0] * self.draft_tokens
        self.kept = self.kept or [0] * self.draft_tokens

    def record(self, accepted: int) -> None:
        """One verification that kept `accepted` guesses (it judged one more, unless it kept them all)."""
        self.verifications += 1
        self.accepted += accepted
        for i in range(min(accepted + 1, self.draft_tokens)):
            self.reached[i] += 1
            self.kept[i] += int(i < accepted)

    def add(self, other: SpeculativeStats) -> None:
        self.verifications += other.verifications
        self.accepted += other.accepted
        self.reached = [a + b for a, b in zip(self.reached, other.reached)]
        self.kept = [a + b for a, b in zip(self.kept, other.kept)]

    @property
    def acceptance_length(self) -> float | None:
        """Tokens per verification forward: the kept guesses plus the target's own token."""
        return (self.accepted + self.verifications) / self.verifications if self.verifications else None

    @property
    def accept_rate_per_position(self) -> list[float | None]:
        return [k / r if r else None for k, r in zip(self.kept, self.reached)]


@dataclass
class SpeculativeOutput:
    tokens: list[int]  # the new tokens, up to and excluding the first stop token
    stats: SpeculativeStats


def greedy_verify(target_logits: torch.Tensor, drafted: list[int]) -> list[int]:
    """The longest prefix of the k guesses that the target's argmax agrees with, then its own token (logits
    [k + 1, V]: row i follows guess i)."""
    choices = target_logits.argmax(-1).tolist()
    kept = 0
    while kept < len(drafted) and drafted[kept] == choices[kept]:
        kept += 1
    return drafted[:kept] + [choices[kept]]


def accept_tokens(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling, row by row: keep drafted[i] (drawn from q[i]) with probability min(1, p/q); the
    replacement for a rejected one is drawn from normalize(max(0, p[i] - q[i])). Returns kept [N], replacement [N]."""
    px = p.gather(-1, drafted[:, None]).squeeze(-1)
    qx = q.gather(-1, drafted[:, None]).squeeze(-1)
    u = torch.rand(px.shape, generator=generator, device=p.device)
    kept = u * qx < px  # u < p/q without dividing; always true where p >= q
    residual = (p - q).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # Where p <= q everywhere (p == q) nothing is ever rejected; p keeps the draw defined.
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(p.dtype).tiny), p)
    return kept, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


def sampled_verify(
    p: torch.Tensor, q: torch.Tensor, drafted: list[int], generator: torch.Generator | None
) -> list[int]:
    """The kept prefix of the guesses, then the replacement of the first rejected one, or a draw from the last
    row of p when all are kept (p [k + 1, V] the target's, q [k, V] the draft's, over target ids)."""
    k = len(drafted)
    kept, replacement = accept_tokens(p[:k], q, torch.tensor(drafted, device=p.device), generator)
    rejected = (~kept).nonzero()
    if len(rejected):
        first = int(rejected[0])
        return drafted[:first] + [int(replacement[first])]
    return drafted + [int(torch.multinomial(p[k], 1, generator=generator))]


def _positions(prompt_positions: torch.Tensor, next_position: torch.Tensor, total: int) -> torch.Tensor:
    """Rotary positions [3, total] of every index: the prompt's, then one more per generated token."""
    rows = prompt_positions if prompt_positions.dim() == 2 else prompt_positions.expand(3, -1)
    generated = next_position.to(rows.device) + torch.arange(total - rows.shape[1], device=rows.device)
    return torch.cat([rows, generated.expand(3, -1)], dim=1)


def _generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    if cfg.temperature == 0 or cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


def _check(cfg: SamplingConfig, prompt: PackedBatch, draft_tokens: int) -> None:
    cfg.validate()
    if cfg.top_p < 1:
        raise ValueError(f"speculative decoding samples from the whole distribution: set top_p to 1, got {cfg.top_p}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if prompt.num_samples != 1:
        raise ValueError(f"speculative decoding runs one prompt at a time, got a pack of {prompt.num_samples}")


@torch.no_grad()
def speculative_generate(
    model: VLM,
    draft: Eagle3Draft,
    prompt: PackedBatch,
    cfg: SamplingConfig,
    stop_token_ids: int | Iterable[int],
    draft_tokens: int,
    feature_dtype: torch.dtype = torch.bfloat16,
) -> SpeculativeOutput:
    """The new tokens for a pack of one prompt, drafted `draft_tokens` at a time by `draft`; `feature_dtype` is
    the draft's eagle3.hidden_dtype (what the target's layers were stored in when it trained)."""
    generator = _generator(cfg, prompt.input_ids.device)
    proposer = Eagle3Proposer(draft, cfg.temperature, generator)
    return run_speculative(
        model, prompt, proposer, cfg, stop_token_ids, draft_tokens, draft.target_layers, feature_dtype, generator
    )


@torch.no_grad()
def run_speculative(
    model: VLM,
    prompt: PackedBatch,
    proposer: Proposer,
    cfg: SamplingConfig,
    stop_token_ids: int | Iterable[int],
    draft_tokens: int,
    capture: tuple[int, ...],
    feature_dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """The decoding loop of `speculative_generate` with any proposer (the target's layers `capture` feed it)."""
    _check(cfg, prompt, draft_tokens)
    stops = {stop_token_ids} if isinstance(stop_token_ids, int) else set(stop_token_ids)
    out = SpeculativeOutput([], SpeculativeStats(draft_tokens))
    if cfg.max_new_tokens == 0:
        return out
    llm, device = model.llm, prompt.input_ids.device
    total = prompt.num_tokens + cfg.max_new_tokens + draft_tokens + 1  # the newest token and k guesses overshoot
    cache = llm.new_cache(total)
    final, captured = llm.prefill_capture(
        model.embed(prompt), prompt.position_ids, prompt.cu_seqlens, prompt.max_seqlen, cache, capture
    )
    positions = _positions(prompt.position_ids, cache.next_position[0], total)
    features = torch.cat(captured, dim=-1).to(feature_dtype)  # of the indices the draft has not seen yet
    first = int(next_tokens(llm.logits(final[-1:]), cfg, generator)[0])
    if first in stops:
        return out
    sequence = [*prompt.input_ids.tolist(), first]
    out.tokens.append(first)
    given = 0  # indices the draft has an entry for: 0 .. given - 1
    while len(out.tokens) < cfg.max_new_tokens:
        newest = len(sequence) - 1  # its token is not in the target's cache yet
        inputs = torch.tensor(sequence[given + 1 : newest + 1], device=device)
        proposal = proposer.propose(inputs, features, positions[:, given:newest], draft_tokens)
        given = newest
        chain = torch.tensor([sequence[newest], *proposal.tokens], device=device)
        final, captured = llm.extend(llm.embed(chain)[None], cache, capture)
        logits = llm.logits(final[0])
        if cfg.temperature == 0:
            emitted = greedy_verify(logits, proposal.tokens)
        else:
            if proposal.probs is None:
                raise ValueError("sampling needs the proposer's distribution (Proposal.probs)")
            p = torch.softmax(logits.float() / cfg.temperature, dim=-1)
            emitted = sampled_verify(p, proposal.probs.to(p), proposal.tokens, generator)
        kept = len(emitted) - 1
        out.stats.record(kept)
        cache.truncate(newest + kept + 1)  # the newest token and the kept guesses stay
        features = torch.cat(captured, dim=-1)[0, : kept + 1].to(feature_dtype)
        for token in emitted:
            if token in stops:
                return out
            out.tokens.append(token)
            sequence.append(token)
            if len(out.tokens) >= cfg.max_new_tokens:
                break
    return out
