"""tools/seed_table.py: each run of a checkout's copy with a fresh data cache, its wall time and held-out score, and
the summary per code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tools import seed_table

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "curriculum.stages.0.steps=2",
    "curriculum.stages.1.steps=2",
    "data.synthetic.num_train_images=60",
    "data.synthetic.num_heldout_images=10",
    "data.synthetic.images_per_shard=30",
    "eval.num_caption=3",
    "eval.num_grounding=0",
    "eval.num_loss=4",
    "eval.max_new_tokens=4",
]


def test_a_seed_table_runs_a_copy_of_the_checkout_per_seed_and_summarises(tmp_path, capsys, monkeypatch):
    # A checkout that differs from this one (its first stage renamed), the table started from this one's root: the
    # run must take the checkout's code and configs, not those of the folder it was started in.
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "vlm_train", checkout / "vlm_train", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", checkout / "conf")
    curriculum = checkout / "conf" / "curriculum" / "default.yaml"
    curriculum.write_text(curriculum.read_text().replace("name: align", "name: align_of_the_checkout"))
    monkeypatch.chdir(ROOT)
    out = tmp_path / "table"
    assert seed_table.main(["--seeds", "3", "--code", f"here={checkout}", "--out", str(out), "--", *TINY]) == 0
    printed = capsys.readouterr().out
    row = json.loads(printed.splitlines()[0])
    assert row["code"] == "here" and row["seed"] == 3 and row["steps"] == 4 and row["wall_s"] >= row["train_s"] > 0
    assert 0.0 <= row["heldout_exact_match"] <= 1.0
    summary = json.loads(printed[printed.index("\n{") :])["summary"]["here"]
    assert summary["median_wall_s"] == row["wall_s"] and summary["heldout_exact_match"] == [row["heldout_exact_match"]]
    # the run used the copy (with its configs inside the package) and trained the seed it was given
    assert (out / "code" / "here" / "vlm_train" / "conf" / "config.yaml").is_file()
    run = out / "runs" / "here_seed3"
    assert "seed: 3" in (run / "config.yaml").read_text()
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages[0] == "align_of_the_checkout"
