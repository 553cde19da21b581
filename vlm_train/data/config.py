"""Data configuration (Hydra structured configs); a user's data config needs only its `sources`."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from vlm_train.data.image import ImageSampling
from vlm_train.data.packer import PackConfig
from vlm_train.data.synthetic import SyntheticConfig, corpus_lines
from vlm_train.data.synthetic_video import SyntheticVideoConfig, video_corpus_lines
from vlm_train.data.video import VideoConfig


@dataclass
class SourceConfig:
    name: str = MISSING
    urls: str = MISSING  # brace pattern, e.g. /data/cc3m/{00000..00331}.tar; several joined with '::'
    weight: float = 1.0  # sources mix by weight (a curriculum stage may override the mixture)
    format: str = "auto"  # auto | caption | conversation | grounding | text


@dataclass
class TokenDropConfig:
    prob: float = 0.0  # share of images that drop merge windows (0: off); the rest are seen whole
    rate_min: float = 0.0  # a dropping image's rate is drawn uniformly from [rate_min, rate_max]
    rate_max: float = 0.5


@dataclass
class ImageConfig:
    min_pixels: int = 56 * 56  # images are resized (aspect kept) to an area within [min_pixels, max_pixels]
    max_pixels: int = 168 * 168
    max_decode_pixels: int = 89_478_485  # larger images are skipped from their header (decompression bombs)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random side scale per image (1, 1: off)
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    # pil: PIL bicubic, pixel-identical to the HF image processor; torch: antialiased bicubic on uint8, ~2.5x
    # faster (values differ from PIL by one level on a few % of pixels).
    resize: str = "pil"

    def sampling(self) -> ImageSampling:
        """The per-image randomness these settings ask for."""
        if len(self.scale_range) != 2:
            raise ValueError(f"data.image.scale_range must be [min, max], got {list(self.scale_range)}")
        drop = self.token_drop
        return ImageSampling(
            float(self.scale_range[0]),
            float(self.scale_range[1]),
            drop.prob,
            drop.rate_min,
            drop.rate_max if drop.prob > 0 else 0.0,
        )


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    # Source name -> weight, in place of the sources' own weights; sources not named drop out (empty: their own).
    # A curriculum stage sets it to change the mixture from its first pack on.
    mixture: dict[str, float] = field(default_factory=dict)
    heldout_urls: str = ""  # shards for held-out evaluation
    use_synthetic: bool = False  # add the built-in synthetic shapes dataset (made once, then cached)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # add the built-in synthetic video dataset (shapes moving left/right/up/down; made once, then cached); the tiny
    # tokenizer then also learns its words ("moving", "left", ...)
    use_synthetic_video: bool = False
    synthetic_video: SyntheticVideoConfig = field(default_factory=SyntheticVideoConfig)
    tokenizer: str = "tiny"  # 'tiny' (built in) or a local Hugging Face tokenizer folder
    system_prompt: str = ""  # a system turn before every conversation (Qwen2-VL's template uses one)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)  # frame sampling and pixel budgets of video samples
    pack: PackConfig = field(default_factory=PackConfig)
    num_workers: int = 0  # loader worker processes per rank (0: load in the training process)
    shuffle_buffer: int = 256  # samples per source and worker held for shuffling
    max_consecutive_failures: int = 200  # a longer run of skipped samples is a fatal error
    allow_pipe: bool = False  # pipe: URLs run shell commands; refused unless this is set


def tokenizer_corpus(data: DataConfig) -> list[str]:
    """The text the tiny tokenizer is built from: the image set's corpus, plus the video captions' words when the
    video set is used (so a run without it keeps exactly the tokenizer it always had)."""
    return video_corpus_lines() if data.use_synthetic_video else corpus_lines()
