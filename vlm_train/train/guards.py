"""Guards that keep a long run alive and correct: skipped steps, the loss-spike rule, SIGTERM, fault injection.

Every decision here is taken from numbers that are already the same on every rank (the all-reduced step loss,
the global grad norm, the all-reduced stop flag), so all ranks skip or stop alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlm_train.data.loader import PackedStream
from vlm_train.train.config import FaultConfig, GuardConfig

log = logging.getLogger("vlm_train")

NONFINITE_LOSS, NONFINITE_GRAD, LOSS_SPIKE = "nonfinite_loss", "nonfinite_grad_norm", "loss_spike"


class SkipLimitError(RuntimeError):
    """Too many optimizer steps in a row were skipped."""


class Guard:
    """Decides whether a step's update is skipped, counts skips by reason, and stops a run of too many."""

    def __init__(self, cfg: GuardConfig):
        if cfg.spike_zscore < 0 or cfg.spike_window < 2 or cfg.max_consecutive_skips < 0:
            raise ValueError("train.guard: spike_zscore >= 0, spike_window >= 2 and max_consecutive_skips >= 0")
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.skipped: Counter = Counter()
        self.consecutive = 0

    def check_loss(self, loss: float) -> str | None:
        """The reason to skip this step's update judged from its (global) loss, or None."""
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        if self.cfg.spike_zscore > 0 and len(self.window) >= max(self.cfg.spike_min_history, 2):
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (len(self.window) - 1))
            if std > 0 and (loss - mean) / std > self.cfg.spike_zscore:
                return LOSS_SPIKE
        return None

    def record(self, step: int, loss: float, reason: str | None) -> None:
        """Count the outcome of a step; raise SkipLimitError after too many skips in a row."""
        if reason is None:
            self.consecutive = 0
            self.window.append(loss)
            return
        self.skipped[reason] += 1
        self.consecutive += 1
        log.warning("step %d: optimizer step skipped (%s, loss %s)", step, reason, loss)
        limit = self.cfg.max_consecutive_skips
        if limit and self.consecutive > limit:
            raise SkipLimitError(
                f"{self.consecutive} optimizer steps in a row were skipped (last at step {step}: {reason}), over "
                f"train.guard.max_consecutive_skips={limit}: the run is diverging or its data is broken; lower the "
                "lr, check the data, or resume from an earlier checkpoint"
            )

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "skipped": dict(self.skipped), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque((float(x) for x in state["window"]), maxlen=self.cfg.spike_window)
        self.skipped = Counter(state["skipped"])
        self.consecutive = int(state["consecutive"])


class StopSignal:
    """Turns SIGTERM (what SLURM sends before preemption) into a flag the training loop reads between steps."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def install(self) -> StopSignal:
        # Loader workers forked after this inherit the handler, so they outlive a SIGTERM sent to the whole job.
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


@dataclass(frozen=True)
class StepFaults:
    """The faults injected into one optimizer step's loss (FaultInjector.step_faults); every kind's step applies
    them to the loss it runs backward from."""

    nan_loss: bool = False

    def loss(self, value: torch.Tensor) -> torch.Tensor:
        return value * float("nan") if self.nan_loss else value


class FaultInjector:
    """Deliberate failures for tests: a NaN loss, an inf gradient, SIGTERM to this process, an error inside a data
    worker."""

    def __init__(self, cfg: FaultConfig, rank: int):
        self.cfg = cfg
        self.rank = rank

    def nan_loss(self, step: int) -> bool:
        return step in self.cfg.nan_loss_at_steps and self.cfg.nan_rank in (-1, self.rank)

    def inf_grad(self, step: int, model: nn.Module) -> Callable[[], None]:
        """At a chosen step, make the gradient of the first trainable parameter inf; returns the undo.

        Through the output of the innermost module around it that runs (the parameter's own module may be read by
        its parent, as the patch embedding's is): a hook on the parameter itself never runs under an engine that
        computes with gathered copies of sharded parameters (FSDP2)."""
        if step not in self.cfg.inf_grad_at_steps or self.cfg.inf_grad_rank not in (-1, self.rank):
            return lambda: None
        name = next(n for n, p in model.named_parameters() if p.requires_grad)
        parts = name.split(".")[:-1]
        around = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts), -1, -1)]  # innermost first
        hooked = []

        def to_inf(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not hooked and torch.is_tensor(output) and output.requires_grad:
                hooked.append(output.register_hook(lambda grad: grad + math.inf))

        handles = [module.register_forward_hook(to_inf) for module in around]
        return lambda: [h.remove() for h in handles]

    @contextlib.contextmanager
    def step_faults(self, step: int, model: nn.Module) -> Iterator[StepFaults]:
        """The faults of `step` for its forward and backward: an inf gradient hooked on for the duration, and the
        NaN loss for the kind's step to apply."""
        undo = self.inf_grad(step, model)
        try:
            yield StepFaults(nan_loss=self.nan_loss(step))
        finally:
            undo()

    def after_step(self, step: int) -> None:
        if self.cfg.sigterm_at_step and step == self.cfg.sigterm_at_step and self.rank == self.cfg.sigterm_rank:
            log.warning("fault injection: SIGTERM to rank %d after step %d", self.rank, step)
            os.kill(os.getpid(), signal.SIGTERM)

    def wrap_stream(self, stream: PackedStream) -> PackedStream:
        """The stream itself, or (with data_error_at_pack) one whose readers fail at that pack."""
        if self.cfg.data_error_at_pack <= 0:
            return stream
        faulty = _FaultyStream(stream.sources, stream.encoder, stream.cfg, stream.seed, stream.rank, stream.world_size)
        faulty.fail_at = self.cfg.data_error_at_pack
        return faulty


class _FaultyStream(PackedStream):
    """A PackedStream whose reader raises at its n-th pack, inside the data worker that makes it."""

    fail_at = 0

    def slot_stream(self, worker: int, num_workers: int):  # type: ignore[override]
        stream = super().slot_stream(worker, num_workers)
        make, fail_at = stream.next_pack, self.fail_at

        def next_pack():
            if stream.packs + 1 >= fail_at:
                raise RuntimeError(
                    f"fault injection: data worker error at pack {stream.packs + 1} "
                    f"(train.fault.data_error_at_pack={fail_at})"
                )
            return make()

        stream.next_pack = next_pack  # type: ignore[method-assign]
        return stream
