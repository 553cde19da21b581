"""tools/eval_curves.py: score curves per VLM step (a vision stage's steps not counted) and per training second."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.eval_curves import main  # noqa: E402


def write_metrics(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_curves_shift_by_the_vision_stage_and_find_the_first_step_at_a_threshold(tmp_path, capsys):
    vision = [{"step": s, "stage": "vision", "step_time_s": 0.5, "vision/heldout_retrieval_top1": 0.3} for s in (1, 2)]
    vlm = [
        {"step": 3, "stage": "full", "step_time_s": 1.0, "heldout_exact_match": 0.5},
        {"step": 4, "stage": "full", "step_time_s": 1.0},
        {"step": 5, "stage": "full", "step_time_s": 1.0, "heldout_exact_match": 0.92},
    ]
    run = write_metrics(tmp_path / "run", vision + vlm)
    main([str(run), "--thresholds", "0.9", "0.95"])
    (curve,) = json.loads(capsys.readouterr().out)
    assert curve["vision_steps"] == 2 and curve["train_seconds"] == 4.0
    assert curve["points"] == [
        {"vlm_step": 1, "train_seconds": 2.0, "heldout_exact_match": 0.5},
        {"vlm_step": 3, "train_seconds": 4.0, "heldout_exact_match": 0.92},
    ]
    assert curve["first_at_or_above"] == {"0.9": {"vlm_step": 3, "train_seconds": 4.0}, "0.95": None}
