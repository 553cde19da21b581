"""Eagle3 draft training: the training-time test and its loss against direct computations, packing that cannot
change a sample's draft losses or gradients, the step normaliser, the vocabulary maps, and the draft stage in a
run: pretrain then draft, the VLM frozen, the draft saved apart, exact resume (one process and two ranks of
DeepSpeed ZeRO-2 under torchrun), clear errors for targets and settings the draft cannot use."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlm_train.data.batch import IGNORE_INDEX
from vlm_train.data.collate import collate
from vlm_train.model import VLM, ModelConfig
from vlm_train.model.draft import DraftInputs, default_layers, draft_losses, draft_of
from vlm_train.train.builders import add_draft
from vlm_train.train.config import Eagle3Config, StageConfig
from vlm_train.train.draft_objective import (
    choose_vocabulary,
    step_masks,
    target_distribution,
    target_features,
)
from vlm_train.train.draft_step import draft_forward_backward, features_to_inputs, simulated_acceptance
from vlm_train.train.draft_target import load_target
from vlm_train.train.engines import SingleEngine
from vlm_train.train.trainer import run

from conftest import SHORT_RUN, SMALL_DATA, make_config
from helpers import encoder, sample, tiny_tokenizer

TOL = {"atol": 1e-5, "rtol": 1e-5}
STEPS = 4


def _model(vocab: int = 40) -> VLM:
    """A tiny VLM (random weights) with a draft whose vocabulary is `vocab` of the target's ids."""
    torch.manual_seed(0)
    enc = encoder()
    vlm = VLM(ModelConfig(), vocab_size=len(tiny_tokenizer()), image_token_id=enc.special.image_pad).eval()
    cfg = Eagle3Config()
    cfg.draft.draft_vocab_size = vocab
    add_draft(vlm, cfg)
    draft = draft_of(vlm)
    draft.embed_tokens.weight.data.copy_(vlm.llm.embed_tokens.weight)
    # Every other id, so d2t holds real offsets; the tokens of the answers below are among them or not.
    draft.set_vocabulary(torch.arange(0, 2 * vocab, 2))
    return vlm


def _encoded(key: str, answer: str, images: int, seed: int):
    return encoder().encode(sample(key, answer, images=images, seed=seed))


def _inputs(vlm: VLM, batch, steps: int = STEPS) -> DraftInputs:
    features = target_features(vlm, batch, draft_of(vlm).target_layers, "bfloat16")
    return features_to_inputs(features, vlm.llm.lm_head.weight, draft_of(vlm), batch, steps)


# ---- pieces against direct computations ---------------------------------------------------------------------------


def test_default_layers_are_specforges_low_middle_high_and_distinct_from_three_layers_on():
    assert default_layers(28) == [1, 13, 24]  # Qwen2.5-VL-7B: SpecForge's [1, L/2 - 1, L - 4]
    assert default_layers(3) == [0, 1, 2]  # the tiny model's three layers
    for layers in range(3, 40):
        chosen = default_layers(layers)
        assert len(set(chosen)) == 3 and all(0 <= i < layers for i in chosen), layers


def test_vocabulary_is_the_most_frequent_supervised_tokens_and_the_maps_invert():
    labels = [torch.tensor([IGNORE_INDEX, 5, 5, 7, 9]), torch.tensor([9, 9, IGNORE_INDEX, 3])]
    assert choose_vocabulary(labels, 2, 20).tolist() == [5, 9]  # 9 three times, 5 twice
    assert choose_vocabulary(labels, 3, 20).tolist() == [3, 5, 9]  # 3 and 7 once each: the smaller id
    assert choose_vocabulary(labels, 6, 20).tolist() == [0, 1, 3, 5, 7, 9]  # topped up with the smallest unseen
    vlm = _model(vocab=8)
    draft = draft_of(vlm)
    ids = torch.tensor([3, 4, 10, 11, 30, 31, 32, 100])
    draft.set_vocabulary(ids)
    assert torch.equal(draft.draft_to_target, ids)  # target id = draft id + d2t[draft id]
    assert torch.equal(draft.t2d.nonzero().squeeze(-1), ids)


def test_target_distribution_is_the_head_restricted_to_the_draft_vocabulary():
    vlm = _model(vocab=16)
    draft = draft_of(vlm)
    final = torch.randn(6, vlm.cfg.llm.hidden_size)
    logits, in_vocab = target_distribution(final, vlm.llm.lm_head.weight, draft)
    full = final @ vlm.llm.lm_head.weight.T
    torch.testing.assert_close(logits, full[:, draft.draft_to_target])
    assert torch.equal(in_vocab, draft.t2d[full.argmax(-1)])


def test_step_masks_supervise_a_position_only_while_j_tokens_of_its_sample_remain():
    batch = collate([_encoded("a", "a red circle", 0, 1), _encoded("b", "a blue square near a ring", 0, 2)])
    in_vocab = torch.rand(batch.num_tokens) > 0.3
    masks = step_masks(batch, in_vocab, STEPS)
    bounds = batch.cu_seqlens.tolist()
    for j in range(STEPS):
        for t in range(batch.num_tokens):
            end = next(b for b in bounds[1:] if b > t)
            u = t + 1 + j
            expected = u < end and bool(batch.labels[u] != IGNORE_INDEX) and bool(in_vocab[u])
            assert bool(masks[j, t]) == expected, (j, t)


def test_the_loss_is_soft_cross_entropy_against_the_target_at_t_plus_1_plus_j():
    vlm = _model()
    batch = collate([_encoded("a", "a red circle and a blue square", 1, 3)])
    inputs = _inputs(vlm, batch)
    draft = draft_of(vlm)
    out = draft_losses(draft, batch.input_ids, batch.position_ids, batch.cu_seqlens, inputs)
    hidden = draft.ttt(batch.input_ids, inputs.aux, batch.position_ids, batch.cu_seqlens, STEPS)
    for j in range(STEPS):
        expected, right = torch.zeros(()), 0
        for t in inputs.masks[j].nonzero().squeeze(-1).tolist():
            p = torch.softmax(inputs.target_logits[t + 1 + j], -1)
            logits = draft.logits(hidden[j][t])
            expected = expected - (p * torch.log_softmax(logits, -1)).sum()
            right += int(logits.argmax() == inputs.target_logits[t + 1 + j].argmax())
        torch.testing.assert_close(out.loss_sums[j], expected, **TOL)
        assert int(out.correct[j]) == right
    assert inputs.masks.any(1).all()  # every step supervises something here


def test_a_samples_draft_losses_and_gradients_are_the_same_alone_or_packed_behind_others():
    vlm = _model()
    draft = draft_of(vlm)
    target = _encoded("t", "a red circle and a blue square", 1, 7)
    others = [_encoded("o1", "a green ring", 2, 9), _encoded("o2", "an orange cross near a yellow star", 0, 4)]

    def losses_and_grads(samples, index):
        batch = collate(samples)
        inputs = _inputs(vlm, batch)
        own = batch.sample_index == index
        inputs.masks &= own  # score the target sample only
        draft.zero_grad()
        out = draft_losses(draft, batch.input_ids, batch.position_ids, batch.cu_seqlens, inputs)
        out.loss_sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        return out.loss_sums.detach(), out.correct, grads

    alone = losses_and_grads([target], 0)
    packed = losses_and_grads([*others, target], 2)
    torch.testing.assert_close(packed[0], alone[0], **TOL)
    assert torch.equal(packed[1], alone[1])
    assert alone[2].keys() == packed[2].keys() and "fc.weight" in alone[2]
    for name in alone[2]:
        torch.testing.assert_close(packed[2][name], alone[2][name], **TOL, msg=name)


def _engine(vlm: VLM) -> SingleEngine:
    from vlm_train.train.config import TrainConfig
    from vlm_train.train.curriculum import param_groups
    from vlm_train.train.kinds import stage_kind

    stage = StageConfig(name="draft", kind="draft", steps=1, trainable=["draft.*"])
    engine = SingleEngine(vlm, TrainConfig(), torch.device("cpu"), bf16=False)

    def groups(module):
        stage_kind("draft").set_trainable(module, stage)
        return param_groups(module, stage, {"draft": ["draft.*"]}, TrainConfig())

    engine.start_stage(groups, 0)
    return engine


def test_the_step_loss_and_gradients_do_not_depend_on_how_samples_split_into_micro_batches():
    samples = [_encoded(f"s{i}", a, i % 2, i) for i, a in enumerate(["a red circle", "a blue ring", "a green cross"])]
    cfg = Eagle3Config(ttt_steps=3)

    def step(packs):
        vlm = _model()
        engine = _engine(vlm)
        result = draft_forward_backward(engine, packs, cfg)
        draft = draft_of(vlm)
        assert not draft.embed_tokens.weight.requires_grad and not any(p.requires_grad for p in vlm.llm.parameters())
        # Every trainable draft weight has a gradient (an empty or partial set below would compare nothing).
        trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        assert "fc.weight" in trainable and grads.keys() == trainable, sorted(trainable ^ grads.keys())
        return result, grads

    one, one_grads = step([collate(samples)])
    three, three_grads = step([collate([s]) for s in samples])
    assert one_grads.keys() == three_grads.keys()
    assert one.loss == pytest.approx(three.loss, rel=1e-5)
    for key in ("draft/acc_0", "draft/loss_2", "draft/positions_1", "draft/simulated_acceptance_length"):
        assert one.extra[key] == pytest.approx(three.extra[key], rel=1e-5), key
    loss = sum(0.8**j * one.extra[f"draft/loss_{j}"] for j in range(3))
    assert one.loss == pytest.approx(loss, rel=1e-5)  # sum_j 0.8^j * (step j's mean soft cross-entropy)
    for name in one_grads:
        torch.testing.assert_close(three_grads[name], one_grads[name], **TOL, msg=name)


def test_simulated_acceptance_length_sums_the_running_products_of_step_accuracies():
    assert simulated_acceptance([0.5, 0.5, 1.0]) == pytest.approx(0.5 + 0.25 + 0.25)
    assert simulated_acceptance([1.0] * 4) == 4.0 and simulated_acceptance([0.0, 1.0]) == 0.0


# ---- the stage in a run -------------------------------------------------------------------------------------------

DRAFT = ["eagle3.draft.draft_vocab_size=64", "eagle3.vocab_samples=50", "eagle3.ttt_steps=3"]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _pretrain_then_draft(run_dir, *more: str):
    cfg = make_config(f"run.dir={run_dir}", *SHORT_RUN, *DRAFT, "eval.enabled=false", *more)
    cfg.curriculum.stages.append(StageConfig(name="draft", kind="draft", steps=3, trainable=["draft.*"], lr=2e-3))
    return run(cfg)


def test_a_run_pretrains_then_trains_its_draft_with_the_vlm_frozen_and_saved_apart(tmp_path):
    stopped = _pretrain_then_draft(tmp_path, "train.exit_at_step=5")  # the end of the VLM stages
    assert stopped["stopped"] == "exit_at_step"
    before = load_file(str(tmp_path / "checkpoints" / "step_00000005" / "model.safetensors"))
    _pretrain_then_draft(tmp_path)
    final = tmp_path / "checkpoints" / "step_00000008"
    after = load_file(str(final / "model.safetensors"))
    assert after.keys() == before.keys() and not any(k.startswith("draft") for k in after)
    for name in before:  # the draft stage leaves the VLM as it was
        assert torch.equal(after[name], before[name]), name
    draft = load_file(str(final / "draft.safetensors"))
    assert draft["lm_head.weight"].shape[0] == 64 and draft["t2d"].sum() == 64
    torch.testing.assert_close(draft["embed_tokens.weight"], after["llm.embed_tokens.weight"])  # a frozen copy
    rows = _rows(tmp_path)
    assert [r["stage"] for r in rows] == ["align"] * 2 + ["full"] * 3 + ["draft"] * 3
    last = rows[-1]
    for key in ("draft/loss_0", "draft/acc_2", "draft/simulated_acceptance_length"):
        assert key in last
    assert last["loss"] < rows[5]["loss"]  # it learns


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    """A short VLM run: the frozen target of the eagle3 preset below."""
    folder = tmp_path_factory.mktemp("target")
    run(make_config(f"run.dir={folder}", *SHORT_RUN, "eval.enabled=false", "model.llm.num_layers=3"))
    return folder


def _preset(target, run_dir, *more: str):
    overrides = ["curriculum=eagle3", f"eagle3.target={target}", *DRAFT, "curriculum.stages.0.steps=4"]
    return run(make_config(f"run.dir={run_dir}", *overrides, "eval.enabled=false", *more))


def test_the_eagle3_preset_resumes_exactly_in_one_process(target_run, tmp_path):
    _preset(target_run, tmp_path / "whole")
    assert _preset(target_run, tmp_path / "parts", "train.exit_at_step=2")["stopped"] == "exit_at_step"
    _preset(target_run, tmp_path / "parts")
    whole = {r["step"]: r["loss"] for r in _rows(tmp_path / "whole")}
    parts = {r["step"]: r["loss"] for r in _rows(tmp_path / "parts")}
    assert parts == whole and len(whole) == 4
    first = load_file(str(tmp_path / "parts" / "checkpoints" / "step_00000002" / "draft.safetensors"))
    final = load_file(str(tmp_path / "whole" / "checkpoints" / "step_00000004" / "draft.safetensors"))
    assert torch.equal(first["t2d"], final["t2d"]) and not torch.equal(first["fc.weight"], final["fc.weight"])


def _torchrun(target, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "vlm_train.train",
        *SMALL_DATA,
        "curriculum=eagle3",
        f"eagle3.target={target}",
        *DRAFT,
        "curriculum.stages.0.steps=4",
        "engine=deepspeed",
        "engine.zero_stage=2",
        "data.pack.llm_budget=512",
        "eval.enabled=false",
        "train.fault.inf_grad_at_steps=[3]",  # rank 0's gradient turns inf: both ranks skip that update alike
        "train.fault.inf_grad_rank=0",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_eagle3_preset_on_two_ranks_of_zero2_stopped_by_sigterm_resumes_exactly(target_run, tmp_path):
    whole = _torchrun(target_run, f"run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-4000:]
    stopped = _torchrun(
        target_run, f"run.dir={tmp_path / 'parts'}", "train.fault.sigterm_at_step=1", "train.fault.sigterm_rank=1"
    )
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == ["step_00000002"]
    resumed = _torchrun(target_run, f"run.dir={tmp_path / 'parts'}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = _rows(tmp_path / "whole")
    assert [r["skipped_step"] for r in rows] == [0, 0, 1, 0]
    assert {r["step"]: r["loss"] for r in _rows(tmp_path / "parts")} == {r["step"]: r["loss"] for r in rows}
    # The target's weights went into the run's checkpoint unchanged; its config.yaml describes the target.
    target_weights = load_file(str(sorted((target_run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    final = tmp_path / "whole" / "checkpoints" / "step_00000004"
    for name, weight in load_file(str(final / "model.safetensors")).items():
        assert torch.equal(weight, target_weights[name]), name
    assert "num_layers: 3" in (final / "config.yaml").read_text()


def test_an_online_draft_run_builds_its_data_for_the_targets_model_not_the_command_lines(target_run, tmp_path):
    # The command line's model has 16-px patches and 2 layers; the target has 14-px patches and 3: the packs (patch
    # size, FLOPs costs) are made for the target, which then reads them.
    summary = _preset(target_run, tmp_path / "run", "model.vision.patch_size=16", "model.llm.num_layers=2")
    assert summary["steps"] == 4
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "patch_size: 14" in saved and "num_layers: 3" in saved
    rows = _rows(tmp_path / "run")
    assert all(r["draft/positions_0"] > 0 for r in rows)


def test_targets_and_settings_the_draft_cannot_use_are_clear_errors(target_run, tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    enc = encoder()
    with pytest.raises(ValueError, match=r"a 'llama' model \(\['LlamaForCausalLM'\]\); the draft reads"):
        load_target(str(other), tiny_tokenizer(), enc.special.image_pad)
    tokenizer = tiny_tokenizer().__class__.from_pretrained(
        str(sorted((target_run / "checkpoints").iterdir())[-1] / "tokenizer")
    )
    tokenizer.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="draft/target tokenizer mismatch: the target's tokenizer has 348 tokens"):
        load_target(str(target_run), tokenizer, enc.special.image_pad)
    preset = [f"run.dir={tmp_path / 'run'}", "curriculum=eagle3", f"eagle3.target={target_run}", *DRAFT]
    with pytest.raises(ValueError, match=r"a draft stage trains the draft .* also matches \['llm.\*'\]"):
        run(make_config(*preset, "curriculum.stages.0.trainable=[draft.*,llm.*]"))
    with pytest.raises(ValueError, match="draft stages need whole weights on every rank .* deepspeed ZeRO-3 shards"):
        run(make_config(*preset, "engine=deepspeed", "engine.zero_stage=3"))
    with pytest.raises(ValueError, match="eagle3.ttt_steps must be >= 1"):
        run(make_config(*preset, "eagle3.ttt_steps=0"))
    with pytest.raises(FileNotFoundError, match="eagle3.target=.*does not exist"):
        run(make_config(*preset[: -len(DRAFT) - 1], f"eagle3.target={tmp_path / 'nowhere'}"))


def test_a_hugging_face_qwen2_5_vl_target_trains_the_same_draft_as_the_run_it_was_exported_from(target_run, tmp_path):
    from vlm_train.cli.convert_hf import main as convert

    convert(["to-hf", str(target_run), str(tmp_path / "hf")])
    enc = encoder()
    ours = load_target(str(target_run), tiny_tokenizer(), enc.special.image_pad)
    theirs = load_target(str(tmp_path / "hf"), tiny_tokenizer(), enc.special.image_pad)
    for name, weight in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[name], weight, msg=name)
    _preset(target_run, tmp_path / "from_run", "curriculum.stages.0.steps=2")
    _preset(tmp_path / "hf", tmp_path / "from_hf", "curriculum.stages.0.steps=2")
    expected = {r["step"]: r["loss"] for r in _rows(tmp_path / "from_run")}
    assert {r["step"]: r["loss"] for r in _rows(tmp_path / "from_hf")} == pytest.approx(expected, rel=1e-5)
