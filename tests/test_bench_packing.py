"""tools/bench_packing.py: one JSON object with a packing summary per buffer, from the seeded realistic mix."""

from __future__ import annotations

import json

from tools import bench_packing


def test_sweeps_buffers_and_larger_buffers_fill_at_least_as_well(capsys):
    assert bench_packing.main(["--samples", "3000", "--buffers", "8", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["buffers"]) == {"8", "256"}
    small, large = out["buffers"]["8"], out["buffers"]["256"]
    for run in (small, large):
        assert run["samples"] + run["dropped"] == 3000
        assert 0 < run["efficiency"] <= 1 and run["packs"] >= run["lower_bound_packs"]
    assert large["efficiency"] >= small["efficiency"] - 1e-3


def test_bad_arguments_are_refused(capsys):
    assert bench_packing.main(["--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err
