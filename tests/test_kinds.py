"""Stage kinds as one interface: a fourth kind is one class and one line in KINDS, and the trainer runs it
(checkpoints, resume, FLOPs, faults) without knowing it; no code outside the kinds asks which kind a stage is."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlm_train.model.attachments import attach
from vlm_train.model.vlm import VLM
from vlm_train.train import kinds as K
from vlm_train.train.config import StageConfig
from vlm_train.train.kinds import StageKind
from vlm_train.train.step import StepResult
from vlm_train.train.trainer import run

from conftest import SHORT_RUN, make_config

PACKAGE = Path(__file__).resolve().parents[1] / "vlm_train"
KINDS_DIR = PACKAGE / "train" / "kinds"
ENGINES_DIR = PACKAGE / "train" / "engines"


class Probe(nn.Module):
    """A read-out of the VLM's mean final hidden state, trained beside the frozen VLM."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, vlm: nn.Module, batch) -> torch.Tensor:
        hidden = vlm(batch, return_logits=False).hidden
        return (hidden.mean(0) @ self.weight - 1.0).pow(2)


class ProbeKind(StageKind):
    """A new kind, written as a user would: the VLM frozen, a probe of its own attached (saved in
    probe.safetensors) and trained on its own objective."""

    name = "probe"
    attachment = "probe"

    def attach(self, model: VLM) -> None:
        attach(model, self.attachment, Probe(model.cfg.llm.hidden_size), "probe.safetensors")

    def trainable(self, stage: StageConfig) -> tuple[list[str], list[str]]:
        return ["probe.*"], []

    def forward_backward(self, engine, packs, faults) -> StepResult:
        module, total = engine.forward_module(), 0.0
        for pack in packs:
            loss = faults.loss(module(pack.to(engine.device), attachment=self.attachment) / len(packs))
            engine.backward(loss)
            total += float(loss.detach())
        return StepResult(loss=total)


@pytest.fixture
def probe_kind(monkeypatch):
    monkeypatch.setitem(K.KINDS, ProbeKind.name, ProbeKind)  # the one line that registers a kind


def _probe_run(run_dir: Path, *more: str) -> dict:
    cfg = make_config(f"run.dir={run_dir}", *SHORT_RUN, "eval.enabled=false", *more)
    cfg.curriculum.stages.append(StageConfig(name="probe", kind="probe", steps=3, lr=1e-2))
    return run(cfg)


def test_a_fourth_kind_is_one_class_and_one_line_and_the_trainer_runs_it(probe_kind, tmp_path):
    _probe_run(tmp_path / "whole", "checkpoint.interval=5", "checkpoint.keep_last=0")
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["align"] * 2 + ["full"] * 3 + ["probe"] * 3
    before = tmp_path / "whole" / "checkpoints" / "step_00000005"
    after = tmp_path / "whole" / "checkpoints" / "step_00000008"
    assert (after / "probe.safetensors").is_file() and not any(
        k.startswith("probe") for k in load_file(str(after / "model.safetensors"))
    )
    old, new = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    assert all(torch.equal(new[name], old[name]) for name in new)  # the VLM is frozen in the probe stage
    probe = [load_file(str(folder / "probe.safetensors"))["weight"] for folder in (before, after)]
    assert not probe[0].any() and probe[1].abs().sum() > 0  # ... and the probe trained (it starts at zero)

    # exact resume inside the new kind's stage
    assert _probe_run(tmp_path / "parts", "train.exit_at_step=6")["stopped"] == "exit_at_step"
    _probe_run(tmp_path / "parts")
    whole = {r["step"]: r["loss"] for r in rows}
    parts = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in parts} == whole


def test_an_unknown_kind_names_the_registered_ones(tmp_path):
    cfg = make_config(f"run.dir={tmp_path}", *SHORT_RUN, "curriculum.stages.1.kind=probe")
    with pytest.raises(
        ValueError, match=r"curriculum.stages.1 \(full\): kind 'probe' is not one of \('vlm', 'vision', 'draft'\)"
    ):
        run(cfg)


def _branches(path: Path) -> tuple[list[str], list[str]]:
    """Comparisons on a stage's kind (`x.kind == ...`, `!=`, `in`), and engine internals read outside the engines
    (a comparison on a ZeRO stage, DeepSpeed's `ds_*` parameter attributes, an import of deepspeed), as file:line."""
    kinds, engines = [], []
    where = lambda node: f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Attribute) and side.attr == "kind":
                    kinds.append(where(node))
                if isinstance(side, ast.Attribute) and side.attr == "zero_stage":
                    engines.append(where(node))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ds_")) or (
            isinstance(node, ast.Attribute) and node.attr.startswith("ds_")
        ):
            engines.append(where(node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] == "deepspeed" for n in names):
                engines.append(where(node))
    return kinds, engines


def test_no_code_outside_the_kinds_branches_on_a_stage_kind_or_reads_engine_internals():
    kinds, engines = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        found_kinds, found_engines = _branches(path)
        stage_code = path.parent.name in ("train", "model") or (PACKAGE / "train") in path.parents
        kinds += found_kinds if stage_code and KINDS_DIR not in path.parents else []
        engines += found_engines if ENGINES_DIR not in path.parents else []
    assert kinds == [] and engines == []
