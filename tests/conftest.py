"""Shared fixtures: a small synthetic dataset in a per-session cache, and composed test configs."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from vlm_train.train.config import Config, register_configs

register_configs()

# Small enough that a test run takes seconds; the same folder serves every test of a session.
SMALL_DATA = [
    "data.synthetic.num_train_images=200",
    "data.synthetic.num_heldout_images=20",
    "data.synthetic.images_per_shard=50",
    "data.num_workers=0",
    "data.pack.llm_budget=1024",  # packs of the data.pack defaults: the tests need few samples a step
    "data.pack.vit_budget=4096",
]
SHORT_RUN = [
    "curriculum.stages.0.steps=2",
    "curriculum.stages.1.steps=3",
    "eval.num_caption=4",
    "eval.num_grounding=4",
    "eval.max_new_tokens=8",
]


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory) -> str:
    """Point the synthetic-dataset cache at a session temp folder (never the user's ~/.cache)."""
    path = str(tmp_path_factory.mktemp("vlm_train_cache"))
    os.environ["VLM_TRAIN_CACHE"] = path
    os.environ.setdefault("WANDB_MODE", "offline")
    return path


def make_config(*overrides: str) -> Config:
    """The composed config with the test's overrides, as typed dataclasses."""
    with initialize_config_module(config_module="vlm_train.conf", version_base=None):
        cfg = compose("config", overrides=[*SMALL_DATA, *overrides])
    return OmegaConf.to_object(cfg)


# pytest.ini's `timeout` (pytest-timeout, the dev extra) bounds every test; a `slow` test trains for real, in
# launches whose own timeouts are 600-900 s, so it gets this unless it sets its own @pytest.mark.timeout.
SLOW_TIMEOUT = 1200


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
