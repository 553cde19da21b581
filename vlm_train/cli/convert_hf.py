"""Convert between our training checkpoints and Hugging Face Qwen2.5-VL folders (safetensors, local only).

  vlm-convert-hf to-hf   RUN_OR_CHECKPOINT OUT_DIR [--dtype bfloat16]
  vlm-convert-hf from-hf HF_DIR RUN_DIR [--step 0]

to-hf reads checkpoints/step_XXXXXXXX/ (model.safetensors, config.yaml, tokenizer/), or the newest complete one
of a run folder, and writes a folder transformers loads as Qwen2_5_VLForConditionalGeneration. from-hf writes
RUN_DIR/checkpoints/step_XXXXXXXX/ from a Qwen2.5-VL folder. Both print a JSON summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlm_train.devices import DTYPES
from vlm_train.inference import load_checkpoint_model
from vlm_train.jsonio import dumps
from vlm_train.model.hf import from_hf, to_hf
from vlm_train.train.checkpoint import Checkpointer, resolve_checkpoint
from vlm_train.train.config import CheckpointConfig, Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def convert_to_hf(
    source: str | Path,
    out: str | Path,
    dtype: str = "auto",
    image_token_id: int | None = None,
    max_shard_size: str = "5GB",
) -> dict[str, Any]:
    checkpoint = resolve_checkpoint(source)
    model, tokenizer = load_checkpoint_model(checkpoint, image_token_id)
    target = None if dtype == "auto" else DTYPES[dtype]
    folder = to_hf(model, out, tokenizer=tokenizer, dtype=target, max_shard_size=max_shard_size)
    return {
        "direction": "to-hf",
        "checkpoint": str(checkpoint),
        "output": str(folder),
        "parameters": model.num_parameters(),
        "tokenizer": tokenizer is not None,
        "files": sorted(p.name for p in folder.iterdir()),
    }


def convert_from_hf(source: str | Path, run_dir: str | Path, step: int = 0, dtype: str = "float32") -> dict[str, Any]:
    source = Path(source).expanduser()
    model = from_hf(source, dtype=DTYPES[dtype])
    tokenizer = None
    if any((source / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    config = Config(model=model.cfg)
    config.data.tokenizer = str(source.resolve()) if tokenizer is not None else config.data.tokenizer
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    checkpointer = Checkpointer(run_dir, CheckpointConfig(keep_last=0))  # weights only: no training state
    folder = checkpointer.save(step, model, config_yaml, tokenizer, info={"converted_from": str(source.resolve())})
    return {
        "direction": "from-hf",
        "source": str(source),
        "checkpoint": str(folder),
        "parameters": model.num_parameters(),
        "tokenizer": tokenizer is not None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face Qwen2.5-VL folder")
    to.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX folder, or a run folder (newest checkpoint)")
    to.add_argument("out", help="folder to write (config.json, safetensors, tokenizer)")
    to.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weight dtype (auto: as stored)")
    to.add_argument("--image-token-id", type=int, default=None, help="needed only without a tokenizer/ folder")
    to.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (e.g. 5GB)")
    back = sub.add_parser("from-hf", help="Hugging Face Qwen2.5-VL folder -> our checkpoint")
    back.add_argument("hf_dir", help="local Qwen2.5-VL folder (config.json + safetensors)")
    back.add_argument("run_dir", help="run folder; writes RUN_DIR/checkpoints/step_XXXXXXXX")
    back.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
    back.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype of our checkpoint")
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        result = convert_to_hf(args.checkpoint, args.out, args.dtype, args.image_token_id, args.max_shard_size)
    else:
        result = convert_from_hf(args.hf_dir, args.run_dir, args.step, args.dtype)
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
