"""engine=fsdp2 (PyTorch FSDP2 under torchrun, gloo on the CPU): the model built on the meta device, gradients
summed exactly as one process sums them (a reduction that averages, or gloo's AVG that sums, fails here), and
sharded checkpoints that load at any world size, bit for bit, with nothing pickled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_engine import assert_same, single_step

from vlm_train.model.row_shards import local_part, row_range
from vlm_train.train.engines.shards import Piece, ShardedTensors, save_pieces, write_safetensors_streaming

from conftest import SMALL_DATA, make_config
from engine_cases import all_packs, make_model

HERE = Path(__file__).parent


def torchrun(nproc: int, *args: str, fails: bool = False) -> str:
    """tests/fsdp2_worker.py under torchrun; its output. It must succeed, or with `fails`, fail."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        str(HERE / "fsdp2_worker.py"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)
    assert (result.returncode != 0) == fails, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> Path:
    """The weights both the single engine and fsdp2 start from (fsdp2 streams them into its shards)."""
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_file({k: v.detach().clone() for k, v in make_model().named_parameters()}, str(path))
    return path


# ---- row shards, without processes ------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,world", [(5, 4), (8, 3), (1, 2), (0, 2), (7, 1)])
def test_row_ranges_tile_the_rows_like_torch_chunk(rows, world):
    value = torch.arange(rows * 2).reshape(rows, 2)
    parts = [local_part(value, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), value)
    chunks = torch.chunk(value, world) if rows else ()
    for r, chunk in enumerate(chunks):  # FSDP2 shards as torch.chunk does
        assert torch.equal(parts[r], chunk) and row_range(rows, r, world)[0] == r * chunks[0].shape[0]


def test_shards_saved_by_two_ranks_read_back_whole_and_a_missing_or_partial_one_is_named(tmp_path):
    whole = {"w": torch.randn(5, 3), "b": torch.randn(4), "step": torch.tensor(3.0)}
    for rank in range(2):
        pieces = [
            Piece(n, local_part(v, rank, 2), row_range(v.shape[0], rank, 2)[0] if v.dim() else 0, tuple(v.shape))
            for n, v in whole.items()
        ]
        save_pieces(tmp_path, "model", rank, 2, pieces)
    shards = ShardedTensors(tmp_path, "model")
    assert shards.saved_world_size == 2 and all(torch.equal(shards.whole(n), v) for n, v in whole.items())
    assert torch.equal(shards.rows("w", 2, 3), local_part(whole["w"], 2, 3))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        shards.whole("nope")
    (tmp_path / "model_rank00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"rank\(s\) \[1\] are missing: 2 rank\(s\) saved it, 1 file"):
        ShardedTensors(tmp_path, "model")
    (tmp_path / "model_rank00000.safetensors").rename(tmp_path / "model_rank00001.safetensors")
    with pytest.raises(FileNotFoundError, match=r"rank\(s\) \[0\] are missing"):
        ShardedTensors(tmp_path, "model")


def test_pieces_that_do_not_tile_a_tensor_are_named(tmp_path):
    whole = torch.randn(5, 3)
    save_pieces(tmp_path, "model", 0, 2, [Piece("w", whole[:3], 0, (5, 3))])
    save_pieces(tmp_path, "model", 1, 2, [Piece("w", whole[3:], 2, (5, 3))])  # rows 2..4 where 3..4 belong
    with pytest.raises(ValueError, match=r"shards of 'w' do not tile its shape \[5, 3\]"):
        ShardedTensors(tmp_path, "model").whole("w")
    save_pieces(tmp_path, "model", 1, 2, [Piece("w", whole[3:4], 3, (5, 3))])  # row 4 lost
    with pytest.raises(ValueError, match="cover 4 of its 5 rows"):
        ShardedTensors(tmp_path, "model").whole("w")
    with pytest.raises(ValueError, match=r"do not hold rows 4\.\.5 of its shape \[5, 3\]"):
        ShardedTensors(tmp_path, "model").rows("w", 1, 2)
    assert torch.equal(ShardedTensors(tmp_path, "model").rows("w", 0, 3), whole[:2])  # read across no gap


def test_a_streamed_safetensors_file_equals_one_written_at_once(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2).bfloat16(), "d": torch.tensor(2.5)}
    path = write_safetensors_streaming(
        tmp_path / "x.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], tensors.__getitem__
    )
    read = load_file(str(path))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".tmp-*"))


# ---- under torchrun ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("reshard", ["1", "0"])
def test_fsdp2_on_two_ranks_matches_one_process(initial, tmp_path, reshard):
    """2 ranks x 2 micro-batches (rank 1 text-only), built on meta, initial weights streamed into the shards: the
    loss, every reduced gradient (a wrong reduction scale fails here), the norm and the updated weights equal one
    process's."""
    torchrun(2, "step", str(tmp_path), str(initial), reshard)
    loss, grads, norm, weights = single_step(all_packs())
    out = load_file(str(tmp_path / "fsdp2.safetensors"))
    fsdp_loss, step_loss, fsdp_norm = out["loss"].tolist()
    assert fsdp_loss == pytest.approx(loss, rel=1e-6) and step_loss == pytest.approx(loss, rel=1e-6)
    assert fsdp_norm == pytest.approx(norm, rel=1e-5)
    assert_same({k[5:]: v for k, v in out.items() if k.startswith("grad/")}, grads, "fsdp2 grad")
    got = {k[7:]: v for k, v in out.items() if k.startswith("weight/")}
    assert got.keys() == weights.keys()
    for name, weight in got.items():  # as test_engine: well-conditioned entries tightly, the rest within one lr step
        conditioned = grads[name].abs() > 1e-6
        torch.testing.assert_close(weight[conditioned], weights[name][conditioned], atol=2e-5, rtol=0, msg=name)
        assert (weight - weights[name]).abs().max() <= 1e-3 * (1 + 1e-3), name


@pytest.mark.slow
def test_sharded_checkpoints_reshard_2_to_1_and_3_and_1_to_2_bit_for_bit(initial, tmp_path):
    saved2, saved1 = tmp_path / "by2", tmp_path / "by1"
    for folder in (saved2, saved1):
        folder.mkdir()
    torchrun(2, "save", str(saved2), str(initial))
    torchrun(1, "save", str(saved1), str(initial))
    for source, ranks in ((saved2, 1), (saved2, 3), (saved1, 2)):
        target = tmp_path / f"{source.name}_to{ranks}"
        target.mkdir()
        torchrun(ranks, "reshard", str(source), str(target))
        assert json.loads((target / "shards.json").read_text())["world_size"] == ranks
        for prefix in ("model", "optimizer"):
            before, after = ShardedTensors(source, prefix), ShardedTensors(target, prefix)
            assert after.saved_world_size == ranks and sorted(before.names()) == sorted(after.names())
            for name in before.names():
                assert torch.equal(before.whole(name), after.whole(name)), (source.name, ranks, name)
        # Adam's moments are there (a step was taken), and every file is safetensors: nothing to unpickle.
        assert any(n.endswith("/exp_avg_sq") for n in ShardedTensors(target, "optimizer").names())
        assert {p.suffix for p in target.iterdir()} == {".safetensors", ".json"}
        with safe_open(str(target / "model_rank00000.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["pieces"])


# ---- the trainer under torchrun -------------------------------------------------------------------------------------

RUN = [
    *SMALL_DATA,
    "curriculum.stages.0.steps=3",
    "curriculum.stages.1.steps=3",
    "eval.num_caption=4",
    "eval.num_grounding=4",
    "eval.max_new_tokens=8",
    "model.llm.num_layers=1",
    "model.vision.depth=1",
    "data.pack.llm_budget=512",
]


def train(nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "vlm_train.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *RUN, *overrides], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_a_stopped_fsdp2_run_resumes_exactly_and_skips_a_bad_step_on_every_rank(tmp_path):
    fault = ["engine=fsdp2", "train.fault.inf_grad_at_steps=[4]", "train.fault.inf_grad_rank=0"]
    train(2, *fault, f"run.dir={tmp_path / 'whole'}")
    train(2, *fault, f"run.dir={tmp_path / 'parts'}", "train.exit_at_step=4")  # inside stage 2: its optimizer
    folder = tmp_path / "parts" / "checkpoints" / "step_00000004"
    assert {p.name for p in folder.glob("*_rank*")} >= {
        f"{part}_rank{r:05d}.safetensors" for part in ("model", "optimizer") for r in (0, 1)
    }
    assert not (folder / "model.safetensors").exists()  # whole weights only at the end of a run, or on request
    train(2, *fault, f"run.dir={tmp_path / 'parts'}")
    expected = losses(tmp_path / "whole")
    assert len(expected) == 6 and losses(tmp_path / "parts") == expected
    assert [r["skipped_step"] for r in metrics(tmp_path / "whole")] == [0, 0, 0, 1, 0, 0]
    final = tmp_path / "whole" / "checkpoints" / "step_00000006"
    assert (final / "model.safetensors").is_file()  # consolidated at the end, by streaming the shards
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["steps"] == 6 and "heldout_exact_match" in summary  # evaluation runs on the sharded model


@pytest.mark.slow
def test_fsdp2_resumes_on_other_world_sizes_and_its_weights_load_for_inference(tmp_path):
    run_dir = tmp_path / "run"
    train(2, "engine=fsdp2", f"run.dir={run_dir}", "train.exit_at_step=2")
    train(3, "engine=fsdp2", f"run.dir={run_dir}", "train.exit_at_step=4")  # 2 -> 3, across the stage change
    result = train(1, "engine=fsdp2", f"run.dir={run_dir}")  # 3 -> 1
    assert "re-dealt to 1" in result.stdout + result.stderr
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] and r["loss"] < 20 for r in rows if "loss" in r)
    from vlm_train.inference import load

    final = run_dir / "checkpoints" / "step_00000006"
    model = load(final).model
    shards = ShardedTensors(final, "model")
    for name, weight in model.named_parameters():
        assert torch.equal(weight.detach(), shards.whole(name)), name


@pytest.mark.slow
def test_twelve_steps_of_fsdp2_equal_deepspeed_zero2_on_the_same_two_ranks(tmp_path):
    """Both engines start from the same weights (a weights-only checkpoint) and read the same packs."""
    from safetensors.torch import save_model

    from vlm_train.train.builders import build_data, build_model

    cfg = make_config(*RUN)
    start = tmp_path / "start"
    start.mkdir()
    save_model(build_model(cfg.model, build_data(cfg.data, cfg.model)), str(start / "model.safetensors"))
    twelve = [
        "curriculum.stages.0.steps=4",
        "curriculum.stages.1.steps=8",
        f"train.resume={start}",
        "eval.enabled=false",
    ]
    train(2, "engine=fsdp2", f"run.dir={tmp_path / 'fsdp2'}", *twelve)
    train(2, "engine=deepspeed", "engine.zero_stage=2", f"run.dir={tmp_path / 'zero2'}", *twelve)
    ours, theirs = losses(tmp_path / "fsdp2"), losses(tmp_path / "zero2")
    assert len(ours) == 12
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    print(f"largest relative loss difference over 12 steps: {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.slow
def test_a_damaged_sharded_checkpoint_names_the_missing_shard_or_the_tensor_and_both_shapes(initial, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    torchrun(2, "save", str(saved), str(initial))
    shards = ShardedTensors(saved, "model")
    name = "llm.norm.weight"

    def rank_pieces(rank: int) -> list[Piece]:
        return [
            Piece(n, shards.rows(n, rank, 2), row_range(shards.shape(n)[0], rank, 2)[0], shards.shape(n))
            for n in shards.names()
            if not (rank == 0 and n == name)
        ]

    # The same checkpoint, but rank 0 holds a tensor of another shape: what a checkpoint of another model holds.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for file in saved.iterdir():
        (wrong / file.name).write_bytes(file.read_bytes())
    save_pieces(wrong, "model", 0, 2, [*rank_pieces(0), Piece(name, torch.ones(2), 0, (3,))])
    save_pieces(wrong, "model", 1, 2, rank_pieces(1))
    failed = torchrun(1, "reshard", str(wrong), str(tmp_path / "out"), fails=True)
    assert f"tensor '{name}' has shape [3] there, [{shards.shape(name)[0]}] in the model" in failed
    (saved / "model_rank00001.safetensors").unlink()
    failed = torchrun(1, "reshard", str(saved), str(tmp_path / "out"), fails=True)
    assert "model shards of rank(s) [1] are missing" in failed and str(saved) in failed
