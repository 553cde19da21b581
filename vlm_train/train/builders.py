"""Turn the config into components: tokenizer, encoder, data sources, packed stream, model."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vlm_train.data.config import DataConfig
from vlm_train.data.encode import Encoder
from vlm_train.data.image import PatchSpec
from vlm_train.data.loader import PackedStream, Source, expand_urls
from vlm_train.data.pack_cost import FlopsCost
from vlm_train.data.synthetic import corpus_lines, ensure_synthetic_shards
from vlm_train.data.tokenizer import load_tokenizer
from vlm_train.model.config import ModelConfig
from vlm_train.model.flops import flops_cost
from vlm_train.model.hf import apply_hf_init
from vlm_train.model.vlm import VLM


@dataclass
class DataSetup:
    tokenizer: PreTrainedTokenizerBase
    encoder: Encoder
    sources: list[Source]
    heldout_urls: list[str]
    flops_cost: FlopsCost | None = None  # the model's per-sample training FLOPs, for the packer's FLOPs balancing


def patch_spec(model: ModelConfig, data: DataConfig) -> PatchSpec:
    """Patch geometry from the vision tower, pixel range from the data config."""
    vision = model.vision
    return PatchSpec(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=data.image.min_pixels,
        max_pixels=data.image.max_pixels,
        resize=data.image.resize,
    )


def build_data(data: DataConfig, model: ModelConfig) -> DataSetup:
    """Make (or reuse) the synthetic shards if asked, load the tokenizer, and list the sources."""
    sources = [Source(s.name, expand_urls(s.urls, data.allow_pipe), s.weight, s.format) for s in data.sources]
    heldout = expand_urls(data.heldout_urls, data.allow_pipe) if data.heldout_urls else []
    if data.use_synthetic:
        shards = ensure_synthetic_shards(data.synthetic)
        sources.append(Source("shapes_caption", shards.caption_urls, data.synthetic.caption_weight))
        sources.append(Source("shapes_grounding", shards.grounding_urls, data.synthetic.grounding_weight))
        heldout = heldout or shards.heldout_urls
    for source in sources:
        missing = [u for u in source.urls if "://" not in u and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(
                f"data source {source.name!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}"
            )
    tokenizer = load_tokenizer(data.tokenizer, corpus=corpus_lines())
    cost = flops_cost(model, vocab_size=model.llm.vocab_size or len(tokenizer))
    return DataSetup(tokenizer, build_encoder(tokenizer, data, model), sources, heldout, cost)


def build_encoder(tokenizer: PreTrainedTokenizerBase, data: DataConfig, model: ModelConfig) -> Encoder:
    """The encoder for this data config (a curriculum stage may change its resolution range)."""
    return Encoder(tokenizer, patch_spec(model, data), data.image.sampling(), data.system_prompt)


def build_stream(
    setup: DataSetup, data: DataConfig, seed: int, rank: int = 0, world_size: int = 1, encoder: Encoder | None = None
) -> PackedStream:
    if setup.flops_cost is not None and data.pack.flops_cost is None:  # FLOPs balancing needs the model's costs
        data = dataclasses.replace(data, pack=dataclasses.replace(data.pack, flops_cost=setup.flops_cost))
    return PackedStream(setup.sources, encoder or setup.encoder, data, seed=seed, rank=rank, world_size=world_size)


def build_model(model: ModelConfig, setup: DataSetup, load_hf: bool = True) -> VLM:
    """The VLM sized to the tokenizer (llm.vocab_size=0 means: the tokenizer's size); `load_hf=False` skips the
    model.init_*_from_hf weights (for a model whose weights are copied in right after)."""
    tokens = len(setup.tokenizer)
    vocab_size = model.llm.vocab_size or tokens
    if vocab_size < tokens:
        raise ValueError(f"model.llm.vocab_size={vocab_size} is smaller than the tokenizer ({tokens} tokens)")
    vlm = VLM(model, vocab_size=vocab_size, image_token_id=setup.encoder.special.image_pad)
    if load_hf:
        apply_hf_init(vlm, model)  # model.init_*_from_hf: start from released Hugging Face weights
    return vlm
