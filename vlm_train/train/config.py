"""The root training config, registered with Hydra's ConfigStore so a misspelt key or a wrong type is an error."""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from vlm_train.data.config import DataConfig
from vlm_train.model.config import ModelConfig


@dataclass
class RunConfig:
    dir: str = "outputs/${now:%Y-%m-%d_%H-%M-%S}"  # the run folder: config, metrics, checkpoints, summary
    seed: int = 0


@dataclass
class StageConfig:
    name: str = MISSING
    steps: int = MISSING  # optimizer steps in this stage
    trainable: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns: vision.*, projector.*, llm.*
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio


@dataclass
class CurriculumConfig:
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class LossConfig:
    # alpha: weight of per-sample averaging (each sample counts once); 1 - alpha goes to per-token averaging.
    per_sample_weight: float = 0.5


@dataclass
class EngineConfig:
    name: str = "single"  # single process, CPU or one GPU
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 leaves torch's default


@dataclass
class TrainConfig:
    micro_batches: int = 1  # packs per optimizer step (gradient accumulation)
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class EvalConfig:
    enabled: bool = True  # held-out evaluation at the end of the run
    num_caption: int = 100  # held-out caption samples scored by exact match
    num_grounding: int = 100  # held-out grounding samples scored by IoU >= 0.5
    max_new_tokens: int = 32
    prompts_per_pack: int = 64
    show_examples: int = 4


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps; 0 saves only at the end
    keep_last: int = 2


@dataclass
class LoggerConfig:
    console_interval: int = 10  # steps between progress lines
    wandb: bool = False
    wandb_project: str = "vlm_train"
    wandb_entity: str = ""
    wandb_name: str = ""
    wandb_mode: str = ""  # online | offline | disabled; empty: wandb's own default (WANDB_MODE, else online)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Make the schema the first entry of conf/config.yaml's defaults list."""
    ConfigStore.instance().store(name="base_config", node=Config)
