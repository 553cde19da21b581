"""Tokenizers: the built-in tiny byte-level BPE, or any Hugging Face tokenizer from a local folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Qwen2-VL's special tokens, so templates and checkpoints line up with that family.
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD]

# Qwen2's pre-tokenizer split: every digit is its own token, so a 000-999 coordinate is three tokens.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the chat template and the model need."""

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on `corpus`; the 256-byte alphabet makes any text encodable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat template's own words are always in the corpus, so "assistant" is one token, not nine.
    tok.train_from_iterator(list(corpus) + ["system\n", "user\n", "assistant\n"] * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, PAD)],
    )


def load_tokenizer(spec: str, corpus: list[str] | None = None) -> PreTrainedTokenizerBase:
    """`tiny` builds the built-in tokenizer from `corpus`; anything else is a local Hugging Face tokenizer folder."""
    if spec == "tiny":
        if not corpus:
            raise ValueError("data.tokenizer=tiny needs a text corpus to build from (the synthetic dataset gives one)")
        return build_tiny_tokenizer(corpus)
    path = os.path.expanduser(spec)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.tokenizer={spec!r}: not 'tiny' and not a local tokenizer folder")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    added = add_missing_special_tokens(tokenizer)
    if added:
        log.warning(
            "tokenizer %s lacked %s: added them as new special tokens (the model's vocabulary grows to %d)",
            path,
            added,
            len(tokenizer),
        )
    return tokenizer


def add_missing_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give a tokenizer of another family the chat-template tokens it lacks; returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Look up the chat-template tokens; a clear error names any the tokenizer lacks."""
    ids = {}
    missing = []
    for name, token in [
        ("pad", PAD),
        ("im_start", IM_START),
        ("im_end", IM_END),
        ("vision_start", VISION_START),
        ("vision_end", VISION_END),
        ("image_pad", IMAGE_PAD),
    ]:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            missing.append(token)
        ids[name] = token_id
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; use a Qwen2-VL-style tokenizer")
    return SpecialIds(**ids)
