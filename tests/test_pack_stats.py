"""tools/pack_stats.py: the realistic mix, packing figures from a lengths file and from real shards, the plot."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tools import pack_stats
from tools.pack_mix import make_mix

REQUIRED = {"efficiency", "vit_efficiency", "packs", "samples", "dropped"}


def _run(capsys, *argv: str) -> dict:
    assert pack_stats.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_mix_is_seeded_and_holds_every_kind(tmp_path, capsys):
    path = tmp_path / "mix.jsonl"
    assert pack_stats.main(["--make-mix", str(path), "--samples", "3000", "--seed", "1"]) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == make_mix(3000, 1) and records != make_mix(3000, 2)
    kinds = {r["kind"] for r in records}
    assert kinds == {"caption", "conversation", "text"}
    for r in records:
        assert (r["vit_patches"] == 0) == (r["kind"] == "text") and r["images"] <= 3
        # Qwen2-VL geometry: four ViT patches per image token, so the image tokens fit inside the sample.
        assert r["vit_patches"] % 4 == 0 and r["vit_patches"] // 4 < r["llm_tokens"]
        # Per image, its patch grid (for FLOPs: attention per image and window); the learnt tokens.
        assert len(r["grids"]) == r["images"] and sum(t * h * w for t, h, w in r["grids"]) == r["vit_patches"]
        assert all(t == 1 and h % 2 == w % 2 == 0 for t, h, w in r["grids"])
        assert 0 < r["supervised"] <= r["llm_tokens"] and (r["supervised"] == r["llm_tokens"]) == (r["kind"] == "text")
    assert any(r["llm_tokens"] > 8192 for r in records)  # some long documents exceed an 8k budget


def test_lengths_file_gives_the_figures_and_fills_packs(tmp_path, capsys):
    path = tmp_path / "mix.jsonl"
    pack_stats.main(["--make-mix", str(path), "--samples", "4000", "--seed", "0"])
    capsys.readouterr()
    stats = _run(capsys, "--lengths", str(path), "--llm-budget", "8192", "--vit-budget", "32768", "--buffer", "256")
    assert set(stats) >= REQUIRED
    records = make_mix(4000, 0)
    assert stats["samples"] + stats["dropped"] == 4000
    assert stats["dropped"] == sum(r["llm_tokens"] > 8192 for r in records)
    packed_tokens = sum(r["llm_tokens"] for r in records if r["llm_tokens"] <= 8192)
    assert stats["efficiency"] == pytest.approx(packed_tokens / (stats["packs"] * 8192))
    assert stats["efficiency"] > 0.99 and stats["lower_bound_packs"] <= stats["packs"]
    tight = _run(capsys, "--lengths", str(path), "--vit-budget", "8192", "--max-images", "4", "--buffer", "64")
    assert tight["vit_efficiency"] > stats["vit_efficiency"] and tight["dropped"] > stats["dropped"]


def test_bad_lengths_are_named_by_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"llm_tokens": 10, "vit_patches": 0}\n{"llm_tokens": "many"}\n')
    assert pack_stats.main(["--lengths", str(path)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pack_stats.main(["--lengths", str(path), "--too-long", "truncate"])
    with pytest.raises(SystemExit) as done:
        pack_stats.main(["--help"])
    assert done.value.code == 0


def test_runs_as_a_script_from_any_folder(tmp_path):
    script = Path(pack_stats.__file__).resolve()
    done = subprocess.run(
        [sys.executable, str(script), "--make-mix", "mix.jsonl", "--samples", "50"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "mix.jsonl").read_text().splitlines()) == 50


def test_plot_draws_the_fill_histograms(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_mix(500, 0)))
    image = tmp_path / "fill.png"
    _run(capsys, "--lengths", str(path), "--buffer", "32", "--plot", str(image))
    assert Image.open(image).size[0] > 100


def _png(seed: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, 56), (seed * 40 % 255, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_real_shards_are_encoded_and_packed(tmp_path, capsys):
    urls = []
    for s in range(2):
        urls.append(str(tmp_path / f"shard-{s}.tar"))
        with wds.TarWriter(urls[-1]) as writer:
            for i in range(20):
                words = "a red circle " * (1 + i % 5 + 200 * (i == 7))  # one caption far over the budget
                writer.write({"__key__": f"s{s}i{i}", "png": _png(i, 56 + 28 * (i % 4)), "txt": words})
    pattern = str(tmp_path / "shard-{0..1}.tar")
    stats = _run(capsys, "--shards", pattern, "--llm-budget", "128", "--vit-budget", "1024", "--buffer", "8")
    assert stats["samples"] + stats["dropped"] == 40 and stats["dropped_by_reason"] == {"too_long": 2}
    assert stats["encode_ms_per_pack"] > 0 and stats["efficiency"] > 0.5
    truncated = _run(
        capsys,
        "--shards",
        pattern,
        "--llm-budget",
        "128",
        "--vit-budget",
        "1024",
        "--buffer",
        "8",
        "--too-long",
        "truncate",
    )
    assert truncated["truncated"] == 2 and truncated["samples"] == 40
