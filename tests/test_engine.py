"""Engines: the step loss and gradients do not depend on how a step's samples are split over micro-batches and
ranks, for the single engine and real DeepSpeed ZeRO 0-3 under torchrun (2 processes, gloo, CPU); one rank gets
only text-only packs (modality skew), which must neither hang ZeRO-3 nor change the vision gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_train.train.config import EngineConfig, GuardConfig, TrainConfig
from vlm_train.train.distributed import DistInfo
from vlm_train.train.engines import SingleEngine, build_engine
from vlm_train.train.guards import Guard
from vlm_train.train.step import finish_step, forward_backward

from engine_cases import LOSS, all_packs, make_model, one_pack, start_full_stage

HERE = Path(__file__).parent


def single_step(packs):
    """(loss, reduced grads, grad norm, weights after the update) of one single-engine step over `packs`."""
    train = TrainConfig(micro_batches=len(packs), grad_clip=1.0)
    engine = SingleEngine(make_model(), train, torch.device("cpu"), bf16=False)
    start_full_stage(engine, train)
    result = forward_backward(engine, packs, LOSS)
    loss, grads = result.loss, engine.full_grads()
    result = finish_step(engine, result, Guard(GuardConfig()), stop=False)
    weights = {k: v.detach().clone() for k, v in engine.model.named_parameters()}
    return loss, grads, result.grad_norm, weights


def assert_same(a: dict, b: dict, what: str, atol=1e-6, rtol=1e-4):
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=f"{what} {name}")


@pytest.fixture(scope="module")
def reference():
    return single_step(all_packs())


def test_one_micro_batch_equals_four(reference):
    loss, grads, norm, _ = reference
    loss_one, grads_one, norm_one, _ = single_step(one_pack())
    assert loss_one == pytest.approx(loss, rel=1e-6)
    assert norm_one == pytest.approx(norm, rel=1e-5)
    assert any(n.startswith("vision.") and g.abs().sum() > 0 for n, g in grads.items())
    assert_same(grads_one, grads, "grad")


@pytest.mark.slow
def test_deepspeed_zero_0_to_3_on_two_ranks_match_one_rank(reference, tmp_path):
    """2 ranks x 2 micro-batches, rank 1 text-only, for ZeRO 0-3 in one torchrun launch."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(HERE / "engine_worker.py"),
        str(tmp_path),
        "0",
        "1",
        "2",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    loss, grads, norm, weights = reference
    for stage in range(4):
        out = load_file(str(tmp_path / f"zero{stage}.safetensors"))
        ds_loss, ds_step_loss, ds_norm = out["loss"].tolist()
        assert ds_loss == pytest.approx(loss, rel=1e-6) and ds_step_loss == pytest.approx(loss, rel=1e-6), stage
        assert ds_norm == pytest.approx(norm, rel=1e-5), stage
        ds_grads = {k[len("grad/") :]: v for k, v in out.items() if k.startswith("grad/")}
        assert_same(ds_grads, grads, f"ZeRO-{stage} grad")
        ds_weights = {k[len("weight/") :]: v for k, v in out.items() if k.startswith("weight/")}
        # Adam's first update is lr * g / (|g| + eps): where |g| is within fp32 noise of eps (patch-embedding
        # columns of near-constant pixels), the summation order (ranks, threads) decides its size. Compare the
        # well-conditioned entries tightly, and bound the rest by one learning-rate step.
        assert ds_weights.keys() == weights.keys()
        for name, weight in ds_weights.items():
            conditioned = grads[name].abs() > 1e-6
            torch.testing.assert_close(
                weight[conditioned],
                weights[name][conditioned],
                atol=2e-5,
                rtol=0,
                msg=f"ZeRO-{stage} weight after the step {name}",
            )
            assert (weight - weights[name]).abs().max() <= 1e-3 * (1 + 1e-3), f"ZeRO-{stage} {name}"


def test_single_engine_refuses_several_ranks_and_unknown_engines_are_named():
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="one process"):
        build_engine(EngineConfig(name="single"), TrainConfig(), make_model(), make_model, cpu, DistInfo(0, 2))
    with pytest.raises(ValueError, match="engine.name"):
        build_engine(EngineConfig(name="fsdp"), TrainConfig(), make_model(), make_model, cpu, DistInfo())
    with pytest.raises(ValueError, match="engine.bf16 must be auto, true or false"):
        build_engine(EngineConfig(name="single", bf16="yes"), TrainConfig(), make_model(), make_model, cpu, DistInfo())
