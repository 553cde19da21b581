"""The streaming pipeline of one rank: shards -> samples -> mixture -> encode -> packer -> PackedBatch.

Each loader worker of each rank is a reader slot with its own shards (see shard_assignment.py) and its own SlotStream.
Workers are read in a fixed round-robin, and each pack carries its worker's state (as a change to the one before, see
worker_state.py), so the main process always knows the state of every worker as of the last pack it handed out. The
stream never ends: a slot that finishes its share of an epoch goes on into the next, so every rank yields the same
number of packs per step, and no rank waits on another at an epoch end, whatever the shard sizes.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_train import runtime
from vlm_train.data.batch import PackedBatch
from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import DEFAULT_FACTOR, Sample, parse_sample
from vlm_train.data.shard_assignment import reader_slot
from vlm_train.data.sources import Source, expand_urls
from vlm_train.data.stream import SlotStream
from vlm_train.data.tar_reader import ShardError, iter_shard
from vlm_train.data.video import VideoConfig
from vlm_train.data.worker_state import StateReceiver, StateSender

__all__ = [
    "PackedLoader",
    "PackedStream",
    "Source",
    "build_loader",
    "expand_urls",
    "iter_samples",
    "pack_for_generation",
]

log = logging.getLogger(__name__)
LOADER_STATE_VERSION = 1


def iter_samples(
    urls: list[str],
    source: str,
    max_decode_pixels: int,
    fmt: str = "auto",
    *,
    video: VideoConfig | None = None,
    factor: int = DEFAULT_FACTOR,
) -> Iterator[Sample]:
    """Decoded samples of the shards in order; unusable ones are logged and skipped (for evaluation). Videos are
    sampled by `video` (data.video; None: defaults) and resized to multiples of `factor` (patch_size * merge_size)."""
    for url in urls:
        try:
            for raw in iter_shard(url):
                try:
                    yield parse_sample(raw, source, max_decode_pixels, fmt, video=video, factor=factor)
                except SkipSample as exc:
                    log.warning("skipping %s: %s", raw.get("__key__"), exc)
        except ShardError as exc:
            log.warning("%s", exc)


class PackedStream(IterableDataset):
    """Endless packs for one data-parallel rank; each loader worker runs the SlotStream of its reader slot."""

    def __init__(self, sources: list[Source], encoder: Encoder, cfg: DataConfig, seed: int, rank: int, world_size: int):
        if not sources:
            raise ValueError("data.sources is empty: name at least one source (or set data.use_synthetic=true)")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data source names must be unique, got {names}")
        for source in sources:
            source.__post_init__()  # a Source edited after construction is checked again
        reader_slot(rank, world_size, 0, 1)
        self.sources = sources
        self.encoder = encoder
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # Set by PackedLoader before it starts workers: where each worker resumes, and which worker goes first.
        self.weights = [s.weight for s in sources]
        self.worker_states: list[dict[str, Any] | None] | None = None
        self.worker_offset = 0

    def slot_stream(self, worker: int, num_workers: int) -> SlotStream:
        """The stream of one loader worker (num_workers=0 counts as one worker, in the main process)."""
        slot, slots = reader_slot(self.rank, self.world_size, worker, num_workers)
        stream = SlotStream(self.sources, self.encoder, self.cfg, self.seed, slot, slots, self.weights)
        state = self.worker_states[worker] if self.worker_states else None
        if state is not None:
            stream.load_state_dict(state)
            stream.set_weights(self.weights)
        return stream

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            runtime.reuse_freed_memory()
        worker = (loader_worker + self.worker_offset) % workers
        stream = self.slot_stream(worker, workers)
        sender = StateSender()
        while True:
            pack = stream.next_pack()
            pack.loader_state = {"worker": worker, **sender.encode(stream.state_dict())}
            yield pack


class PackedLoader:
    """Packs of one rank from `num_workers` worker processes (or the main process for 0), with exact state.

    `state_dict()` is the state after the last pack returned; `load_state_dict()` continues from there.
    `set_weights()` changes the source mixture from the next pack on (a curriculum stage's override).
    """

    def __init__(self, stream: PackedStream, num_workers: int, prefetch_factor: int = 4):
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.stream = stream
        self.num_workers = num_workers
        self.workers = max(num_workers, 1)
        self.prefetch_factor = prefetch_factor
        self.weights = [s.weight for s in stream.sources]
        self.worker_states: list[dict[str, Any] | None] = [None] * self.workers  # as of the last (re)start
        self.next_worker = 0
        self._local: SlotStream | None = None
        self._it: Iterator[PackedBatch] | None = None
        self._receivers: list[StateReceiver] = []  # the running workers' states since the start
        self._skipped: Counter = Counter()  # kept from the packs' skips, so skipped() reads no state

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        if self.num_workers == 0:
            if self._local is None:
                runtime.reuse_freed_memory()
                self._local = self._prepared_stream().slot_stream(0, 1)
            pack = self._local.next_pack()
            self._skipped.update(pack.skipped)
            return pack
        if self._it is None:
            self._receivers = [StateReceiver() for _ in range(self.workers)]
            self._it = iter(self._dataloader())
        pack = next(self._it)
        info, pack.loader_state = pack.loader_state, None
        if info["worker"] != self.next_worker:
            raise RuntimeError(f"loader worker {info['worker']} answered out of turn (expected {self.next_worker})")
        self._receivers[info["worker"]].apply(info)
        self._skipped.update(pack.skipped)
        self.next_worker = (self.next_worker + 1) % self.workers
        return pack

    def _prepared_stream(self) -> PackedStream:
        self.stream.weights = list(self.weights)
        self.stream.worker_states = list(self.worker_states)
        self.stream.worker_offset = self.next_worker
        return self.stream

    def _dataloader(self) -> DataLoader:
        # Workers answer strictly in turn (in_order), starting from the worker whose turn is next; they die with this
        # process, their parent unless a forkserver starts them.
        context = worker_context()
        direct = context.get_start_method() != "forkserver"
        return DataLoader(
            self._prepared_stream(),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            in_order=True,
            multiprocessing_context=context,
            worker_init_fn=functools.partial(runtime.die_with_parent, os.getpid(), direct),
        )

    def close(self) -> None:
        """Stop the worker processes (they restart from the saved state on the next pack)."""
        self.worker_states = self._states()
        self._local = None
        self._receivers = []
        self._it = None  # dropping the iterator shuts its workers down

    # ---- mixture -----------------------------------------------------------------------------------------------

    def set_weights(self, weights: dict[str, float] | None) -> None:
        """Mix sources by `weights` (name -> weight; unnamed sources drop out) from the next pack on;
        None restores the configured weights. Part of the state."""
        names = [s.name for s in self.stream.sources]
        if weights is None:
            new = [s.weight for s in self.stream.sources]
        else:
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ValueError(f"mixture names unknown data sources {unknown}; the sources are {names}")
            new = [float(weights.get(name, 0.0)) for name in names]
            if min(new) < 0 or sum(new) <= 0:
                raise ValueError(f"mixture weights {weights} must be non-negative and not all zero")
        self.weights = new
        if self._local is not None:
            self._local.set_weights(new)
        elif self._it is not None:
            self.close()  # workers restart from the last state handed out, now with the new weights

    def mixture(self) -> dict[str, float]:
        return {s.name: w for s, w in zip(self.stream.sources, self.weights)}

    # ---- state -------------------------------------------------------------------------------------------------

    def skipped(self) -> dict[str, int]:
        """Every skip so far on this rank, as "source/reason" -> count (restored with the state)."""
        return dict(self._skipped)

    def _states(self) -> list[dict[str, Any] | None]:
        if self._local is not None:
            return [self._local.state_dict()]
        if not self._receivers:
            return list(self.worker_states)
        return [r.state() or saved for r, saved in zip(self._receivers, self.worker_states)]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state of this rank's loader: every worker, the turn, and the mixture."""
        return {
            "version": LOADER_STATE_VERSION,
            "seed": self.stream.seed,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "workers": self.workers,
            "next_worker": self.next_worker,
            "weights": self.mixture(),
            "shards": {s.name: len(s.urls) for s in self.stream.sources},  # a re-deal needs them (redeal.py)
            "worker_states": self._states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the world size, worker count and seed must be the ones it was saved with (a state
        of another layout is re-dealt first, from the states of all ranks: redeal.py)."""
        if state.get("version") != LOADER_STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {LOADER_STATE_VERSION}")
        saved = (state["world_size"], state["workers"])
        if saved != (self.stream.world_size, self.workers):
            raise ValueError(
                f"loader state was saved with world_size={saved[0]} and {saved[1]} loader worker(s) per rank, but this "
                f"run has world_size={self.stream.world_size} and {self.workers}: the shard split depends on both, so "
                "resume with the same number of ranks and data.num_workers (0 and 1 count alike), or first re-deal "
                "the states of all the saved ranks to this layout (vlm_train.data.redeal.redeal_loader_states)"
            )
        if state["rank"] != self.stream.rank:
            raise ValueError(f"loader state of rank {state['rank']} given to rank {self.stream.rank}")
        if state["seed"] != self.stream.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run has {self.stream.seed}")
        names = [s.name for s in self.stream.sources]
        if sorted(state["weights"]) != sorted(names):
            raise ValueError(f"loader state has sources {sorted(state['weights'])} but the config has {sorted(names)}")
        self.close()
        self.weights = [float(state["weights"][name]) for name in names]
        self.worker_states = list(state["worker_states"])
        self.next_worker = int(state["next_worker"])
        self._skipped = Counter()
        for worker_state in self.worker_states:
            if worker_state is not None:
                self._skipped.update(worker_state["skipped"])


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: from a forkserver where there is one, so that a worker never holds a copy of the
    training process (a model of many GB): the server is a fresh interpreter that has imported the loader alone, and
    each worker is forked from it. Elsewhere, the platform's default."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vlm_train.data.loader"])  # once imported there, each worker starts at once
    return context


def build_loader(stream: PackedStream, num_workers: int) -> PackedLoader:
    """An endless iterator over packs (each item is one PackedBatch) with state_dict()/load_state_dict()."""
    return PackedLoader(stream, num_workers)


def pack_for_generation(encoder: Encoder, samples: list[Sample]) -> PackedBatch:
    """One pack of prompts (answers held out) for batched generation."""
    return collate([encoder.encode(s, for_generation=True) for s in samples])
