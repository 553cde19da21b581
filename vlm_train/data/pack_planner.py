"""Streaming two-budget packing on sizes alone: the algorithm shared by the Packer and tools/pack_stats.py."""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Any

from vlm_train.data.pack_cost import FlopsCost

_NEWEST = float("-inf")  # sorts after every (tokens, -seq) key with the same token count
_NO_LIMIT = 1 << 62
SKIP_REASONS = {"tokens": "too_long", "patches": "too_many_patches", "images": "too_many_images"}  # by budget


@dataclass(frozen=True)
class FlopsTarget:
    """Keep each pack's training FLOPs near the buffer's average FLOPs per token times the token budget."""

    cost: FlopsCost
    corridor: float = 0.002  # slack either side of the target, as a share of it

    def __post_init__(self) -> None:
        if not self.corridor > 0:
            raise ValueError(f"the FLOPs corridor must be > 0, got {self.corridor}")


@dataclass(frozen=True)
class Budget:
    """What one pack may hold: LLM tokens, ViT patches and (if > 0) images; and, if `flops` is set, training
    FLOPs near the buffered samples' average per token (a preference, not a limit)."""

    tokens: int
    patches: int
    images: int = 0  # 0: no limit
    flops: FlopsTarget | None = None

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.patches <= 0 or self.images < 0:
            raise ValueError(f"pack budgets must be positive (images >= 0, 0 = no limit), got {self}")

    def overflow(self, tokens: int, patches: int, images: int) -> str | None:
        """The name of the first budget ('tokens', 'patches', 'images') these sizes exceed, or None."""
        if tokens > self.tokens:
            return "tokens"
        if patches > self.patches:
            return "patches"
        if self.images and images > self.images:
            return "images"
        return None


@dataclass(eq=False)  # compared by identity: payloads hold arrays
class Item:
    """One sample's sizes; `payload` is what the caller gets back in the pack."""

    tokens: int
    patches: int = 0
    images: int = 0
    payload: Any = None
    seq: int = -1  # arrival number, set when the item enters the buffer
    supervised: int = 0  # tokens with a label (LM-head rows), for the FLOPs cost
    grids: tuple[tuple[int, int, int], ...] = ()  # (t, h, w) patch grid of each image, for the FLOPs cost
    flops: int = 0  # training FLOPs, set on entry when the budget has a FLOPs target


@dataclass
class _Room:
    tokens: int
    patches: int
    images: int

    def fits(self, tokens: int, patches: int, images: int) -> bool:
        return tokens <= self.tokens and patches <= self.patches and images <= self.images

    def fits_item(self, item: Item) -> bool:
        return self.fits(item.tokens, item.patches, item.images)

    def fits_all(self, items: list[Item]) -> bool:
        return self.fits(sum(i.tokens for i in items), sum(i.patches for i in items), sum(i.images for i in items))

    def take(self, item: Item, sign: int = 1) -> None:
        self.tokens -= sign * item.tokens
        self.patches -= sign * item.patches
        self.images -= sign * item.images


class PackPlanner:
    """A bounded buffer of items; once full, it emits one pack anchored on its oldest item and filled best-fit.

    The buffer is full at `buffer_size` items holding at least two packs' worth of tokens or patches (tiny
    samples: up to 2 * budget.tokens items). Each pack: the oldest buffered item (so a sample waits for fewer
    packs than the buffer holds items, and packs mix the stream), then the largest items that fit every budget,
    keeping the pack's ViT load near the stream's average; then its small items are re-chosen by an exact
    subset sum over the buffer to use the last tokens. With a FLOPs target (budget.flops), the items are chosen
    to bring the pack's training FLOPs to the buffer's average FLOPs per token times the token budget instead.
    Ties go by arrival: the packs depend only on the order the items arrive in (the FLOPs target too: it is
    taken from the buffered items, which a restore brings back).
    """

    def __init__(
        self,
        budget: Budget,
        buffer_size: int,
        corridor: float = 0.15,  # ViT slack either side of the average load, as a share of the ViT budget
        gap_window: float = 1 / 8,  # share of the token budget re-chosen by subset sum
        scan_limit: int = 64,  # items looked at per greedy choice
        max_candidates: int = 128,  # items given to the subset sum
        flops_flex: float = 0.05,  # FLOPs target: extra slack, as a share of what the room left would add
    ):
        if buffer_size <= 0:
            raise ValueError(f"pack buffer_size must be positive, got {buffer_size}")
        self.budget = budget
        self.buffer_size = buffer_size
        self.corridor = corridor
        self.gap_window = gap_window
        self.scan_limit = scan_limit
        self.max_candidates = max_candidates
        self.flops_flex = flops_flex
        self._items: dict[int, Item] = {}
        self._arrivals: list[int] = []  # min-heap of seqs, cleaned lazily: its live top is the oldest item
        self._sorted: list[tuple[int, int]] = []  # (tokens, -seq): ascending size, oldest first among equals
        self._next_seq = 0
        self._buffered_tokens = 0
        self._buffered_patches = 0
        self._buffered_flops = 0
        self._small_flops = self._small_tokens = 0  # buffered items of at most gap_window of the token budget
        self.seen_tokens = 0  # over the whole stream: its average ViT load per token
        self.seen_patches = 0

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[Item]:
        """Buffered items, oldest first."""
        return [self._items[seq] for seq in sorted(self._items)]

    def push(self, item: Item) -> list[list[Item]]:
        """Buffer an item; returns the packs this completes (one per call once the buffer is full, else none)."""
        self._admit(item)
        self.seen_tokens += item.tokens
        self.seen_patches += item.patches
        packs = []
        while len(self._items) >= self.buffer_size and self._could_fill():
            packs.append(self._build(self._oldest()))
        return packs

    def restore(self, items: list[Item], seen_tokens: int, seen_patches: int) -> None:
        """Refill an empty packer with the items a saved one held (oldest first) and its stream totals."""
        if self._items:
            raise RuntimeError("restore needs an empty packer")
        for item in items:
            self._admit(item)
        self.seen_tokens, self.seen_patches = seen_tokens, seen_patches

    def flush(self) -> list[list[Item]]:
        """Pack everything buffered (end of stream), largest items first."""
        packs = []
        while self._sorted:
            packs.append(self._build(-self._sorted[-1][1]))
        return packs

    def _admit(self, item: Item) -> None:
        if item.tokens < 1 or item.patches < 0 or item.images < 0:
            raise ValueError(f"an item needs at least one token and no negative size, got {item}")
        over = self.budget.overflow(item.tokens, item.patches, item.images)
        if over:
            raise ValueError(
                f"item of {item.tokens} tokens, {item.patches} patches, {item.images} images "
                f"is over the {over} budget of {self.budget}"
            )
        if self.budget.flops is not None:
            item.flops = self.budget.flops.cost.sample(item.tokens, item.supervised, item.patches, item.grids)
        item.seq = self._next_seq
        self._next_seq += 1
        self._insert(item)

    def _could_fill(self) -> bool:
        # With tiny samples, hold more than buffer_size until the buffer could fill two packs, so there is a choice
        # (this holds fewer than 2 * budget.tokens samples).
        return self._buffered_tokens >= 2 * self.budget.tokens or self._buffered_patches >= 2 * self.budget.patches

    def _insert(self, item: Item) -> None:
        # An item put back from a pack keeps its arrival number: it stays as old as it was.
        self._items[item.seq] = item
        self._buffered_tokens += item.tokens
        self._buffered_patches += item.patches
        self._buffered_flops += item.flops
        if item.tokens <= self.gap_window * self.budget.tokens:
            self._small_flops += item.flops
            self._small_tokens += item.tokens
        heapq.heappush(self._arrivals, item.seq)
        bisect.insort(self._sorted, (item.tokens, -item.seq))

    def _remove(self, seq: int) -> Item:
        item = self._items.pop(seq)
        self._buffered_tokens -= item.tokens
        self._buffered_patches -= item.patches
        self._buffered_flops -= item.flops
        if item.tokens <= self.gap_window * self.budget.tokens:
            self._small_flops -= item.flops
            self._small_tokens -= item.tokens
        del self._sorted[bisect.bisect_left(self._sorted, (item.tokens, -seq))]
        return item

    def _oldest(self) -> int:
        while self._arrivals[0] not in self._items:
            heapq.heappop(self._arrivals)
        return self._arrivals[0]

    def _build(self, anchor_seq: int) -> list[Item]:
        # FLOPs per token to aim at: the buffer's average, which its items restore exactly on resume.
        flops_per_token = self._buffered_flops / max(self._buffered_tokens, 1)
        room = _Room(self.budget.tokens, self.budget.patches, self.budget.images or _NO_LIMIT)
        pack = [self._remove(anchor_seq)]
        room.take(pack[0])
        while room.tokens > 0 and (item := self._largest_fitting(room, pack, flops_per_token)) is not None:
            pack.append(self._remove(item.seq))
            room.take(item)
        if room.tokens > 0 and len(pack) > 1:
            self._close_gap(pack, room, flops_per_token * self.budget.tokens)
        return pack

    def _largest_fitting(self, room: _Room, pack: list[Item], flops_per_token: float) -> Item | None:
        """The largest buffered item that fits (oldest among equals), preferring one that keeps the loads even.

        Preferred items keep the pack's patches within `corridor` of the stream's average patches per token:
        packs then take image-heavy and text-only samples in the proportion they arrive, so neither piles up in
        the buffer and the ViT budget seldom ends a pack before its tokens are used. With a FLOPs target, items
        that keep the pack's FLOPs within its corridor of `flops_per_token` come first: every pack then costs
        about the same compute, so data-parallel ranks that each pack their own stream wait less for each other.
        """
        used_tokens = self.budget.tokens - room.tokens
        used_patches = self.budget.patches - room.patches
        load = min(self.budget.patches / self.budget.tokens, self.seen_patches / max(self.seen_tokens, 1))
        slack = self.corridor * self.budget.patches
        target = self.budget.flops
        if target is not None:
            # The pack's FLOPs if it took `item` and then filled its room with small items of the buffer's average
            # FLOPs per token (the last items of a pack are small ones): |item.flops - tail * item.tokens - aim|
            # is how far that lands from the target. While much room is left, the items still to come can make up
            # for a miss, so the slack widens with it (flops_flex); else large items, always a coarse step, would
            # be passed over until they are the oldest, and the buffer would fill with them.
            goal = flops_per_token * self.budget.tokens
            flops_slack = target.corridor * goal
            tail = self._small_flops / self._small_tokens if self._small_tokens else flops_per_token
            aim = goal - sum(i.flops for i in pack) - tail * room.tokens
        index = bisect.bisect_right(self._sorted, (room.tokens, _NEWEST)) - 1
        flops_even = fallback = None
        closest: tuple[float, Item] | None = None  # under a FLOPs target, the fallback: the item landing nearest
        for _ in range(self.scan_limit):
            if index < 0:
                break
            item = self._items[-self._sorted[index][1]]
            index -= 1
            if room.fits_item(item):
                vit = abs(used_patches + item.patches - load * (used_tokens + item.tokens)) <= slack
                if target is None:
                    if vit:
                        return item
                    fallback = fallback or item
                    continue
                off = abs(item.flops - tail * item.tokens - aim)
                if off <= flops_slack + self.flops_flex * tail * (room.tokens - item.tokens):
                    if vit:
                        return item
                    flops_even = flops_even or item
                if closest is None or off < closest[0]:
                    closest = (off, item)
        if target is not None:
            return flops_even or (closest[1] if closest else None)
        return fallback

    def _close_gap(self, pack: list[Item], room: _Room, target: float) -> None:
        """Re-choose the pack's small items by an exact subset sum over the buffer, to use the last tokens.

        Greedy largest-fit leaves a gap smaller than any buffered item that fits; giving back the pack's small
        items and solving subset sum (a bitset over token counts) over those and the buffer usually closes it.
        Under a FLOPs target, the sum prefers the items whose FLOPs per token would bring the pack to `target`.
        """
        window = max(room.tokens, int(self.budget.tokens * self.gap_window))
        reopened = []
        for item in sorted(pack[1:], key=lambda i: (i.tokens, i.seq)):  # the anchor stays
            if room.tokens + item.tokens > window:
                break
            room.take(item, sign=-1)
            reopened.append(item)
        candidates = reopened + self._fitting_items(room)
        if self.budget.flops is None:
            candidates.sort(key=lambda i: (-i.tokens, i.seq))
        else:  # the subset sum prefers earlier items: put first those of the FLOPs per token the room needs
            density = (target - sum(i.flops for i in pack) + sum(i.flops for i in reopened)) / room.tokens
            candidates.sort(key=lambda i: (abs(i.flops / i.tokens - density), -i.tokens, i.seq))
        chosen = _subset_sum(candidates, room.tokens)
        if not room.fits_all(chosen):
            # The exact fill breaks the ViT or image budget: solve again over the least patch-hungry candidates
            # that fit those budgets together, and keep the greedy choice if that is no better.
            chosen = _subset_sum(_lightest(candidates, room), room.tokens)
            if sum(i.tokens for i in chosen) <= sum(i.tokens for i in reopened):
                chosen = reopened
        reopened_seqs = {i.seq for i in reopened}
        chosen_seqs = {i.seq for i in chosen}
        for item in reopened:
            if item.seq not in chosen_seqs:
                self._insert(item)
        for item in chosen:
            if item.seq not in reopened_seqs:
                self._remove(item.seq)
            room.take(item)
        pack[:] = [i for i in pack if i.seq not in reopened_seqs] + chosen

    def _fitting_items(self, room: _Room) -> list[Item]:
        """Buffered items that fit `room`, largest first; of one size, no more than could fill the room."""
        items: list[Item] = []
        copies: dict[int, int] = {}
        index = bisect.bisect_right(self._sorted, (room.tokens, _NEWEST)) - 1
        while index >= 0 and len(items) < self.max_candidates:
            tokens, seq = self._sorted[index]
            index -= 1
            if copies.get(tokens, 0) < room.tokens // tokens and room.fits_item(item := self._items[-seq]):
                copies[tokens] = copies.get(tokens, 0) + 1
                items.append(item)
        return items


def _lightest(items: list[Item], room: _Room) -> list[Item]:
    """The items with the fewest patches per token, as many as fit `room`'s patches and images together."""
    chosen, patches, images = [], 0, 0
    for item in sorted(items, key=lambda i: (i.patches / i.tokens, -i.tokens, i.seq)):
        if patches + item.patches > room.patches or images + item.images > room.images:
            break
        chosen.append(item)
        patches += item.patches
        images += item.images
    return sorted(chosen, key=lambda i: (-i.tokens, i.seq))


def _subset_sum(items: list[Item], capacity: int) -> list[Item]:
    """The subset of `items` with the largest token sum <= capacity; earlier items preferred (bitset DP)."""
    full = (1 << (capacity + 1)) - 1
    reachable = [1]  # reachable[i]: bit s is set when some subset of items[:i] sums to s tokens
    for item in items:
        reachable.append((reachable[-1] | (reachable[-1] << item.tokens)) & full)
    total = reachable[-1].bit_length() - 1
    chosen = []
    for i in range(len(items), 0, -1):
        if not (reachable[i - 1] >> total) & 1:  # the sum needs item i-1
            chosen.append(items[i - 1])
            total -= items[i - 1].tokens
    return chosen
