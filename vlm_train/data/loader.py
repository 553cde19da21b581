"""The streaming pipeline: shards -> samples -> mixture -> encode -> packer -> PackedBatch."""
from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_train.data.batch import PackedBatch
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import Sample, parse_sample
from vlm_train.data.packer import Packer, collate

log = logging.getLogger(__name__)


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float = 1.0


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand brace patterns; `pipe:` URLs run shell commands and are refused."""
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    for url in expanded:
        if url.startswith("pipe:"):
            raise ValueError(f"refusing shell-command URL {url!r}")
    return expanded


def iter_raw_samples(urls: list[str], on_error) -> Iterator[dict[str, Any]]:
    """Read tar shards with webdataset; `on_error(exc)` sees broken shards, and reading goes on."""

    def handler(exc: Exception) -> bool:
        on_error(exc)
        return True

    yield from wds.tarfile_samples(({"url": url} for url in urls), handler=handler)


def iter_samples(urls: list[str], source: str, max_decode_pixels: int) -> Iterator[Sample]:
    """Decoded samples of the shards in order; unusable ones are logged and skipped (for evaluation)."""
    for raw in iter_raw_samples(urls, on_error=lambda exc: log.warning("shard error: %s", exc)):
        try:
            yield parse_sample(raw, source, max_decode_pixels)
        except SkipSample as exc:
            log.warning("skipping %s: %s", raw.get("__key__"), exc)


class PackedStream(IterableDataset):
    """Endless packs for one data-parallel rank; each loader worker reads a disjoint part of every source."""

    def __init__(self, sources: list[Source], encoder: Encoder, cfg: DataConfig, seed: int, rank: int, world_size: int):
        if not sources:
            raise ValueError("data.sources is empty: name at least one source (or set data.use_synthetic=true)")
        for source in sources:
            if not source.urls:
                raise ValueError(f"data source {source.name!r} has no shards")
            if source.weight <= 0:
                raise ValueError(f"data source {source.name!r}: weight must be positive, got {source.weight}")
        self.sources = sources
        self.encoder = encoder
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def _reader_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _source_samples(self, source: Source, slot: int, slots: int, skipped: Counter) -> Iterator[dict]:
        """Raw samples of one source for this reader, epoch after epoch, shards reshuffled per epoch."""
        epoch = 0
        while True:
            shards = list(source.urls)
            random.Random(f"{self.seed}/{source.name}/{epoch}").shuffle(shards)
            # Enough shards: each reader takes whole shards. Too few: every reader scans all, keeping every n-th sample.
            by_shard = len(shards) >= slots
            mine = shards[slot::slots] if by_shard else shards
            rng = random.Random(f"{self.seed}/{source.name}/{epoch}/{slot}")
            buffer: list[dict] = []
            produced = 0

            def count_shard_error(exc: Exception) -> None:
                skipped[f"{source.name}/shard_error"] += 1
                log.warning("source %s: shard error (skipped the rest of it): %s", source.name, exc)

            for index, raw in enumerate(iter_raw_samples(mine, count_shard_error)):
                if not by_shard and index % slots != slot:
                    continue
                buffer.append(raw)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    produced += 1
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            produced += len(buffer)
            yield from buffer
            if produced == 0:
                raise RuntimeError(f"data source {source.name!r}: no readable sample in an epoch of {len(mine)} shards")
            epoch += 1

    def __iter__(self) -> Iterator[PackedBatch]:
        slot, slots = self._reader_slot()
        skipped: Counter = Counter()
        streams = {s.name: self._source_samples(s, slot, slots, skipped) for s in self.sources}
        mixture = random.Random(f"{self.seed}/mixture/{slot}")
        weights = [s.weight for s in self.sources]
        packer = Packer(self.cfg.pack)
        failures = 0
        while True:
            source = mixture.choices(self.sources, weights)[0]
            raw = next(streams[source.name])
            try:
                sample = parse_sample(raw, source.name, self.cfg.image.max_decode_pixels)
                packs = packer.add(self.encoder.encode(sample))
                failures = 0
            except SkipSample as exc:
                skipped[f"{source.name}/{exc.reason}"] += 1
                failures += 1
                if failures > self.cfg.max_consecutive_failures:
                    raise RuntimeError(
                        f"{failures} samples in a row failed; last: shard {raw.get('__url__')} key {raw.get('__key__')}: {exc}"
                    ) from exc
                continue
            for pack in packs:
                yield collate(pack, dict(skipped))
                skipped.clear()


def build_loader(stream: PackedStream, num_workers: int) -> DataLoader:
    """A DataLoader over packs (each item is one PackedBatch)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def pack_for_generation(encoder: Encoder, samples: list[Sample]) -> PackedBatch:
    """One pack of prompts (answers held out) for batched generation."""
    return collate([encoder.encode(s, for_generation=True) for s in samples])
