"""tools/make_shards.py, tools/inspect_shards.py and tools/bench_loader.py on small data the tests write."""

import json

import pytest

from tools import bench_loader
from vlm_train.cli import inspect_shards, make_shards
from vlm_train.data.loader import PackedStream, Source, build_loader
from vlm_train.data.sources import expand_urls

from helpers import encoder, noise_image
from test_loader import _config


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        noise_image(56 + 28 * (i % 2), 56, i).save(folder / name)


def test_llava_json_and_image_folder_become_shards_training_reads(tmp_path, capsys):
    _images(tmp_path / "img" / "coco", ["a.jpg", "b.png", "c.jpg"])
    turn = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "a red circle"}]
    records = [
        {"id": "000.a", "image": "coco/a.jpg", "conversations": turn("<image>\nWhat?")},
        {"id": "two", "image": ["coco/b.png", "coco/c.jpg"], "conversations": turn("<image> vs <image>?")},
        {"id": "text", "conversations": turn("Say something.")},
        {"id": "gone", "image": "coco/missing.jpg", "conversations": turn("<image>?")},
        {"id": "bad", "image": "coco/a.jpg", "conversations": turn("<image><image> two?")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = make_shards.main(
        [
            "llava",
            "--json",
            str(tmp_path / "llava.json"),
            "--images",
            str(tmp_path / "img"),
            "--out",
            str(tmp_path / "shards" / "llava"),
            "--samples-per-shard",
            "2",
        ]
    )
    assert out["samples"] == 4 and out["shards"] == 2 and out["skipped"] == {"missing_image": 1}
    urls = expand_urls(out["urls"])
    assert len(urls) == 2 and json.loads(capsys.readouterr().out)["urls"] == out["urls"]

    report = inspect_shards.main([out["urls"], "--previews", "2"])
    assert report["samples"] == 4 and report["by_format"] == {"conversation": 3}
    assert [(i["reason"], i["key"].split("_", 1)[1]) for i in report["invalid"]] == [("image_count_mismatch", "bad")]
    assert report["previews"][0]["images"] == ["56x56"] and report["previews"][0]["tokens"] > 0
    assert report["previews"][1]["images"] == ["84x56", "56x56"]  # in placeholder order

    loader = build_loader(
        PackedStream(
            [Source("llava", urls, format="conversation")], encoder(), _config(llm_budget=900, buffer_size=2), 0, 0, 1
        ),
        0,
    )
    metas = [m for _ in range(3) for m in next(loader).meta]
    assert {m["key"].split("_", 1)[1] for m in metas if m["restore_key"]["epoch"] == 0} == {"000_a", "two", "text"}
    assert loader.skipped()["llava/image_count_mismatch"] >= 1


def test_caption_folder_becomes_shards_and_inspect_lists_every_invalid_sample(tmp_path):
    _images(tmp_path / "photos" / "sub", ["x.jpg", "y.png", "z.jpg"])
    (tmp_path / "photos" / "sub" / "x.txt").write_text("a red circle")
    (tmp_path / "photos" / "sub" / "y.txt").write_text("a blue square")
    (tmp_path / "photos" / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "photos" / "sub" / "broken.txt").write_text("a broken picture")
    out = make_shards.main(["captions", "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "cap")])
    assert out["samples"] == 3 and out["shards"] == 1 and out["skipped"] == {"missing_caption": 1}
    report = inspect_shards.main([out["urls"], "--format", "caption", "--llm-budget", "20"])
    assert report["valid"] == 0  # 20 tokens hold no captioned image
    reasons = {i["key"].rsplit("_", 1)[1]: i["reason"] for i in report["invalid"]}
    assert reasons == {"broken": "corrupt_image", "x": "too_long", "y": "too_long"}
    report = inspect_shards.main([out["urls"], "--no-encode"])
    assert report["by_format"] == {"caption": 2} and report["invalid_by_reason"] == {"corrupt_image": 1}


def test_bench_loader_prints_throughput_json(capsys):
    result = bench_loader.main(["--samples", "24", "--per-shard", "8", "--side", "96"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] >= 24 and printed["samples_per_s"] > 0 and printed["workers"] == 0
    assert set(result["stages_one_core"]) >= {"decode_ms_per_sample", "resize_ms_per_sample", "pack_ms_per_sample"}


@pytest.mark.parametrize("tool", [make_shards, inspect_shards, bench_loader])
def test_tools_have_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out
