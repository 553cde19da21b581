"""Checkpoints of a run, by one component: the parts of the training state register with it, and it owns the
layout on disk, the atomic save, keep_last, the checks that a launch can resume, and the lookup of the newest
complete checkpoint (tools use the same lookup).

Layout of RUN/checkpoints/step_XXXXXXXX/:
  model.safetensors            full model weights (rank 0): the VLM; an engine that shards (engine=fsdp2) writes it
                               only at the end of the run, or when a tool asks (consolidate), by streaming
  model_rankNNNNN.safetensors, each rank's rows of every parameter and Adam moment (engine=fsdp2, engines/shards.py):
  optimizer_rankNNNNN.safetensors  they load at any world size; shards.json names the attachments' files
  vision_heads.safetensors,    each module a stage kind attached to the VLM (model/attachments.py), in the file it
  draft.safetensors, ...       names: a vision stage's heads, a draft stage's Eagle3 draft (with d2t, t2d)
  trainer_state.json           step, the launch (world size, engine, ZeRO stage) and the shared parts' states
                               (position in the curriculum, guard)
  NAME_rankNNNNN.pt | .json    each per-rank part's state: optimizer and rng as tensors (.pt), loader as JSON
  config.yaml, tokenizer/      the resolved config as YAML text, the tokenizer
Nothing is pickled: .pt files load with torch.load(weights_only=True). Every rank writes into one temporary folder
(run.dir must be on a filesystem all ranks share); rank 0 renames it once every rank is done, so a checkpoint is
visible only when complete, and a run killed during a save leaves the previous one usable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model
from torch import nn

from vlm_train.jsonio import dumps
from vlm_train.model.attachments import detached
from vlm_train.train import distributed as D
from vlm_train.train.config import CheckpointConfig
from vlm_train.train.engines import EngineChoice
from vlm_train.train.engines.shards import SHARDS_INDEX, ShardedTensors, write_safetensors_streaming
from vlm_train.train.model_files import MODEL_FILE, write_model_files

log = logging.getLogger("vlm_train")
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"


def is_checkpoint(folder: Path) -> bool:
    """A folder holding model weights: whole (model.safetensors) or as row shards (shards.json)."""
    return (folder / MODEL_FILE).is_file() or (folder / SHARDS_INDEX).is_file()


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: missing, truncated or damaged."""


@dataclass(frozen=True)
class Launch:
    """What a resumed launch must share with the one that saved: per-rank states only fit the same ranks."""

    world_size: int = 1
    engine: str = "single"
    zero_stage: int | None = None  # None for the single engine

    def state(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "engine": self.engine, "zero_stage": self.zero_stage}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Launch:
        return cls(int(state["world_size"]), str(state["engine"]), state.get("zero_stage"))

    def describe(self) -> str:
        return f"{self.world_size} rank(s) with engine {EngineChoice(self.engine, self.zero_stage).describe()}"


@dataclass
class Resume:
    """A checkpoint to continue from; `state` (trainer_state.json) is None for weights only (e.g. converted)."""

    folder: Path
    state: dict[str, Any] | None


# A per-rank part's states of every saved rank -> the state of every rank of this launch, when the world size
# changed (None: fresh). Rank 0 calls it once and hands each rank its state.
Redeal = Callable[[list[Any], int], list[Any]]


@dataclass
class _Part:
    part: Stateful
    per_rank: bool
    tensors: bool
    redeal: Redeal | None = None


def rank_states_or_fresh(states: list[Any], world_size: int) -> list[Any]:
    """Per-rank states after a resize: each saved rank's to the rank of the same number, none (fresh) for a new
    rank."""
    return [states[rank] if rank < len(states) else None for rank in range(world_size)]


class RandomState:
    """This process's torch RNG (and the GPU's) as a checkpoint part. A restored state waits for `apply()`, which
    the trainer calls right before the first step it was saved for (building a stage's engine may draw numbers)."""

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state

    def apply(self) -> None:
        """Set the restored state, if any (once)."""
        state, self._restored = self._restored, None
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])


# ---- the run folder's checkpoints -----------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX) :])


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are not listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint of a run folder."""
    path = Path(path).expanduser()
    if not is_checkpoint(path):
        found = complete_checkpoints(path)
        if not found:
            raise FileNotFoundError(
                f"{path}: neither a checkpoint folder ({MODEL_FILE} or {SHARDS_INDEX}) nor a run folder with complete "
                "checkpoints under checkpoints/"
            )
        path = found[-1]
    if not (path / MODEL_FILE).is_file():
        consolidate(path)  # a sharded checkpoint: the tools read the whole weights
    return path


def consolidate(folder: Path) -> Path:
    """Write a sharded checkpoint's whole weights as model.safetensors (the VLM) and each attachment's file, one
    tensor at a time from the shards (no process holds the whole model); returns model.safetensors."""
    index = read_json(folder / SHARDS_INDEX, "shard index")
    shards = read_checkpoint_file(folder, lambda p: ShardedTensors(p, index["model"]), "model shards")
    attachments = {f"{name}.": file for name, file in index.get("attachments", {}).items()}
    files: dict[str, dict[str, str]] = {MODEL_FILE: {}}  # file -> {name in the file: name in the shards}
    for name in shards.names():
        prefix = next((p for p in attachments if name.startswith(p)), "")
        files.setdefault(attachments.get(prefix, MODEL_FILE), {})[name[len(prefix) :]] = name
    for file, names in files.items():
        entries = [(ours, shards.shape(theirs), shards.dtype(theirs)) for ours, theirs in names.items()]
        write_safetensors_streaming(folder / file, entries, lambda ours, names=names: shards.whole(names[ours]))
    log.info("consolidated the shards of %s into %s", folder, ", ".join(files))
    return folder / MODEL_FILE


def publish(tmp: Path, final: Path) -> Path:
    """Make a fully written folder visible under its final name in one rename (replacing an older one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _recovery_hint(folder: Path) -> str:
    older = [p for p in complete_checkpoints(folder.parent.parent) if p != folder and step_of(p) < _step_or(folder)]
    if older:
        return (
            f"resume from an earlier checkpoint with train.resume={older[-1]}, or start afresh with train.resume=never"
        )
    return "no earlier complete checkpoint is there: start afresh with train.resume=never (or another run.dir)"


def _step_or(folder: Path) -> int:
    return step_of(folder) if folder.name.startswith(PREFIX) and folder.name[len(PREFIX) :].isdigit() else 1 << 62


def read_checkpoint_file(path: Path, read: Callable[[Path], Any], what: str) -> Any:
    """`read(path)`, or an error naming the file and saying what to do when it is missing or damaged."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; {_recovery_hint(path.parent)}")
    try:
        return read(path)
    except Exception as exc:  # truncated zip, bad JSON, safetensors header errors: all mean a damaged file
        raise CheckpointError(
            f"{path} ({what}) cannot be read, it is truncated or damaged ({type(exc).__name__}: {exc}); "
            f"{_recovery_hint(path.parent)}"
        ) from exc


def read_json(path: Path, what: str = "JSON state") -> Any:
    return read_checkpoint_file(path, lambda p: json.loads(p.read_text()), what)


def read_tensors(path: Path, what: str) -> Any:
    return read_checkpoint_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), what)


def load_model_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load model.safetensors into `model`, and each module attached to it (model/attachments.py) from its own
    file when the checkpoint has it; missing or unexpected weights are an error naming them."""
    path = Path(checkpoint) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in checkpoint {checkpoint}")
    with detached(model) as parts:
        _load_exactly(model, path, checkpoint, "weights")
    for part in parts:
        part_path = Path(checkpoint) / part.file
        if part_path.is_file():
            _load_exactly(part.module, part_path, checkpoint, part.name)
        else:
            log.info("%s has no %s: the %s starts fresh", checkpoint, part.file, part.name)


def _load_exactly(module: nn.Module, path: Path, checkpoint: str | Path, what: str) -> None:
    missing, unexpected = read_checkpoint_file(path, lambda p: load_model(module, str(p), strict=False), what)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} ({path.name}) does not match the model: missing {missing}, "
            f"unexpected {unexpected}"
        )


# ---- the component ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the registered parts and the model weights of one run folder, on every rank.

    A part registered `per_rank` is saved by every rank in its own file (`tensors`: torch.save of tensors and
    numbers, else JSON); the others are the same on every rank and go into trainer_state.json from rank 0.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: CheckpointConfig | None = None,
        dist: D.DistInfo | None = None,
        launch: Launch | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = cfg or CheckpointConfig()
        self.dist = dist or D.DistInfo()
        self.launch = launch or Launch()
        self.parts: dict[str, _Part] = {}

    def register(
        self, name: str, part: Stateful, per_rank: bool = False, tensors: bool = False, redeal: Redeal | None = None
    ) -> None:
        """`redeal`: how a per-rank part's saved states become this rank's when the world size changed (a launch
        whose engine reshards its checkpoints); without it such a resume is refused."""
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} registered twice")
        self.parts[name] = _Part(part, per_rank, tensors, redeal)

    def _rank_file(self, folder: Path, name: str, rank: int) -> Path:
        return folder / f"{name}_rank{rank:05d}.{'pt' if self.parts[name].tensors else 'json'}"

    # ---- save -----------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module | None = None,
        config_yaml: str = "",
        tokenizer: Any = None,
        info: dict[str, Any] | None = None,
        write_weights: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `step` (call on every rank) and keep the last `checkpoint.keep_last`; returns its folder.
        The weights: `model`, the full weights, on rank 0, or `write_weights(folder)`, called on every rank (an
        engine writing its own files: whole weights from rank 0, or every rank's shards)."""
        started = time.perf_counter()
        root = checkpoint_dir(self.run_dir)
        tmp, final = root / f"{TMP_PREFIX}{PREFIX}{step:08d}", root / f"{PREFIX}{step:08d}"
        main = self.dist.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier()
        if write_weights is not None:
            write_weights(tmp)
        elif main:
            if model is None:
                raise ValueError("Checkpointer.save needs the model's weights on rank 0")
            write_model_files(model, tmp)
        if main:
            state = {"step": step, **self.launch.state(), **(info or {})}
            state.update({name: p.part.state_dict() for name, p in self.parts.items() if not p.per_rank})
            (tmp / TRAINER_STATE).write_text(dumps(state, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for name, p in self.parts.items():
            if p.per_rank:
                path = self._rank_file(tmp, name, self.dist.rank)
                if p.tensors:
                    torch.save(p.part.state_dict(), path)
                else:
                    path.write_text(dumps(p.part.state_dict()))
        D.barrier()
        if main:
            publish(tmp, final)
            self._prune()
        D.barrier()
        log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - started)
        return final

    def _prune(self) -> None:
        if self.cfg.keep_last > 0:
            for old in complete_checkpoints(self.run_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    # ---- resume ---------------------------------------------------------------------------------------------

    def find(self, resume: str) -> Path | None:
        """train.resume: auto (the newest complete checkpoint of the run folder, if any), never, or a folder."""
        if resume in ("", "never", "none", "false"):
            return None
        if resume == "auto":
            found = complete_checkpoints(self.run_dir)
            return found[-1] if found else None
        folder = Path(resume).expanduser()
        if not is_checkpoint(folder):
            raise FileNotFoundError(
                f"train.resume={resume}: not a complete checkpoint folder (no {MODEL_FILE} or {SHARDS_INDEX}); use "
                "auto, never, or a checkpoints/step_XXXXXXXX folder"
            )
        return folder

    def resume_point(self, resume: str) -> Resume | None:
        """The checkpoint rank 0 picked (every rank gets the same), checked against this launch."""
        folder = D.broadcast_object(self.find(resume))
        if folder is None:
            return None
        state_file = folder / TRAINER_STATE
        state = read_json(state_file, "trainer state") if state_file.is_file() else {}
        if "position" not in state:
            return Resume(folder, None)  # weights only: it initialises the model
        saved = Launch.from_state(state)
        if saved != self.launch and not self.resizes(saved):
            raise ValueError(
                f"checkpoint {folder} was saved by {saved.describe()}, but this launch has {self.launch.describe()}: "
                "the optimizer and data-loader states are per rank, so resume with the same launch (or "
                "train.resume=never)"
            )
        return Resume(folder, state)

    def resizes(self, saved: Launch) -> bool:
        """Whether this launch continues `saved` at another world size: both run an engine whose checkpoints
        reshard (the per-rank parts are then re-dealt)."""
        resharding = EngineChoice(self.launch.engine, self.launch.zero_stage).reshards_checkpoints
        return resharding and saved.engine == self.launch.engine and saved.world_size != self.launch.world_size

    def load_model(self, model: nn.Module, folder: Path) -> None:
        load_model_weights(model, folder)

    def load(self, resume: Resume) -> None:
        """Give every registered part its saved state."""
        assert resume.state is not None, "a weights-only checkpoint has no training state"
        for name, p in self.parts.items():
            if not p.per_rank:
                if name not in resume.state:
                    raise CheckpointError(
                        f"{resume.folder / TRAINER_STATE} has no {name!r} state; {_recovery_hint(resume.folder)}"
                    )
                p.part.load_state_dict(resume.state[name])
                continue
            saved_world = int(resume.state.get("world_size", self.launch.world_size))
            if saved_world != self.launch.world_size:
                p.part.load_state_dict(self._redealt(resume.folder, name, saved_world))
                continue
            path = self._rank_file(resume.folder, name, self.dist.rank)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was saved by fewer ranks than this launch has"
                )
            reader = read_tensors if p.tensors else read_json
            p.part.load_state_dict(reader(path, f"{name} state of rank {self.dist.rank}"))

    def _redealt(self, folder: Path, name: str, saved_world: int) -> Any:
        """This rank's state of per-rank part `name`: rank 0 reads the states of all `saved_world` saved ranks,
        re-deals them once, and hands each rank its own."""
        p = self.parts[name]
        if p.redeal is None:
            raise ValueError(f"checkpoint part {name!r} is per rank and cannot be re-dealt to another world size")
        dealt = None
        if self.dist.is_main:
            reader = read_tensors if p.tensors else read_json
            states = [reader(self._rank_file(folder, name, r), f"{name} state of rank {r}") for r in range(saved_world)]
            dealt = p.redeal(states, self.launch.world_size)
            log.info("%s: %s states of %d rank(s) re-dealt to %d", folder.name, name, saved_world, len(dealt))
        return D.scatter_object(dealt)
