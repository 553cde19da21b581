"""The packs of one reader slot (one loader worker of one rank): mixture -> decode -> encode -> packer.

Everything it holds is a plain JSON-able state: source cursors, shuffle and packing buffers as restore keys, and
generator states. Restoring re-reads only the buffered samples (by byte offset where it can) and the shards the
cursors were in, then re-encodes them; per-sample randomness comes from the sample's restore key, so the packs
that follow are the same as in an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import parse_sample
from vlm_train.data.hidden_states import FORMAT as HIDDEN_STATES
from vlm_train.data.hidden_states import read_sample as read_hidden_states
from vlm_train.data.interleaved import ENTRIES, split_document
from vlm_train.data.packer import Packer
from vlm_train.data.sources import Source, SourceReader
from vlm_train.data.state import PART, find_restore_keys, new_rng, rng_from_state, rng_state, sample_rng
from vlm_train.data.tar_reader import fetch_samples
from vlm_train.data.video_thinning import THINNED, encode_to_fit

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _ref(key: dict[str, Any]) -> tuple[str, int]:
    return key["url"], int(key["index"])


def _images(sample: EncodedSample) -> int:
    return int(sample.image_grid_thw.shape[0])


class SlotStream:
    """Endless packs of one reader slot, with `state_dict()` / `load_state_dict()`."""

    def __init__(
        self,
        sources: list[Source],
        encoder: Encoder,
        cfg: DataConfig,
        seed: int,
        slot: int,
        slots: int,
        weights: list[float] | None = None,
    ):
        self.sources = sources
        self.encoder = encoder
        self.cfg = cfg
        self.seed, self.slot, self.slots = seed, slot, slots
        self.readers = [SourceReader(s, slot, slots, seed, cfg.shuffle_buffer, self._count) for s in sources]
        self.mixture = new_rng(seed, "mixture", slot)
        self.weights = list(weights) if weights is not None else [s.weight for s in sources]
        self.packer = Packer(cfg.pack, special=encoder.special)
        self.pending: list[list[EncodedSample]] = []  # packs formed but not handed out yet
        self.failures = 0  # consecutive skipped samples
        self.skipped: Counter = Counter()  # every skip so far, as "source/reason"
        self._since_pack: Counter = Counter()
        self.packs = 0

    def set_weights(self, weights: list[float]) -> None:
        """New mixture weights (one per source, in order), from the next sample on."""
        if len(weights) != len(self.sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"mixture weights {weights} must be one non-negative number per source, not all zero")
        self.weights = [float(w) for w in weights]

    def _count(self, source: str, reason: str) -> None:
        self.skipped[f"{source}/{reason}"] += 1
        self._since_pack[f"{source}/{reason}"] += 1

    def next_pack(self) -> PackedBatch:
        """The next pack; the skips since the previous pack ride along in `skipped`."""
        while not self.pending:
            self._step()
        samples = self.pending.pop(0)
        batch = collate(samples, dict(self._since_pack), image_token_id=self.encoder.special.image_pad)
        self._since_pack.clear()
        self.packs += 1
        return batch

    def _step(self) -> None:
        p = np.asarray(self.weights) / sum(self.weights)
        index = int(self.mixture.choice(len(p), p=p))
        raw = self.readers[index].next()
        source = self.sources[index]
        try:
            items = self._encode(source, raw)
            packs = [pack for encoded in items for pack in self.packer.add(encoded)]
        except ImportError:
            raise  # a library this machine lacks (av, to decode videos) fails every such sample: stop, naming it
        except Exception as exc:  # a bad sample must never stop the run: count it, and give up only on a long run
            reason = exc.reason if isinstance(exc, SkipSample) else "unexpected_error"
            if not isinstance(exc, SkipSample):
                log.warning(
                    "source %s: unexpected error on %s of %s",
                    source.name,
                    raw.get("__key__"),
                    raw.get("__url__"),
                    exc_info=True,
                )
            self._count(source.name, reason)
            self.failures += 1
            if self.failures > self.cfg.max_consecutive_failures:
                raise RuntimeError(
                    f"{self.failures} samples in a row failed (data.max_consecutive_failures="
                    f"{self.cfg.max_consecutive_failures}); last: source {source.name} shard {raw.get('__url__')} "
                    f"key {raw.get('__key__')}: {exc}"
                ) from exc
            return
        self.failures = 0
        for encoded in items:  # counted here, for new samples only (a restore re-encodes buffered ones)
            if THINNED in encoded.meta:
                self._count(source.name, THINNED)
        self.pending.extend(packs)

    def _encode(self, source: Source, raw: dict[str, Any]) -> list[EncodedSample]:
        """The packer's items of one raw sample: the sample, or the parts of an interleaved document too long for
        one pack (cut between its entries; each part's restore key names it by `part`)."""
        key = raw["__restore__"]
        if source.format == HIDDEN_STATES:  # stored already encoded, with the target's hidden states
            encoded = read_hidden_states(raw, source.name, self.encoder.spec.pixel_dim)
            encoded.meta["restore_key"] = key
            return [encoded]
        spec = self.encoder.spec
        sample = parse_sample(
            raw,
            source.name,
            self.cfg.image.max_decode_pixels,
            source.format,
            video=self.cfg.video,
            factor=spec.patch_size * spec.merge_size,
        )
        parts = split_document(sample, self.encoder, self.packer.budget) if ENTRIES in sample.meta else [sample]
        items = []
        for n, part in enumerate(parts):
            part_key = key if len(parts) == 1 else {**key, PART: n}
            # Videos over the pack budgets are thinned (fewer, then smaller frames) to fit, not dropped.
            # A generator takes ~0.1 ms to make: only samples whose encoding draws (scale, token drop) get one.
            rng = sample_rng(self.seed, part_key) if self.encoder.sampling.draws else None
            encoded = encode_to_fit(self.encoder, part, self.packer.budget, rng=rng)
            encoded.meta["restore_key"] = part_key
            items.append(encoded)
        return items

    # ---- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The slot's position as plain JSON-able data (taken between packs)."""
        return {
            "version": STATE_VERSION,
            "slot": self.slot,
            "slots": self.slots,
            "readers": {r.source.name: r.state_dict() for r in self.readers},
            "mixture": rng_state(self.mixture),
            "weights": list(self.weights),
            "packer": self.packer.state_dict(),
            "pending": [[s.meta["restore_key"] for s in pack] for pack in self.pending],
            "failures": self.failures,
            "skipped": dict(self.skipped),
            "packs": self.packs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; reads again only the buffered samples."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if (state["slot"], state["slots"]) != (self.slot, self.slots):
            raise ValueError(
                f"loader state is for reader slot {state['slot']} of {state['slots']}, not {self.slot} of {self.slots}"
            )
        names = [s.name for s in self.sources]
        if sorted(state["readers"]) != sorted(names):
            raise ValueError(
                f"loader state has sources {sorted(state['readers'])} but the config has {sorted(names)}: "
                "resume with the same data.sources"
            )
        reader_keys = [k for r in self.readers for k in state["readers"][r.source.name]["buffer"]]
        other_keys = find_restore_keys(state["packer"]) + [k for pack in state["pending"] for k in pack]
        raws = dict(zip(map(_ref, reader_keys + other_keys), fetch_samples(reader_keys + other_keys)))
        for reader in self.readers:
            reader_state = state["readers"][reader.source.name]
            reader.load_state_dict(reader_state, [raws[_ref(k)] for k in reader_state["buffer"]])
        by_name = {s.name: s for s in self.sources}

        def resolve(key: dict[str, Any]) -> EncodedSample:
            whole = {k: v for k, v in key.items() if k != PART}
            try:
                items = self._encode(by_name[key["source"]], {**raws[_ref(key)], "__restore__": whole})
                return next(item for item in items if item.meta["restore_key"] == key)
            except StopIteration:
                raise ValueError(f"loader state: buffered document part {key} no longer exists") from None
            except SkipSample as exc:
                raise ValueError(
                    f"loader state: buffered sample {key} no longer encodes ({exc}); "
                    "did the data or the data config change?"
                ) from exc

        self.skipped = Counter(state["skipped"])
        self._since_pack = Counter()  # drops under budgets lower than the state's ride on the next pack
        self.packer = Packer(self.cfg.pack, special=self.encoder.special)
        self.pending, repack = self._restore_pending(state["pending"], resolve)
        packer_state = {**state["packer"], "buffer": repack + state["packer"]["buffer"]}
        self.packer.load_state_dict(packer_state, resolve, lambda key, exc: self._count(key["source"], exc.reason))
        if repack or self._since_pack:
            log.warning(
                "loader state saved under larger pack budgets: %d pending sample(s) packed again, dropped %s",
                len(repack),
                dict(self._since_pack) or "none",
            )
        self.mixture = rng_from_state(state["mixture"])
        self.weights = [float(w) for w in state["weights"]]
        self.failures = int(state["failures"])
        self.packs = int(state["packs"])

    def _restore_pending(
        self, saved: list[list[dict[str, Any]]], resolve: Callable[[dict[str, Any]], EncodedSample]
    ) -> tuple[list[list[EncodedSample]], list[dict[str, Any]]]:
        """The saved packs not handed out yet that fit the budgets, and the keys of those that no longer do (a
        stage lowered the budgets): their samples go back into the packing buffer, first, to be packed again."""
        pending, repack = [], []
        for keys in saved:
            try:
                pack = [self.packer.check(resolve(k)) for k in keys]  # cut again, if they were cut to fit
            except SkipSample:
                repack.extend(keys)
                continue
            sizes = (sum(s.num_tokens for s in pack), sum(s.num_patches for s in pack), sum(_images(s) for s in pack))
            if self.packer.budget.overflow(*sizes) is None:
                pending.append(pack)
            else:
                repack.extend(keys)
        return pending, repack
