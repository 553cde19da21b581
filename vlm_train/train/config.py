"""The root training config, registered with Hydra's ConfigStore so a misspelt key or a wrong type is an error."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from vlm_train.data.config import DataConfig
from vlm_train.model.config import ModelConfig
from vlm_train.model.draft import DraftShapeConfig
from vlm_train.model.vision_heads import VisionHeadsConfig


@dataclass
class RunConfig:
    # The run folder: config, metrics, checkpoints, summary. run_time is Hydra's `now`, but rank 0's on every rank.
    dir: str = "outputs/${run_time:%Y-%m-%d_%H-%M-%S}"
    seed: int = 0


@dataclass
class LossConfig:
    """How token losses are weighted; the weights of one optimizer step (all micro-batches, all ranks) sum to 1."""

    averaging: str = "mix"  # token | sample (1/x per sample of x tokens) | square (1/sqrt x) | mix
    per_sample_weight: float = 0.5  # mix: alpha * sample + (1 - alpha) * token
    position_power: float = 0.0  # a sample's k-th supervised token (k = 0, 1, ...) is weighted (k + 1) ** -power
    source_weights: dict[str, float] = field(default_factory=dict)  # importance per data source (others: 1)
    importance_field: str = ""  # a per-sample meta field holding an importance factor (absent: 1)
    # How the LM head and cross-entropy run: chunked (ours: logits of the supervised tokens only, 2048 rows at a
    # time, recomputed in backward; any device) | liger (liger-kernel's fused linear + cross-entropy: CUDA only,
    # `pip install 'vlm_train[gpu]'`, not under ZeRO-3, whose head weight is partitioned)
    kernel: str = "chunked"


@dataclass
class StageConfig:
    name: str = MISSING
    # What the stage trains (vlm_train/train/kinds/): vlm: the VLM's token loss | vision: the vision tower alone,
    # with the objectives of `vision_pretrain` (its pooling head and text tower train with it; they are not part of
    # the VLM) | draft: an Eagle3 draft of the frozen VLM, with the settings of `eagle3` (trainable: draft.*)
    kind: str = "vlm"
    steps: int = 0  # optimizer steps in this stage, or
    tokens: int = 0  # LLM tokens (all ranks together) in this stage: set exactly one of steps and tokens
    trainable: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns: vision.*, projector.*, llm.*
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)  # curriculum.groups name -> multiplier of lr
    warmup_steps: int = 0
    schedule: str = "cosine"  # constant | cosine | wsd (warm-up, stable, decay)
    min_lr_ratio: float = 0.1  # cosine and wsd decay to lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: the last share of the stage that decays
    decay_shape: str = "linear"  # wsd: linear | cosine | sqrt (1 - sqrt)
    # Partial configs merged onto the run's `data` and `loss` for this stage, checked against the same schema:
    # e.g. data: {mixture: {laion: 1.0}, pack: {llm_budget: 512}, image: {max_pixels: 6272}}, loss: {averaging: token}
    data: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisionPretrainConfig:
    """The objectives of `kind: vision` stages; the heads' shapes are `heads`."""

    heads: VisionHeadsConfig = field(default_factory=VisionHeadsConfig)
    contrastive_weight: float = 1.0  # sigmoid image-text contrastive (SigLIP) over the whole step's pairs
    multilabel_weight: float = 0.0  # per-label sigmoid (binary cross-entropy) over `labels`
    # The label vocabulary. A sample's labels: the list in its JSON's `labels` field, else the vocabulary words
    # that appear in its caption (whole words, any case).
    labels: list[str] = field(default_factory=list)


@dataclass
class Eagle3Config:
    """The Eagle3 draft of `kind: draft` stages: its target, its shape and its training-time test."""

    # The frozen target: one of our run or checkpoint folders, or a Hugging Face Qwen2.5-VL folder; empty: the
    # run's own VLM (a curriculum that pretrains, then trains its draft)
    target: str = ""
    # Offline: a folder of the target's hidden states written by tools/dump_hidden_states.py; the draft stages
    # read them instead of running the target. Empty: online (the target runs forward in the loop).
    offline: str = ""
    draft: DraftShapeConfig = field(default_factory=DraftShapeConfig)
    ttt_steps: int = 7  # training-time-test steps per position
    step_weight: float = 0.8  # step j's loss is weighted step_weight ** j
    vocab_samples: int = 2000  # training samples whose supervised tokens choose the draft vocabulary
    # The precision the target's hidden states reach the draft in, online as offline (stored): bfloat16 | float16
    hidden_dtype: str = "bfloat16"


def _default_groups() -> dict[str, list[str]]:
    return {"vision": ["vision.*"], "projector": ["projector.*"], "llm": ["llm.*"]}


@dataclass
class CurriculumConfig:
    # Parameter groups by module pattern (a parameter joins the first group that matches); each has its own lr.
    groups: dict[str, list[str]] = field(default_factory=_default_groups)
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class FSDPConfig:
    # True: each block's gathered weights are freed after its forward and gathered again for backward (ZeRO-3-like,
    # least memory); False: kept from forward to backward (ZeRO-2-like, one all-gather fewer per block and step).
    reshard_after_forward: bool = True


@dataclass
class EngineConfig:
    # auto: single in one process, deepspeed when torchrun starts several | single (one process, CPU or one GPU) |
    # deepspeed (under torchrun) | fsdp2 (under torchrun: PyTorch FSDP2, built on the meta device, sharded
    # checkpoints that resume at any world size)
    name: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    zero_stage: int = 2  # deepspeed: ZeRO stage 0-3
    bf16: str = "auto"  # auto (on with CUDA) | true | false; true on the CPU tests the bf16 path (slow there)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged last
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # engine=fsdp2


@dataclass
class GuardConfig:
    max_consecutive_skips: int = 10  # a longer run of skipped optimizer steps stops the run (0: no limit)
    spike_zscore: float = 0.0  # skip a step whose loss is this many standard deviations above the window (0: off)
    spike_window: int = 100  # losses of accepted steps the spike rule compares with
    spike_min_history: int = 20  # the spike rule waits for this many losses


@dataclass
class FaultConfig:
    """Fault injection for tests (like Megatron's): each 0 / empty is off."""

    nan_loss_at_steps: list[int] = field(default_factory=list)  # these steps' loss becomes NaN
    nan_rank: int = -1  # ... on this rank only (-1: every rank)
    inf_grad_at_steps: list[int] = field(default_factory=list)  # a gradient becomes inf (the loss stays finite)
    inf_grad_rank: int = -1  # ... on this rank only (-1: every rank)
    data_error_at_pack: int = 0  # a data worker's n-th pack (1-based) raises inside that worker
    sigterm_at_step: int = 0  # send SIGTERM to this process after this step
    sigterm_rank: int = 0  # ... on this rank


@dataclass
class TrainConfig:
    micro_batches: int = 1  # packs per rank per optimizer step (gradient accumulation)
    grad_clip: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    resume: str = "auto"  # auto (newest complete checkpoint of run.dir, if any) | never | a checkpoint folder
    exit_at_step: int = 0  # save and exit after this step, schedules unchanged (0: off)
    guard: GuardConfig = field(default_factory=GuardConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class EvalConfig:
    enabled: bool = True  # held-out evaluation at the end of the run
    interval: int = 0  # also every N optimizer steps, into that step's metrics (0: off)
    at_stage_end: bool = False  # also after the last step of every stage
    num_loss: int = 64  # held-out samples of each set for the teacher-forced loss (0: no loss)
    tokens_per_pack: int = 4096  # LLM tokens per pack for the loss
    num_caption: int = 200  # held-out caption samples scored by exact match
    num_grounding: int = 200  # held-out grounding samples scored by IoU >= 0.5
    max_new_tokens: int = 32
    prompts_per_pack: int = 64
    show_examples: int = 4
    # the first N held-out examples with their pictures (the image, or a video's frames side by side), for a W&B
    # table at each evaluation (0: none)
    table_examples: int = 16


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps; 0 saves only at the end (and on SIGTERM / exit_at_step)
    keep_last: int = 2  # complete checkpoints kept (0: all)


@dataclass
class LoggerConfig:
    console_interval: int = 10  # steps between progress lines
    peak_tflops: float = 0.0  # peak dense TFLOP/s of one device for MFU; 0: from the GPU's name (none on CPU)
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
    vision_pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    eagle3: Eagle3Config = field(default_factory=Eagle3Config)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_START_TIME: list[datetime.datetime] = []


def set_start_time(when: datetime.datetime) -> None:
    """The time `${run_time:...}` formats (every rank of a launch sets rank 0's)."""
    _START_TIME[:] = [when]


def _run_time(pattern: str) -> str:
    if not _START_TIME:
        set_start_time(datetime.datetime.now())
    return _START_TIME[0].strftime(pattern)


def register_configs() -> None:
    """Make the schema the first entry of conf/config.yaml's defaults list; register the run_time resolver."""
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("run_time", _run_time, use_cache=True, replace=True)


def compose_config(*overrides: str) -> Config:
    """The run config as `vlm-train OVERRIDES...` would compose it from the packaged conf/, typed (for tools)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="vlm_train.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))  # type: ignore[return-value]
