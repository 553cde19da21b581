"""Tensors split by rows over ranks (FSDP2's dim-0 shards), saved and read back at any world size.

FSDP2 splits every parameter along its first dimension as `torch.chunk` does: rank r of N holds rows
[r * c, min((r + 1) * c, rows)) with c = ceil(rows / N), and a rank past the end holds none. A sharded save writes,
per rank, one safetensors file of its local rows, with the rows' global place in the file's JSON metadata; a load
at any world size assembles each tensor from the pieces of every saved rank, one tensor at a time, and keeps the
rows of its own shard. Nothing is pickled and no process ever holds more than one whole tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm_train.model.row_shards import local_part, row_range  # noqa: F401 - re-exported for the engine

SHARD_FORMAT = "vlm_train.row_shards/1"
SHARDS_INDEX = "shards.json"  # in a sharded checkpoint: the saving world size, the shard prefixes, attachments' files


@dataclass(frozen=True)
class Piece:
    """Rows [start, start + local rows) of tensor `name`, whose whole shape is `shape`."""

    name: str
    local: torch.Tensor
    start: int
    shape: tuple[int, ...]


def shard_file(folder: Path, prefix: str, rank: int) -> Path:
    return folder / f"{prefix}_rank{rank:05d}.safetensors"


def save_pieces(folder: Path, prefix: str, rank: int, world_size: int, pieces: Iterable[Piece]) -> Path:
    """This rank's pieces as one safetensors file; the JSON metadata places each piece in its whole tensor and
    names how many ranks saved (so a lost file is noticed)."""
    tensors, places = {}, {}
    for piece in pieces:
        tensors[piece.name] = piece.local.detach().contiguous().cpu()
        places[piece.name] = {"start": piece.start, "shape": list(piece.shape), "dtype": str(piece.local.dtype)}
    path = shard_file(folder, prefix, rank)
    metadata = {"format": SHARD_FORMAT, "world_size": str(world_size), "pieces": json.dumps(places)}
    save_file(tensors, str(path), metadata=metadata)
    return path


class ShardedTensors:
    """The pieces every rank saved under `prefix` in a checkpoint folder, read back whole or as this rank's rows."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix
        files = sorted(folder.glob(f"{prefix}_rank*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no {prefix}_rankNNNNN.safetensors files (a sharded checkpoint's)")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.files = files
        metas = [handle.metadata() or {} for handle in self._handles]
        for file, meta in zip(files, metas):
            if meta.get("format") != SHARD_FORMAT:
                raise ValueError(f"{file} is not a vlm_train shard file (metadata format {meta.get('format')!r})")
        saved_by = {int(meta["world_size"]) for meta in metas}
        numbers = [int(f.stem.rsplit("_rank", 1)[1]) for f in files]
        if len(saved_by) != 1 or numbers != list(range(max(saved_by))):
            missing = sorted(set(range(max(saved_by | {max(numbers) + 1}))) - set(numbers))
            raise FileNotFoundError(
                f"{folder}: {prefix} shards of rank(s) {missing} are missing: {max(saved_by)} rank(s) saved it, "
                f"{len(files)} file(s) are there"
            )
        self.places: dict[str, list[tuple[int, dict]]] = {}  # name -> [(file index, place)]
        for i, meta in enumerate(metas):
            for name, place in json.loads(meta["pieces"]).items():
                self.places.setdefault(name, []).append((i, place))

    @property
    def saved_world_size(self) -> int:
        return len(self.files)

    def names(self) -> list[str]:
        return list(self.places)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where(name)[0][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return getattr(torch, self._where(name)[0][1]["dtype"].removeprefix("torch."))

    def _where(self, name: str) -> list[tuple[int, dict]]:
        if name not in self.places:
            raise KeyError(
                f"{self.folder}: the {self.prefix} shards hold no tensor {name!r} "
                f"(files {self.files[0].name} .. {self.files[-1].name})"
            )
        return self.places[name]

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor, assembled from every rank's rows (checked to cover it exactly)."""
        where = self._where(name)
        shape = tuple(where[0][1]["shape"])
        if len(shape) == 0:
            return self._handles[where[0][0]].get_tensor(name)
        parts = sorted(((place["start"], self._handles[i].get_tensor(name)) for i, place in where), key=lambda x: x[0])
        covered = 0
        for start, part in parts:
            if part.shape[0] == 0:
                continue
            if start != covered or tuple(part.shape[1:]) != shape[1:]:
                raise ValueError(
                    f"{self.folder}: the {self.prefix} shards of {name!r} do not tile its shape {list(shape)} "
                    f"(a piece of rows {start}..{start + part.shape[0]} after row {covered})"
                )
            covered += part.shape[0]
        if covered != shape[0]:
            raise ValueError(
                f"{self.folder}: the {self.prefix} shards of {name!r} cover {covered} of its {shape[0]} rows"
            )
        return torch.cat([p for _, p in parts if p.shape[0]]) if covered else torch.empty(shape)

    def rows(self, name: str, rank: int, world_size: int) -> torch.Tensor:
        """Rank `rank` of `world_size`'s rows of the tensor, reading only the saved rows that overlap them (so a rank
        touches about 1/world_size of each file)."""
        where = self._where(name)
        shape = tuple(where[0][1]["shape"])
        if len(shape) == 0:
            return self._handles[where[0][0]].get_tensor(name)
        start, stop = row_range(shape[0], rank, world_size)
        parts, covered = [], start
        for i, place in sorted(where, key=lambda x: x[1]["start"]):
            saved = self._handles[i].get_slice(name)
            first, count = place["start"], saved.get_shape()[0]
            low, high = max(first, covered), min(first + count, stop)
            if low < high:
                if low != covered:
                    break  # a gap: reported below
                parts.append(saved[low - first : high - first])
                covered = high
        if covered != stop:
            raise ValueError(
                f"{self.folder}: the {self.prefix} shards of {name!r} do not hold rows {covered}..{stop} of its "
                f"shape {list(shape)}"
            )
        if not parts:
            return torch.empty((0, *shape[1:]), dtype=self.dtype(name))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every whole tensor, one at a time."""
        for name in self.places:
            yield name, self.whole(name)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors_streaming(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensor: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A safetensors file written one tensor at a time: the header from the names, shapes and dtypes first, then
    each tensor's bytes as `tensor(name)` makes it; written under a temporary name and renamed when complete."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for name, shape, dtype in entries:
            value = tensor(name).detach().to("cpu", dtype).contiguous()
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {list(value.shape)} where the header says {list(shape)}")
            out.write(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    os.replace(tmp, path)
    return path
