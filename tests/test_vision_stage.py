"""The vision stage: per-image pooling that packing cannot change, SigLIP and multi-label losses equal to direct
reference computations, a step whose loss and gradients do not depend on micro-batches or ranks (GradCache over
real DeepSpeed ZeRO-2 under torchrun), the label vocabulary, and the run: heads saved apart from the VLM, later
stages starting from the pretrained tower, model.init_vision_from, exact resume, clear errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from vision_cases import (
    LABELS,
    all_packs,
    make_model,
    objective_config,
    one_pack,
    samples,
    start_vision_stage,
    vocabulary,
)

from vlm_train.data.collate import collate
from vlm_train.model.vision_heads import HEADS_ATTR, AttentionPool, image_samples
from vlm_train.train.builders import build_data, build_model
from vlm_train.train.config import Config, GuardConfig, StageConfig, TrainConfig
from vlm_train.train.curriculum import param_groups
from vlm_train.train.engines import SingleEngine
from vlm_train.train.guards import Guard
from vlm_train.train.kinds import stage_kind
from vlm_train.train.step import finish_step
from vlm_train.train.trainer import run
from vlm_train.train.vision_objective import (
    LabelVocabulary,
    multilabel_loss,
    pack_rows,
    sigmoid_contrastive_loss,
)
from vlm_train.train.vision_step import vision_forward_backward

from conftest import SMALL_DATA, make_config
from helpers import encoder

HERE = Path(__file__).parent
IMAGE_PAD = encoder().special.image_pad

# ---- the losses against direct computations -----------------------------------------------------------------------


def test_sigmoid_contrastive_loss_equals_the_papers_formula_written_out():
    torch.manual_seed(0)
    images, texts = torch.randn(5, 8), torch.randn(5, 8)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    expected = 0.0
    for i in range(5):  # SigLIP, Algorithm 1: -sum_ij log sigmoid(z_ij (t x_i . y_j + b)) / n
        for j in range(5):
            x = images[i] / images[i].norm()
            y = texts[j] / texts[j].norm()
            z = 1.0 if i == j else -1.0
            logit = 10.0 * float(x @ y) - 10.0
            expected += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    assert float(sigmoid_contrastive_loss(images, texts, scale, bias)) == pytest.approx(expected / 5, rel=1e-5)


def test_multilabel_loss_is_binary_cross_entropy_summed_over_labels_averaged_over_images():
    torch.manual_seed(1)
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    expected = 0.0
    for i in range(4):
        for k in range(3):
            p = 1.0 / (1.0 + math.exp(-float(logits[i, k])))
            expected -= float(targets[i, k]) * math.log(p) + (1 - float(targets[i, k])) * math.log(1 - p)
    assert float(multilabel_loss(logits, targets)) == pytest.approx(expected / 4, rel=1e-5)


def test_attention_pool_equals_a_softmax_attention_per_image():
    torch.manual_seed(2)
    pool = AttentionPool(16, 4, 1e-6)
    torch.nn.init.normal_(pool.probe)
    x, image = torch.randn(11, 16), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    pooled = pool(x, image, 3)
    q = pool.q(pool.probe).view(4, 4)
    k, v = pool.kv(x).view(11, 2, 4, 4).unbind(1)
    for n in range(3):
        rows = image == n
        attn = torch.softmax(torch.einsum("hd,phd->hp", q, k[rows]) / 2.0, dim=-1)  # per head, this image only
        out = pool.out(torch.einsum("hp,phd->hd", attn, v[rows]).reshape(16))
        torch.testing.assert_close(pooled[n], out + pool.mlp(pool.norm(out)), atol=1e-5, rtol=1e-5)


# ---- packing does not change an image's embedding ---------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["map", "mean"])
def test_an_image_and_its_text_embed_the_same_packed_alone_or_behind_others(pooling):
    model = make_model(pooling).eval()
    s = samples()
    with torch.no_grad():
        alone = model(collate([s[4]]), attachment=HEADS_ATTR)
        packed = model(collate([s[0], s[1], s[2], s[3], s[4]]), attachment=HEADS_ATTR)
    # s[3] is text-only: s[4] is the fourth image and the fifth text of the pack
    torch.testing.assert_close(packed.image_embeds[3], alone.image_embeds[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.text_embeds[4], alone.text_embeds[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.label_logits[3], alone.label_logits[0], atol=1e-5, rtol=1e-4)


def test_pack_rows_pair_single_image_captions_and_skip_text_only_and_two_image_samples():
    pack = collate(list(samples()))
    owner = image_samples(pack.input_ids, pack.sample_index, IMAGE_PAD)
    assert owner.tolist() == [0, 1, 2, 4, 5, 6, 6, 7, 8, 9]  # sample 3 is text-only, sample 6 has two images
    rows = pack_rows(pack, IMAGE_PAD, vocabulary())
    assert rows.pair_images.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert rows.pair_texts.tolist() == [0, 1, 2, 4, 5, 7, 8, 9]  # every sample has text
    assert rows.label_images.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    # sample 1: "a blue ring and a green square"
    assert [LABELS[k] for k in torch.nonzero(rows.label_targets[1]).flatten()] == ["blue", "green", "square", "ring"]


def test_labels_come_from_the_json_list_else_from_whole_words_of_the_caption():
    vocab = LabelVocabulary(["red", "ring", "blue"])
    assert vocab.of({"task": "caption", "answer": "a Red ring and a redder square"}) == [0, 1]
    assert vocab.of({"task": "caption", "answer": "a blue", "labels": ["ring", "unknown"]}) == [1]
    assert vocab.of({"task": "grounding", "answer": "(1,2),(3,4)"}) is None
    assert LabelVocabulary([]).of({"task": "caption", "answer": "a red ring"}) is None
    with pytest.raises(ValueError, match="duplicates"):
        LabelVocabulary(["red", "red"])


# ---- the step: micro-batches and ranks change nothing -----------------------------------------------------------


def vision_step(packs):
    train = TrainConfig(micro_batches=len(packs), grad_clip=1.0)
    engine = SingleEngine(make_model(), train, torch.device("cpu"), bf16=False)
    start_vision_stage(engine, train)
    result = vision_forward_backward(engine, packs, objective_config(), vocabulary(), IMAGE_PAD, 0, 1)
    loss, grads, extra = result.loss, engine.full_grads(), dict(result.extra)
    finish_step(engine, result, Guard(GuardConfig()), stop=False)
    return loss, grads, extra


@pytest.fixture(scope="module")
def reference():
    return vision_step(all_packs())


def assert_same(a: dict, b: dict, what: str, atol=1e-6, rtol=1e-4):
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=f"{what} {name}")


def test_the_step_loss_and_gradients_are_the_same_in_one_micro_batch_or_four(reference):
    loss, grads, extra = reference
    one_loss, one_grads, one_extra = vision_step(one_pack())
    assert one_loss == pytest.approx(loss, rel=1e-6)
    assert extra["vision/pairs"] == one_extra["vision/pairs"] == 8
    assert "vision/contrastive_loss" in extra and "vision/multilabel_loss" in extra
    assert_same(one_grads, grads, "grad")
    trained = {n.split(".")[0] for n in grads}
    assert trained == {"vision", "vision_heads"}  # the LLM and the projector do not train in a vision stage
    assert grads["vision_heads.logit_scale"].abs() > 0 and grads["vision.blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_the_llm_as_text_tower_trains_when_the_stage_names_it():
    train = TrainConfig(micro_batches=2, grad_clip=1.0)
    engine = SingleEngine(make_model(text_tower="llm"), train, torch.device("cpu"), bf16=False)
    stage = StageConfig(name="vision", kind="vision", steps=1, trainable=["vision.*", "llm.*"])
    kind = stage_kind("vision", Config(vision_pretrain=objective_config(text_tower="llm")))
    kind.check_stage(stage, "curriculum.stages.0 (vision)", engine.model)
    engine.start_stage(lambda m: (kind.set_trainable(m, stage), param_groups(m, stage, {}, train))[1], 0)
    engine.set_lrs({g["name"]: 1e-3 for g in engine.param_groups()})
    cfg = objective_config(text_tower="llm")
    result = vision_forward_backward(engine, all_packs()[:2], cfg, vocabulary(), IMAGE_PAD, 0, 1)
    grads = engine.full_grads()
    assert math.isfinite(result.loss) and "vision_heads.text.embed_tokens.weight" not in grads
    assert grads["llm.layers.0.mlp.gate_proj.weight"].abs().sum() > 0  # the LLM embeds the captions
    assert not any(name.startswith("projector.") for name in grads)


def test_the_step_loss_is_the_objective_of_all_pairs_at_once(reference):
    """The step's loss equals SigLIP + 0.5 x multi-label computed directly over every pair of the step."""
    model = make_model().eval()
    images, texts, logits, targets = [], [], [], []
    with torch.no_grad():
        for pack in all_packs():
            rows = pack_rows(pack, IMAGE_PAD, vocabulary())
            out = model(pack, attachment=HEADS_ATTR)
            images.append(out.image_embeds[rows.pair_images])
            texts.append(out.text_embeds[rows.pair_texts])
            logits.append(out.label_logits[rows.label_images])
            targets.append(rows.label_targets)
        scale, bias = model.vision_heads.logit_scale, model.vision_heads.logit_bias
        expected = sigmoid_contrastive_loss(torch.cat(images), torch.cat(texts), scale, bias)
        expected = expected + 0.5 * multilabel_loss(torch.cat(logits), torch.cat(targets))
    assert reference[0] == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.slow
def test_deepspeed_zero_0_to_3_on_two_ranks_match_one_rank(reference, tmp_path):
    """2 ranks x 2 micro-batches; the negatives of each rank's images include the other rank's texts."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(HERE / "vision_worker.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(tmp_path), "0", "1", "2", "3"], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    loss, grads, _ = reference
    for stage in range(4):
        saved = load_file(str(tmp_path / f"zero{stage}.safetensors"))
        assert float(saved["loss"][0]) == pytest.approx(loss, rel=1e-5), stage
        ds_grads = {k[len("grad/") :]: v for k, v in saved.items() if k.startswith("grad/")}
        assert_same(ds_grads, grads, f"ZeRO-{stage} grad", atol=1e-5, rtol=1e-3)


# ---- the run --------------------------------------------------------------------------------------------------------

VISION_RUN = [
    *SMALL_DATA,
    "curriculum=vision_pretrain",
    "curriculum.stages.0.steps=3",
    "curriculum.stages.1.steps=1",
    "curriculum.stages.2.steps=1",
    "model.llm.num_layers=1",
    "eval.num_caption=8",
    "eval.num_grounding=0",
    "eval.num_loss=0",
    "logger.console_interval=100",
]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_pretrains_the_tower_then_the_vlm_starts_from_it(tmp_path):
    first = [*VISION_RUN, "curriculum.stages.0.steps=2"]
    cfg = make_config(f"run.dir={tmp_path}", *first, "train.exit_at_step=2")
    torch.manual_seed(cfg.run.seed)  # the run's initial weights, as the trainer draws them
    initial = build_model(cfg.model, build_data(cfg.data, cfg.model), vision_pretrain=cfg.vision_pretrain).state_dict()
    assert run(cfg) == {"steps": 2, "stopped": "exit_at_step"}
    after_vision = tmp_path / "checkpoints" / "step_00000002"
    vlm = load_file(str(after_vision / "model.safetensors"))
    heads = load_file(str(after_vision / "vision_heads.safetensors"))
    assert not any(k.startswith("vision_heads") for k in vlm) and "logit_scale" in heads and "text.norm.weight" in heads
    for name, weight in vlm.items():  # the vision stage trained the tower alone
        assert torch.equal(weight, initial[name]) != name.startswith("vision."), name

    summary = run(make_config(f"run.dir={tmp_path}", *first))  # resumes into the VLM stages
    rows = rows_of(tmp_path)
    assert [r["stage"] for r in rows] == ["vision", "vision", "align", "full"]
    assert "vision/contrastive_loss" in rows[0] and "vision/multilabel_loss" in rows[0]
    assert "vision/heldout_retrieval_top1" in rows[1] and "vision/heldout_label_acc/red" in rows[1]
    final = tmp_path / "checkpoints" / f"step_{summary['steps']:08d}"
    torch.testing.assert_close(load_file(str(final / "vision_heads.safetensors")), heads)  # frozen after its stage

    # model.init_vision_from: a new run's tower is that checkpoint's; a tower of another shape is a clear error
    cfg = make_config(
        f"run.dir={tmp_path / 'next'}", "model.llm.num_layers=1", f"model.init_vision_from={after_vision}"
    )
    model = build_model(cfg.model, build_data(cfg.data, cfg.model))
    for name, weight in model.vision.state_dict().items():
        torch.testing.assert_close(weight, vlm[f"vision.{name}"])
    cfg.model.vision.hidden_size = 128
    with pytest.raises(ValueError, match="init_vision_from=.*does not fit model.vision"):
        build_model(cfg.model, build_data(cfg.data, cfg.model))


def test_a_vision_stage_resumes_exactly(tmp_path):
    common = [*VISION_RUN, "curriculum.stages.0.steps=4", "eval.enabled=false", "data.num_workers=0"]
    run(make_config(f"run.dir={tmp_path / 'whole'}", *common))
    stopped = run(make_config(f"run.dir={tmp_path / 'parts'}", *common, "train.exit_at_step=2"))
    assert stopped["stopped"] == "exit_at_step"
    run(make_config(f"run.dir={tmp_path / 'parts'}", *common))
    whole = {r["step"]: r["loss"] for r in rows_of(tmp_path / "whole")}
    parts = {r["step"]: r["loss"] for r in rows_of(tmp_path / "parts")}
    assert parts == whole and len(whole) == 6


def test_injected_faults_skip_vision_steps_as_they_skip_vlm_steps(tmp_path):
    # A NaN loss at step 1 and an inf gradient at step 2, both in the vision stage: each update is skipped (the tower
    # and heads keep their weights through those steps) and counted by reason; step 3 trains again.
    faults = ["train.fault.nan_loss_at_steps=[1]", "train.fault.inf_grad_at_steps=[2]", "eval.enabled=false"]
    cfg = make_config(f"run.dir={tmp_path}", *VISION_RUN, *faults, "train.exit_at_step=2", "checkpoint.keep_last=0")
    torch.manual_seed(cfg.run.seed)  # the run's initial weights, as the trainer draws them
    initial = build_model(cfg.model, build_data(cfg.data, cfg.model), vision_pretrain=cfg.vision_pretrain).state_dict()
    run(cfg)
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    for name, weight in saved.items():
        assert torch.equal(weight, initial[name]), name
    summary = run(make_config(f"run.dir={tmp_path}", *VISION_RUN, *faults))
    rows = rows_of(tmp_path)
    assert [r["skipped_step"] for r in rows[:3]] == [1, 1, 0] and rows[0]["stage"] == "vision"
    assert rows[1]["skipped_steps/nonfinite_loss"] == 1 and rows[1]["skipped_steps/nonfinite_grad_norm"] == 1
    assert summary["skipped_steps"] == 2


def test_vision_stage_config_errors_name_what_to_fix(tmp_path):
    with pytest.raises(
        ValueError, match=r"vision stage runs \['vision.\*'\].*also matches \['llm.\*', 'projector.\*'\]"
    ):
        run(make_config(f"run.dir={tmp_path}", *VISION_RUN, "curriculum.stages.0.trainable=[*]"))
    with pytest.raises(ValueError, match="multilabel_weight > 0 needs a label vocabulary"):
        run(make_config(f"run.dir={tmp_path}", *VISION_RUN, "vision_pretrain.labels=[]"))
    with pytest.raises(ValueError, match="kind 'visual' is not one of"):
        run(make_config(f"run.dir={tmp_path}", *VISION_RUN, "curriculum.stages.0.kind=visual"))
