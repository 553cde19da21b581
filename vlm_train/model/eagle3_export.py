"""An Eagle3 draft in the layout SGLang and vLLM serve (SpecForge's published one), and back.

The folder holds `config.json` and `model.safetensors`:

- config.json is SpecForge's `LlamaForCausalLMEagle3` config (configs/qwen2-5-vl-7b-eagle3.json): a one-layer
  Llama with the target's width and rotary (M-RoPE as rope_scaling {"type": "mrope", "mrope_section"}),
  `draft_vocab_size`, and `eagle_config.eagle_aux_hidden_state_layer_ids`, the target layers whose outputs the
  draft reads. SGLang reads those ids as layer outputs (it captures the input of layer id + 1), as SpecForge and
  this draft do. vLLM counts hidden-state boundaries instead (id k: the output of layer k - 1) and reads a
  top-level `eagle_aux_hidden_state_layer_ids` first, so that key holds the same layers in its counting.
- model.safetensors holds the draft's own names, which are the names both engines load: `fc.weight`,
  `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t` (int64 offsets: target id = draft id + d2t[id]) and `t2d`
  (bool over the target vocabulary). The frozen `embed_tokens.weight` is left out, as SpecForge's SGLang export
  does: both engines give the draft the target's embedding. `embed_tokens=True` keeps it (a self-contained draft).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ROPE_TYPES, LLMConfig
from .draft import DraftShapeConfig, Eagle3Draft
from .hf_weights import SafetensorsFolder

ARCHITECTURE = "LlamaForCausalLMEagle3"  # SGLang's and vLLM's registry name (vLLM also knows Eagle3LlamaForCausalLM)
ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM")
TARGET_MODEL_TYPE = "qwen2_5_vl"
MAX_POSITIONS = 128000  # as the target's config.json (vlm_train.model.hf_config); SGLang sizes its rotary cache by it
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMBED_KEY = "embed_tokens.weight"
VOCAB_KEYS = ("d2t", "t2d")  # kept in their own dtypes (int64, bool) whatever the export dtype


def eagle3_config(draft: Eagle3Draft, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the draft as SpecForge publishes one for a Qwen2.5-VL target."""
    cfg = draft.cfg
    if cfg.rope_type != "default":
        raise ValueError(
            f"the draft's rotary is M-RoPE with rope_type={cfg.rope_type}; the engines' Eagle3 draft takes either "
            "M-RoPE (mrope_section) or a rope scaling, not both, so this draft cannot be exported"
        )
    layers = list(draft.target_layers)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "target_model_type": TARGET_MODEL_TYPE,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True},
        # vLLM's counting (see the module docstring): boundary k is the output of layer k - 1.
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in layers],
        "hidden_size": cfg.hidden_size,
        "target_hidden_size": cfg.hidden_size,  # fc reads 3 x the target's width, which is the draft's own
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "norm_before_residual": False,  # the attention's residual is the raw fused feature, not hidden_norm's
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": cfg.initializer_range,
        "vocab_size": draft.t2d.numel(),
        "draft_vocab_size": draft.draft_vocab_size,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_state(draft: Eagle3Draft, dtype: torch.dtype, embed_tokens: bool = False) -> dict[str, torch.Tensor]:
    """The tensors model.safetensors holds: weights in `dtype`, d2t/t2d as they are, the embedding if asked."""
    state = {}
    for name, tensor in draft.state_dict().items():
        if name == EMBED_KEY and not embed_tokens:
            continue
        value = tensor.detach().cpu()
        state[name] = (value if name in VOCAB_KEYS else value.to(dtype)).contiguous()
    return state


def export_eagle3(
    draft: Eagle3Draft, out: str | Path, dtype: torch.dtype | None = None, embed_tokens: bool = False
) -> Path:
    """Write config.json and model.safetensors of the draft into `out`; dtype None keeps the weights' own."""
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or draft.fc.weight.dtype
    config = eagle3_config(draft, dtype)
    for old in folder.glob("model*.safetensors*"):
        old.unlink()  # an earlier export's shards would be read beside this one
    save_file(export_state(draft, dtype, embed_tokens), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def capture_notes(layers: tuple[int, ...] | list[int], num_layers: int) -> list[str]:
    """What the engines will not capture as trained: the last layer's output (SGLang captures layer inputs only)
    and, in SGLang releases that read a first id other than 1 as a layer input, every id."""
    notes = []
    if num_layers - 1 in layers:
        notes.append(
            f"the draft reads the output of the target's last layer ({num_layers - 1}), which SGLang's Eagle3 "
            "capture cannot return (it captures layer inputs); train with eagle3.draft.target_layers below it"
        )
    if layers and layers[0] != 1:
        notes.append(
            f"eagle_aux_hidden_state_layer_ids starts at {layers[0]}, not 1: recent SGLang releases read such ids "
            "as layer inputs (one layer early); the default layers of a target of 8+ layers start at 1"
        )
    return notes


# ---------------------------------------------------------------- reading back


def draft_from_state(target: LLMConfig, shape: DraftShapeConfig, state: dict[str, torch.Tensor]) -> Eagle3Draft:
    """An Eagle3Draft of this shape holding `state` (all of its tensors; the vocabulary size is t2d's length)."""
    if "t2d" not in state:
        raise ValueError("the draft's tensors have no t2d (the target-vocabulary mask): not an Eagle3 draft")
    vocab_size = int(state["t2d"].numel())
    draft = Eagle3Draft(target, shape, vocab_size)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the draft's tensors do not fit its config: missing {missing}, unexpected {unexpected}")
    return draft


def load_eagle3_export(
    folder: str | Path, embed_tokens: torch.Tensor | None = None, target_layers: list[int] | None = None
) -> Eagle3Draft:
    """An Eagle3Draft (float32) from an exported folder. Without embed_tokens.weight in the folder, pass the
    target's embedding [V, D]; without eagle_config layer ids (some published drafts), pass target_layers."""
    folder = Path(folder).expanduser()
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; export a draft with tools/export_eagle3.py")
    config = json.loads(config_file.read_text())
    _check_eagle3_config(config, folder)
    weights = SafetensorsFolder(folder)
    state = {key: weights.tensor(key) for key in weights.keys()}
    if EMBED_KEY not in state:
        if embed_tokens is None:
            raise ValueError(
                f"{folder} has no {EMBED_KEY} (the engines take the target's, so exports leave it out): pass the "
                "target's embedding (embed_tokens=vlm.llm.embed_tokens.weight) or export with --embed-tokens"
            )
        state[EMBED_KEY] = embed_tokens.detach().cpu()
    layers = list(target_layers or (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or [])
    if not layers:
        raise ValueError(f"{config_file} names no eagle_config.eagle_aux_hidden_state_layer_ids: pass target_layers")
    target, shape = _configs_from_json(config, layers, config_file)
    if state[EMBED_KEY].shape != (target.vocab_size, target.hidden_size):
        raise ValueError(
            f"the embedding is {tuple(state[EMBED_KEY].shape)}, the draft needs "
            f"({target.vocab_size}, {target.hidden_size}) (vocab_size x hidden_size of {config_file})"
        )
    if int(state.get("t2d", torch.empty(0)).numel()) != target.vocab_size:
        raise ValueError(f"{folder}: t2d does not span vocab_size {target.vocab_size} of {config_file}")
    return draft_from_state(target, shape, state)  # loading casts the weights to the draft's float32


def _check_eagle3_config(config: dict[str, Any], folder: Path) -> None:
    """A clear error for a config.json that is not an Eagle3 Llama draft this model can express."""
    architectures = config.get("architectures") or []
    if not set(architectures) & set(ARCHITECTURES) or "draft_vocab_size" not in config:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not an Eagle3 draft (architectures {architectures}, draft_vocab_size "
            f"{config.get('draft_vocab_size')}); expected {ARCHITECTURE} with a draft_vocab_size, as "
            "tools/export_eagle3.py writes"
        )
    problems = []
    if config.get("num_hidden_layers", 1) != 1:
        problems.append(f"num_hidden_layers={config['num_hidden_layers']} (one decoder layer)")
    target_hidden = config.get("target_hidden_size")
    if target_hidden not in (None, config.get("hidden_size")):
        problems.append(f"target_hidden_size={target_hidden} differs from hidden_size={config.get('hidden_size')}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (only silu)")
    for flag in ("attention_bias", "mlp_bias", "norm_before_residual", "fc_norm", "norm_before_fc"):
        if config.get(flag):
            problems.append(f"{flag}=true")
    if config.get("norm_output") is False:
        problems.append("norm_output=false (the LM head reads the normed state)")
    if problems:
        raise ValueError(f"{folder / CONFIG_FILE}: an Eagle3 draft this model cannot express: {'; '.join(problems)}")


def _configs_from_json(config: dict[str, Any], layers: list[int], where: Path) -> tuple[LLMConfig, DraftShapeConfig]:
    """The target config and draft shape that rebuild the exported draft."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    # A draft without M-RoPE rotates by one position row: all of the rotary in the first (temporal) section.
    section = list(rope.get("mrope_section") or [head_dim // 2, 0, 0])
    rope_type = "default" if kind == "mrope" else kind
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope type {kind!r} is not supported (mrope, default, llama3)")
    target = LLMConfig(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=max(layers) + 1,  # the draft needs only the layers it reads to exist
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        mrope_section=section,
        rope_type=rope_type,
        rope_scaling={key: float(rope[key]) for key in ROPE_TYPES[rope_type] if key in rope},  # validate() names gaps
        qkv_bias=False,
        tie_word_embeddings=False,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        initializer_range=float(config.get("initializer_range", 0.02)),
    )
    shape = DraftShapeConfig(
        target_layers=list(layers),
        draft_vocab_size=int(config["draft_vocab_size"]),
        num_heads=target.num_heads,
        num_kv_heads=target.num_kv_heads,
        intermediate_size=target.intermediate_size,
    )
    return target, shape
