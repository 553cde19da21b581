"""Export a run's trained Eagle3 draft for serving with SGLang or vLLM (local files only).

  python tools/export_eagle3.py RUN_OR_CHECKPOINT OUT_DIR [--dtype bfloat16] [--embed-tokens]

Reads checkpoints/step_XXXXXXXX/ (draft.safetensors and config.yaml), or the newest complete one of a run folder,
and writes OUT_DIR/config.json (LlamaForCausalLMEagle3) and OUT_DIR/model.safetensors; see
vlm_train.model.eagle3_export for the layout. Serve it beside the target exported by tools/convert_hf.py, e.g.
`--speculative-algorithm EAGLE3 --speculative-draft-model-path OUT_DIR`. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from vlm_train.devices import DTYPES
from vlm_train.inference import read_config
from vlm_train.jsonio import dumps
from vlm_train.model.config import ModelConfig
from vlm_train.model.draft import DRAFT_FILE, DraftShapeConfig, Eagle3Draft
from vlm_train.model.eagle3_export import ARCHITECTURE, capture_notes, draft_from_state, export_eagle3
from vlm_train.train.checkpoint import read_checkpoint_file, resolve_checkpoint


def draft_shape(section: dict[str, Any], where: Path) -> DraftShapeConfig:
    """eagle3.draft of a config.yaml as a DraftShapeConfig; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(DraftShapeConfig)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"{where}: unknown eagle3.draft keys {unknown}; valid keys: {sorted(names)}")
    values = dict(section)
    values["target_layers"] = list(values.get("target_layers") or [])
    return DraftShapeConfig(**values)


def load_run_draft(checkpoint: Path) -> tuple[Eagle3Draft, ModelConfig]:
    """The draft of a checkpoint folder and the target's model config, from draft.safetensors and config.yaml."""
    path = checkpoint / DRAFT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no {DRAFT_FILE}: it is not from a run with a draft stage; train one with "
            "curriculum=eagle3 (vlm-train curriculum=eagle3 eagle3.target=RUN run.dir=DRAFT_RUN)"
        )
    config = read_config(checkpoint)
    where = checkpoint / "config.yaml"
    if "model" not in config or "eagle3" not in config:
        raise ValueError(f"{where} has no model or eagle3 section: not a config.yaml of a run with a draft stage")
    model_cfg = ModelConfig.from_dict(config["model"])
    shape = draft_shape((config["eagle3"] or {}).get("draft") or {}, where)
    state = read_checkpoint_file(path, load_file, "draft")
    return draft_from_state(model_cfg.llm, shape, state), model_cfg


def export(source: str | Path, out: str | Path, dtype: str = "auto", embed_tokens: bool = False) -> dict[str, Any]:
    checkpoint = resolve_checkpoint(source)
    draft, model_cfg = load_run_draft(checkpoint)
    folder = export_eagle3(draft, out, None if dtype == "auto" else DTYPES[dtype], embed_tokens)
    return {
        "checkpoint": str(checkpoint),
        "output": str(folder),
        "architecture": ARCHITECTURE,
        "target_layers": list(draft.target_layers),
        "target_num_layers": model_cfg.llm.num_layers,
        "draft_vocab_size": draft.draft_vocab_size,
        "vocab_size": draft.t2d.numel(),
        "parameters": sum(p.numel() for name, p in draft.named_parameters() if name != "embed_tokens.weight"),
        "embed_tokens": embed_tokens,
        "files": sorted(p.name for p in folder.iterdir()),
        "notes": capture_notes(draft.target_layers, model_cfg.llm.num_layers),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX folder, or a run folder (newest checkpoint)")
    parser.add_argument("out", help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="weight dtype (auto: as stored)")
    parser.add_argument(
        "--embed-tokens",
        action="store_true",
        help="also write the frozen token embedding (the engines take the target's; this makes the folder "
        "load on its own)",
    )
    args = parser.parse_args(argv)
    result = export(args.checkpoint, args.out, args.dtype, args.embed_tokens)
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
