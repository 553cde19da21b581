"""A tokenizer larger than the LLM's vocabulary (Llama's plus the chat tokens): the model grows to it, rows loaded
from a smaller checkpoint are filled as transformers' mean resizing does, and runs save and export the grown
vocabulary consistently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlm_train.cli.convert_hf import convert_to_hf
from vlm_train.data.collate import collate
from vlm_train.data.encode import Encoder
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tokenizer import SPECIAL_TOKENS, load_tokenizer
from vlm_train.inference import load_checkpoint_model
from vlm_train.model import VLM, DecoderLM, ModelConfig
from vlm_train.model.hf import apply_hf_init, from_hf, llm_from_hf, load_llm_from_hf
from vlm_train.model.vocab_resize import mean_resized
from vlm_train.train.trainer import run

from conftest import make_config
from helpers import SPEC, encoder, sample, tiny_tokenizer
from test_hf import _hf_logits, _hf_vl_config

transformers = pytest.importorskip("transformers")

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's pre-tokenizer split (digits in runs of up to three).
LLAMA_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BASE_VOCAB = 320  # the tiny Llama tokenizer's size, and its LLM's vocab_size (128256 for Llama-3.2-1B)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA3_ROPE = {  # conf/model/llm/llama3_2_1b.yaml's
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-3-style tokenizer (byte-level BPE, Llama's special tokens, a BOS) without the chat tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        special_tokens=LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert len(fast) == BASE_VOCAB and not any(t in fast.get_vocab() for t in SPECIAL_TOKENS)
    path = tmp_path_factory.mktemp("llama_tokenizer")
    fast.save_pretrained(path)
    return path


def _hf_llama(tie: bool, rope: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=BASE_VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rope, **TEXT
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF one-inits the norms: random values make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=["tied", "untied"])
def hf_llama_dir(request, tmp_path_factory):
    model = _hf_llama(tie=request.param == "tied", rope={"rope_type": "default", "rope_theta": 500000.0})
    path = tmp_path_factory.mktemp(f"llama_{request.param}")
    model.save_pretrained(path)
    return path, model


# ---------------------------------------------------------------- the formula


@pytest.mark.parametrize("rows", [50, 10])  # more rows than columns: a covariance; fewer: the mean alone
def test_mean_resized_draws_what_transformers_draws(rows):
    hf = _hf_llama(tie=False, rope={"rope_type": "default", "rope_theta": 500000.0})
    old = torch.nn.Embedding(rows, 16)
    torch.nn.init.normal_(old.weight, mean=0.3, std=0.5)
    new = torch.nn.Embedding(rows + 7, 16)
    torch.manual_seed(7)
    hf._init_added_embeddings_weights_with_mean(old, new, rows, 7)
    torch.manual_seed(7)
    grown = mean_resized(old.weight.detach(), rows + 7)
    assert torch.equal(grown[:rows], old.weight) and torch.equal(grown[rows:], new.weight[rows:])
    torch.testing.assert_close(grown[rows:].mean(0), old.weight.mean(0), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- loading into a larger vocabulary


def test_a_grown_llm_loads_as_transformers_resizes_it(hf_llama_dir, caplog):
    path, hf_model = hf_llama_dir
    cfg = llm_from_hf(path).cfg
    cfg.vocab_size = BASE_VOCAB + len(SPECIAL_TOKENS)
    llm = DecoderLM(cfg, "sdpa").eval()
    with caplog.at_level(logging.WARNING, logger="vlm_train.model.hf_weights"):
        load_llm_from_hf(llm, path)
    assert f"embed_tokens.weight has {BASE_VOCAB} rows, the model {cfg.vocab_size}: the 6 new rows" in caplog.text
    hf_model.resize_token_embeddings(cfg.vocab_size, mean_resizing=True)
    stored = hf_model.get_input_embeddings().weight
    for ours, theirs in ((llm.embed_tokens.weight, stored), (llm.lm_head.weight, hf_model.lm_head.weight)):
        assert torch.equal(ours[:BASE_VOCAB], theirs[:BASE_VOCAB])
        # The new rows are the old rows' mean plus a draw at 1e-9 times their covariance (different draws here).
        torch.testing.assert_close(ours[BASE_VOCAB:], theirs[BASE_VOCAB:], atol=1e-5, rtol=0)
        mean = theirs[:BASE_VOCAB].mean(0, keepdim=True).expand(len(SPECIAL_TOKENS), -1)
        torch.testing.assert_close(ours[BASE_VOCAB:], mean, atol=1e-5, rtol=0)
    assert (llm.lm_head.weight is llm.embed_tokens.weight) == cfg.tie_word_embeddings
    ids = torch.tensor(
        [1, 17, 200, BASE_VOCAB - 1, BASE_VOCAB, BASE_VOCAB + 5, 40, BASE_VOCAB + 3]
    )  # old and new tokens
    with torch.no_grad():
        theirs = hf_model(input_ids=ids[None]).logits[0]
        ours = llm(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_whole_vlm_import_grows_the_vocabulary_too(tmp_path):
    small = len(tiny_tokenizer()) - 4  # the checkpoint lacks the tokenizer's last rows
    hf_cfg = _hf_vl_config(tie=False)
    hf_cfg.text_config.vocab_size = small
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).save_pretrained(tmp_path)
    stored = from_hf(tmp_path).llm
    cfg = ModelConfig(vision=from_hf(tmp_path).cfg.vision, llm=stored.cfg, init_from_hf=str(tmp_path))
    cfg.llm.vocab_size = len(tiny_tokenizer())
    vlm = VLM(cfg, vocab_size=cfg.llm.vocab_size, image_token_id=encoder().special.image_pad)
    apply_hf_init(vlm, cfg)
    for ours, theirs in (
        (vlm.llm.embed_tokens.weight, stored.embed_tokens.weight),
        (vlm.llm.lm_head.weight, stored.lm_head.weight),
    ):
        assert ours.shape[0] == len(tiny_tokenizer()) and torch.equal(ours[:small], theirs)
        torch.testing.assert_close(ours[small:], theirs.mean(0, keepdim=True).expand(4, -1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the Llama preset, end to end


def _llama_run(tmp_path: Path, tokenizer_dir: Path, hf_dir: Path, *overrides: str):
    """The Llama-3.2-1B preset at a tiny width, its tokenizer grown by the chat tokens, started from `hf_dir`."""
    return make_config(
        f"run.dir={tmp_path}",
        "model=qwen2_5_vl_3b",
        "model/llm=llama3_2_1b",
        "model.activation_checkpointing=false",
        "model.attn_backend=sdpa",
        "model.vision.hidden_size=32",
        "model.vision.depth=1",
        "model.vision.num_heads=2",
        "model.vision.intermediate_size=48",
        "model.vision.window_size=0",
        "model.vision.fullatt_block_indexes=[]",
        f"model.llm.vocab_size={BASE_VOCAB}",
        "model.llm.hidden_size=64",
        "model.llm.num_layers=2",
        "model.llm.num_heads=4",
        "model.llm.num_kv_heads=2",
        "model.llm.intermediate_size=128",
        "model.llm.mrope_section=[2,3,3]",
        f"model.init_llm_from_hf={hf_dir}",
        f"data.tokenizer={tokenizer_dir}",
        "curriculum.stages.0.steps=1",
        "curriculum.stages.1.steps=2",
        "eval.enabled=false",
        *overrides,
    )


def _batch(tokenizer):
    enc = Encoder(tokenizer, SPEC)
    return collate([enc.encode(sample(f"s{i}", "a red circle", images=n, seed=i)) for i, n in enumerate((1, 0, 2))])


def _final_checkpoint(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"step_{steps:08d}"


def test_the_llama_preset_grows_to_its_tokenizer_and_trains(tmp_path, llama_tokenizer_dir, caplog):
    hf_dir = tmp_path / "llama"
    _hf_llama(tie=True, rope=LLAMA3_ROPE).save_pretrained(hf_dir)
    tokens = len(load_tokenizer(str(llama_tokenizer_dir)))
    assert tokens == BASE_VOCAB + len(SPECIAL_TOKENS)
    with caplog.at_level(logging.WARNING, logger="vlm_train.model"):
        summary = run(_llama_run(tmp_path / "run", llama_tokenizer_dir, hf_dir))
    assert summary["steps"] == 3
    assert f"model.llm.vocab_size is {BASE_VOCAB} but the tokenizer has {tokens} tokens" in caplog.text
    assert f"embed_tokens.weight has {BASE_VOCAB} rows, the model {tokens}" in caplog.text  # init_llm_from_hf grew
    checkpoint = _final_checkpoint(tmp_path / "run", 3)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice("llm.embed_tokens.weight").get_shape() == [tokens, 64]
    assert yaml.safe_load((checkpoint / "config.yaml").read_text())["model"]["llm"]["vocab_size"] == tokens
    model, tokenizer = load_checkpoint_model(checkpoint)
    assert model.cfg.llm.rope_type == "llama3" and len(tokenizer) == tokens
    with torch.no_grad():
        assert torch.isfinite(model.eval()(_batch(tokenizer)).logits).all()


def test_a_grown_llama_vlm_exports_and_transformers_gives_its_logits(tmp_path, llama_tokenizer_dir):
    hf_dir = tmp_path / "llama"
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    _hf_llama(tie=True, rope=rope).save_pretrained(hf_dir)
    cfg = _llama_run(tmp_path / "run", llama_tokenizer_dir, hf_dir)
    cfg.model.llm.rope_type, cfg.model.llm.rope_scaling = "default", {}  # Qwen2.5-VL has no Llama 3 RoPE scaling
    assert run(cfg)["steps"] == 3
    checkpoint = _final_checkpoint(tmp_path / "run", 3)
    ours, tokenizer = load_checkpoint_model(checkpoint)
    tokens = len(tokenizer)
    assert ours.llm.embed_tokens.weight.shape[0] == tokens == BASE_VOCAB + len(SPECIAL_TOKENS)

    convert_to_hf(checkpoint, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == tokens
    hf_model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")) == tokens
    ours.eval().set_attn_backend("sdpa")
    reimported = from_hf(tmp_path / "hf", attn_backend="sdpa").eval()
    enc = Encoder(tokenizer, SPEC)
    samples = [enc.encode(sample(f"s{i}", "a red circle", images=n, seed=i)) for i, n in enumerate((1, 0, 2))]
    batch = collate(samples)
    with torch.no_grad():
        logits = ours(batch).logits
        assert torch.equal(reimported(batch).logits, logits)
    bounds = batch.cu_seqlens.tolist()
    for i, encoded in enumerate(samples):
        torch.testing.assert_close(
            logits[bounds[i] : bounds[i + 1]], _hf_logits(hf_model.eval(), encoded), atol=1e-4, rtol=1e-4
        )
