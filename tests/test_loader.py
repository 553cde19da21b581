import io
import itertools
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from vlm_train.data.config import DataConfig
from vlm_train.data.loader import PackedStream, Source, build_loader, expand_urls
from vlm_train.data.worker_state import StateReceiver, StateSender

from helpers import encoder


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56 + 28 * (seed % 3), 56), (seed * 40 % 255, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder, shards: int, per_shard: int, bad: dict[str, dict] | None = None) -> list[str]:
    """Caption shards in the img2dataset layout; `bad` replaces some samples' members by key."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(shards):
        url = str(folder / f"shard-{s:03d}.tar")
        with wds.TarWriter(url) as writer:
            for i in range(per_shard):
                key = f"s{s}i{i}"
                members = (bad or {}).get(key, {"png": _png(i), "txt": f"a red circle number {i}"})
                writer.write({"__key__": key, **members})
        urls.append(url)
    return urls


def _config(**pack) -> DataConfig:
    cfg = DataConfig(shuffle_buffer=4)
    cfg.pack.llm_budget = pack.get("llm_budget", 400)
    cfg.pack.buffer_size = pack.get("buffer_size", 4)
    return cfg


def _stream(sources: list[Source], cfg: DataConfig | None = None, seed: int = 0) -> PackedStream:
    return PackedStream(sources, encoder(), cfg or _config(), seed=seed, rank=0, world_size=1)


def test_bad_samples_are_counted_per_source_and_reason(tmp_path):
    bad = {
        "s0i1": {"png": b"garbage", "txt": "x"},
        "s0i2": {"png": _png(2), "json": b"{broken"},
        "s1i0": {"txt": "no image"},
    }
    urls = write_shards(tmp_path, 2, 6, bad)
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=0, rank=0, world_size=1)
    skipped, keys = Counter(), []
    for batch in itertools.islice(iter(stream), 6):
        skipped.update(batch.skipped)
        keys += [m["key"] for m in batch.meta]
    assert skipped["web/corrupt_image"] >= 1 and skipped["web/bad_json"] >= 1 and skipped["web/missing_image"] >= 1
    assert not set(keys) & set(bad)
    assert {f"s{s}i{i}" for s in range(2) for i in range(6)} - set(bad) <= set(keys)


def test_truncated_tar_is_counted_and_reading_goes_on(tmp_path):
    urls = write_shards(tmp_path, 2, 6)
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[: len(data) // 2])
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=0, rank=0, world_size=1)
    skipped, keys = Counter(), set()
    for batch in itertools.islice(iter(stream), 6):
        skipped.update(batch.skipped)
        keys |= {m["key"] for m in batch.meta}
    assert skipped["web/shard_error"] >= 1
    assert {f"s1i{i}" for i in range(6)} <= keys


def test_a_run_of_failures_is_fatal_and_names_shard_and_key(tmp_path):
    urls = write_shards(tmp_path, 1, 8, {f"s0i{i}": {"png": b"bad", "txt": "x"} for i in range(8)})
    cfg = _config()
    cfg.max_consecutive_failures = 5
    stream = PackedStream([Source("web", urls)], encoder(), cfg, seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"shard-000\.tar key s0i\d"):
        next(iter(stream))


def test_sample_longer_than_the_budget_is_skipped(tmp_path):
    urls = write_shards(tmp_path, 1, 4, {"s0i0": {"png": _png(0), "txt": "long " * 300}})
    stream = PackedStream([Source("web", urls)], encoder(), _config(), seed=0, rank=0, world_size=1)
    batch = next(iter(stream))
    assert batch.skipped.get("web/too_long", 0) + sum(1 for m in batch.meta if m["key"] == "s0i0") >= 1
    assert all(m["key"] != "s0i0" for m in batch.meta)


def test_pipe_urls_are_refused_unless_allowed_and_empty_sources_too(tmp_path):
    with pytest.raises(ValueError, match="shell-command.*allow_pipe"):
        expand_urls("pipe:curl -s http://example.com/{0..3}.tar")
    assert len(expand_urls("pipe:cat /data/{0..3}.tar", allow_pipe=True)) == 4
    with pytest.raises(ValueError, match="no shards"):
        Source("web", [])
    with pytest.raises(ValueError, match="weight must be positive"):
        Source("web", ["a.tar"], weight=0)
    with pytest.raises(ValueError, match="format 'llava'"):
        Source("web", ["a.tar"], format="llava")
    urls = expand_urls(str(tmp_path / "x-{000..002}.tar") + "::" + str(tmp_path / "y.tar"))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["x-000.tar", "x-001.tar", "x-002.tar", "y.tar"]


def test_a_source_with_no_readable_shard_is_a_fatal_error_naming_it(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    loader = build_loader(_stream([Source("broken", [str(tmp_path / "junk.tar"), str(tmp_path / "gone.tar")])]), 0)
    with pytest.raises(RuntimeError, match="'broken'.*no readable sample"):
        next(loader)


def test_duplicate_members_and_missing_json_are_counted(tmp_path):
    urls = write_shards(tmp_path, 1, 6)
    # A hand-written tar: the same member twice in one sample, and a conversation without its json.
    with tarfile.open(urls[0], "a") as tar:
        for name, data in [("dup.png", _png(1)), ("dup.png", _png(2)), ("dup.txt", b"x"), ("conv.0.png", _png(3))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = PackedStream([Source("web", urls, format="auto")], encoder(), _config(), seed=0, rank=0, world_size=1)
    loader = build_loader(stream, 0)
    keys = [m["key"] for _ in range(3) for m in next(loader).meta]
    assert {"dup", "conv"}.isdisjoint(keys)
    assert set(loader.skipped()) == {"web/bad_member", "web/unknown_format"}


def test_skip_counters_reach_every_pack_and_the_loader_total(tmp_path):
    bad = {f"s0i{i}": {"png": b"junk", "txt": "x"} for i in range(3)}
    urls = write_shards(tmp_path, 2, 6, bad)
    loader = build_loader(_stream([Source("a", urls[:1]), Source("b", urls[1:])]), 0)
    per_pack = Counter()
    for _ in range(8):
        per_pack.update(next(loader).skipped)
    assert per_pack == Counter(loader.skipped()) and per_pack["a/corrupt_image"] >= 3
    assert not any(k.startswith("b/") for k in per_pack)


def test_ranks_with_uneven_shards_never_run_dry(tmp_path):
    """Every rank yields packs for as long as it is asked: a rank with less data goes on into its next epoch."""
    sizes = [2, 3, 30]
    urls = [write_shards(tmp_path / f"d{i}", 1, n)[0] for i, n in enumerate(sizes)]
    epochs = []
    for rank in range(2):
        stream = PackedStream(
            [Source("web", urls)], encoder(), _config(llm_budget=120), seed=1, rank=rank, world_size=2
        )
        loader = build_loader(stream, 0)
        packs = [next(loader) for _ in range(12)]
        assert all(p.num_samples >= 1 for p in packs)
        epochs.append(loader.state_dict()["worker_states"][0]["readers"]["web"]["epoch"])
    assert min(epochs) >= 1  # both went on past an epoch end instead of stopping


HOLD_LOADER = """
import multiprocessing, sys, time
sys.path.insert(0, sys.argv[2])
from helpers import encoder
from vlm_train.data.config import DataConfig
from vlm_train.data.loader import PackedLoader, PackedStream, Source

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    cfg = DataConfig(num_workers=2)
    stream = PackedStream([Source("web", sys.argv[3:])], encoder(), cfg, seed=0, rank=0, world_size=1)
    loader = PackedLoader(stream, cfg.num_workers, prefetch_factor=32)  # many packs in flight: the pipe fills
    for _ in range(3):
        next(loader)
    print("reading no more", flush=True)
    time.sleep(600)
"""


def _running(procs) -> list:
    psutil = pytest.importorskip("psutil")
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # a zombie is dead, just not reaped
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_loader_workers_die_with_a_killed_training_process(tmp_path, start_method):
    """kill -9 of the training process (or an OOM kill) leaves no loader worker behind, not even one stuck on a
    full pipe, nor (forkserver) the server that started them."""
    psutil = pytest.importorskip("psutil")
    urls = write_shards(tmp_path / "shards", 4, 40)
    script = tmp_path / "hold_loader.py"
    script.write_text(HOLD_LOADER)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, str(script), start_method, os.path.dirname(__file__), *urls],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its own process group: the test can always clean up after itself
        )
    children = []
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 120)
        line = parent.stdout.readline() if ready else ""
        assert line.strip() == "reading no more", (tmp_path / "stderr.txt").read_text()[-3000:]
        children = psutil.Process(parent.pid).children(recursive=True)
        workers = [c for c in children if c.name() == "pt_data_worker"]
        assert len(workers) == 2
        cpu = None  # wait until the workers stop working: every queue (and the pipe) is full
        for _ in range(60):
            now = [w.cpu_times().user + w.cpu_times().system for w in workers]
            if now == cpu:
                break
            cpu = now
            time.sleep(0.5)
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 5
        while _running(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(children), f"loader processes outlived their parent: {_running(children)}"
    finally:
        for proc in _running(children):
            proc.kill()
        if parent.poll() is None:
            parent.kill()
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.wait(30)
        parent.stdout.close()


def test_a_worker_whose_parent_died_before_it_started_ends_at_once():
    """The race: the parent dies before the worker asks to die with it; the worker then has another parent."""
    code = "from vlm_train.runtime import die_with_parent; die_with_parent(-1, True); print('still here')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and "still here" not in done.stdout


def test_a_worker_not_started_by_the_training_process_watches_it():
    """Started by a forkserver (or where prctl is missing), a worker ends when the training process does."""
    code = (
        "import subprocess, time\n"
        "from vlm_train.runtime import die_with_parent\n"
        "trainer = subprocess.Popen(['sleep', '1'])\n"
        "die_with_parent(trainer.pid, False)\n"
        "trainer.wait()\n"
        "time.sleep(60)\n"
        "print('still here')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and "still here" not in done.stdout


def test_each_pack_carries_a_small_change_to_its_workers_state(tmp_path):
    urls = write_shards(tmp_path, 4, 80)
    cfg = DataConfig(shuffle_buffer=100)
    cfg.pack.llm_budget, cfg.pack.buffer_size = 400, 16
    slot = _stream([Source("a", urls[:2]), Source("b", urls[2:])], cfg).slot_stream(0, 1)
    sender, receiver = StateSender(), StateReceiver()
    for i in range(16):
        slot.next_pack()
        state = slot.state_dict()
        message = pickle.dumps(sender.encode(state))
        receiver.apply(pickle.loads(message))
        assert receiver.state() == json.loads(json.dumps(state))  # keys whose ids were given back and reused too
        if i > 0:
            assert len(message) < len(pickle.dumps(state)) / 3
