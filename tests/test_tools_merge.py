"""tools/merge_checkpoints.py: weighted averages of checkpoints of one model, and clear refusals otherwise."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_train.data.collate import collate
from vlm_train.model import VLM
from vlm_train.train.checkpoint import load_model_weights

from helpers import encoder, sample, tiny_tokenizer
from tools_helpers import save_run, small_model

ROOT = Path(__file__).resolve().parents[1]
from vlm_train.cli.merge_checkpoints import CheckpointMismatch, main  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three checkpoints of one model with different weights."""
    root = tmp_path_factory.mktemp("runs")
    return [save_run(root / f"run{i}", small_model(seed=i), step=10 * (i + 1)) for i in range(3)]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_weighted_average_of_three_checkpoints(runs, tmp_path, capsys):
    out = tmp_path / "soup"
    summary = main([*map(str, runs), "--out", str(out), "--weights", "1", "2", "1"])
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["weights"] == [0.25, 0.5, 0.25] and summary["normalized"]
    inputs = [_weights(r) for r in runs]
    merged = _weights(out)
    assert merged.keys() == inputs[0].keys()
    for name, tensor in merged.items():
        expected = 0.25 * inputs[0][name].double() + 0.5 * inputs[1][name].double() + 0.25 * inputs[2][name].double()
        torch.testing.assert_close(tensor, expected.float(), atol=0, rtol=0)
        assert tensor.dtype == inputs[0][name].dtype

    # A checkpoint folder of ours: the model loads from it and runs, with the first input's config and tokenizer.
    assert (out / "config.yaml").read_text() == (runs[0] / "config.yaml").read_text()
    assert (out / "tokenizer").is_dir()
    assert json.loads((out / "merge.json").read_text())["weights"] == summary["weights"]
    model = VLM(small_model().cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    load_model_weights(model, out)
    batch = collate([encoder().encode(sample("s", "a red square"))])
    with torch.no_grad():
        assert torch.isfinite(model(batch).logits).all()


def test_uniform_default_explicit_weights_and_dtype(runs, tmp_path):
    uniform = main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "u")])
    assert uniform["weights"] == [0.5, 0.5]
    a, b = _weights(runs[0]), _weights(runs[1])
    diff = main(
        [
            str(runs[0]),
            str(runs[1]),
            "--out",
            str(tmp_path / "d"),
            "--weights",
            "1",
            "-1",
            "--no-normalize",
            "--dtype",
            "bfloat16",
        ]
    )
    assert diff["weights"] == [1.0, -1.0] and not diff["normalized"]
    merged = _weights(tmp_path / "d")
    name = "llm.embed_tokens.weight"
    assert merged[name].dtype == torch.bfloat16
    torch.testing.assert_close(merged[name], (a[name].double() - b[name].double()).to(torch.bfloat16), atol=0, rtol=0)


def test_run_folders_resolve_to_their_newest_checkpoint(runs, tmp_path):
    summary = main([str(runs[0].parent.parent), str(runs[1].parent.parent), "--out", str(tmp_path / "m")])
    assert summary["checkpoints"] == [str(runs[0]), str(runs[1])]


def test_mismatched_checkpoints_are_refused(runs, tmp_path):
    other_cfg = dataclasses.replace(small_model().cfg, llm=dataclasses.replace(small_model().cfg.llm, num_layers=3))
    torch.manual_seed(0)
    deeper = VLM(other_cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad)
    other = save_run(tmp_path / "deeper", deeper)
    with pytest.raises(CheckpointMismatch, match="model.llm.num_layers: 2 vs 3"):
        main([str(runs[0]), str(other), "--out", str(tmp_path / "x")])

    # Same config, but a tensor of another shape (a widened vocabulary) is named.
    wide = small_model()
    wide.llm.lm_head = torch.nn.Linear(64, len(tiny_tokenizer()) + 8, bias=False)
    bad = save_run(tmp_path / "wide", wide)
    with pytest.raises(CheckpointMismatch, match="llm.lm_head.weight"):
        main([str(runs[0]), str(bad), "--out", str(tmp_path / "x")])
    # Same weights layout, another tokenizer: token ids would mean different things.
    retok = tmp_path / "retok" / "step_00000001"
    shutil.copytree(runs[1], retok)
    vocab = retok / "tokenizer" / "tokenizer.json"
    data = json.loads(vocab.read_text())
    token = max(data["model"]["vocab"], key=len)
    data["model"]["vocab"][token + "x"] = data["model"]["vocab"].pop(token)  # one token spelt differently
    vocab.write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatch, match="tokenizers differ.*tokenizer.json"):
        main([str(runs[0]), str(retok), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_bad_arguments_are_clear_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="complete checkpoints"):
        main([str(runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="3 weights for 2 checkpoints"):
        main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "x"), "--weights", "1", "1", "1"])
    with pytest.raises(ValueError, match="at least two"):
        main([str(runs[0]), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="given twice"):
        main([str(runs[0]), str(runs[0]), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="no-normalize"):
        main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "x"), "--weights", "1", "-1"])
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "taken")])
    assert main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "taken"), "--force"])["tensors"] > 0


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "merge_checkpoints.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--weights" in result.stdout and "--no-normalize" in result.stdout
