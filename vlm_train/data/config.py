"""Data configuration (Hydra structured configs)."""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from vlm_train.data.packer import PackConfig
from vlm_train.data.synthetic import SyntheticConfig


@dataclass
class SourceConfig:
    name: str = MISSING
    urls: str = MISSING  # brace pattern, e.g. /data/cc3m/{00000..00331}.tar; several joined with '::'
    weight: float = 1.0


@dataclass
class ImageConfig:
    min_pixels: int = 56 * 56  # images are resized (aspect kept) to an area within [min_pixels, max_pixels]
    max_pixels: int = 168 * 168
    max_decode_pixels: int = 89_478_485  # larger images are skipped from their header (decompression bombs)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    heldout_urls: str = ""  # shards for held-out evaluation
    use_synthetic: bool = False  # add the built-in synthetic shapes dataset (made once, then cached)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    tokenizer: str = "tiny"  # 'tiny' (built in) or a local Hugging Face tokenizer folder
    image: ImageConfig = field(default_factory=ImageConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    num_workers: int = 0
    shuffle_buffer: int = 256
    max_consecutive_failures: int = 200  # a longer run of skipped samples is a fatal error
