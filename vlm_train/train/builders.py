"""Turn the config into components: tokenizer, encoder, data sources, packed stream, model."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from vlm_train.data.config import DataConfig, tokenizer_corpus
from vlm_train.data.encode import Encoder
from vlm_train.data.image import PatchSpec
from vlm_train.data.loader import PackedStream, Source, expand_urls
from vlm_train.data.pack_cost import FlopsCost
from vlm_train.data.synthetic import ensure_synthetic_shards
from vlm_train.data.synthetic_video import ensure_synthetic_video_shards
from vlm_train.data.tokenizer import load_tokenizer
from vlm_train.model.config import ModelConfig
from vlm_train.model.draft import Eagle3Draft, attach_draft
from vlm_train.model.flops import flops_cost
from vlm_train.model.hf import apply_hf_init
from vlm_train.model.row_shards import copy_whole_into
from vlm_train.model.vision_heads import VisionHeads, attach_heads
from vlm_train.model.vlm import VLM
from vlm_train.model.vocab_resize import vocab_size_for
from vlm_train.train.checkpoint import MODEL_FILE, read_checkpoint_file, resolve_checkpoint
from vlm_train.train.config import Eagle3Config, VisionPretrainConfig


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
        tokens_per_second=vision.tokens_per_second,
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
    if data.use_synthetic_video:
        clips = ensure_synthetic_video_shards(data.synthetic_video)
        sources.append(Source("shapes_video_caption", clips.caption_urls, 1.0))
        # With both built-in sets, the image set's held-out shards are scored (data.heldout_urls can name others).
        heldout = heldout or clips.heldout_urls
    for source in sources:
        missing = [u for u in source.urls if "://" not in u and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(
                f"data source {source.name!r}: {len(missing)} shard(s) not found, e.g. {missing[0]}"
            )
    tokenizer = load_tokenizer(data.tokenizer, corpus=tokenizer_corpus(data))
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


def build_model(
    model: ModelConfig, setup: DataSetup, load_hf: bool = True, vision_pretrain: VisionPretrainConfig | None = None
) -> VLM:
    """The VLM sized to the tokenizer (llm.vocab_size=0 means: the tokenizer's size; a smaller one grows to the
    tokenizer, warned, and is updated in `model` so that the run's config.yaml names the rows the model has);
    `load_hf=False` skips the model.init_* weights (for a model whose weights are copied in right after). With
    `vision_pretrain` (a run with a vision stage), the vision stage's heads are attached to it."""
    vocab_size = vocab_size_for(model.llm, len(setup.tokenizer))
    if model.llm.vocab_size:
        model.llm.vocab_size = vocab_size
    vlm = VLM(model, vocab_size=vocab_size, image_token_id=setup.encoder.special.image_pad)
    if load_hf:
        load_initial_weights(vlm, model)
    if vision_pretrain is not None:
        add_vision_heads(vlm, vision_pretrain)
    return vlm


def load_initial_weights(vlm: VLM, model: ModelConfig) -> None:
    """The weights the model config starts from: model.init_*_from_hf (released Hugging Face weights), then
    model.init_vision_from (one of our checkpoints' tower); one tensor at a time, into a sharded model's rows too."""
    apply_hf_init(vlm, model)
    if model.init_vision_from:
        load_vision_from_checkpoint(vlm, model.init_vision_from)


def add_vision_heads(vlm: VLM, cfg: VisionPretrainConfig) -> VLM:
    """Attach fresh vision-stage heads (pooling, projections, text tower) to this VLM (a run with a vision stage)."""
    vision, llm = vlm.cfg.vision, vlm.cfg.llm
    heads = VisionHeads(
        cfg.heads,
        vision.hidden_size,
        llm.hidden_size,
        llm.vocab_size,
        len(cfg.labels),
        vlm.cfg.attn_backend,
        vision.rms_norm_eps,
        vision.initializer_range,
    )
    attach_heads(vlm, heads)
    return vlm


def load_vision_from_checkpoint(vlm: VLM, path: str) -> None:
    """model.init_vision_from: copy the vision.* weights of one of our checkpoints (or a run folder's newest)."""
    folder = resolve_checkpoint(path)
    weights = read_checkpoint_file(folder / MODEL_FILE, load_file, "weights")
    prefix = "vision."
    tower = {name[len(prefix) :]: w for name, w in weights.items() if name.startswith(prefix)}
    if not tower:
        raise ValueError(f"model.init_vision_from={path}: {folder / MODEL_FILE} has no vision.* weights")
    ours = vlm.vision.state_dict()
    problems = sorted(set(ours) ^ set(tower))
    problems += [
        f"{name}: checkpoint {list(tower[name].shape)}, model {list(w.shape)}"
        for name, w in ours.items()
        if name in tower and tower[name].shape != w.shape
    ]
    if problems:
        raise ValueError(
            f"model.init_vision_from={path}: the checkpoint's vision tower does not fit model.vision "
            f"(set model.vision like the checkpoint's config.yaml): {problems[:6]}"
        )
    with torch.no_grad():  # one tensor at a time, into each rank's rows when the model is sharded (engine=fsdp2)
        for name, param in vlm.vision.named_parameters():
            copy_whole_into(param, tower[name])


def add_draft(vlm: VLM, eagle3: Eagle3Config) -> VLM:
    """Attach a fresh Eagle3 draft of this VLM (a run with a draft stage); its vocabulary and embedding copy are
    set when its first draft stage starts."""
    llm = vlm.cfg.llm
    attach_draft(vlm, Eagle3Draft(llm, eagle3.draft, llm.vocab_size, vlm.cfg.attn_backend))
    return vlm
