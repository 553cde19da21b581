"""pack_flops equals what torch's FlopCounterMode counts on the real model, forward and forward + backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.collate import collate
from vlm_train.model import VLM, LLMConfig, ModelConfig
from vlm_train.model import attention as attention_module
from vlm_train.model.flops import llm_flops, pack_flops
from vlm_train.model.vision_layout import random_keep, vision_layout
from vlm_train.model.vit import float_pixel_values

from helpers import encoder, flops_model_config, sample, tiny_tokenizer


@pytest.fixture(autouse=True)
def _unpadded_attention(monkeypatch):
    """The formulas count the attention each segment needs; the sdpa backend pads segments of different lengths
    into shared calls, which torch's counter would count too. At ratio 1 nothing is padded."""
    monkeypatch.setattr(attention_module, "PADDED_AREA_RATIO", 1.0)


def _model(window: bool = True) -> VLM:
    torch.manual_seed(0)
    cfg = flops_model_config(window)
    return VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)


def _pack(images_per_sample=(1, 0, 2)):
    enc = encoder()
    samples = [sample(f"s{i}", "a red circle", images=n, seed=i) for i, n in enumerate(images_per_sample)]
    return collate([enc.encode(s) for s in samples])


def _counted(model, batch):
    """(forward FLOPs, forward + backward FLOPs) as torch counts them."""
    # Float patches that require grad, so backward also makes the patch embedding's input gradient.
    batch.pixel_values = float_pixel_values(batch.pixel_values, model.cfg.vision.patch_dim).requires_grad_(True)
    # The math kernel: torch's counter has no formula for the CPU flash kernel, but counts the math one's matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(batch).logits
        forward = counter.get_total_flops()
        F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX).backward()
    return forward, counter.get_total_flops()


@pytest.mark.parametrize("window", [True, False], ids=["windows", "full"])
@pytest.mark.parametrize("images", [(1, 0, 2), (0, 0)], ids=["images", "text_only"])
def test_pack_flops_equal_torch_flop_counter(window, images):
    model, batch = _model(window), _pack(images)
    forward, training = _counted(model, batch)
    flops = pack_flops(model.cfg, batch, head_tokens=batch.num_tokens)
    skipped = folded = 0
    if not any(images):
        # The dummy image is made inside the model, so autograd skips its patch embedding's input gradient; it is
        # one uint8 frame, so its patch embedding runs the kernel folded over time (1/t of the FLOPs, forward and
        # weight gradient) where the formula counts the model's Conv3d.
        vision = model.cfg.vision
        skipped = 2 * 4 * vision.patch_dim * vision.hidden_size
        folded = 2 * 4 * (vision.patch_dim - vision.patch_dim // vision.temporal_patch_size) * vision.hidden_size
    assert flops.forward == forward + folded
    assert flops.training == training + skipped + 2 * folded
    assert flops.vision > 0 and flops.projector > 0 and flops.llm > 0


def test_token_dropping_counts_only_kept_patches():
    model = _model()
    batch = _pack()
    keep = random_keep(batch.image_grid_thw, 2, 0.5, torch.Generator().manual_seed(0))
    full = pack_flops(model.cfg, batch)
    # The pack as the data side makes it: kept patches only, their positions, per-image kept lengths.
    rows = keep.repeat_interleave(4)
    batch.pixel_values = batch.pixel_values[rows]
    batch.patch_positions = vision_layout(batch.image_grid_thw, 2).positions[rows]
    kept_per_image = torch.stack([k.sum() * 4 for k in keep.split(_units(batch))])
    batch.vit_cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), kept_per_image.cumsum(0)]).int()
    flops = pack_flops(model.cfg, batch)
    assert flops.vision < full.vision
    batch.pixel_values = float_pixel_values(batch.pixel_values, model.cfg.vision.patch_dim).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.encode_images(batch.pixel_values, batch.image_grid_thw, keep)
    assert flops.vision + flops.projector == counter.get_total_flops()


def _units(batch):
    return (batch.image_grid_thw.prod(-1) // 4).tolist()


def test_attention_counts_the_real_sample_lengths_not_the_pack():
    cfg = ModelConfig(llm=LLMConfig(vocab_size=64))
    one_sample, two_halves = llm_flops(cfg, [100]), llm_flops(cfg, [50, 50])
    width = cfg.llm.num_heads * cfg.llm.resolved_head_dim
    assert one_sample - two_halves == cfg.llm.num_layers * 4 * width * (100**2 - 2 * 50**2)


def test_default_head_rows_are_the_supervised_tokens():
    model, batch = _model(), _pack()
    supervised = int((batch.labels != IGNORE_INDEX).sum())
    assert 0 < supervised < batch.num_tokens
    flops = pack_flops(model.cfg, batch)
    assert flops.lm_head == 2 * supervised * model.cfg.llm.hidden_size * model.cfg.llm.vocab_size


@pytest.mark.parametrize(
    "trainable",
    [["projector.*"], ["vision.*", "projector.*"], ["projector.*", "llm.*"], ["llm.layers.*"], ["vision.*"], ["*"]],
)
def test_a_stage_that_freezes_parts_counts_only_what_runs(trainable):
    """MFU in frozen stages: forward + the backward torch really runs (pixels need no gradient)."""
    from vlm_train.model.flops import TrainedParts
    from vlm_train.train.curriculum import set_trainable

    model, batch = _model(), _pack()
    set_trainable(model, trainable)
    batch.pixel_values = float_pixel_values(batch.pixel_values, model.cfg.vision.patch_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(batch).logits
        F.cross_entropy(logits, batch.labels, ignore_index=IGNORE_INDEX).backward()
    flops = pack_flops(model.cfg, batch, head_tokens=batch.num_tokens)
    parts = TrainedParts.of(model)
    assert flops.trained(parts) == counter.get_total_flops(), parts
    if trainable == ["projector.*"]:  # the align stage: the tower runs forward only, the LLM passes gradients
        assert flops.trained(parts) < flops.training
