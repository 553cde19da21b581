"""A vocabulary larger than the checkpoint's: the model grows to its tokenizer, and the rows a checkpoint lacks
start where transformers' `resize_token_embeddings(n, mean_resizing=True)` puts them.

A tokenizer of another family (Llama's) gains the chat-template tokens (`<|im_start|>`, `<|image_pad|>`, ...,
data/tokenizer.py), so it outgrows its LLM preset's `vocab_size`. The model then gets one row per token, and an
LLM checkpoint with fewer rows fills the first ones; each new row is drawn from a normal with the old rows' mean
and 1e-9 times their covariance (in effect the mean), which keeps the next-token distribution of the old tokens
nearly unchanged (https://nlp.stanford.edu/~johnhew/vocab-expansion.html).
"""

from __future__ import annotations

import logging

import torch
from torch.distributions import constraints
from torch.distributions.multivariate_normal import MultivariateNormal

from .config import LLMConfig

log = logging.getLogger(__name__)

# transformers' scale of the old rows' covariance for the new rows' distribution.
COVARIANCE_SCALE = 1e-9


def vocab_size_for(llm: LLMConfig, tokens: int) -> int:
    """The rows the model needs for a tokenizer of `tokens` tokens: llm.vocab_size (0: the tokenizer's size),
    grown to the tokenizer when smaller (warned). A larger vocab_size (a padded vocabulary) stays."""
    if llm.vocab_size and llm.vocab_size < tokens:
        log.warning(
            "model.llm.vocab_size is %d but the tokenizer has %d tokens (chat-template tokens added to it?): the "
            "vocabulary grows by %d rows; weights loaded from a checkpoint of %d rows start the new rows at their mean",
            llm.vocab_size,
            tokens,
            tokens - llm.vocab_size,
            llm.vocab_size,
        )
        return tokens
    return llm.vocab_size or tokens


def mean_resized(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` [V, D] (an embedding or an LM head) grown to [rows, D] as transformers' mean resizing does
    (`_init_added_embeddings_weights_with_mean`): the same formula and the same draws from the global RNG, so under
    the same RNG state the new rows are transformers' to the bit."""
    old_rows = weight.shape[0]
    added = rows - old_rows
    if added < 0:
        raise ValueError(f"cannot grow {old_rows} rows to {rows}")
    old = weight.to(torch.float32)
    mean = torch.mean(old, dim=0)
    centered = old - mean
    covariance = centered.T @ centered / old_rows
    scaled = COVARIANCE_SCALE * covariance
    if constraints.positive_definite.check(scaled).all():
        new = MultivariateNormal(mean, covariance_matrix=scaled).sample(sample_shape=(added,))
    else:  # fewer rows than columns, or degenerate ones: no distribution, the mean itself (as transformers does)
        new = mean[None, :].repeat(added, 1)
    return torch.cat([weight, new.to(weight.dtype)])
