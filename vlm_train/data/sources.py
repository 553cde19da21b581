"""Data sources: shard lists, and one source's samples for one reader slot with a resumable cursor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from vlm_train.data.hidden_states import FORMAT as HIDDEN_STATES
from vlm_train.data.shard_assignment import Unit, slot_units
from vlm_train.data.state import new_rng, restore_key, rng_from_state, rng_state
from vlm_train.data.tar_reader import ShardError, check_url, iter_shard

log = logging.getLogger(__name__)

# decoded from raw members (formats.py; interleaved.py)
FORMATS = ("auto", "caption", "conversation", "grounding", "text", "interleaved")
SOURCE_FORMATS = (*FORMATS, HIDDEN_STATES)  # and stored hidden states, already encoded (offline draft training)


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float = 1.0
    format: str = "auto"  # auto | caption | conversation | grounding | text | hidden_states (data/hidden_states.py)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"data source {self.name!r} has no shards")
        if not self.weight > 0:
            raise ValueError(f"data source {self.name!r}: weight must be positive, got {self.weight}")
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"data source {self.name!r}: format {self.format!r} is not one of {SOURCE_FORMATS}")


def expand_urls(urls: str | list[str], allow_pipe: bool = False) -> list[str]:
    """Expand brace patterns (several joined with '::'); `pipe:` URLs run shell commands and need `allow_pipe`."""
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    for url in expanded:
        check_url(url, allow_pipe)
    return expanded


class SourceReader:
    """One source's raw samples for one reader slot: its units of each epoch in order, through a shuffle buffer.

    The position is a cursor (epoch, unit, next sample index and byte offset in that unit's shard), the buffer
    as restore keys, and the shuffle generator's state; the buffer drains at the end of each epoch, so an epoch's
    samples all come out before the next epoch's.

    After the position was re-dealt to another number of slots (redeal.py), the units of the epochs that were in
    flight are not this slot's stride of the epoch's permutation but an explicit list, `dealt`: one list per epoch
    from the current one on, each unit as [shard, part, parts, index, offset] (a unit another slot had part-read
    starts at that slot's cursor). Later epochs use the normal deal again. A reader that was never re-dealt has none,
    and its state is exactly what it always was.
    """

    def __init__(
        self, source: Source, slot: int, slots: int, seed: int, buffer_size: int, on_skip: Callable[[str, str], None]
    ):
        self.source = source
        self.slot, self.slots, self.seed = slot, slots, seed
        self.buffer_size = max(buffer_size, 1)
        self.on_skip = on_skip
        self.buffer: list[dict[str, Any]] = []
        self.dealt: list[list[list[Any]]] = []  # explicit units of this and the next epochs, after a re-deal
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.units: list[Unit]
        if self.dealt:
            self.units = [Unit(int(u[0]), int(u[1]), int(u[2])) for u in self.dealt[0]]
        else:
            self.units = slot_units(len(self.source.urls), self.slot, self.slots, self.seed, self.source.name, epoch)
        self.unit = 0
        self.index, self.offset = self._unit_start()
        self.read_in_epoch = 0  # raw samples read from this slot's shards, any slice: tells unreadable from small
        self.rng = new_rng(self.seed, "shuffle", self.source.name, self.slot, epoch)
        self._samples = None
        self._first_error = ""

    def next(self) -> dict[str, Any]:
        """The next raw sample (member bytes plus `__restore__`, its restore key)."""
        while True:
            if self.buffer and (len(self.buffer) >= self.buffer_size or self.unit >= len(self.units)):
                return self._pop()
            if self.unit >= len(self.units):
                self._end_epoch()
                continue
            raw = self._read()
            if raw is not None:
                self.buffer.append(raw)

    def _pop(self) -> dict[str, Any]:
        i = int(self.rng.integers(len(self.buffer)))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def _read(self) -> dict[str, Any] | None:
        unit = self.units[self.unit]
        url = self.source.urls[unit.shard]
        if self._samples is None:
            self._samples = iter_shard(url, self.index, self.offset)
        try:
            raw = next(self._samples)
        except StopIteration:
            self._next_unit()
            return None
        except ShardError as exc:
            self.on_skip(self.source.name, "shard_error")
            log.warning("source %s: %s; skipping the rest of the shard", self.source.name, exc)
            self._first_error = self._first_error or str(exc)
            self._next_unit()
            return None
        self.read_in_epoch += 1
        self.index, self.offset = raw["__index__"] + 1, raw["__next_offset__"]
        if not unit.holds(raw["__index__"]):
            return None  # another slot's slice of this shard
        raw["__restore__"] = restore_key(self.source.name, self.epoch, raw)
        return raw

    def _unit_start(self) -> tuple[int, int | None]:
        """(sample index, byte offset) where reading the current unit begins: its start, or for a unit handed over
        part-read by a re-deal, the cursor of the slot that read it before."""
        if self.dealt and self.unit < len(self.dealt[0]):
            entry = self.dealt[0][self.unit]
            return int(entry[3]), entry[4]
        return 0, None

    def _next_unit(self) -> None:
        self._close()
        self.unit += 1
        self.index, self.offset = self._unit_start()

    def _end_epoch(self) -> None:
        # A re-dealt epoch's share may rightly be empty, or hold only the read-out end of a unit: no check there.
        if self.read_in_epoch == 0 and not self.dealt:
            raise RuntimeError(
                f"data source {self.source.name!r}: reader slot {self.slot} of {self.slots} found no readable sample "
                f"in its {len(self.units)} shard(s) of epoch {self.epoch}; first error: {self._first_error or 'none'}"
            )
        self.dealt = self.dealt[1:]
        self._start_epoch(self.epoch + 1)

    def _close(self) -> None:
        if self._samples is not None:
            self._samples.close()
            self._samples = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "unit": self.unit,
            "index": self.index,
            "offset": self.offset,
            "read_in_epoch": self.read_in_epoch,
            "rng": rng_state(self.rng),
            "buffer": [raw["__restore__"] for raw in self.buffer],
        }
        if self.dealt:  # only after a re-deal, until its epochs are read: other states keep their old form
            state["dealt"] = [[list(unit) for unit in units] for units in self.dealt]
        return state

    def load_state_dict(self, state: dict[str, Any], raws: list[dict[str, Any]]) -> None:
        """Restore the cursor; `raws` are the buffered samples, read again from their restore keys."""
        self._close()
        self.dealt = [[list(unit) for unit in units] for units in state.get("dealt", [])]
        shards = len(self.source.urls)
        if any(not 0 <= int(unit[0]) < shards for units in self.dealt for unit in units):
            raise ValueError(
                f"loader state of source {self.source.name!r} deals shards beyond its {shards} shard(s): "
                "resume with the data.sources the state was saved (or re-dealt) with"
            )
        self._start_epoch(int(state["epoch"]))
        self.unit, self.index, self.offset = int(state["unit"]), int(state["index"]), state["offset"]
        self.read_in_epoch = int(state["read_in_epoch"])
        self.rng = rng_from_state(state["rng"])
        self.buffer = [{**raw, "__restore__": key} for raw, key in zip(raws, state["buffer"], strict=True)]
