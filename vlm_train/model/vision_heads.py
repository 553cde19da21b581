"""The vision stage's heads: per-image pooling over the packed ViT output, the image projection, a text tower, a
multi-label classifier, and SigLIP's learned temperature and bias.

They train with the vision tower in a `kind: vision` curriculum stage and are not part of the VLM: the trainer
attaches them as `model.vision_heads` (so the engine, DeepSpeed and the optimizer see them), checkpoints keep them
in their own file, and exports and inference leave them out (`without_heads`).

Pooling stays inside each image: a patch's image comes from `vit_cu_seqlens`, and the attention pool's softmax
runs per image (a segment softmax), so an image's embedding is the same packed alone or behind others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batch import IGNORE_INDEX, PackedBatch
from .attachments import attach, attached_module
from .config import LLMConfig
from .llm import DecoderLM
from .mlp import SwiGLU
from .norm import RMSNorm
from .vision_layout import pack_keep

HEADS_ATTR = "vision_heads"  # the attribute of the VLM the heads are attached under while training
HEADS_FILE = "vision_heads.safetensors"  # their checkpoint file, beside the VLM's
POOLINGS = ("map", "mean")
TEXT_TOWERS = ("small", "llm")


@dataclass
class VisionHeadsConfig:
    pooling: str = "map"  # map: a learned query per image attending to its own patches (SigLIP's MAP head) | mean
    pool_heads: int = 4  # attention heads of the MAP pooling
    embed_dim: int = 128  # the shared image-text space of the contrastive loss
    # small: a causal transformer of its own over each sample's supervised text, pooled at its last token (CLIP)
    # llm: the VLM's own LLM over that text, mean-pooled (it trains only if the stage's `trainable` names llm.*)
    text_tower: str = "small"
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    init_temperature: float = 10.0  # SigLIP's t = exp(t'), t' = log 10
    init_bias: float = -10.0  # SigLIP's b

    def validate(self, vision_hidden: int) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"vision_pretrain.heads.pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.text_tower not in TEXT_TOWERS:
            raise ValueError(f"vision_pretrain.heads.text_tower {self.text_tower!r} is not one of {TEXT_TOWERS}")
        if self.pool_heads <= 0 or vision_hidden % self.pool_heads:
            raise ValueError(
                f"vision_pretrain.heads.pool_heads ({self.pool_heads}) must divide vision.hidden_size ({vision_hidden})"
            )
        if self.embed_dim <= 0 or self.init_temperature <= 0:
            raise ValueError("vision_pretrain.heads.embed_dim and init_temperature must be positive")


@dataclass
class VisionHeadsOutput:
    """One pack through the tower and the heads. Images in pack order; texts: the samples with supervised tokens,
    in sample order (`text_samples`)."""

    image_embeds: torch.Tensor  # [N, embed_dim], not normalised
    text_embeds: torch.Tensor  # [S_text, embed_dim], not normalised
    label_logits: torch.Tensor | None  # [N, num_labels]
    logit_scale: torch.Tensor  # [1]: t' (the temperature is its exp)
    logit_bias: torch.Tensor  # [1]
    anchor: torch.Tensor  # 0, but touching every weight a pack without images or text left out (see forward)


def text_spans(labels: torch.Tensor, sample_index: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text a sample pairs with: its supervised target tokens (the answer, e.g. a caption, with its end token).

    Returns (token ids [K], supervised tokens per sample [S])."""
    supervised = labels != IGNORE_INDEX
    counts = torch.bincount(sample_index[supervised], minlength=num_samples)
    return labels[supervised], counts


def image_samples(input_ids: torch.Tensor, sample_index: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The sample each image of the pack belongs to [N]: an image is a run of image-pad tokens (a sample's images
    are kept apart by their vision start/end tokens, and every image keeps at least one token)."""
    is_pad = input_ids == image_token_id
    starts = is_pad.clone()
    starts[1:] &= ~is_pad[:-1] | (sample_index[1:] != sample_index[:-1])
    return sample_index[starts]


class AttentionPool(nn.Module):
    """A learned query per image attending to that image's patches only (MAP head, as in SigLIP), then a SwiGLU
    MLP with a residual; the softmax is taken per image."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.probe = nn.Parameter(torch.zeros(hidden))
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.q = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, 4 * hidden, bias=True)

    def forward(self, x: torch.Tensor, image: torch.Tensor, num_images: int) -> torch.Tensor:
        """x [P, D] patch features, image [P] the image of each patch -> [N, D]."""
        k, v = self.kv(x).view(x.shape[0], 2, self.heads, self.head_dim).unbind(1)  # [P, H, d]
        q = self.q(self.probe).view(self.heads, self.head_dim)
        # In float32 (sums over thousands of patches in bf16 would round at every step), cast back at the end.
        scores = (k.float() * q.float()).sum(-1) / math.sqrt(self.head_dim)  # [P, H]
        index = image.unsqueeze(-1).expand_as(scores)
        peak = torch.full((num_images, self.heads), -torch.inf, device=x.device)
        peak = peak.scatter_reduce(0, index, scores, "amax", include_self=True)
        weights = torch.exp(scores - peak.detach()[image])
        total = torch.zeros_like(peak).index_add(0, image, weights)
        weights = weights / total[image]  # softmax over each image's patches
        pooled = torch.zeros(num_images, self.heads, self.head_dim, device=x.device)
        pooled = pooled.index_add(0, image, weights.unsqueeze(-1) * v.float()).view(num_images, -1).to(v.dtype)
        pooled = self.out(pooled)
        return pooled + self.mlp(self.norm(pooled))


def mean_pool(x: torch.Tensor, image: torch.Tensor, num_images: int) -> torch.Tensor:
    """The mean of each image's patch features [N, D]."""
    total = torch.zeros(num_images, x.shape[1], device=x.device, dtype=x.dtype).index_add(0, image, x)
    count = torch.bincount(image, minlength=num_images).clamp(min=1).to(x.dtype)
    return total / count.unsqueeze(-1)


def segment_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive segments of `lengths` rows."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    return mean_pool(x, owner, len(lengths))


def _text_config(cfg: VisionHeadsConfig, vocab_size: int, eps: float) -> LLMConfig:
    half = cfg.text_hidden_size // cfg.text_heads // 2
    return LLMConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden_size,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        num_kv_heads=cfg.text_heads,
        intermediate_size=4 * cfg.text_hidden_size,
        mrope_section=[half - 2 * (half // 3), half // 3, half // 3],  # 1-D positions: the split does not matter
        rms_norm_eps=eps,
    )


class VisionHeads(nn.Module):
    """Pooling, projections, text tower and label classifier of the vision stage; see the module docstring."""

    def __init__(
        self,
        cfg: VisionHeadsConfig,
        vision_hidden: int,
        llm_hidden: int,
        vocab_size: int,
        num_labels: int,
        attn_backend: str = "auto",
        eps: float = 1e-6,
        std: float = 0.02,
    ) -> None:
        super().__init__()
        cfg.validate(vision_hidden)
        self.cfg = cfg
        self.norm = RMSNorm(vision_hidden, eps)  # the tower has no final norm (the merger has its own)
        self.pool = AttentionPool(vision_hidden, cfg.pool_heads, eps) if cfg.pooling == "map" else None
        self.image_proj = nn.Linear(vision_hidden, cfg.embed_dim)
        self.text = DecoderLM(_text_config(cfg, vocab_size, eps), attn_backend) if cfg.text_tower == "small" else None
        text_width = cfg.text_hidden_size if self.text is not None else llm_hidden
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.label_head = nn.Linear(vision_hidden, num_labels) if num_labels else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.pool is not None:
            nn.init.normal_(self.pool.probe, std=std)
        # Shape [1], not a scalar: DeepSpeed flattens and broadcasts every parameter as bytes.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(cfg.init_temperature)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(cfg.init_bias)]))

    def pool_images(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-image features [N, D] from the packed patch features [P, D] and each image's patch count."""
        image = torch.repeat_interleave(torch.arange(len(lengths), device=features.device), lengths)
        x = self.norm(features)
        return self.pool(x, image, len(lengths)) if self.pool is not None else mean_pool(x, image, len(lengths))

    def encode_text(self, vlm: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Texts laid out one after another (ids [K], lengths [S_text], none empty) -> embeddings [S_text, E]."""
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        positions = torch.arange(ids.shape[0], device=ids.device) - starts
        max_len = int(lengths.max())
        if self.text is not None:
            hidden = self.text.forward_embeds(self.text.embed(ids), positions, cu, max_len)
            pooled = hidden[cu[1:].long() - 1]  # the last token has read the whole text (causal)
        else:
            llm = vlm.llm
            hidden = llm.forward_embeds(llm.embed(ids), positions, cu, max_len)
            pooled = segment_mean(hidden, lengths)
        return self.text_proj(pooled)

    def forward(self, vlm: nn.Module, batch: PackedBatch) -> VisionHeadsOutput:
        """The pack's images through `vlm.vision` and the heads; its texts through the text tower."""
        device = batch.input_ids.device
        anchor = torch.zeros((), device=device)
        if batch.num_images:
            keep = pack_keep(batch, vlm.cfg.vision.spatial_merge_size)
            features = vlm.vision(batch.pixel_values, batch.image_grid_thw, keep)
            lengths = torch.diff(batch.vit_cu_seqlens.to(device).long())
            if int(lengths.sum()) != features.shape[0]:
                raise ValueError(
                    f"vit_cu_seqlens counts {int(lengths.sum())} patches but the tower gave {features.shape[0]}"
                )
            pooled = self.pool_images(features, lengths)
        else:  # every rank runs the same weights: a pack without images runs one black image, times 0
            m = vlm.cfg.vision.spatial_merge_size
            width = vlm.cfg.vision.patch_dim // vlm.cfg.vision.temporal_patch_size
            pixels = torch.zeros(m * m, width, dtype=torch.uint8, device=device)
            grid = torch.tensor([[1, m, m]], device=device)
            dummy = self.pool_images(vlm.vision(pixels, grid), torch.tensor([m * m], device=device))
            for output in self._image_outputs(dummy):
                anchor = anchor + (0.0 * output.sum() if output is not None else 0.0)
            pooled = dummy[:0]
        image_embeds, label_logits = self._image_outputs(pooled)

        ids, counts = text_spans(batch.labels, batch.sample_index, batch.num_samples)
        lengths = counts[counts > 0]
        if lengths.numel():
            text_embeds = self.encode_text(vlm, ids, lengths)
        else:  # no supervised text in the pack: one token through the text tower, times 0
            one = torch.ones(1, dtype=torch.long, device=device)
            text_embeds = self.encode_text(vlm, one - 1, one)
            anchor = anchor + 0.0 * text_embeds.sum()
            text_embeds = text_embeds[:0]
        return VisionHeadsOutput(image_embeds, text_embeds, label_logits, self.logit_scale, self.logit_bias, anchor)

    def _image_outputs(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.label_head(pooled) if self.label_head is not None else None
        return self.image_proj(pooled), logits


def attach_heads(vlm: nn.Module, heads: VisionHeads) -> None:
    """Attach the heads to the VLM for a run with a vision stage (trained by the same engine and optimizer, saved in
    HEADS_FILE)."""
    attach(vlm, HEADS_ATTR, heads, HEADS_FILE)


def heads_of(vlm: nn.Module) -> VisionHeads | None:
    return attached_module(vlm, HEADS_ATTR)  # type: ignore[return-value]
