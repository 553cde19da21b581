"""Videos against transformers: patches as Qwen2VLVideoProcessor's, M-RoPE time positions as get_rope_index, and
the logits of a tiny Qwen2.5-VL (imported and exported) on a pack that mixes a video, an image and text."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.encode import Encoder
from vlm_train.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample, Turn
from vlm_train.data.image import image_to_patches, normalise_patches
from vlm_train.data.truncate import image_runs
from vlm_train.data.video import Video
from vlm_train.data.video_patches import expand_frames, temporal_positions, video_to_patches
from vlm_train.model import VLM, LLMConfig, ModelConfig, VisionConfig
from vlm_train.model.hf import from_hf, to_hf
from vlm_train.model.hf_config import vision_config_from_hf
from vlm_train.model.vit import float_pixel_values
from vlm_train.train.builders import patch_spec

from helpers import SPEC, noise_image, sample, tiny_tokenizer

transformers = pytest.importorskip("transformers")

WINDOWED = dict(window_size=56, fullatt_block_indexes=[1])  # 2x2-token windows: several per video frame
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, tokens_per_second=2, **WINDOWED)


def _video(frames: int, height: int, width: int, fps: float, seed: int = 0) -> Video:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return Video(pixels, fps, [i / fps for i in range(frames)])


def _encoder(tokens_per_second: int = 2) -> Encoder:
    return Encoder(tiny_tokenizer(), dataclasses.replace(SPEC, tokens_per_second=tokens_per_second))


# Each case: the sample and the kind of each of its media in placeholder order (what HF needs to tell them apart).
# Their videos keep the last time step below the spatial extent, where transformers >= 5.3 agrees with Qwen2.5-VL
# on where the text after a video starts (see test_text_after_a_long_video_continues_after_its_last_time_step).
def _video_sample(fps: float = 1.5) -> tuple[Sample, list[str]]:
    # 4 frames at 1.5 fps: 4/3 s per temporal patch, 8/3 time steps: positions 0, 2 (not a multiple of the step).
    turns = [Turn("user", VIDEO_PLACEHOLDER + "What happens?"), Turn("assistant", "a red circle moves left")]
    return Sample("video", "test", "conversation", [], turns, videos=[_video(4, 56, 84, fps, seed=1)]), ["video"]


def _mixed_sample() -> tuple[Sample, list[str]]:
    # An image then a video in one turn: 6 frames of 112x56 at 3 fps, 4/3 time steps per temporal patch: 0, 1, 2.
    turns = [
        Turn("user", IMAGE_PLACEHOLDER + "First this, then " + VIDEO_PLACEHOLDER + " what changed?"),
        Turn("assistant", "the square turned green"),
    ]
    video = _video(6, 112, 56, 3.0, seed=2)
    return Sample("mixed", "test", "conversation", [noise_image(84, 56, seed=3)], turns, videos=[video]), [
        "image",
        "video",
    ]


def _pack_cases() -> list[tuple[Sample, list[str]]]:
    return [
        _video_sample(),
        (sample("image", "a blue square", images=1, seed=4), ["image"]),
        (sample("text", "two", images=0, prompt="What comes after one?"), []),
        _mixed_sample(),
    ]


def _hf_inputs(encoded, kinds: list[str], seconds: list[float], video_token_id: int, patch_dim: int) -> dict:
    """One sample as transformers takes it: video tokens as its video token, images and videos apart, float pixels."""
    image_pad = _encoder().special.image_pad
    ids = torch.from_numpy(encoded.input_ids).clone()
    types = torch.zeros_like(ids, dtype=torch.int)
    sizes = encoded.image_grid_thw.prod(axis=1).tolist()
    bounds = np.cumsum([0, *sizes]).tolist()
    rows = torch.from_numpy(encoded.pixel_values)
    media: dict[str, tuple[list, list]] = {"image": ([], []), "video": ([], [])}
    runs = image_runs(encoded.input_ids, image_pad)
    assert len(runs) == len(kinds) == len(sizes)
    for kind, (start, end), grid, a, b in zip(kinds, runs, encoded.image_grid_thw, bounds[:-1], bounds[1:]):
        types[start:end] = 2 if kind == "video" else 1
        if kind == "video":
            ids[start:end] = video_token_id
        media[kind][0].append(rows[a:b])
        media[kind][1].append(torch.from_numpy(grid))
    kwargs = {"input_ids": ids[None], "mm_token_type_ids": types[None]}
    for kind, pixels_key, grid_key in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        pixels, grids = media[kind]
        if grids:
            kwargs[pixels_key] = float_pixel_values(torch.cat(pixels), patch_dim)
            kwargs[grid_key] = torch.stack(grids)
    if media["video"][1]:
        # As Qwen2_5_VLProcessor returns them: float32 seconds per temporal patch, one per video.
        kwargs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return kwargs


def _seconds(case: tuple[Sample, list[str]]) -> list[float]:
    return [v.second_per_grid_t(SPEC.temporal_patch_size) for v in case[0].videos]


def _hf_config(tokens_per_second: int = 2):
    special = _encoder().special
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tiny_tokenizer()),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            **TEXT,
        ),
        vision_config=dict(out_hidden_size=TEXT["hidden_size"], **{**VISION, "tokens_per_second": tokens_per_second}),
        image_token_id=special.image_pad,
        # The tiny tokenizer has no <|video_pad|>; any id no sample holds stands in for HF's video token.
        video_token_id=special.pad,
        vision_start_token_id=special.vision_start,
        vision_end_token_id=special.vision_end,
        tie_word_embeddings=False,
    )


def _randomize(model, seed=0):
    """HF zero-inits biases and one-inits norms; random values make every mapped tensor count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_vl_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL with window attention, saved by transformers."""
    torch.manual_seed(0)
    model = _randomize(transformers.Qwen2_5_VLForConditionalGeneration(_hf_config())).eval()
    path = tmp_path_factory.mktemp("hf_vl_video")
    model.save_pretrained(path)
    return path


def _load_hf(path, video_token_id: int):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.config.video_token_id = model.model.config.video_token_id = video_token_id
    return model


def _assert_pack_matches_hf(ours: VLM, hf_model, cases, encoder: Encoder):
    encoded = [encoder.encode(s) for s, _ in cases]
    batch = collate(encoded)
    assert batch.pixel_values.dtype == torch.uint8 and batch.pixel_values.shape[1] == ours.cfg.vision.patch_dim
    with torch.no_grad():
        logits = ours(batch).logits
    bounds = batch.cu_seqlens.tolist()
    patch_dim = ours.cfg.vision.patch_dim
    for i, (enc, case) in enumerate(zip(encoded, cases)):
        kwargs = _hf_inputs(enc, case[1], _seconds(case), hf_model.config.video_token_id, patch_dim)
        with torch.no_grad():
            expected = hf_model(**kwargs).logits[0]
        torch.testing.assert_close(
            logits[bounds[i] : bounds[i + 1]],
            expected,
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m, k=enc.meta["key"]: f"{k}: {m}",
        )


# ---------------------------------------------------------------- patches


def _hf_patchify(frames: np.ndarray, p: int = 14, m: int = 2, t: int = 2) -> np.ndarray:
    """transformers' Qwen2VLVideoProcessor.patchify, transcribed (its module needs torchvision to import)."""
    videos = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [B, T, C, H, W]
    if pad := -videos.shape[1] % t:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    b, n, c, h, w = videos.shape
    patches = videos.reshape(b, n // t, t, c, h // p // m, m, p, w // p // m, m, p)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(n // t * (h // p) * (w // p), c * t * p * p).numpy()


@pytest.mark.parametrize("frames,height,width", [(4, 56, 84), (6, 112, 56), (3, 56, 56)])
def test_video_patches_follow_the_qwen2_vl_video_processor_layout(frames, height, width):
    video = _video(frames, height, width, 2.0, seed=frames)
    patches, grid = video_to_patches(video, SPEC)
    assert patches.dtype == np.uint8 and patches.shape[1] == SPEC.patch_dim
    assert grid == ((frames + 1) // 2, height // 14, width // 14)
    np.testing.assert_array_equal(patches, _hf_patchify(video.frames))


@pytest.mark.parametrize("frames,height,width", [(4, 56, 84), (6, 112, 56), (3, 56, 56)])
def test_video_pixel_values_equal_the_qwen2_vl_video_processor(frames, height, width):
    pytest.importorskip("torchvision")  # transformers' video processors need it
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    video = _video(frames, height, width, 2.0, seed=frames)
    processor = Qwen2VLVideoProcessor(do_resize=False, do_sample_frames=False, cap_pixels_per_frame=False)
    reference = processor(videos=[video.frames], return_tensors="pt")
    patches, grid = video_to_patches(video, SPEC)
    assert list(grid) == reference["video_grid_thw"][0].tolist()
    values = float_pixel_values(torch.from_numpy(patches), SPEC.patch_dim)
    torch.testing.assert_close(values, reference["pixel_values_videos"].float(), atol=1e-6, rtol=0)


def test_widened_image_rows_embed_as_the_one_frame_rows():
    patches, _ = image_to_patches(noise_image(84, 56), SPEC)
    wide = expand_frames(patches, SPEC.temporal_patch_size)
    assert wide.shape == (patches.shape[0], SPEC.patch_dim)
    np.testing.assert_array_equal(
        float_pixel_values(torch.from_numpy(wide), SPEC.patch_dim).numpy(),
        normalise_patches(patches, SPEC.temporal_patch_size),
    )


def test_video_frames_must_be_resized_to_the_merge_multiple():
    with pytest.raises(ValueError, match="multiples of 28"):
        video_to_patches(_video(2, 56, 70, 2.0), SPEC)


# ---------------------------------------------------------------- positions


def test_temporal_positions_truncate_like_transformers():
    # 2 / 1.5 s per patch at 2 tokens a second: 8/3 per patch, truncated after the multiply.
    assert temporal_positions(5, 2 / 1.5, 2).tolist() == [0, 2, 5, 8, 10]
    assert temporal_positions(4, 0.5, 2).tolist() == [0, 1, 2, 3]  # not truncated to 0 before the multiply


def test_positions_equal_transformers_get_rope_index(hf_vl_dir):
    hf_model = _load_hf(hf_vl_dir, _encoder().special.pad)
    encoder = _encoder()
    for case in _pack_cases():
        encoded = encoder.encode(case[0])
        if not case[1]:  # text only: plain 1D positions on all three rows, as HF's default
            assert (encoded.position_ids == np.arange(encoded.num_tokens)).all()
            continue
        kwargs = _hf_inputs(encoded, case[1], _seconds(case), hf_model.config.video_token_id, SPEC.patch_dim)
        expected, _ = hf_model.model.get_rope_index(
            kwargs["input_ids"],
            kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            second_per_grid_ts=kwargs.get("second_per_grid_ts"),
            attention_mask=torch.ones_like(kwargs["input_ids"]),
        )
        np.testing.assert_array_equal(encoded.position_ids, expected[:, 0].numpy(), err_msg=case[0].key)
    # The video's own time steps are the non-integer multiples: 0 and int(8/3) = 2.
    video = encoder.encode(_video_sample()[0])
    start = image_runs(video.input_ids, encoder.special.image_pad)[0][0]
    assert sorted(set((video.position_ids[0, start : start + 12] - start).tolist())) == [0, 2]


def test_text_after_a_long_video_continues_after_its_last_time_step(hf_vl_dir):
    # 6 frames at 1 fps: time steps 0, 4, 8 outrun the 4x2-token frame. Qwen2.5-VL (as trained, and as vLLM and
    # transformers < 5.3 compute) continues the text at the largest position + 1; transformers >= 5.3 continues it
    # after the spatial extent only, so the two agree up to the video's last token and differ after it.
    encoder = _encoder()
    turns = [Turn("user", VIDEO_PLACEHOLDER + "What happens?"), Turn("assistant", "it spins")]
    case = (Sample("long", "test", "conversation", [], turns, videos=[_video(6, 112, 56, 1.0)]), ["video"])
    encoded = encoder.encode(case[0])
    hf_model = _load_hf(hf_vl_dir, encoder.special.pad)
    kwargs = _hf_inputs(encoded, case[1], _seconds(case), hf_model.config.video_token_id, SPEC.patch_dim)
    expected, _ = hf_model.model.get_rope_index(
        kwargs["input_ids"],
        kwargs["mm_token_type_ids"],
        video_grid_thw=kwargs["video_grid_thw"],
        second_per_grid_ts=kwargs["second_per_grid_ts"],
    )
    start, end = image_runs(encoded.input_ids, encoder.special.image_pad)[0]
    np.testing.assert_array_equal(encoded.position_ids[:, :end], expected[0:3, 0, :end].numpy())
    assert (encoded.position_ids[0, start:end] - start).max() == 8
    after = encoded.position_ids[:, end:]
    assert (after == start + 9 + np.arange(after.shape[1])).all()


# ---------------------------------------------------------------- the model


def test_imported_qwen2_5_vl_gives_transformers_logits_on_a_pack_with_videos(hf_vl_dir):
    ours = from_hf(hf_vl_dir, attn_backend="sdpa").eval()
    assert ours.cfg.vision.window_size == 56 and ours.cfg.vision.fullatt_block_indexes == [1]
    assert ours.cfg.vision.tokens_per_second == 2
    _assert_pack_matches_hf(ours, _load_hf(hf_vl_dir, _encoder().special.pad), _pack_cases(), _encoder())


def test_export_with_videos_reloads_in_transformers_with_the_same_logits(tmp_path):
    # tokens_per_second 3 (not HF's default) must reach both config.json and our encoder's positions.
    cfg = ModelConfig(
        vision=VisionConfig(
            hidden_size=32,
            depth=3,
            num_heads=2,
            intermediate_size=48,
            window_size=56,
            fullatt_block_indexes=[2],
            tokens_per_second=3,
        ),
        llm=LLMConfig(
            mrope_section=[2, 3, 3], hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2
        ),
        attn_backend="sdpa",
    )
    torch.manual_seed(1)
    encoder = _encoder(tokens_per_second=3)
    ours = _randomize(VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder.special.image_pad), 1).eval()
    out = to_hf(ours, tmp_path / "export", tokenizer=tiny_tokenizer())
    reloaded = _load_hf(out, encoder.special.pad)
    assert reloaded.config.vision_config.tokens_per_second == 3 == from_hf(out).cfg.vision.tokens_per_second
    # 4 frames at 4 fps: 0.5 s per temporal patch, 1.5 time steps at 3 a second: positions 0, 1.
    cases = [_video_sample(fps=4.0), (sample("image", "a blue square", images=1, seed=4), ["image"])]
    _assert_pack_matches_hf(ours, reloaded, cases, encoder)


def test_tokens_per_second_reaches_the_encoder_and_the_hf_config():
    model = ModelConfig(vision=VisionConfig(tokens_per_second=5))
    assert patch_spec(model, DataConfig()).tokens_per_second == 5
    hf_vision = _hf_config(tokens_per_second=4).vision_config
    assert vision_config_from_hf(hf_vision).tokens_per_second == 4


def test_a_video_sample_has_the_same_logits_alone_and_packed_behind_an_image_and_text():
    torch.manual_seed(0)
    encoder = _encoder()
    cfg = ModelConfig(vision=VisionConfig(**WINDOWED), attn_backend="sdpa")
    model = VLM(cfg, vocab_size=len(tiny_tokenizer()), image_token_id=encoder.special.image_pad).eval()
    video = encoder.encode(_video_sample()[0])
    image = encoder.encode(sample("image", "a blue square", images=1, seed=4))
    text = encoder.encode(sample("text", "two", images=0, prompt="What comes after one?"))
    alone, image_alone = collate([video]), collate([image])
    packed = collate([image, text, video])
    # Images keep one-frame rows unless a video shares their pack, where they widen to all t frames.
    assert image_alone.pixel_values.shape[1] == SPEC.pixel_dim
    assert alone.pixel_values.shape[1] == packed.pixel_values.shape[1] == SPEC.patch_dim
    with torch.no_grad():
        logits_alone, logits_image, logits_packed = (model(b).logits for b in (alone, image_alone, packed))
    bounds = packed.cu_seqlens.tolist()
    torch.testing.assert_close(logits_packed[bounds[2] : bounds[3]], logits_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_packed[bounds[0] : bounds[1]], logits_image, atol=1e-5, rtol=1e-5)


def test_video_placeholders_must_match_the_videos():
    from vlm_train.data.decode import SkipSample

    turns = [Turn("user", VIDEO_PLACEHOLDER * 2 + "What happens?"), Turn("assistant", "it spins")]
    with pytest.raises(SkipSample, match="video"):
        _encoder().encode(Sample("k", "test", "conversation", [], turns, videos=[_video(2, 56, 56, 2.0)]))


def test_a_video_counts_all_its_patches_and_is_cut_whole():
    from vlm_train.data.pack_planner import Budget
    from vlm_train.data.truncate import truncate

    encoder = _encoder()
    turns = [
        Turn("user", IMAGE_PLACEHOLDER + "What is it?"),
        Turn("assistant", "a square"),
        Turn("user", VIDEO_PLACEHOLDER + "And now?"),
        Turn("assistant", "it spins"),
    ]
    video = _video(6, 112, 56, 3.0)
    # An image (24 patches) answered first, then a video (3 x 8 x 4 = 96 patches).
    encoded = encoder.encode(Sample("two", "test", "conversation", [noise_image(84, 56)], turns, videos=[video]))
    assert encoded.num_patches == 24 + 96 and encoded.image_grid_thw.tolist() == [[1, 4, 6], [3, 8, 4]]
    cut = truncate(encoded, Budget(tokens=10_000, patches=100), encoder.special)
    assert cut.image_grid_thw.tolist() == [[1, 4, 6]] and cut.num_patches == 24  # the video went, whole
    assert cut.pixel_values.shape[1] == SPEC.patch_dim  # its image stays widened; collate keeps widths uniform
