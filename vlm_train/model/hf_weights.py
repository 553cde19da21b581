"""Hugging Face safetensors <-> our parameter names: read lazily, map names, load all-or-nothing, write.

Our modules mirror HF's names, so the maps are prefix renames plus one reshape (HF's Conv3d patch embedding
is our Linear). Loading checks every name and shape before it touches the model: a mismatch is an error that
lists what differs, never a partial load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlm_train.model.row_shards import copy_whole_into

# Released Qwen2.5-VL checkpoints (and transformers' own save_pretrained) use the first spelling;
# transformers 5 modules use the second. Both are read; the first is written.
_HF_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
PATCH_EMBED = "patch_embed.proj.weight"

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """Weights that do not fit the model: missing, unexpected or of the wrong shape."""


class SafetensorsFolder:
    """The tensors of a checkpoint folder (one model.safetensors or shards with an index), opened lazily."""

    def __init__(self, path: str | Path) -> None:
        folder = Path(path).expanduser()
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = ""
            if others:
                hint = f" (found {', '.join(others)}: pickled weights are never read; re-save as safetensors)"
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        self.folder = folder
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in files}
        self._where = {key: name for name, handle in self._handles.items() for key in handle.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)


def canonical_hf_name(key: str) -> str:
    """The released-checkpoint spelling of an HF key (transformers 5 module names folded back)."""
    for new, old in _HF_ALIASES:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


# ---------------------------------------------------------------- name maps (ours -> HF, released layout)


def vlm_to_hf_name(name: str) -> str:
    """Our VLM name -> Qwen2.5-VL name: vision.* -> visual.*, projector.* -> visual.merger.*, llm.lm_head.* ->
    lm_head.*, llm.* -> model.*."""
    if name.startswith("vision."):
        return "visual." + name[len("vision.") :]
    if name.startswith("projector."):
        return "visual.merger." + name[len("projector.") :]
    if name.startswith("llm.lm_head."):
        return name[len("llm.") :]
    if name.startswith("llm."):
        return "model." + name[len("llm.") :]
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def llm_to_hf_name(name: str) -> str:
    """A DecoderLM parameter -> its *ForCausalLM name."""
    return name if name.startswith("lm_head.") else "model." + name


# ---------------------------------------------------------------- loading


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def load_hf_weights(
    module: nn.Module,
    folder: SafetensorsFolder,
    to_hf: Callable[[str], str],
    *,
    params: Iterable[str] | None = None,
    ignore: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype | None = None,
    grow: Mapping[str, Callable[[torch.Tensor, int], torch.Tensor]] | None = None,
) -> None:
    """Copy `params` of `module` (default: all) from `folder`, names mapped by `to_hf`; all checked first.

    Checkpoint keys outside the mapped set are unexpected unless `ignore(key)` says they belong to a part of the
    checkpoint we deliberately skip (e.g. the LLM when loading only the vision tower). `grow` names parameters
    (the embedding and LM head of a grown vocabulary) that may have more rows than the checkpoint's, and the
    function that makes the missing rows from the stored ones. Works on a model built on the meta device:
    parameters are replaced rather than copied into.
    """
    grow = grow or {}
    tied = _tied_names(module)
    ours = {n: p for n, p in module.named_parameters() if n not in tied}
    wanted = list(params) if params is not None else list(ours)
    available = {canonical_hf_name(k): k for k in folder.keys()}
    expected = {to_hf(n): n for n in wanted}

    missing = sorted(h for h in expected if h not in available)
    unexpected = sorted(
        k for k in available if k not in expected and not ignore(k) and not _is_tied_copy(k, tied, to_hf)
    )
    mismatched = []
    for hf_name, name in expected.items():
        if hf_name in available:
            have = folder.shape(available[hf_name])
            want = tuple(ours[name].shape)
            reshaped = name.endswith(PATCH_EMBED) and _numel(have) == _numel(want)
            grown = name in grow and have[0] < want[0] and have[1:] == want[1:]
            if have != want and not reshaped and not grown:
                mismatched.append(f"{hf_name}: checkpoint {list(have)}, model {list(want)}")
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(_report(folder.folder, missing, unexpected, mismatched))

    with torch.no_grad():
        for hf_name, name in expected.items():
            want = ours[name].shape
            value = folder.tensor(available[hf_name]).to(dtype or ours[name].dtype)
            if name in grow and value.shape[0] < want[0]:
                log.warning(
                    "%s has %d rows, the model %d: the %d new rows are drawn around the mean of the stored ones "
                    "(transformers' mean_resizing)",
                    hf_name,
                    value.shape[0],
                    want[0],
                    want[0] - value.shape[0],
                )
                value = grow[name](value, want[0])
            _set_parameter(module, name, value.reshape(want))
    _retie(module, tied)


def _is_tied_copy(key: str, tied: set[str], to_hf: Callable[[str], str]) -> bool:
    # A checkpoint may store the tied LM head too; it carries no information, so it is accepted and skipped.
    return any(to_hf(name) == key for name in tied)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _report(folder: Path, missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 20) -> str:
    parts = [f"checkpoint {folder} does not match the model:"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "\n  ".join(parts)


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    param = getattr(owner, attr)
    if param.is_meta:
        setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=param.requires_grad))
    else:
        copy_whole_into(param, value)  # a row-sharded parameter (engine=fsdp2) takes only its own rows


def _retie(module: nn.Module, tied: set[str]) -> None:
    """Re-point tied parameters at their source after meta-device parameters were replaced."""
    llm = getattr(module, "llm", module)
    if tied and hasattr(llm, "lm_head") and hasattr(llm, "embed_tokens"):
        llm.lm_head.weight = llm.embed_tokens.weight


# ---------------------------------------------------------------- writing


def hf_state_dict(
    module: nn.Module,
    to_hf: Callable[[str], str],
    dtype: torch.dtype | None = None,
    patch_embed_shape: tuple[int, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """`module`'s parameters under HF names (tied copies left out, as transformers writes them)."""
    tied = _tied_names(module)
    state = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        value = param.detach()
        if name.endswith(PATCH_EMBED) and patch_embed_shape is not None:
            value = value.reshape(patch_embed_shape)
        state[to_hf(name)] = value.to(dtype or value.dtype).contiguous()
    return state
