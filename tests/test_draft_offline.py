"""Offline Eagle3 draft training: tools/dump_hidden_states.py writes a target's hidden states, `eagle3.offline`
trains the draft on them. The same packs give the same draft losses and gradients online (the target runs) and
offline (stored bf16 states); a corrupt member is a counted skip; another target or tokenizer is a clear error."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_train.cli.dump_hidden_states import main as dump_main
from vlm_train.data.collate import collate
from vlm_train.data.formats import parse_sample
from vlm_train.data.hidden_states import HIDDEN_MEMBER, read_sample
from vlm_train.data.packer import PackConfig, Packer
from vlm_train.data.state import restore_key, sample_rng
from vlm_train.data.stream import SlotStream
from vlm_train.data.synthetic import corpus_lines
from vlm_train.data.tar_reader import fetch_samples, iter_shard
from vlm_train.data.tokenizer import build_tiny_tokenizer
from vlm_train.inference import read_data_config
from vlm_train.model.draft import DRAFT_FILE, draft_of
from vlm_train.train.builders import add_draft, build_encoder, build_stream
from vlm_train.train.checkpoint import resolve_checkpoint
from vlm_train.train.config import Eagle3Config, StageConfig
from vlm_train.train.draft_objective import choose_vocabulary
from vlm_train.train.draft_offline import offline_model, open_offline
from vlm_train.train.draft_step import draft_forward_backward
from vlm_train.train.draft_target import load_target
from vlm_train.train.trainer import run

from conftest import SHORT_RUN, make_config

DRAFT = ["eagle3.draft.draft_vocab_size=48", "eagle3.vocab_samples=24", "eagle3.ttt_steps=3", "engine.threads=1"]


@pytest.fixture(scope="module")
def target_run(tmp_path_factory) -> Path:
    """A tiny VLM trained for a few steps: the frozen target."""
    folder = tmp_path_factory.mktemp("target")
    cfg = make_config(f"run.dir={folder}", *SHORT_RUN, "train.resume=never", "engine.threads=1", "eval.enabled=false")
    run(cfg)
    return folder


@pytest.fixture(scope="module")
def dumped(target_run, tmp_path_factory) -> tuple[Path, dict]:
    """Its hidden states for 32 samples of its own data config, and what the tool printed."""
    out = tmp_path_factory.mktemp("hidden") / "states"
    with contextlib.redirect_stdout(io.StringIO()):
        result = dump_main(["--target", str(target_run), "--out", str(out), "--num-samples", "32", "--device", "cpu"])
    return out, result


class _Engine:
    """What draft_forward_backward needs of an engine: one process on the CPU, float32."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.device = model, torch.device("cpu")

    def forward_module(self) -> torch.nn.Module:
        return self.model

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def _offline_eagle3(folder: Path, **fields) -> Eagle3Config:
    return Eagle3Config(offline=str(folder), ttt_steps=3, **fields)


def _online_pack(offline_pack, run_data, encoder, packer: Packer):
    """The same samples as `offline_pack`, read from the original shards and encoded as the online loader does."""
    keys = [
        {**m["origin"], "source": m["source"], "epoch": 0, "offset": None, "key": m["key"]} for m in offline_pack.meta
    ]
    encoded = []
    for raw, key in zip(fetch_samples(keys), keys):
        sample = parse_sample(raw, key["source"], run_data.image.max_decode_pixels, "auto")
        rng = sample_rng(0, restore_key(key["source"], 0, raw))
        encoded.append(packer.check(encoder.encode(sample, rng=rng)))
    return collate(encoded, image_token_id=encoder.special.image_pad)


def test_online_and_offline_draft_steps_match_on_the_same_packs(target_run, dumped):
    folder, _ = dumped
    eagle3 = _offline_eagle3(folder)
    offline, setup = open_offline(eagle3, make_config().data)
    offline_packs = []
    for pack in build_stream(setup, make_config("data.pack.llm_budget=256").data, seed=0):
        offline_packs.append(pack)
        if len(offline_packs) == 2:
            break
    checkpoint = resolve_checkpoint(target_run)
    run_data = read_data_config(checkpoint)
    image_pad = setup.encoder.special.image_pad
    target = load_target(str(target_run), setup.tokenizer, image_pad)
    encoder = build_encoder(setup.tokenizer, run_data, target.cfg)
    packer = Packer(run_data.pack, special=encoder.special)
    online_packs = [_online_pack(p, run_data, encoder, packer) for p in offline_packs]
    for on, off in zip(online_packs, offline_packs):
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(on, name), getattr(off, name)), name
        assert on.num_patches > 0 and off.num_patches == 0 and off.target_aux.dtype == torch.bfloat16

    online = add_draft(target, eagle3)
    stored = add_draft(offline_model(offline, image_pad, "auto"), eagle3)
    draft_of(stored).load_state_dict(draft_of(online).state_dict())
    ids = choose_vocabulary(
        [p.labels for p in offline_packs], draft_of(online).draft_vocab_size, offline.model.llm.vocab_size
    )
    results, grads = [], []
    for model, packs, cfg in ((online, online_packs, Eagle3Config(ttt_steps=3)), (stored, offline_packs, eagle3)):
        draft = draft_of(model)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(model.llm.embed_tokens.weight)
        draft.set_vocabulary(ids)
        model.requires_grad_(False)
        for name, p in draft.named_parameters():
            p.requires_grad_(name != "embed_tokens.weight")
        results.append(draft_forward_backward(_Engine(model), packs, cfg))
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    on, off = results
    assert off.extra["draft/positions_0"] > 0
    assert off.loss == pytest.approx(on.loss, rel=1e-6, abs=1e-6)
    for key, value in on.extra.items():
        assert off.extra[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_dump_reports_bytes_per_token_and_describes_the_target(target_run, dumped):
    folder, result = dumped
    manifest = json.loads((folder / "target.json").read_text())
    shards = sorted(folder.glob("*.tar"))
    assert result["samples"] == manifest["samples"] == 32
    assert result["bytes"] == sum(p.stat().st_size for p in shards)
    assert result["bytes_per_token"] == pytest.approx(result["bytes"] / result["tokens"])
    hidden = manifest["hidden_size"]
    # aux [3H] and final [H] in bf16 are 8H bytes a token; tar headers and the token ids add the rest
    assert 8 * hidden <= result["bytes_per_token"] < 16 * hidden
    assert manifest["layers"] == [0, 1, 2] and manifest["dtype"] == "bfloat16"
    assert {s["name"] for s in manifest["sources"]} == {"shapes_caption", "shapes_grounding"}
    head = load_file(str(folder / "target_head.safetensors"))
    target = load_file(str(resolve_checkpoint(target_run) / "model.safetensors"))
    torch.testing.assert_close(head["embed_tokens"], target["llm.embed_tokens.weight"], rtol=0, atol=0)
    assert manifest["vocab_size"] == head["lm_head"].shape[0] and manifest["tokenizer"]["size"] > 0


def test_offline_draft_stage_trains_on_the_stored_states(dumped, tmp_path):
    folder, _ = dumped
    cfg = make_config(f"run.dir={tmp_path / 'run'}", "train.resume=never", f"eagle3.offline={folder}", *DRAFT)
    cfg.curriculum.stages = [StageConfig(name="draft", kind="draft", steps=6, trainable=["draft.*"], lr=3e-3)]
    summary = run(cfg)
    assert summary["steps"] == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["draft/loss_0"] for r in records if "draft/loss_0" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # The draft vocabulary was counted from the stored shards' labels, as _start_draft reads its stage's stream.
    offline, setup = open_offline(cfg.eagle3, cfg.data)
    labels, samples = [], 0
    for pack in build_stream(setup, cfg.data, cfg.run.seed):
        assert pack.target_aux is not None
        labels.append(pack.labels)
        samples += pack.num_samples
        if samples >= cfg.eagle3.vocab_samples:
            break
    draft = load_file(str(Path(summary["checkpoint"]) / DRAFT_FILE))
    chosen = torch.arange(draft["d2t"].numel()) + draft["d2t"]
    assert torch.equal(chosen, choose_vocabulary(labels, 48, offline.model.llm.vocab_size))


def _rewrite_member(shard: Path, sample_index: int, member: str, data: bytes) -> str:
    """Replace one member of one sample of a shard; returns that sample's key."""
    with tarfile.open(shard) as tar:
        entries = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    keys = list(dict.fromkeys(info.name.split(".")[0] for info, _ in entries))
    key = keys[sample_index]
    with tarfile.open(shard, "w") as tar:
        for info, content in entries:
            if info.name == f"{key}.{member}":
                content = data
                info.size = len(data)
            tar.addfile(info, io.BytesIO(content))
    return key


def test_a_corrupt_hidden_state_member_is_a_counted_skip(dumped, tmp_path):
    folder, _ = dumped
    copy = tmp_path / "states"
    shutil.copytree(folder, copy)
    shard = copy / "shapes_grounding-000000.tar"
    raws = list(iter_shard(str(shard)))
    keys = [json.loads(r["json"])["key"] for r in raws]  # the original samples' keys, as packs carry them
    _rewrite_member(shard, 2, HIDDEN_MEMBER, raws[2][HIDDEN_MEMBER][:-100])  # truncated
    offline, setup = open_offline(_offline_eagle3(copy), make_config().data)
    source = next(s for s in setup.sources if s.name == "shapes_grounding")
    stream = SlotStream([source], setup.encoder, make_config("data.shuffle_buffer=4").data, seed=0, slot=0, slots=1)
    seen: set[str] = set()
    while not stream.skipped or len(seen) < len(keys) - 1:  # one epoch at least
        pack = stream.next_pack()
        assert pack.target_aux.shape == (pack.num_tokens, 3 * offline.model.llm.hidden_size)
        seen |= {m["key"] for m in pack.meta}
        assert stream.packs < 50, "the stream never came round to every sample"
    assert seen == set(keys) - {keys[2]}  # nothing else lost
    assert set(stream.skipped) == {"shapes_grounding/corrupt_hidden_states"}


def test_stored_samples_over_the_budget_are_cut_with_their_states(dumped):
    folder, _ = dumped
    _, setup = open_offline(_offline_eagle3(folder), make_config().data)
    source = next(s for s in setup.sources if s.name == "shapes_grounding")
    sample = read_sample(next(iter_shard(source.urls[0])), source.name, setup.encoder.spec.pixel_dim)
    packer = Packer(PackConfig(llm_budget=sample.num_tokens - 5, too_long="truncate"), special=setup.encoder.special)
    cut = packer.check(sample)
    n = sample.num_tokens - 5
    assert cut.num_tokens == n and cut.target_aux.shape[0] == n and cut.target_final.shape[0] == n
    assert torch.equal(cut.target_aux, sample.target_aux[:n]) and cut.labels[-1] == -100
    batch = collate([cut, sample])
    assert batch.target_aux.shape[0] == batch.num_tokens == 2 * sample.num_tokens - 5


def test_offline_states_of_another_target_are_an_error(target_run, dumped, tmp_path):
    folder, _ = dumped
    data = make_config().data
    other = tmp_path / "other"
    shutil.copytree(resolve_checkpoint(target_run), other)
    weights = load_file(str(other / "model.safetensors"))
    weights["llm.embed_tokens.weight"] = weights["llm.embed_tokens.weight"] * 1.01  # tied: the LM head too
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="another target than eagle3.target.*lm_head_sha256"):
        open_offline(_offline_eagle3(folder, target=str(other)), data)
    open_offline(_offline_eagle3(folder, target=str(target_run)), data)  # its own target is fine
    eagle3 = _offline_eagle3(folder)
    eagle3.draft.target_layers = [0, 2, 1]
    with pytest.raises(ValueError, match=r"holds target layers \[0, 1, 2\].*reads layers \[0, 2, 1\]"):
        open_offline(eagle3, data)
    with pytest.raises(ValueError, match="stored in bfloat16.*eagle3.hidden_dtype=float16"):
        open_offline(_offline_eagle3(folder, hidden_dtype="float16"), data)
    # A head file that is not the manifest's target's
    copy = tmp_path / "states"
    shutil.copytree(folder, copy)
    head = load_file(str(copy / "target_head.safetensors"))
    save_file({k: v * 2 for k, v in head.items()}, str(copy / "target_head.safetensors"))
    offline, setup = open_offline(_offline_eagle3(copy), data)
    with pytest.raises(ValueError, match="not the LM head of the target"):
        offline_model(offline, setup.encoder.special.image_pad, "auto")


def test_a_draft_target_tokenizer_mismatch_is_an_error(dumped, tmp_path):
    folder, _ = dumped
    other = build_tiny_tokenizer([*corpus_lines(), "a zebra grazes quietly"])
    other.save_pretrained(str(tmp_path / "tokenizer"))
    data = make_config(f"data.tokenizer={tmp_path / 'tokenizer'}").data
    with pytest.raises(ValueError, match=r"draft/target tokenizer mismatch.*\d+ tokens.*set data.tokenizer"):
        open_offline(_offline_eagle3(folder), data)
    copy = tmp_path / "states"  # without the tokenizer copy, the manifest's fingerprint alone tells
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ValueError, match=r"draft/target tokenizer mismatch.*vocabulary sha256.*set data.tokenizer"):
        open_offline(_offline_eagle3(copy), data)
