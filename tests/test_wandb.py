"""W&B as the trainer uses it, offline: one W&B run per training run (a resume continues it, a fresh start in the
same folder does not), and the dashboard's held-out examples table and pack-fill histograms, read back from the
files wandb writes."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from wandb.proto import wandb_internal_pb2 as pb

from vlm_train.data.formats import Sample, Turn
from vlm_train.data.video import Video
from vlm_train.train.config import EvalConfig, LoggerConfig
from vlm_train.train.evaluator import HeldoutEvaluator, HeldoutResult, Prediction, picture, table_rows
from vlm_train.train.metrics import EXAMPLE_COLUMNS, METRICS_FILE, MetricsLogger
from vlm_train.train.trainer import run

from conftest import SHORT_RUN, make_config
from helpers import encoder, noise_image
from tools_helpers import small_model, write_shard

EXAMPLES_KEY = "heldout/examples"


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its staging area (where logged tables wait for `wandb sync`) inside the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def wandb_logger(run_dir: Path, start_step: int = 0, config: dict[str, Any] | None = None) -> MetricsLogger:
    cfg = LoggerConfig(wandb=True, wandb_mode="offline", console_interval=1000)
    return MetricsLogger(run_dir, cfg, total_steps=10, config=config or {}, start_step=start_step)


def log_steps(logger: MetricsLogger, steps: range) -> None:
    for step in steps:
        logger.log({"step": step, "stage": "s", "loss": 1.0 / step})


def read_records(path: Path) -> list[pb.Record]:
    """A .wandb file's records: a 7-byte header, then LevelDB's log format (32 KiB blocks of chunks: CRC-32C,
    length, type FULL / FIRST / MIDDLE / LAST) holding Record protos."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    found, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def records(run_dir: Path) -> list[pb.Record]:
    """Every record of the run folder's offline W&B runs. wandb-core writes a run's file after `finish()` has
    returned, so each file is read once it holds the run's exit record."""
    found = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + 60
        file_records = read_records(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in file_records):
            assert time.monotonic() < deadline, f"{path} has no exit record"
            time.sleep(0.1)
            file_records = read_records(path)
        found += file_records
    return found


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The logged rows: {key: value}, nested keys joined by '.'."""
    rows = []
    for record in records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {".".join(item.nested_key or [item.key]): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


# ---- the W&B run's identity ------------------------------------------------------------------------------------


def test_a_resume_continues_the_wandb_run_and_a_fresh_start_in_the_same_folder_begins_another(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = wandb_logger(run_dir)
    log_steps(first, range(1, 4))
    first_id = first.wandb_run.id
    first.close()

    resumed = wandb_logger(run_dir, start_step=2, config={"train": {"resume": "auto"}})  # from a step-2 checkpoint
    log_steps(resumed, range(3, 5))
    assert resumed.wandb_run.id == first_id
    resumed.close()

    # train.resume=never in the same folder: training restarts at step 1, so its steps go to a run of their own
    # (in the old one W&B would drop every step up to 4 as going backwards).
    fresh = wandb_logger(run_dir, start_step=0, config={"train": {"resume": "never"}})
    log_steps(fresh, range(1, 3))
    assert fresh.wandb_run.id != first_id
    fresh.close()

    ids = [r.run.run_id for r in records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert sorted(ids) == sorted([first_id, first_id, fresh.wandb_run.id])
    # the next resume continues the newest run
    again = wandb_logger(run_dir, start_step=2)
    assert again.wandb_run.id == fresh.wandb_run.id
    again.close()


def test_a_resume_into_a_folder_without_a_wandb_run_starts_one(tmp_path):
    """train.resume=<another run's checkpoint> into a new folder: nothing to continue."""
    logger = wandb_logger(tmp_path, start_step=7)
    assert logger.wandb_run.id
    log_steps(logger, range(8, 9))
    logger.close()


# ---- the dashboard: held-out examples and pack fill ----------------------------------------------------------


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.asarray(noise_image(width, height, seed))


def test_examples_table_and_fill_histograms_reach_wandb_and_metrics_jsonl_stays_scalar(tmp_path):
    rows = [
        {
            "image": rgb(28, 56, 0),
            "prompt": "Describe the image.",
            "prediction": "a red square",
            "reference": "a red square",
            "correct": True,
            "task": "caption",
        },
        {
            "image": rgb(56, 28, 1),
            "prompt": "Where is the ring?",
            "prediction": "(1,2),(3,4)",
            "reference": "(100,200),(300,400)",
            "correct": False,
            "task": "grounding",
        },
        {
            "image": None,
            "prompt": "Say something.",
            "prediction": "",
            "reference": "hi",
            "correct": False,
            "task": "caption",
        },
    ]
    llm_fills, vit_fills = [0.5, 0.75, 1.0, 0.95], [0.25, 0.5, 0.5, 0.0]
    logger = wandb_logger(tmp_path)
    logger.log({"step": 1, "stage": "s", "loss": 2.0})
    logger.log_examples(2, rows)
    fills = {"packing/llm_fill_per_pack": llm_fills, "packing/vit_fill_per_pack": vit_fills}
    logger.log({"step": 2, "stage": "s", "loss": 1.5}, histograms=fills)
    logger.close()

    # metrics.jsonl: the scalars only
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [set(line) for line in lines] == [{"step", "stage", "loss"}] * 2

    # the table: an artifact of the run, its JSON and one PNG per image, staged for `wandb sync`
    tables = [r.artifact for r in records(tmp_path) if r.WhichOneof("record_type") == "artifact"]
    assert [t.type for t in tables] == ["run_table"]
    files = {entry.path: Path(entry.local_path) for entry in tables[0].manifest.contents}
    table = json.loads(files[f"{EXAMPLES_KEY}.table.json"].read_text())
    assert (
        table["columns"] == list(EXAMPLE_COLUMNS) == ["image", "prompt", "prediction", "reference", "correct", "task"]
    )
    assert [row[1:] for row in table["data"]] == [[r[c] for c in EXAMPLE_COLUMNS[1:]] for r in rows]
    for row, sent in zip(table["data"], rows):
        if sent["image"] is None:
            assert row[0] is None
            continue
        assert row[0]["_type"] == "image-file" and (row[0]["height"], row[0]["width"]) == sent["image"].shape[:2]
        stored = np.asarray(Image.open(files[row[0]["path"]]).convert("RGB"))
        assert np.array_equal(stored, sent["image"])  # PNG: the very pixels

    # the history: the table and both histograms at step 2, next to that step's scalars
    (step2,) = [row for row in history(tmp_path) if row.get("_step") == 2]
    assert step2["loss"] == 1.5 and step2[f"{EXAMPLES_KEY}._type"] == "table-file"
    assert step2[f"{EXAMPLES_KEY}.nrows"] == 3
    for name, values in fills.items():
        assert step2[f"{name}._type"] == "histogram"
        counts, edges = step2[f"{name}.values"], step2[f"{name}.bins"]
        assert sum(counts) == len(values) and edges[0] == 0.0 and edges[-1] == 1.0
        assert counts == np.histogram(values, bins=len(counts), range=(0.0, 1.0))[0].tolist()


def test_no_wandb_no_files_and_the_new_methods_are_no_ops(tmp_path):
    logger = MetricsLogger(tmp_path, LoggerConfig(wandb=False), total_steps=2, config={})
    logger.log_examples(1, [{"image": None, "prompt": "", "prediction": "", "reference": "", "correct": True}])
    logger.log({"step": 1, "stage": "s", "loss": 1.0}, histograms={"packing/llm_fill_per_pack": [0.5]})
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


# ---- the evaluator's pictures and rows --------------------------------------------------------------------------


def video(frames: int, height: int, width: int) -> Video:
    clip = np.stack([rgb(height, width, seed) for seed in range(frames)])
    return Video(clip, 2.0, [i / 2 for i in range(frames)])


def test_picture_is_the_image_or_a_strip_of_the_video_frames():
    image = noise_image(56, 28, 0)
    turns = [Turn("user", "<image>Describe."), Turn("assistant", "x")]
    assert np.array_equal(picture(Sample("a", "s", "caption", [image], turns)), np.asarray(image))

    clip = video(4, 28, 42)
    strip = picture(Sample("v", "s", "caption", [], turns, videos=[clip]))
    assert strip.dtype == np.uint8 and strip.shape == (28, 4 * 42, 3)
    assert np.array_equal(strip[:, 42:84], clip.frames[1])  # frames left to right in time

    long_clip = video(40, 28, 28)  # a long video shows evenly spaced frames
    strip = picture(Sample("v", "s", "caption", [], turns, videos=[long_clip]), max_tiles=8)
    assert strip.shape == (28, 8 * 28, 3)
    assert np.array_equal(strip[:, :28], long_clip.frames[0]) and np.array_equal(strip[:, -28:], long_clip.frames[-1])

    big = noise_image(1200, 900, 1)  # scaled down to the picture height, keeping its aspect
    assert picture(Sample("b", "s", "caption", [big], turns), height=150).shape == (150, 200, 3)
    assert picture(Sample("n", "s", "caption", [], turns)) is None


def test_the_evaluator_keeps_pictures_of_its_first_examples_only_and_table_rows_pair_them(tmp_path):
    shard = write_shard(
        tmp_path / "h.tar", ["a red square", "a cross", "two blue rings"], [("red square", [0.1, 0.2, 0.5, 0.6])]
    )
    cfg = EvalConfig(num_caption=3, num_grounding=1, max_new_tokens=4, num_loss=0, table_examples=2)
    evaluator = HeldoutEvaluator([shard], encoder(), cfg, 1 << 26)
    result = evaluator.evaluate(small_model(), torch.device("cpu"))
    assert len(result.predictions) == 4 and len(result.pictures) == 2
    samples = evaluator.task_samples()
    for pic, sample in zip(result.pictures, samples):
        assert np.array_equal(pic, np.asarray(sample.images[0].convert("RGB")))

    rows = table_rows(result)
    assert [r["reference"] for r in rows] == [p.expected for p in result.predictions[:2]]
    assert [r["prediction"] for r in rows] == [p.generated for p in result.predictions[:2]]
    assert [r["correct"] for r in rows] == [p.correct for p in result.predictions[:2]]
    assert all("<image>" not in r["prompt"] and r["prompt"] for r in rows)
    assert rows[0]["image"] is result.pictures[0]

    off = HeldoutEvaluator(
        [shard],
        encoder(),
        EvalConfig(num_caption=1, num_grounding=0, num_loss=0, max_new_tokens=2, table_examples=0),
        1 << 26,
    )
    assert table_rows(off.evaluate(small_model(), torch.device("cpu"))) == []


def test_table_rows_of_a_result_without_pictures_are_empty():
    prediction = Prediction("k", "caption", "28x28 px", "<image>Describe.", "a", "b", False)
    assert table_rows(HeldoutResult({}, [prediction])) == []


def test_a_training_run_logs_the_examples_table_at_each_evaluation_and_fill_histograms_every_step(tmp_path):
    overrides = [
        *SHORT_RUN,
        "logger.wandb=true",
        "logger.wandb_mode=offline",
        "eval.interval=3",
        "eval.table_examples=3",
    ]
    summary = run(make_config(f"run.dir={tmp_path}", *overrides))
    rows = history(tmp_path)
    by_step = {row["_step"]: row for row in rows if "_step" in row}
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    for step, row in by_step.items():  # every step: its packs' fills
        assert row["packing/llm_fill_per_pack._type"] == "histogram", step
        assert sum(row["packing/llm_fill_per_pack.values"]) == 1  # one pack a step (micro_batches=1)
    evaluated = [step for step, row in by_step.items() if f"{EXAMPLES_KEY}._type" in row]
    assert evaluated == [3, 5]  # eval.interval=3, and the final evaluation at step 5
    assert by_step[5][f"{EXAMPLES_KEY}.nrows"] == 3
    tables = [r.artifact for r in records(tmp_path) if r.WhichOneof("record_type") == "artifact"]
    files = {entry.path: Path(entry.local_path) for entry in tables[-1].manifest.contents}
    table = json.loads(files[f"{EXAMPLES_KEY}.table.json"].read_text())
    predictions = [json.loads(line) for line in (tmp_path / "heldout_predictions.jsonl").read_text().splitlines()]
    assert [row[2:5] for row in table["data"]] == [
        [p["generated"], p["expected"], p["correct"]] for p in predictions[:3]
    ]
    assert all(row[0]["_type"] == "image-file" for row in table["data"])
    assert summary["heldout_exact_match"] is not None
