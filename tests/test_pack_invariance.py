"""A sample's logits and loss must not depend on what else is in its pack, or where (fp32, tight tolerance)."""

import itertools

import pytest
import torch

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.collate import collate
from vlm_train.data.formats import IMAGE_PLACEHOLDER, Sample, Turn
from vlm_train.data.packer import PackConfig, Packer
from vlm_train.model import VLM, ModelConfig
from vlm_train.model.vit import float_pixel_values
from vlm_train.train import loss as L

from helpers import encoder, noise_image, sample, tiny_tokenizer

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _model() -> VLM:
    torch.manual_seed(0)
    enc = encoder()
    return VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=enc.special.image_pad).eval()


def _conversation(key: str, seed: int) -> Sample:
    """Two turns, an image in each user turn (of different sizes), both answered."""
    images = [noise_image(84, 56, seed), noise_image(56, 112, seed + 1)]
    turns = [
        Turn("user", IMAGE_PLACEHOLDER + "What is this?"),
        Turn("assistant", "a red circle"),
        Turn("user", "And this? " + IMAGE_PLACEHOLDER),
        Turn("assistant", "a blue square near a green star"),
    ]
    return Sample(key, "test", "conversation", images, turns)


# Text only, one image, several images before the prompt, and images spread over a multi-turn conversation.
KINDS = {
    "text": lambda enc: enc.encode(sample("target", "a red circle and a blue square", images=0, seed=7)),
    "one_image": lambda enc: enc.encode(sample("target", "a red circle and a blue square", images=1, seed=7)),
    "three_images": lambda enc: enc.encode(sample("target", "a red circle and a blue square", images=3, seed=7)),
    "conversation": lambda enc: enc.encode(_conversation("target", seed=7)),
}


def _segment(logits: torch.Tensor, batch, index: int) -> torch.Tensor:
    return logits[batch.cu_seqlens[index] : batch.cu_seqlens[index + 1]]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_alone_behind_others_and_in_every_order(kind):
    enc, model = encoder(), _model()
    target = KINDS[kind](enc)
    others = [enc.encode(sample(f"o{i}", "an orange diamond", images=i, seed=i)) for i in range(3)]
    with torch.no_grad():
        alone = model(collate([target])).logits
        for pack in itertools.permutations([target, others[0], others[2]]):
            batch = collate(list(pack))
            where = [s.meta["key"] for s in pack].index("target")
            torch.testing.assert_close(_segment(model(batch).logits, batch, where), alone, **TOL)
        behind = collate([*others, target])
        torch.testing.assert_close(_segment(model(behind).logits, behind, 3), alone, **TOL)


@pytest.mark.parametrize("kind", ["text", "three_images", "conversation"])
def test_per_sample_loss_is_the_same_alone_and_packed(kind):
    enc, model = encoder(), _model()
    others = [enc.encode(sample(f"s{i}", "a green square", images=i % 2, seed=i)) for i in range(2)]
    samples = [KINDS[kind](enc), *others]
    with torch.no_grad():
        for order in ([0, 1, 2], [2, 0, 1]):
            packed = collate([samples[i] for i in order])
            packed_losses = L.token_cross_entropy(model(packed).logits, packed.labels)
            for position, i in enumerate(order):
                alone = collate([samples[i]])
                alone_losses = L.token_cross_entropy(model(alone).logits, alone.labels)
                torch.testing.assert_close(_segment(packed_losses, packed, position), alone_losses, **TOL)
                assert (alone.labels != IGNORE_INDEX).any()


def test_packs_made_by_the_packer_leave_every_sample_unchanged():
    enc, model = encoder(), _model()
    stream = [KINDS[kind](enc) for kind in KINDS]
    stream += [enc.encode(sample(f"o{i}", "a pink star", images=i % 3, seed=i)) for i in range(4)]
    for i, s in enumerate(stream):
        s.meta["key"] = f"k{i}"
    packer = Packer(PackConfig(llm_budget=200, vit_budget=4096, buffer_size=4))
    packs = [p for s in stream for p in packer.add(s)] + packer.flush()
    assert max(len(p) for p in packs) >= 3
    with torch.no_grad():
        for pack in packs:
            batch = collate(pack)
            logits = model(batch).logits
            for index, s in enumerate(pack):
                torch.testing.assert_close(_segment(logits, batch, index), model(collate([s])).logits, **TOL)


def test_no_gradient_flows_between_samples():
    """The loss of one sample has exactly zero gradient with respect to the other samples' image patches."""
    enc, model = encoder(), _model()
    pack = [enc.encode(sample(f"g{i}", "a red circle", images=2, seed=i)) for i in range(3)]
    batch = collate(pack)
    # Gradients are taken with respect to the normalised float patches the model makes of the loader's uint8.
    batch.pixel_values = float_pixel_values(batch.pixel_values, model.cfg.vision.patch_dim).requires_grad_(True)
    losses = L.token_cross_entropy(model(batch).logits, batch.labels)
    _segment(losses, batch, 1).sum().backward()
    per_row = batch.pixel_values.grad.abs().sum(-1)
    rows = [0, *torch.cumsum(torch.tensor([s.num_patches for s in pack]), 0).tolist()]
    assert (per_row[rows[0] : rows[1]] == 0).all() and (per_row[rows[2] : rows[3]] == 0).all()
    assert (per_row[rows[1] : rows[2]] != 0).any()
