"""The Eagle3 draft model (Li et al., EAGLE-3, 2025; the layout of SpecForge and AngelSlim).

It reads the target's hidden states from three decoder layers (low, middle, high), fuses them with one linear
layer, and runs one decoder layer whose attention input is [norm(token embedding), norm(fused feature)]; its own
LM head predicts over a draft vocabulary (the N most frequent supervised target tokens; `d2t` maps a draft id to
its target id as an offset, `t2d` marks the target ids that have one). The token embedding is a frozen copy of
the target's.

Training runs k steps of "training-time test" over a pack (`ttt`): step 0 reads the fused target feature at each
position, step j > 0 reads the draft's own output of step j - 1 at that position, with the token input and the
rotary positions advanced by one per step. At step j a query attends to the step-0 keys of its own sample up to
its position (causal) and to the keys of steps 1..j at its own position: exactly what decoding with a KV cache
sees when the draft extends its own chain of j guesses (`DraftLayer.forward_cached`). Nothing crosses a sample.

It is attached to the VLM as `model.draft` in runs with a draft stage (so the engine, DeepSpeed and the optimizer
see it); checkpoints keep it apart from the VLM (draft.safetensors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import PackedBatch
from .attachments import attach, attached_module
from .config import LLMConfig
from .llm import Attention, rotary_cos_sin
from .mlp import SwiGLU
from .norm import RMSNorm

DRAFT_ATTR = "draft"  # the attribute of the VLM the draft is attached under while training
DRAFT_FILE = "draft.safetensors"  # its checkpoint file, beside the VLM's


@dataclass
class DraftShapeConfig:
    """The draft's shape; 0 or empty takes the target's."""

    target_layers: list[int] = field(default_factory=list)  # the 3 target layers read; empty: see default_layers
    draft_vocab_size: int = 32000  # capped at the target's vocabulary
    num_heads: int = 0
    num_kv_heads: int = 0
    intermediate_size: int = 0


def default_layers(num_layers: int) -> list[int]:
    """SpecForge's and SGLang's low, middle and high layers (outputs of layers 1, L/2 - 1, L - 4); a target of
    fewer than 8 layers gets its first, middle and last instead (distinct from 3 layers on)."""
    if num_layers >= 8:
        return [1, num_layers // 2 - 1, num_layers - 4]
    return [0, (num_layers - 1) // 2, num_layers - 1]


def draft_llm_config(target: LLMConfig, shape: DraftShapeConfig) -> LLMConfig:
    """The decoder-layer config of the draft: the target's rotary and width, Llama's bias-free attention."""
    return dataclasses.replace(
        target,
        num_layers=1,
        num_heads=shape.num_heads or target.num_heads,
        num_kv_heads=shape.num_kv_heads or target.num_kv_heads,
        intermediate_size=shape.intermediate_size or target.intermediate_size,
        qkv_bias=False,
        qk_norm=False,
        tie_word_embeddings=False,
        mrope_section=list(target.mrope_section),
        rope_scaling=dict(target.rope_scaling),
    )


def ttt_attention(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], bounds: list[int]
) -> torch.Tensor:
    """Training-time-test attention over a pack: q [T, Hq, hd]; keys[0]/values[0] (step 0) are attended causally
    within each sample, keys[j]/values[j] (steps 1..) only at the query's own position. Returns [T, Hq, hd]."""
    rep = q.shape[1] // keys[0].shape[1]
    scale = q.shape[-1] ** -0.5
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        qs = q[a:b].transpose(0, 1).float()  # [H, n, hd]
        k0 = keys[0][a:b].repeat_interleave(rep, 1).transpose(0, 1).float()
        v0 = values[0][a:b].repeat_interleave(rep, 1).transpose(0, 1).float()
        scores = (qs @ k0.transpose(-1, -2)) * scale  # [H, n, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        own = [k[a:b].repeat_interleave(rep, 1).transpose(0, 1).float() for k in keys[1:]]
        own_values = [v[a:b].repeat_interleave(rep, 1).transpose(0, 1).float() for v in values[1:]]
        diagonal = [(qs * k).sum(-1, keepdim=True) * scale for k in own]  # [H, n, 1] each
        probs = torch.softmax(torch.cat([scores, *diagonal], dim=-1), dim=-1)
        out = probs[..., :n] @ v0
        for j, v in enumerate(own_values):
            out = out + probs[..., n + j : n + j + 1] * v
        outs.append(out.transpose(0, 1).to(q.dtype))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


class DraftLayer(nn.Module):
    """Eagle3's decoder layer: attention over [input_layernorm(embedding), hidden_norm(feature)], the feature as
    the residual, then a SwiGLU MLP. Names match SpecForge's `midlayer`."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, "sdpa", input_size=2 * cfg.hidden_size)  # bias-free: draft_llm_config
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def qkv(
        self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        return self.self_attn.project(x, cos, sin)

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual around attention (the feature), then the MLP block; attended [..., Hq, hd]."""
        x = hidden + self.self_attn.o_proj(attended.flatten(-2))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: DraftCache,
    ) -> torch.Tensor:
        """Decoding: new positions [m, D] of one sequence attend causally to the cache and to each other; their
        keys and values join the cache."""
        q, k, v = self.qkv(embeds, hidden, cos, sin)
        keys, values = cache.append(k, v)
        m, total = q.shape[0], keys.shape[0]
        rep = q.shape[1] // k.shape[1]
        mask = torch.ones(m, total, dtype=torch.bool, device=q.device).tril(total - m)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            keys.repeat_interleave(rep, 1).transpose(0, 1),
            values.repeat_interleave(rep, 1).transpose(0, 1),
            attn_mask=mask,
        )
        return self.finish(hidden, out.transpose(0, 1))


class DraftCache:
    """The draft layer's keys and values [L, Hkv, hd] for one sequence; `truncate` drops rejected guesses."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[0])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = k if self.keys is None else torch.cat([self.keys, k])
        self.values = v if self.values is None else torch.cat([self.values, v])
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:length], self.values[:length]


class Eagle3Draft(nn.Module):
    """fc (3 target layers -> hidden), one DraftLayer, norm, LM head over the draft vocabulary; see the module doc."""

    def __init__(
        self, target: LLMConfig, shape: DraftShapeConfig, target_vocab_size: int, attn_backend: str = "auto"
    ) -> None:
        super().__init__()
        layers = list(shape.target_layers) or default_layers(target.num_layers)
        if len(layers) != 3 or any(not 0 <= i < target.num_layers for i in layers):
            raise ValueError(
                f"eagle3.draft.target_layers {layers} must be 3 layers of the target's {target.num_layers}"
            )
        self.target_layers = tuple(layers)
        self.cfg = draft_llm_config(target, shape)
        self.cfg.validate()
        hidden = target.hidden_size
        self.draft_vocab_size = min(shape.draft_vocab_size, target_vocab_size)
        if self.draft_vocab_size <= 0:
            raise ValueError(f"eagle3.draft_vocab_size must be positive, got {shape.draft_vocab_size}")
        self.embed_tokens = nn.Embedding(target_vocab_size, hidden)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = DraftLayer(self.cfg)
        self.norm = RMSNorm(hidden, self.cfg.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, self.draft_vocab_size, bias=False)
        # d2t: target id = draft id + d2t[draft id] (SpecForge's offsets); t2d: which target ids are drafted.
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(target_vocab_size, dtype=torch.bool))
        std = target.initializer_range
        for module in (self.fc, self.midlayer, self.lm_head):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, mean=0.0, std=std)

    # ---- the vocabulary --------------------------------------------------------------------------------------

    @property
    def draft_to_target(self) -> torch.Tensor:
        """The target id of every draft id [N]."""
        return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_vocabulary(self, target_ids: torch.Tensor) -> None:
        """Draft ids 0..N-1 stand for these N target ids (kept in ascending order, as SpecForge does)."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        if ids.numel() != self.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"the draft vocabulary needs {self.draft_vocab_size} distinct ids, got {ids.numel()}")
        device = self.d2t.device
        self.d2t.copy_((ids - torch.arange(ids.numel())).to(device))
        self.t2d.zero_()
        self.t2d[ids.to(device)] = True

    # ---- running it ------------------------------------------------------------------------------------------

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The three target layers' hidden states, concatenated [..., 3D] -> the draft's feature [..., D]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft hidden states [..., D] -> logits over the draft vocabulary [..., N]."""
        return self.lm_head(self.norm(hidden))

    def forward(self, vlm: nn.Module, batch: PackedBatch, inputs: DraftInputs) -> DraftOutput:
        """The TTT losses on a pack (run as the VLM's attachment, so the engine sees the call; see VLM.forward)."""
        return draft_losses(self, batch.input_ids, batch.position_ids, batch.cu_seqlens, inputs)

    def ttt(
        self,
        input_ids: torch.Tensor,
        aux: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        steps: int,
    ) -> list[torch.Tensor]:
        """Training-time test over a pack: the draft's hidden states [T, D] after each of `steps` steps.

        At step j, position t reads the token at t + 1 + j of its own sample (zeros past the sample's end, where
        nothing is supervised) and rotary positions advanced by j."""
        t = input_ids.shape[0]
        bounds = cu_seqlens.tolist()
        device = input_ids.device
        lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
        ends = torch.repeat_interleave(cu_seqlens[1:].long().to(device), lengths)  # [T]: its sample's end
        index = torch.arange(t, device=device)
        hidden = self.fuse(aux)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outs = []
        for j in range(steps):
            source = index + 1 + j
            inside = source < ends
            tokens = torch.where(inside, input_ids[source.clamp(max=t - 1)], torch.zeros_like(input_ids))
            cos, sin = rotary_cos_sin(self.cfg, position_ids + j, device)
            q, k, v = self.midlayer.qkv(self.embed_tokens(tokens).to(hidden.dtype), hidden, cos, sin)
            keys.append(k)
            values.append(v)
            hidden = self.midlayer.finish(hidden, ttt_attention(q, keys, values, bounds))
            outs.append(hidden)
        return outs


@dataclass
class DraftInputs:
    """What one pack's draft forward needs beside the pack: the target's fused-layer inputs and its next-token
    logits over the draft vocabulary, and which positions each TTT step supervises."""

    aux: torch.Tensor  # [T, 3D]: the target's three layers, concatenated
    target_logits: torch.Tensor  # [T, N] float: the target's logits at each position, draft vocabulary only
    masks: torch.Tensor  # bool [K, T]: step j supervises position t (the target's distribution at t + 1 + j)


@dataclass
class DraftOutput:
    """Per TTT step: the soft cross-entropy summed over supervised positions, and how many the draft's argmax got
    right (the target's argmax), both [K]."""

    loss_sums: torch.Tensor
    correct: torch.Tensor


def draft_losses(
    draft: Eagle3Draft,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    inputs: DraftInputs,
) -> DraftOutput:
    """Run the TTT steps over a pack and score each against the target's distribution at t + 1 + j."""
    steps = inputs.masks.shape[0]
    outs = draft.ttt(input_ids, inputs.aux, position_ids, cu_seqlens, steps)
    loss_sums, correct = [], []
    for j, hidden in enumerate(outs):
        rows = inputs.masks[j].nonzero().squeeze(-1)
        target = inputs.target_logits[rows + 1 + j]
        logits = draft.logits(hidden[rows]).float()
        target_p = torch.softmax(target, dim=-1)
        loss_sums.append(-(target_p * torch.log_softmax(logits, dim=-1)).sum())
        correct.append((logits.argmax(-1) == target.argmax(-1)).sum())
    return DraftOutput(torch.stack(loss_sums), torch.stack(correct))


def attach_draft(vlm: nn.Module, draft: Eagle3Draft) -> None:
    """Attach the draft to the VLM for a run with a draft stage (trained by the same engine and optimizer, saved in
    DRAFT_FILE)."""
    attach(vlm, DRAFT_ATTR, draft, DRAFT_FILE)


def draft_of(vlm: nn.Module) -> Eagle3Draft | None:
    return attached_module(vlm, DRAFT_ATTR)  # type: ignore[return-value]
