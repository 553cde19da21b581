"""tools/seed_table.py: each run of a checkout's copy with a fresh data cache, its wall time and held-out score, and
the summary per code."""

from __future__ import annotations

import json

from tools import seed_table

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


def test_a_seed_table_runs_a_copy_of_the_checkout_per_seed_and_summarises(tmp_path, capsys):
    assert seed_table.main(["--seeds", "3", "--code", "here=.", "--out", str(tmp_path), "--", *TINY]) == 0
    printed = capsys.readouterr().out
    row = json.loads(printed.splitlines()[0])
    assert row["code"] == "here" and row["seed"] == 3 and row["steps"] == 4 and row["wall_s"] >= row["train_s"] > 0
    assert 0.0 <= row["heldout_exact_match"] <= 1.0
    summary = json.loads(printed[printed.index("\n{") :])["summary"]["here"]
    assert summary["median_wall_s"] == row["wall_s"] and summary["heldout_exact_match"] == [row["heldout_exact_match"]]
    # the run used the copy (with its configs inside the package) and trained the seed it was given
    assert (tmp_path / "code" / "here" / "vlm_train" / "conf" / "config.yaml").is_file()
    assert "seed: 3" in (tmp_path / "runs" / "here_seed3" / "config.yaml").read_text()
