"""Sequence packer: encoded samples into packs under an LLM-token, a ViT-patch and an image budget (see collate.py
for how a pack is laid out as a PackedBatch)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample
from vlm_train.data.hidden_states import cut_to_budget
from vlm_train.data.pack_cost import FlopsCost
from vlm_train.data.pack_planner import SKIP_REASONS, Budget, FlopsTarget, Item, PackPlanner
from vlm_train.data.tokenizer import SpecialIds
from vlm_train.data.truncate import truncate

TOO_LONG_POLICIES = ("drop", "truncate")


@dataclass
class PackConfig:
    llm_budget: int = 1024  # LLM tokens per pack
    vit_budget: int = 4096  # ViT patches per pack
    max_images: int = 0  # images per pack; 0: no limit
    buffer_size: int = 64  # samples held while choosing packs (more while they hold under two packs of tokens)
    too_long: str = "drop"  # a sample over a budget: drop (counted) | truncate (text cut at the end, images whole)
    # FLOPs balancing, so that data-parallel ranks packing their own streams finish their steps together: each
    # pack's training FLOPs are kept within this share of the buffer's average FLOPs per token x llm_budget.
    # 0: off. Active only with flops_cost.
    flops_corridor: float = 0.002
    # Per-sample FLOPs coefficients of the model being trained; the trainer sets them from the model config
    # (vlm_train.model.flops.flops_cost). None: no FLOPs balancing.
    flops_cost: Optional[FlopsCost] = None

    def budget(self) -> Budget:
        if self.too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"data.pack.too_long must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}")
        if self.buffer_size <= 0:
            raise ValueError(f"data.pack.buffer_size must be positive, got {self.buffer_size}")
        if not self.flops_corridor >= 0:
            raise ValueError(f"data.pack.flops_corridor must be >= 0 (0: off), got {self.flops_corridor}")
        flops = None
        if self.flops_cost is not None and self.flops_corridor > 0:
            cost = self.flops_cost if isinstance(self.flops_cost, FlopsCost) else FlopsCost(**self.flops_cost)
            flops = FlopsTarget(cost, self.flops_corridor)
        try:
            return Budget(self.llm_budget, self.vit_budget, self.max_images, flops)
        except ValueError as exc:
            raise ValueError(f"data.pack: {exc} (llm_budget, vit_budget > 0; max_images >= 0)") from exc


def restore_key_of(sample: EncodedSample) -> dict[str, Any]:
    """What the loader needs to read a sample again: its `restore_key` meta, else its source and key."""
    meta = sample.meta
    return meta["restore_key"] if "restore_key" in meta else {"source": meta.get("source"), "key": meta.get("key")}


class Packer:
    """Streams encoded samples into packs (see packing.PackPlanner); its state is the buffer's restore keys.

    `special` (the encoder's token ids) is needed by the `truncate` policy, to keep images whole.
    """

    def __init__(self, cfg: PackConfig, special: SpecialIds | None = None):
        self.cfg = cfg
        self.budget = cfg.budget()
        if cfg.too_long == "truncate" and special is None:
            raise ValueError("data.pack.too_long=truncate: build the Packer with special=encoder.special")
        self.special = special
        self.packer = PackPlanner(self.budget, cfg.buffer_size)
        self.counts: Counter = Counter()  # dropped/<reason>, truncated

    @property
    def buffer(self) -> list[EncodedSample]:
        """Buffered samples, oldest first."""
        return [item.payload for item in self.packer.items()]

    def check(self, sample: EncodedSample) -> EncodedSample:
        """The sample as it will be packed: itself, truncated, or SkipSample when no pack could hold it."""
        over = self.budget.overflow(sample.num_tokens, sample.num_patches, sample.image_grid_thw.shape[0])
        if over is None:
            return sample
        if self.cfg.too_long == "truncate" and (cut := self._truncate(sample)) is not None:
            return cut
        limit = {"tokens": self.budget.tokens, "patches": self.budget.patches, "images": self.budget.images}[over]
        raise SkipSample(SKIP_REASONS[over], f"sample {sample.meta.get('key')} is over the {over} budget {limit}")

    def _truncate(self, sample: EncodedSample) -> EncodedSample | None:
        if sample.target_aux is not None:  # stored hidden states (offline draft training): no images to keep whole
            return cut_to_budget(sample, self.budget)
        return truncate(sample, self.budget, self.special)

    def add(self, sample: EncodedSample) -> list[list[EncodedSample]]:
        """Buffer a sample; returns the packs it completes (none while the buffer fills). Raises SkipSample."""
        try:
            packed = self.check(sample)
        except SkipSample as exc:
            self.counts[f"dropped/{exc.reason}"] += 1
            raise
        if packed is not sample:
            self.counts["truncated"] += 1
        return [[item.payload for item in pack] for pack in self.packer.push(_item(packed))]

    def flush(self) -> list[list[EncodedSample]]:
        """Pack everything still buffered (end of stream)."""
        return [[item.payload for item in pack] for pack in self.packer.flush()]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the buffered samples' restore keys (oldest first), the stream totals and the counts."""
        return {
            "buffer": [restore_key_of(s) for s in self.buffer],
            "seen_tokens": self.packer.seen_tokens,
            "seen_patches": self.packer.seen_patches,
            "counts": dict(self.counts),
        }

    def load_state_dict(
        self,
        state: dict[str, Any],
        resolve: Callable[[dict[str, Any]], EncodedSample],
        on_drop: Callable[[dict[str, Any], SkipSample], None] | None = None,
    ) -> None:
        """Rebuild the buffer: `resolve(key)` re-encodes the sample of each saved restore key.

        Saved under larger budgets (a curriculum stage lowered them), a buffered sample over the new ones follows
        data.pack.too_long, as a new one would: truncated, or dropped, counted and reported to `on_drop`. (A
        truncation is not counted again: the state does not say whether the sample was cut when it came in.)
        """
        self.packer = PackPlanner(self.budget, self.cfg.buffer_size)
        self.counts = Counter(state.get("counts", {}))
        items = []
        for key in state["buffer"]:
            sample = resolve(key)
            try:
                items.append(_item(self.check(sample)))
            except SkipSample as exc:
                self.counts[f"dropped/{exc.reason}"] += 1
                if on_drop is not None:
                    on_drop(key, exc)
        self.packer.restore(items, int(state["seen_tokens"]), int(state["seen_patches"]))


def _item(sample: EncodedSample) -> Item:
    grids = tuple((t, h, w) for t, h, w in sample.image_grid_thw.tolist())
    supervised = int((sample.labels != IGNORE_INDEX).sum())
    return Item(sample.num_tokens, sample.num_patches, len(grids), sample, supervised=supervised, grids=grids)
