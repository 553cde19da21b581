"""The VLM: vision tower -> patch merger -> image embeddings scattered into the LLM's packed sequence."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.batch import PackedBatch
from .attachments import attached, attached_module
from .config import ModelConfig
from .llm import DecoderLM
from .norm import RMSNorm
from .projector import PatchMerger
from .vision_layout import pack_keep
from .vit import VisionTransformer


@dataclass
class VLMOutput:
    """Final-normed hidden states [T, D] and, when asked for, logits [T, V]."""

    hidden: torch.Tensor
    logits: torch.Tensor | None = None


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear and embedding weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


class VLM(nn.Module):
    """ViT + merger + decoder LM. Top-level names `vision`, `projector`, `llm` are what training stages freeze by."""

    def __init__(self, cfg: ModelConfig | Mapping, vocab_size: int, image_token_id: int) -> None:
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            cfg = ModelConfig.from_dict(cfg)
        # The embedding may be larger than the tokenizer (padded vocab), never smaller.
        if cfg.llm.vocab_size and cfg.llm.vocab_size < vocab_size:
            raise ValueError(f"llm.vocab_size ({cfg.llm.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
        llm_cfg = dataclasses.replace(cfg.llm, vocab_size=cfg.llm.vocab_size or vocab_size)
        cfg = dataclasses.replace(cfg, llm=llm_cfg)
        cfg.validate()
        if not 0 <= image_token_id < llm_cfg.vocab_size:
            raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary (size {llm_cfg.vocab_size})")
        self.cfg = cfg
        self.image_token_id = image_token_id

        self.vision = VisionTransformer(cfg.vision, cfg.attn_backend, cfg.activation_checkpointing)
        self.projector = PatchMerger(
            cfg.vision.hidden_size, llm_cfg.hidden_size, cfg.vision.spatial_merge_size, cfg.vision.rms_norm_eps
        )
        self.llm = DecoderLM(llm_cfg, cfg.attn_backend, cfg.activation_checkpointing)
        # Each tower at its own std (the merger belongs to the vision tower, as in Qwen2.5-VL).
        vision_std, llm_std = cfg.vision.initializer_range, llm_cfg.initializer_range
        for module, std in ((self.vision, vision_std), (self.projector, vision_std), (self.llm, llm_std)):
            module.apply(functools.partial(init_weights, std=std))
        if cfg.compile:
            # Per block, not the whole model: the varlen bookkeeping between blocks stays eager, and every block
            # of a tower shares one compiled graph (dynamic shapes, since pack lengths vary).
            for block in [*self.vision.blocks, *self.llm.layers]:
                block.compile(dynamic=True)

    def set_attn_backend(self, name: str) -> None:
        """Switch every attention layer to backend `name` (one of ATTENTION_BACKENDS)."""
        self.cfg = dataclasses.replace(self.cfg, attn_backend=name)
        self.cfg.validate()
        for module in self.modules():
            if hasattr(module, "attn_backend"):
                module.attn_backend = name

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def encode_images(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patches of N images (uint8 [P, C*p*p] or float [P, C*t*p*p], see PatchEmbed) -> image token embeddings
        [kept merge windows, llm_hidden].

        `keep`: optional bool mask over the merge windows of all images (token dropping, see VisionTransformer).
        """
        return self.projector(self.vision(pixel_values, grid_thw, keep))

    def _dummy_image_embeds(self, device: torch.device) -> torch.Tensor:
        """Run the vision path on one black image of one merge window, the smallest valid input, laid out as the
        loader's (uint8, one frame) so it takes the same path through the patch embedding."""
        vision = self.cfg.vision
        m = vision.spatial_merge_size
        one_frame = vision.patch_dim // vision.temporal_patch_size
        pixel_values = torch.zeros(m * m, one_frame, dtype=torch.uint8, device=device)
        grid_thw = torch.tensor([[1, m, m]], dtype=torch.long, device=device)
        return self.encode_images(pixel_values, grid_thw)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Text embeddings [T, D] with each image-pad token replaced by its image embedding, in order."""
        embeds = self.llm.embed(batch.input_ids)
        is_image = batch.input_ids == self.image_token_id
        num_pad = int(is_image.sum())
        if batch.pixel_values.shape[0] == 0:
            if num_pad:
                raise ValueError(
                    f"the pack has {num_pad} image-pad tokens (id {self.image_token_id}) but no image patches"
                )
            # Keeps every rank's parameter set and collectives identical (ZeRO-3 / DDP hang otherwise);
            # the zero factor leaves values unchanged while giving vision/projector a (zero) gradient.
            return embeds + 0.0 * self._dummy_image_embeds(embeds.device).sum().to(embeds.dtype)

        keep = pack_keep(batch, self.cfg.vision.spatial_merge_size)
        image_embeds = self.encode_images(batch.pixel_values, batch.image_grid_thw, keep)
        if num_pad != image_embeds.shape[0]:
            dropped = "" if keep is None else f", {int((~keep).sum())} merge windows dropped"
            raise ValueError(
                f"the pack has {num_pad} image-pad tokens (id {self.image_token_id}) but its "
                f"{batch.num_images} images give {image_embeds.shape[0]} image embeddings "
                f"(grids {batch.image_grid_thw.tolist()}, merge size {self.cfg.vision.spatial_merge_size}{dropped})"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(
        self, batch: PackedBatch, return_logits: bool = True, attachment: str = "", **inputs: Any
    ) -> VLMOutput | Any:
        """Run one pack; logits [T, V] only when `return_logits` (a fused loss may want just the hidden states).

        `attachment`: instead, the output of the module attached under that name (see attachments.py: a vision
        stage's heads, a draft stage's draft), called as module(self, batch, **inputs), here so that the engine
        wrapping this model (DeepSpeed) sees the call."""
        if attachment:
            module = attached_module(self, attachment)
            if module is None:
                names = [part.name for part in attached(self)]
                raise ValueError(f"no module is attached to the VLM as {attachment!r} (attached: {names})")
            return module(self, batch, **inputs)
        hidden = self.llm.forward_embeds(self.embed(batch), batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        return VLMOutput(hidden=hidden, logits=self.llm.logits(hidden) if return_logits else None)
