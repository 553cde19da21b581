"""tools/profile_step.py: a backward op is charged to the part whose forward op made its autograd node."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.profiler import record_function

from tools.profile_step import BACKWARD, PREFIX, _wrap, attribute, group_table


def test_backward_time_goes_to_the_part_that_ran_forward():
    torch.manual_seed(0)
    small, large = nn.Linear(8, 8), nn.Linear(256, 256)
    run_small, run_large = _wrap(small, "vit.mlp"), _wrap(large, "llm.mlp")
    x = torch.randn(512, 8)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu) as prof, record_function(PREFIX + "trainer"):
        hidden = run_small(x)
        out = run_large(hidden.repeat(1, 32))
        with record_function(PREFIX + BACKWARD):
            out.square().sum().backward()
    parts = attribute(list(prof.events()))
    assert parts["vit.mlp"] > 0 and parts["llm.mlp"] > 0
    assert parts["backward:vit.mlp"] > 0 and parts["backward:llm.mlp"] > 0
    # The large layer's backward (two 512x256x256 matmuls) outweighs the small one's.
    assert parts["backward:llm.mlp"] > parts["backward:vit.mlp"]
    table = group_table(parts, steps=1)
    assert {"backward: ViT rest", "backward: LLM"} <= set(table)
    assert abs(sum(row["share"] for row in table.values()) - 1) < 1e-3


def test_a_shared_module_takes_the_name_of_the_tower_around_it():
    norm = _wrap(nn.LayerNorm(8), "norm")
    block = _wrap(lambda x: norm(x) * 2, "vit.block_other")
    merger = _wrap(lambda x: norm(x) + 1, "merger")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(torch.randn(4, 8))
        merger(torch.randn(4, 8))
    parts = attribute(list(prof.events()))
    assert "vit.norm" in parts and "merger" in parts and "norm" not in parts
