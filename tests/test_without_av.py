"""The package imports and trains on images without PyAV (`av`): the lent GPU machine has no av, and only decoding a
video needs it. With av blocked, every module imports, an image sample reads, and a video member raises an error
that says what to install."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Blocks `import av` the way a machine without it fails (ModuleNotFoundError), before anything else is imported.
BLOCK_AV = textwrap.dedent(
    """
    import sys

    class _NoAv:
        def find_spec(self, name, path=None, target=None):
            if name == "av" or name.startswith("av."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoAv())
    """
)


def _mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "check.py"
    script.write_text(BLOCK_AV + textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env()
    )


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}


def test_every_module_imports_without_av_and_only_videos_need_it(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(_mp4())
    (tmp_path / "red.png").write_bytes(_png())
    (tmp_path / "caption.json").write_text(json.dumps({"caption": "a red square"}))
    code = f"""
    import importlib
    import pkgutil
    from pathlib import Path

    import vlm_train

    # Every module of the package (the trainer, the CLI, the data layer), and the GPU check's entry point.
    # (__main__ modules run when imported: what they import is imported here on its own.)
    names = [m.name for m in pkgutil.walk_packages(vlm_train.__path__, "vlm_train.") if not m.name.endswith("__main__")]
    names += ["vlm_train.train.main", "vlm_train.train.trainer", "vlm_train.cli", "tools.gpu_check"]
    for name in names:
        importlib.import_module(name)
    assert "av" not in sys.modules
    print("imported", len(names))

    from vlm_train.data.formats import parse_sample

    folder = Path({str(tmp_path)!r})
    caption = (folder / "caption.json").read_bytes()
    image = parse_sample({{"__key__": "i", "png": (folder / "red.png").read_bytes(), "json": caption}}, "s", 10**7)
    assert image.task == "caption" and image.images[0].size == (56, 56), image
    print("image ok")
    try:
        parse_sample({{"__key__": "v", "mp4": (folder / "clip.mp4").read_bytes(), "json": caption}}, "s", 10**7)
    except ImportError as exc:
        print("video error:", exc)
    else:
        raise AssertionError("a video decoded without av")
    """
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("imported ") and int(lines[0].split()[1]) > 80
    assert lines[1] == "image ok"
    assert lines[2] == "video error: install av (PyAV) to read videos: pip install av"
