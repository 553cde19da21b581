"""tools/convert_hf.py: our training checkpoint -> Hugging Face folder -> our checkpoint, logits equal throughout."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vlm_train.data.collate import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.model.vit import float_pixel_values
from vlm_train.train.checkpoint import Checkpointer, load_model_weights
from vlm_train.train.config import Config

from helpers import encoder, sample, tiny_tokenizer
from tools_helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlm_train.cli.convert_hf import main  # noqa: E402

transformers = pytest.importorskip("transformers")


def _trained_run(tmp_path) -> tuple[Path, VLM]:
    """A run folder with one checkpoint of a small random model, as the trainer writes it."""
    windowed = dataclasses.replace(SMALL.vision, window_size=56, fullatt_block_indexes=[0])
    cfg = dataclasses.replace(SMALL, vision=windowed, llm=dataclasses.replace(SMALL.llm))
    torch.manual_seed(0)
    model = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from their init
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(Config(model=cfg)))
    run = tmp_path / "run"
    Checkpointer(run).save(12, model, config_yaml, tiny_tokenizer())
    return run, model


def _batch():
    enc = encoder()
    return collate([enc.encode(sample(f"s{i}", "a green diamond", images=n, seed=i)) for i, n in enumerate((1, 0, 2))])


def test_checkpoint_to_hf_and_back(tmp_path, capsys):
    run, model = _trained_run(tmp_path)
    summary = main(["to-hf", str(run), str(tmp_path / "hf")])
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["checkpoint"].endswith("step_00000012") and summary["tokenizer"]

    hf_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    batch = _batch()
    with torch.no_grad():
        ours = model(batch).logits
        for i, (start, end) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())):
            ids = batch.input_ids[start:end][None]
            grid = batch.image_grid_thw[[j for j, m in enumerate(_image_owner(batch)) if m == i]]
            kwargs = {}
            if grid.shape[0]:
                patches = slice(*_patch_range(batch, i))
                hf_pixels = float_pixel_values(batch.pixel_values[patches], model.cfg.vision.patch_dim)
                kwargs = dict(
                    pixel_values=hf_pixels, image_grid_thw=grid, mm_token_type_ids=(ids == model.image_token_id).int()
                )
            expected = hf_model(input_ids=ids, **kwargs).logits[0]
            torch.testing.assert_close(ours[start:end], expected, atol=1e-4, rtol=1e-4)

    back = main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run2"), "--step", "3"])
    checkpoint = Path(back["checkpoint"])
    assert checkpoint.name == "step_00000003" and (checkpoint / "tokenizer").is_dir()
    config = OmegaConf.load(checkpoint / "config.yaml")
    rebuilt = VLM(
        ModelConfig.from_dict(OmegaConf.to_container(config.model)),
        vocab_size=len(tiny_tokenizer()),
        image_token_id=model.image_token_id,
    )
    load_model_weights(rebuilt, checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


def _image_owner(batch):
    """Sample index of each image, from where its image-pad run sits."""
    runs = batch.input_ids == encoder().special.image_pad
    starts = (runs & ~torch.cat([torch.tensor([False]), runs[:-1]])).nonzero().squeeze(1)
    return [int(batch.sample_index[s]) for s in starts]


def _patch_range(batch, sample_index):
    owners = _image_owner(batch)
    cu = batch.vit_cu_seqlens.tolist()
    mine = [j for j, m in enumerate(owners) if m == sample_index]
    return cu[mine[0]], cu[mine[-1] + 1]


def test_bf16_export_and_missing_checkpoint_errors(tmp_path):
    run, _ = _trained_run(tmp_path)
    summary = main(["to-hf", str(run), str(tmp_path / "hf16"), "--dtype", "bfloat16"])
    config = json.loads((Path(summary["output"]) / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    with pytest.raises(FileNotFoundError, match="complete checkpoints"):
        main(["to-hf", str(tmp_path / "empty"), str(tmp_path / "x")])


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_hf.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "to-hf" in result.stdout and "from-hf" in result.stdout
