"""The frozen target of a draft stage (`eagle3.target`): one of our run or checkpoint folders, or a Hugging Face
Qwen2.5-VL folder; and the checks that the draft can read it with the run's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_model
from transformers import PreTrainedTokenizerBase

from vlm_train.model.config import ModelConfig
from vlm_train.model.hf_config import VLM_TYPES
from vlm_train.model.vlm import VLM
from vlm_train.train.checkpoint import MODEL_FILE, read_checkpoint_file, resolve_checkpoint


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not (folder / "config.yaml").is_file()


def target_model_config(path: str) -> ModelConfig:
    """The model config of `eagle3.target` (ours or Hugging Face), its weights unread: what the run's data is built
    for (patch geometry, FLOPs costs) before the target is loaded."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"eagle3.target={path} does not exist")
    if _is_hf_folder(folder):
        from vlm_train.model.hf_config import model_config_from_hf, read_hf_config

        _check_hf_target_type(folder)
        return model_config_from_hf(read_hf_config(folder))
    checkpoint = resolve_checkpoint(folder)
    config = read_checkpoint_file(checkpoint / "config.yaml", lambda p: yaml.safe_load(p.read_text()) or {}, "config")
    if "model" not in config:
        raise ValueError(f"eagle3.target={path}: {checkpoint / 'config.yaml'} has no model section")
    cfg = ModelConfig.from_dict(config["model"])
    for name in ("init_from_hf", "init_llm_from_hf", "init_vision_from_hf", "init_vision_from"):
        setattr(cfg, name, "")
    return cfg


def load_target(path: str, tokenizer: PreTrainedTokenizerBase, image_token_id: int) -> VLM:
    """The target VLM (float32, on the CPU) from `eagle3.target`; a clear error when the draft cannot read it or
    its tokenizer is not the run's."""
    folder = Path(path).expanduser()
    cfg = target_model_config(path)
    if _is_hf_folder(folder):
        return _load_hf_target(folder, tokenizer)
    checkpoint = resolve_checkpoint(folder)
    with safe_open(checkpoint / MODEL_FILE, "pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    if "llm.embed_tokens.weight" not in shapes:
        raise ValueError(f"eagle3.target={path}: {checkpoint / MODEL_FILE} is not a vlm_train VLM (no llm weights)")
    theirs = _saved_tokenizer(checkpoint / "tokenizer")
    if theirs is not None:
        check_same_tokenizer(theirs, tokenizer, f"eagle3.target={path}")
    cfg.llm.vocab_size = int(shapes["llm.embed_tokens.weight"][0])
    model = VLM(cfg, vocab_size=cfg.llm.vocab_size, image_token_id=image_token_id)
    file = checkpoint / MODEL_FILE
    missing, unexpected = read_checkpoint_file(file, lambda p: load_model(model, str(p), strict=False), "weights")
    if missing or unexpected:
        raise ValueError(
            f"eagle3.target={path}: its weights do not fit its own config (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    return model


def _check_hf_target_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in VLM_TYPES:
        raise ValueError(
            f"eagle3.target={folder}: a {model_type!r} model ({config.get('architectures')}); the draft reads the "
            f"hidden states of a {', '.join(VLM_TYPES)} model (Qwen2_5_VLForConditionalGeneration) or of one of "
            "our runs"
        )


def _load_hf_target(folder: Path, tokenizer: PreTrainedTokenizerBase) -> VLM:
    from transformers import AutoTokenizer

    from vlm_train.model.hf import from_hf

    try:
        theirs = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"eagle3.target={folder}: no usable tokenizer files ({exc})") from exc
    check_same_tokenizer(theirs, tokenizer, f"eagle3.target={folder}")
    return from_hf(folder, dtype=torch.float32)


def _saved_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    if not folder.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What must agree between a draft's data and its target: the vocabulary (token -> id) and its size."""
    vocab = tokenizer.get_vocab()
    return {"size": len(tokenizer), "vocab": vocab}


def check_same_tokenizer(theirs: PreTrainedTokenizerBase, ours: PreTrainedTokenizerBase, where: str) -> None:
    """The target's tokenizer must give the run's data the same ids; an error names the first difference."""
    a, b = tokenizer_fingerprint(theirs), tokenizer_fingerprint(ours)
    if a == b:
        return
    if a["size"] != b["size"]:
        detail = f"the target's tokenizer has {a['size']} tokens, data.tokenizer {b['size']}"
    else:
        token = next(t for t in sorted(set(a["vocab"]) | set(b["vocab"])) if a["vocab"].get(t) != b["vocab"].get(t))
        ids = a["vocab"].get(token), b["vocab"].get(token)
        detail = f"token {token!r} is id {ids[0]} in the target's tokenizer, {ids[1]} in data.tokenizer's"
    raise ValueError(
        f"{where}: the draft/target tokenizer mismatch: {detail}; set data.tokenizer to the target's tokenizer"
    )
