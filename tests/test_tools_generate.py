"""Generation with a KV cache: equal to the uncached reference and to transformers; tools/generate.py end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_train.cli.generate import main
from vlm_train.data.loader import pack_for_generation
from vlm_train.model.generate import SamplingConfig, generate, greedy_generate
from vlm_train.model.hf import to_hf
from vlm_train.model.vit import float_pixel_values

from helpers import encoder, sample, tiny_tokenizer
from tools_helpers import image_file, save_run, small_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return small_model()


def _prompts():
    """Prompts of different lengths: one image, none, two images of other sizes."""
    enc = encoder()
    return pack_for_generation(enc, [sample(f"s{i}", "x", images=n, seed=i) for i, n in enumerate((1, 0, 2))])


def test_cached_decoding_gives_the_logits_of_a_full_forward(model):
    """Each cached step's logits equal those of the whole sequence run again, position for position."""
    prompts = _prompts()
    llm = model.llm
    with torch.no_grad():
        embeds = model.embed(prompts)
        cache = llm.new_cache(prompts.max_seqlen + 4)
        hidden = llm.prefill(embeds, prompts.position_ids, prompts.cu_seqlens, prompts.max_seqlen, cache)
        last = hidden[prompts.cu_seqlens[1:].long() - 1]
        cu = prompts.cu_seqlens.tolist()
        sequences = [embeds[a:b] for a, b in zip(cu[:-1], cu[1:])]
        positions = [prompts.position_ids[:, a:b] for a, b in zip(cu[:-1], cu[1:])]
        for _ in range(4):
            token = llm.logits(last).argmax(-1)
            last = llm.decode_step(llm.embed(token), cache)
            for i in range(len(sequences)):
                sequences[i] = torch.cat([sequences[i], llm.embed(token[i : i + 1])])
                positions[i] = torch.cat([positions[i], (positions[i].max() + 1).expand(3, 1)], dim=1)
                length = sequences[i].shape[0]
                full = llm.forward_embeds(
                    sequences[i], positions[i], torch.tensor([0, length], dtype=torch.int32), length
                )
                torch.testing.assert_close(llm.logits(last[i]), llm.logits(full[-1]), atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [b - a + 4 for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(16), SamplingConfig(16, temperature=1.0, top_p=0.9, seed=3)], ids=["greedy", "top_p"]
)
def test_cached_generation_equals_uncached_token_for_token(model, sampling):
    prompts = _prompts()
    stop = encoder().special.im_end
    reference = generate(model, prompts, sampling, stop, use_cache=False)
    assert generate(model, prompts, sampling, stop) == reference
    assert len({tuple(r) for r in reference}) == 3  # the prompts get different answers: the test can tell them apart
    # A stop token that ends one prompt early makes the cache drop that row and go on with the others.
    early = reference[0][3]
    stopped = generate(model, prompts, sampling, {stop, early}, use_cache=False)
    assert stopped[0] == reference[0][: reference[0].index(early)]
    assert generate(model, prompts, sampling, {stop, early}) == stopped


def test_greedy_generate_keeps_its_api(model):
    prompts = _prompts()
    assert greedy_generate(model, prompts, 5, encoder().special.im_end) == generate(
        model, prompts, SamplingConfig(5), encoder().special.im_end, use_cache=False
    )


def test_sampling_settings_are_checked(model):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, _prompts(), SamplingConfig(4, temperature=1.0, top_p=0.0), 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, _prompts(), SamplingConfig(4, temperature=-1.0), 0)


def test_generation_equals_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    enc = encoder()
    to_hf(model, tmp_path / "hf", tokenizer=tiny_tokenizer())
    hf_model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    samples = [sample(f"s{i}", "x", images=n, seed=i) for i, n in enumerate((1, 0, 2))]
    ours = generate(model, pack_for_generation(enc, samples), SamplingConfig(10), enc.special.im_end)
    for encoded_sample, answer in zip(samples, ours):
        encoded = enc.encode(encoded_sample, for_generation=True)
        ids = torch.from_numpy(encoded.input_ids)[None]
        kwargs = {}
        if encoded.image_grid_thw.shape[0]:
            pixels = torch.from_numpy(encoded.pixel_values)
            if pixels.dtype == torch.uint8:  # the loader's raw layout; HF takes normalised float patches
                pixels = float_pixel_values(pixels, model.cfg.vision.patch_dim)
            kwargs = dict(
                pixel_values=pixels,
                image_grid_thw=torch.from_numpy(encoded.image_grid_thw),
                mm_token_type_ids=(ids == enc.special.image_pad).int(),
            )
        out = hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=enc.special.im_end,
            **kwargs,
        )
        theirs = out[0, ids.shape[1] :].tolist()
        if enc.special.im_end in theirs:  # transformers keeps the stop token; ours ends before it
            theirs = theirs[: theirs.index(enc.special.im_end)]
        assert answer == theirs
    assert len({tuple(a) for a in ours}) == 3


def test_generate_tool_on_our_checkpoint_and_its_hf_export(model, tmp_path, capsys):
    save_run(tmp_path / "run", model)
    images = [image_file(tmp_path, "a.png", 84, 56, 1), image_file(tmp_path, "b.png", 56, 112, 2)]
    args = [
        "--image",
        images[0],
        "--image",
        images[1],
        "--prompt",
        "Compare <image> and <image>.",
        "--max-new-tokens",
        "8",
        "--json",
        "--device",
        "cpu",
    ]
    result = main([str(tmp_path / "run"), *args])
    assert json.loads(capsys.readouterr().out)["answer"] == result["answer"]
    assert result["kind"] == "vlm_train" and result["checkpoint"].endswith("step_00000005")
    assert result["images"] == 2 and 0 < result["new_tokens"] <= 8
    assert result["answer"] == tiny_tokenizer().decode(result["tokens"], skip_special_tokens=True).strip()
    assert main([str(tmp_path / "run"), *args, "--no-cache"])["tokens"] == result["tokens"]

    from vlm_train.cli.convert_hf import main as convert

    convert(["to-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    capsys.readouterr()
    from_hf = main([str(tmp_path / "hf"), *args, "--min-pixels", str(56 * 56), "--max-pixels", str(168 * 168)])
    assert from_hf["kind"] == "hf" and from_hf["tokens"] == result["tokens"]

    sampled = [
        main([str(tmp_path / "run"), *args, "--temperature", "1", "--seed", str(seed)])["tokens"] for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_tool_errors_name_the_problem(model, tmp_path):
    save_run(tmp_path / "run", model)
    image = image_file(tmp_path, "a.png", 56, 56, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(tmp_path / "nowhere"), "--image", image, "--prompt", "hi"])
    with pytest.raises(FileNotFoundError, match="complete checkpoints"):
        main([str(tmp_path), "--image", image, "--prompt", "hi"])  # a folder, but no checkpoint in it
    with pytest.raises(FileNotFoundError, match="missing.png"):
        main([str(tmp_path / "run"), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"])
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        main([str(tmp_path / "run"), "--image", image, "--prompt", "<image> and <image>"])


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--temperature" in result.stdout and "--image" in result.stdout


def test_console_scripts_are_installed_and_vlm_generate_answers(model, tmp_path):
    """A non-editable install gets the tools as commands: every console script resolves, and vlm-generate runs."""
    from importlib.metadata import entry_points

    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.value.startswith("vlm_train.")}
    expected = {"vlm-train", "vlm-generate", "vlm-evaluate", "vlm-convert-hf", "vlm-merge-checkpoints"}
    expected |= {"vlm-make-shards", "vlm-inspect-shards", "vlm-dump-hidden-states"}
    expected |= {"vlm-speculate", "vlm-export-eagle3"}
    assert expected <= set(scripts)
    assert all(callable(e.load()) for e in scripts.values())
    save_run(tmp_path / "run", model)
    image = image_file(tmp_path, "a.png", 84, 56, seed=3)
    result = subprocess.run(
        ["vlm-generate", str(tmp_path / "run"), "--image", image, "--prompt", "Describe.", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["checkpoint"].endswith("step_00000005")
