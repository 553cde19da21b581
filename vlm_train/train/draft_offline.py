"""Offline Eagle3 draft training (`eagle3.offline=DIR`): the target's hidden states, stored by
tools/dump_hidden_states.py, are the draft stages' data, so the target never runs in the loop.

DIR holds:
  target.json               the manifest: the target (its model config, the layers stored, hidden and vocabulary
                            size, a fingerprint of its tokenizer, a sha256 of its LM head), the storage dtype, and
                            the shards of each data source with its weight
  target_head.safetensors   the target's LM head (`lm_head`) and token embedding (`embed_tokens`), float32: all an
                            offline draft stage needs of the target (the head turns the stored final states into
                            the target's distribution; the draft copies the embedding)
  tokenizer/                the target's tokenizer (a mismatch then names its first differing token)
  SOURCE-000000.tar, ...    the samples, one shard set per source (see vlm_train/data/hidden_states.py)

A folder written from another target, or read with another tokenizer, is a clear error naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vlm_train.data.config import DataConfig, tokenizer_corpus
from vlm_train.data.hidden_states import FORMAT, STORAGE_DTYPES
from vlm_train.data.loader import Source
from vlm_train.data.tokenizer import load_tokenizer
from vlm_train.model.config import ModelConfig
from vlm_train.model.draft import default_layers
from vlm_train.model.flops import flops_cost
from vlm_train.model.hf_config import model_config_from_hf, read_hf_config
from vlm_train.model.hf_weights import SafetensorsFolder, canonical_hf_name, vlm_to_hf_name
from vlm_train.model.vlm import VLM
from vlm_train.train.builders import DataSetup, build_encoder
from vlm_train.train.checkpoint import read_checkpoint_file, resolve_checkpoint
from vlm_train.train.config import Eagle3Config
from vlm_train.train.draft_target import check_same_tokenizer

MANIFEST = "target.json"
HEAD_FILE = "target_head.safetensors"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FORMAT = "vlm_train.hidden_states"
MANIFEST_VERSION = 1
# Model-config fields that do not shape the target's hidden states, left out when two targets are compared.
_NOT_COMPARED = ("initializer_range",)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a weight's float32 bytes (exact for float32, bfloat16 and float16 weights alike)."""
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What must agree between the data and the target: the number of tokens and a sha256 of the sorted vocabulary
    (token -> id)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"size": len(tokenizer), "sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest()}


def describe_target(model: VLM, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """The manifest's description of a target VLM: what a draft trained on its hidden states depends on."""
    head = model.llm.lm_head.weight
    return {
        "model": _model_dict(model.cfg),
        "hidden_size": model.cfg.llm.hidden_size,
        "vocab_size": int(head.shape[0]),
        "tokenizer": vocabulary_fingerprint(tokenizer) if tokenizer is not None else None,
        "lm_head_sha256": tensor_sha256(head),
    }


def _model_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The parts of a model config that shape its hidden states (vision and llm), as plain data."""
    return {"vision": dataclasses.asdict(cfg.vision), "llm": dataclasses.asdict(cfg.llm)}


@dataclass
class OfflineTarget:
    """A folder of stored hidden states, read and checked (see the module docstring)."""

    folder: Path
    manifest: dict[str, Any]
    model: ModelConfig  # the target's, from the manifest
    layers: list[int]
    dtype: str
    sources: list[Source]


def read_offline(path: str) -> OfflineTarget:
    """The manifest of `eagle3.offline`, its model config and its sources (shards relative to the folder)."""
    folder = Path(path).expanduser()
    where = f"eagle3.offline={path}"
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{where}: no {MANIFEST}; write the folder with tools/dump_hidden_states.py")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: {MANIFEST} is not readable JSON ({exc})") from exc
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{where}: {MANIFEST} is format {manifest.get('format')!r} version {manifest.get('version')!r}, not "
            f"{MANIFEST_FORMAT!r} version {MANIFEST_VERSION}: write it again with tools/dump_hidden_states.py"
        )
    model = ModelConfig.from_dict(manifest["model"])
    model.llm.vocab_size = int(manifest["vocab_size"])
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"{where}: {MANIFEST} has dtype {manifest['dtype']!r}, not one of {sorted(STORAGE_DTYPES)}")
    sources = []
    for source in manifest["sources"]:
        urls = [str(folder / name) for name in source["shards"]]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{where}: {len(missing)} shard(s) of source {source['name']!r} missing, e.g. {missing[0]}"
            )
        if urls:
            sources.append(Source(source["name"], urls, float(source["weight"]), FORMAT))
    if not sources:
        raise ValueError(f"{where}: {MANIFEST} lists no shards (did the dump write any sample?)")
    return OfflineTarget(folder, manifest, model, [int(i) for i in manifest["layers"]], manifest["dtype"], sources)


def open_offline(eagle3: Eagle3Config, data: DataConfig) -> tuple[OfflineTarget, DataSetup]:
    """An offline run's stored hidden states, checked against the run's settings, and its data setup: the stored
    shards are its sources (data.sources, the synthetic data and held-out data are not read), data.tokenizer must
    be the target's."""
    offline = read_offline(eagle3.offline)
    tokenizer = load_tokenizer(data.tokenizer, corpus=tokenizer_corpus(data))
    check_offline(offline, eagle3, tokenizer)
    vocab = offline.model.llm.vocab_size
    setup = DataSetup(tokenizer, build_encoder(tokenizer, data, offline.model), offline.sources, [])
    setup.flops_cost = flops_cost(offline.model, vocab_size=vocab)  # the packer's FLOPs balancing, of the target
    return offline, setup


def check_offline(offline: OfflineTarget, eagle3: Eagle3Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """Clear errors when the stored hidden states do not fit this run: the storage dtype, the layers the draft
    reads, the tokenizer, and (when eagle3.target is set) the target itself."""
    where, manifest = f"eagle3.offline={eagle3.offline}", offline.manifest
    if offline.dtype != eagle3.hidden_dtype:
        raise ValueError(
            f"{where}: the hidden states are stored in {offline.dtype}, but eagle3.hidden_dtype={eagle3.hidden_dtype}: "
            f"set eagle3.hidden_dtype={offline.dtype} (or dump them again with --dtype {eagle3.hidden_dtype})"
        )
    layers = list(eagle3.draft.target_layers) or default_layers(offline.model.llm.num_layers)
    if layers != offline.layers:
        raise ValueError(
            f"{where}: the folder holds target layers {offline.layers}, but the draft reads layers {layers} "
            f"(eagle3.draft.target_layers={list(eagle3.draft.target_layers)}): set eagle3.draft.target_layers="
            f"{offline.layers}, or dump the layers wanted with --layers"
        )
    stored, ours = manifest["tokenizer"], vocabulary_fingerprint(tokenizer)
    if stored is not None and stored != ours:
        saved = offline.folder / TOKENIZER_DIR
        if saved.is_dir():  # names the first token that differs
            check_same_tokenizer(AutoTokenizer.from_pretrained(str(saved), local_files_only=True), tokenizer, where)
        raise ValueError(
            f"{where}: the draft/target tokenizer mismatch: the hidden states were written with a tokenizer of "
            f"{stored['size']} tokens (vocabulary sha256 {stored['sha256'][:12]}), data.tokenizer has {ours['size']} "
            f"(sha256 {ours['sha256'][:12]}); set data.tokenizer to the target's tokenizer"
        )
    if eagle3.target:
        differences = compare_targets(manifest, describe_target_folder(eagle3.target))
        if differences:
            raise ValueError(
                f"{where} was written from another target than eagle3.target={eagle3.target}: "
                f"{'; '.join(differences)}. Dump the hidden states of this target, or leave eagle3.target empty"
            )


def compare_targets(stored: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """'what: stored X, target Y' for every difference between a manifest and a target's description."""
    out = []
    for key in ("hidden_size", "vocab_size", "lm_head_sha256"):
        if stored[key] != target[key]:
            out.append(f"{key}: stored {stored[key]}, target {target[key]}")
    if target["tokenizer"] is not None and stored["tokenizer"] not in (None, target["tokenizer"]):
        out.append(f"tokenizer: stored {stored['tokenizer']}, target {target['tokenizer']}")
    for part in ("vision", "llm"):
        mine, theirs = stored["model"][part], target["model"][part]
        for name in sorted(set(mine) | set(theirs)):
            if name not in _NOT_COMPARED and mine.get(name) != theirs.get(name):
                out.append(f"model.{part}.{name}: stored {mine.get(name)}, target {theirs.get(name)}")
    return out


def describe_target_folder(path: str) -> dict[str, Any]:
    """`describe_target` of an eagle3.target folder (ours or Hugging Face) from its config, its LM head and its
    tokenizer alone: the transformer's weights are not read."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"eagle3.target={path} does not exist")
    tokenizer = None
    if (folder / "config.json").is_file() and not (folder / "config.yaml").is_file():  # Hugging Face
        cfg = model_config_from_hf(read_hf_config(folder))
        weights = SafetensorsFolder(folder)
        names = {canonical_hf_name(k): k for k in weights.keys()}
        head = names.get(vlm_to_hf_name("llm.lm_head.weight")) or names.get(vlm_to_hf_name("llm.embed_tokens.weight"))
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        checkpoint = resolve_checkpoint(folder)
        config = read_checkpoint_file(
            checkpoint / "config.yaml", lambda p: yaml.safe_load(p.read_text()) or {}, "config"
        )
        if "model" not in config:
            raise ValueError(f"eagle3.target={path}: {checkpoint / 'config.yaml'} has no model section")
        cfg = ModelConfig.from_dict(config["model"])
        weights = SafetensorsFolder(checkpoint)
        keys = set(weights.keys())
        head = "llm.lm_head.weight" if "llm.lm_head.weight" in keys else "llm.embed_tokens.weight"  # tied: one
        if (checkpoint / TOKENIZER_DIR).is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint / TOKENIZER_DIR), local_files_only=True)
    if head is None or head not in weights.keys():
        raise ValueError(f"eagle3.target={path}: no LM head or token embedding among its weights")
    weight = weights.tensor(head)
    cfg.llm.vocab_size = int(weight.shape[0])
    return {
        "model": _model_dict(cfg),
        "hidden_size": cfg.llm.hidden_size,
        "vocab_size": int(weight.shape[0]),
        "tokenizer": vocabulary_fingerprint(tokenizer) if tokenizer is not None else None,
        "lm_head_sha256": tensor_sha256(weight),
    }


def offline_model(offline: OfflineTarget, image_token_id: int, attn_backend: str) -> VLM:
    """The VLM of an offline run: the target's shape, its LM head and token embedding from target_head.safetensors.
    Its other weights keep their random init: in offline mode nothing but the head (the target's distribution from
    the stored final states) and the embedding (the draft's copy) is ever run or read."""
    cfg = dataclasses.replace(offline.model, attn_backend=attn_backend)
    for name in ("init_from_hf", "init_llm_from_hf", "init_vision_from_hf", "init_vision_from"):
        setattr(cfg, name, "")
    path = offline.folder / HEAD_FILE
    where = f"eagle3.offline={offline.folder}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no {HEAD_FILE} (the target's LM head and embedding)")
    tensors = read_checkpoint_file(path, load_file, "LM head")
    model = VLM(cfg, vocab_size=cfg.llm.vocab_size, image_token_id=image_token_id)
    llm = model.llm
    for name, param in (("lm_head", llm.lm_head.weight), ("embed_tokens", llm.embed_tokens.weight)):
        if name not in tensors or tensors[name].shape != param.shape:
            shape = list(tensors[name].shape) if name in tensors else None
            raise ValueError(f"{where}: {HEAD_FILE} {name} is {shape}, the manifest's target needs {list(param.shape)}")
    if tensor_sha256(tensors["lm_head"]) != offline.manifest["lm_head_sha256"]:
        raise ValueError(f"{where}: {HEAD_FILE} is not the LM head of the target in {MANIFEST} (its sha256 differs)")
    with torch.no_grad():
        llm.embed_tokens.weight.copy_(tensors["embed_tokens"])
        llm.lm_head.weight.copy_(tensors["lm_head"])  # after the embedding: a tied head is the same tensor
    return model
