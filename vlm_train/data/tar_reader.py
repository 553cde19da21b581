"""Tar shards read one sample at a time, each tagged with its index and byte offset, so reading can resume mid-shard.

Samples are grouped the webdataset way (members `key.ext` sharing a key, in a row). Local uncompressed shards are
resumed and re-read by seeking to a sample's offset; anything else (remote URLs, compressed tars) by reading the
shard again up to the sample's index, so restoring never costs more than re-reading the shards involved.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing
from typing import Any, BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's rule: such members describe the shard, not a sample
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_BLOCK = 512


class ShardError(Exception):
    """A shard that could not be opened, or could not be read to its end."""

    def __init__(self, url: str, index: int, cause: BaseException):
        super().__init__(f"shard {url}: {type(cause).__name__}: {cause} (at sample {index})")
        self.url = url
        self.index = index


def check_url(url: str, allow_pipe: bool) -> None:
    """`pipe:` URLs run a shell command: refused unless the config allows them."""
    if url.startswith("pipe:") and not allow_pipe:
        raise ValueError(f"refusing shell-command URL {url!r}: set data.allow_pipe=true if you trust it")


def local_path(url: str) -> str | None:
    """The file path of a local URL (plain path or file://), else None."""
    parsed = urlparse(url)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a Windows drive letter parses as a scheme
        return url
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return None


def _seekable_path(url: str) -> str | None:
    path = local_path(url)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    return None if head.startswith(_COMPRESSED_MAGIC) else path


def _open(url: str, start_index: int, start_offset: int | None) -> tuple[BinaryIO, str, int, int, int]:
    """(stream, tarfile mode, byte base, index of the first sample, samples to skip before yielding)."""
    path = _seekable_path(url) if start_offset is not None and start_index > 0 else None
    if path is not None:
        stream = open(path, "rb")
        stream.seek(start_offset)
        return stream, "r|", start_offset, start_index, 0
    return gopen(url, "rb"), "r|*", 0, 0, start_index


def iter_shard(url: str, start_index: int = 0, start_offset: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard from sample `start_index` on, as dicts of member bytes plus `__key__`, `__url__`,
    `__index__`, `__offset__` (first header) and `__next_offset__`; a broken shard raises ShardError after
    yielding every complete sample before the break."""
    index = start_index
    try:
        stream, mode, base, index, skip = _open(url, start_index, start_offset)
    except Exception as exc:  # missing file, refused or failing URL scheme
        raise ShardError(url, index, exc) from exc
    current: dict[str, Any] | None = None
    end = base
    try:
        tar = tarfile.open(fileobj=stream, mode=mode)
        for info in tar:
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None:
                continue
            data = tar.extractfile(info).read()
            tar.members = []  # a stream reader would otherwise keep every header of the shard
            if current is None or prefix != current["__key__"]:
                if current is not None and current["__index__"] >= skip:
                    yield {**current, "__next_offset__": base + info.offset}
                current = {"__key__": prefix, "__url__": url, "__index__": index, "__offset__": base + info.offset}
                index += 1
            suffix = suffix.lower()
            if suffix in current:
                current["__error__"] = f"duplicate member {info.name}"
            else:
                current[suffix] = data
            end = base + info.offset_data + -(-info.size // _BLOCK) * _BLOCK
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise ShardError(url, index - 1 if current is not None else index, exc) from exc
    finally:
        try:
            stream.close()
        except Exception as exc:  # a remote pipe closed early may report its exit status; nothing is lost
            log.debug("closing %s: %s", url, exc)
    if current is not None and current["__index__"] >= skip:
        yield {**current, "__next_offset__": end}


def fetch_samples(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Read the samples named by restore keys again, in the order given; one pass per shard at most."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    by_url: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key in keys:
        by_url[key["url"]].append(key)
    for url, wanted in by_url.items():
        if _seekable_path(url) is not None and all(k["offset"] is not None for k in wanted):
            for key in wanted:
                if (url, key["index"]) not in found:
                    with closing(iter_shard(url, key["index"], key["offset"])) as samples:
                        found[(url, key["index"])] = next(samples, {})
        else:
            indices = {k["index"] for k in wanted}
            with closing(iter_shard(url)) as samples:
                for raw in samples:
                    if raw["__index__"] in indices:
                        found[(url, raw["__index__"])] = raw
                    if raw["__index__"] >= max(indices):
                        break
    result = []
    for key in keys:
        raw = found.get((key["url"], key["index"]), {})
        if raw.get("__key__") != key["key"] or raw.get("__index__") != key["index"]:
            raise ValueError(
                f"loader state names sample {key['index']} of {key['url']} as {key['key']!r}, but the shard now holds "
                f"{raw.get('__key__')!r} there: the shard changed since the state was saved"
            )
        result.append(raw)
    return result
