"""Answer a prompt about one or more images with a trained checkpoint (ours or a Hugging Face Qwen2.5-VL folder).

    vlm-generate outputs/run --image cat.png --prompt "Describe the image."
    vlm-generate outputs/run/checkpoints/step_00000800 --image a.png --image b.png \\
        --prompt "Compare <image> with <image>." --temperature 0.7 --top-p 0.9 --seed 1
    vlm-generate /models/Qwen2.5-VL-3B-Instruct --image cat.png --prompt "What is this?" --json

    vlm-generate outputs/run --video clip.mp4 --prompt "What happens in <video>?"

Images go before the prompt unless the prompt places them with <image>, one per --image; videos likewise with
<video>, one per --video (sampled and resized by the checkpoint's data.video, as in training). Decoding is greedy
(temperature 0) or sampled (temperature, top-p, seed), with a KV cache (--no-cache: the slower reference).
Prints the answer, or with --json a JSON object with the answer, its tokens and the settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from vlm_train.data.collate import collate
from vlm_train.data.formats import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample, Turn
from vlm_train.devices import inference_autocast, pick_device
from vlm_train.inference import Loaded, load
from vlm_train.jsonio import dumps
from vlm_train.model.generate import SamplingConfig, generate

if TYPE_CHECKING:
    from vlm_train.data.video import Video, VideoConfig


def read_images(paths: list[str]) -> list[Image.Image]:
    """RGB images from files, decoded as training decodes them; a missing or unreadable file is an error naming it."""
    # Training's decoder, so EXIF orientation, transparency (on white) and 16-bit grey come out as in training.
    from vlm_train.data.config import ImageConfig
    from vlm_train.data.decode import SkipSample, decode_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            images.append(decode_image(Path(path).read_bytes(), ImageConfig.max_decode_pixels))
        except (OSError, SkipSample) as exc:
            raise ValueError(f"image {path} cannot be read: {exc}") from exc
    return images


def read_videos(paths: list[str], cfg: VideoConfig | None, factor: int) -> list[Video]:
    """Sampled, resized videos from files, decoded as training decodes them; a missing or unreadable file is an error
    naming it."""
    if not paths:
        return []
    from vlm_train.data.decode import SkipSample
    from vlm_train.data.video import VideoConfig, decode_video  # PyAV only when there is a video

    videos = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"video {path} does not exist")
        try:
            videos.append(decode_video(Path(path).read_bytes(), cfg or VideoConfig(), factor))
        except SkipSample as exc:
            raise ValueError(f"video {path} cannot be read: {exc}") from exc
    return videos


def _place(prompt: str, placeholder: str, count: int, what: str) -> str:
    """The prompt with `count` placeholders: as it places them, or all before the text."""
    placed = prompt.count(placeholder)
    if placed and placed != count:
        raise ValueError(f"the prompt has {placed} {placeholder} placeholders but {count} {what} were given")
    return prompt if placed else placeholder * count + prompt


def prompt_sample(prompt: str, images: list[Image.Image], videos: list[Video] | None = None) -> Sample:
    """A one-turn conversation: the images, then the videos (before the text unless it places them), and the
    prompt."""
    videos = videos or []
    text = _place(prompt, VIDEO_PLACEHOLDER, len(videos), "videos")
    text = _place(text, IMAGE_PLACEHOLDER, len(images), "images")
    turns = [Turn("user", text), Turn("assistant", "")]
    return Sample("prompt", "cli", "generate", images, turns, videos=videos)


def answer(
    loaded: Loaded,
    prompt: str,
    images: list[Image.Image],
    sampling: SamplingConfig,
    device,
    use_cache: bool = True,
    videos: list[Video] | None = None,
) -> dict[str, Any]:
    """Generate the answer to one prompt; returns the text, its token ids and the prompt length."""
    encoded = loaded.encoder.encode(prompt_sample(prompt, images, videos), for_generation=True)
    prompts = collate([encoded]).to(device)
    special = loaded.encoder.special
    with inference_autocast(device, loaded.model):
        tokens = generate(loaded.model, prompts, sampling, {special.im_end, special.pad}, use_cache=use_cache)[0]
    text = loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return {"answer": text, "tokens": tokens, "prompt_tokens": prompts.num_tokens}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder, checkpoints/step_XXXXXXXX folder, or Hugging Face folder")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="a video file (repeat for several)")
    parser.add_argument(
        "--prompt", required=True, help="the question; <image> / <video> mark where each image / video goes"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (reference)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    parser.add_argument("--attn-backend", default=None, help="override the checkpoint's attention backend")
    parser.add_argument("--min-pixels", type=int, default=None, help="image area range (default: training's)")
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--system-prompt", default=None, help="default: the training data's system prompt")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the bare answer")
    args = parser.parse_args(argv)

    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.validate()
    images = read_images(args.image)
    device = pick_device(args.device)
    loaded = load(
        args.checkpoint, device, args.dtype, args.attn_backend, args.min_pixels, args.max_pixels, args.system_prompt
    )
    started = time.perf_counter()
    spec = loaded.encoder.spec
    videos = read_videos(args.video, loaded.data.video if loaded.data else None, spec.patch_size * spec.merge_size)
    result = answer(loaded, args.prompt, images, sampling, device, use_cache=not args.no_cache, videos=videos)
    seconds = time.perf_counter() - started
    result.update(
        {
            "checkpoint": str(loaded.path),
            "kind": loaded.kind,
            "images": len(images),
            "videos": [{"frames": int(v.frames.shape[0]), "sample_fps": float(v.sample_fps)} for v in videos],
            "new_tokens": len(result["tokens"]),
            "seconds": seconds,
            "sampling": vars(sampling),
            "kv_cache": not args.no_cache,
            "device": str(device),
        }
    )
    print(dumps(result, indent=2) if args.json else result["answer"])
    return result


if __name__ == "__main__":
    main()
