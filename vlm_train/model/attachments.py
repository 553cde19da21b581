"""Modules trained beside the VLM but not part of it: a vision stage's heads, a draft stage's Eagle3 draft.

A stage kind attaches its module to the VLM under a name (so the engine and the optimizer see it) and names the
checkpoint file it is kept in; checkpoints save the VLM alone in model.safetensors and each attached module in its
own file, so inference, export and merging read the VLM without knowing what else trained with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

_FILES = "_attachment_files"  # the attribute of the host module that maps attached names to their files


@dataclass(frozen=True)
class Attached:
    name: str  # the host module's attribute (and the prefix of the module's parameter names)
    module: nn.Module
    file: str  # the checkpoint file it is saved in


def attach(host: nn.Module, name: str, module: nn.Module, file: str) -> None:
    """Register `module` as `host.<name>`, saved in checkpoints apart from the host, in `file`."""
    if name in host._modules and name not in _files(host):
        raise ValueError(f"{type(host).__name__} already has a module named {name!r}")
    host.add_module(name, module)
    files = dict(_files(host))
    files[name] = file
    object.__setattr__(host, _FILES, files)


def attached(host: nn.Module) -> list[Attached]:
    """The modules attached to `host`, in the order they were attached."""
    return [Attached(name, host._modules[name], file) for name, file in _files(host).items() if name in host._modules]


def attached_module(host: nn.Module, name: str) -> nn.Module | None:
    """The module attached as `name`, or None."""
    return host._modules.get(name) if name in _files(host) else None


@contextlib.contextmanager
def detached(host: nn.Module) -> Iterator[list[Attached]]:
    """The host alone for the duration (saving, loading, exporting); yields what was detached."""
    parts = attached(host)
    for part in parts:
        host._modules.pop(part.name)
    try:
        yield parts
    finally:
        for part in parts:
            host._modules[part.name] = part.module


def _files(host: nn.Module) -> dict[str, str]:
    return host.__dict__.get(_FILES, {})
