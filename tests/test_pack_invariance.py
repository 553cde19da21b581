"""A sample's logits must not depend on what else is in its pack (fp32, tight tolerance)."""
import pytest
import torch

from helpers import encoder, sample, tiny_tokenizer
from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.packer import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.train import loss as L


def _model() -> VLM:
    torch.manual_seed(0)
    enc = encoder()
    return VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=enc.special.image_pad).eval()


@pytest.mark.parametrize("images", [0, 1, 2])
def test_logits_equal_alone_and_behind_others(images):
    enc, model = encoder(), _model()
    target = enc.encode(sample("target", "a red circle and a blue square", images=images, seed=7))
    others = [enc.encode(sample(f"o{i}", "an orange diamond", images=i % 3, seed=i)) for i in range(3)]
    with torch.no_grad():
        alone = model(collate([target])).logits
        packed_batch = collate([*others, target])
        packed = model(packed_batch).logits
        start = int(packed_batch.cu_seqlens[-2])
        torch.testing.assert_close(packed[start:], alone, atol=1e-5, rtol=1e-5)
        # and in front of others, in another order
        first = model(collate([target, others[1], others[0]])).logits[: target.num_tokens]
        torch.testing.assert_close(first, alone, atol=1e-5, rtol=1e-5)


def test_per_sample_loss_is_the_same_alone_and_packed():
    enc, model = encoder(), _model()
    samples = [enc.encode(sample(f"s{i}", "a green square", images=i % 2, seed=i)) for i in range(3)]
    with torch.no_grad():
        packed = collate(samples)
        packed_losses = L.token_cross_entropy(model(packed).logits, packed.labels)
        for i, s in enumerate(samples):
            alone = collate([s])
            alone_losses = L.token_cross_entropy(model(alone).logits, alone.labels)
            start, end = packed.cu_seqlens[i], packed.cu_seqlens[i + 1]
            torch.testing.assert_close(packed_losses[start:end], alone_losses, atol=1e-5, rtol=1e-5)
            assert (alone.labels != IGNORE_INDEX).any()
