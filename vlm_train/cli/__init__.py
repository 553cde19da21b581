"""The command-line programs installed with the package; tools/ runs them as scripts too. Each module's
`main(argv)` parses its arguments, prints JSON (or the answer) and returns it; the vlm_* functions here are the
console scripts (a console script's return value would become the exit status, so they return nothing)."""

from __future__ import annotations

import importlib


def _run(program: str) -> None:
    importlib.import_module(f"vlm_train.cli.{program}").main()


def vlm_generate() -> None:
    """vlm-generate"""
    _run("generate")


def vlm_evaluate() -> None:
    """vlm-evaluate"""
    _run("evaluate")


def vlm_convert_hf() -> None:
    """vlm-convert-hf"""
    _run("convert_hf")


def vlm_merge_checkpoints() -> None:
    """vlm-merge-checkpoints"""
    _run("merge_checkpoints")


def vlm_make_shards() -> None:
    """vlm-make-shards"""
    _run("make_shards")


def vlm_inspect_shards() -> None:
    """vlm-inspect-shards"""
    _run("inspect_shards")


def vlm_speculate() -> None:
    """vlm-speculate"""
    _run("speculate")


def vlm_export_eagle3() -> None:
    """vlm-export-eagle3"""
    _run("export_eagle3")


def vlm_dump_hidden_states() -> None:
    """vlm-dump-hidden-states"""
    _run("dump_hidden_states")
