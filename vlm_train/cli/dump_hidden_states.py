"""Write a target's hidden states for a data config as webdataset shards, for offline Eagle3 draft training.

    python tools/dump_hidden_states.py --target outputs/RUN --out /data/hidden/RUN --num-samples 20000
    python tools/dump_hidden_states.py --target /models/Qwen2.5-VL-3B-Instruct --data my_data.yaml --out DIR
    python tools/dump_hidden_states.py --target outputs/RUN --out DIR --data synthetic data.pack.llm_budget=512

The data: the target run's own data config (--data run, the default), a packaged one (--data synthetic) or a YAML
file, then any `data.KEY=VALUE` overrides. Each training sample of its sources is read in shard order (source by
source; --num-samples splits between them by weight) and encoded exactly as the training loader encodes it (the
same decoding, chat template, per-sample randomness of --seed's epoch 0, and too-long policy), so offline and
online training see the same tokens. The target runs once over packs of them (eval mode, no gradients; bf16
autocast on a GPU, as the single-process engine runs it) and every sample is written with its token ids, labels,
positions and the hidden states of the layers the draft reads, in --dtype (see vlm_train/data/hidden_states.py).
DIR also gets target.json (the manifest), target_head.safetensors (the target's LM head and embedding) and
tokenizer/ (see vlm_train/train/draft_offline.py), target.json last: a folder without it is incomplete.

Train on it with `vlm-train curriculum=eagle3 eagle3.offline=DIR data.tokenizer=DIR/tokenizer` (the built-in tiny
tokenizer needs no data.tokenizer). Prints JSON: samples, tokens, bytes, bytes per token, per-source counts, skips.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from omegaconf import OmegaConf
from safetensors.torch import save_file

from vlm_train.cli.make_shards import safe_key
from vlm_train.data.collate import collate
from vlm_train.data.config import DataConfig
from vlm_train.data.decode import SkipSample
from vlm_train.data.encode import EncodedSample, Encoder
from vlm_train.data.formats import parse_sample
from vlm_train.data.hidden_states import STORAGE_DTYPES, write_sample
from vlm_train.data.packer import Packer
from vlm_train.data.sources import Source
from vlm_train.data.state import restore_key, sample_rng
from vlm_train.data.tar_reader import ShardError, iter_shard
from vlm_train.devices import pick_device
from vlm_train.inference import load, read_config, read_data_config
from vlm_train.jsonio import dumps
from vlm_train.model.draft import default_layers
from vlm_train.model.vlm import VLM
from vlm_train.train.builders import build_data, build_encoder
from vlm_train.train.config import EngineConfig, compose_config
from vlm_train.train.draft_objective import target_features
from vlm_train.train.draft_offline import (
    HEAD_FILE,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    TOKENIZER_DIR,
    describe_target,
    tensor_sha256,
)
from vlm_train.train.engines import use_bf16

log = logging.getLogger(__name__)


def resolve_data_config(spec: str, overrides: Sequence[str], run_data: DataConfig | None) -> DataConfig:
    """--data (run | a packaged data config name | a YAML file) with `data.KEY=VALUE` overrides merged on top."""
    if spec == "run":
        if run_data is None:
            raise ValueError("--target has no training data config (a Hugging Face folder?): pass --data NAME or FILE")
        base = OmegaConf.structured(run_data)
    elif spec.endswith((".yaml", ".yml")) or os.path.isfile(spec):
        base = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(spec))
    else:
        base = OmegaConf.structured(compose_config(f"data={spec}").data)
    wrong = [o for o in overrides if not o.startswith("data.") or "=" not in o]
    if wrong:
        raise ValueError(f"overrides must look like data.KEY=VALUE, got {wrong}")
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist([o[len("data.") :] for o in overrides]))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def quotas(sources: list[Source], total: int) -> dict[str, int]:
    """Samples per source: `total` split by weight (largest remainders first); 0 means every sample."""
    if total <= 0:
        return {s.name: 0 for s in sources}
    weight = sum(s.weight for s in sources)
    exact = {s.name: total * s.weight / weight for s in sources}
    out = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: out[n] - exact[n])[: total - sum(out.values())]:
        out[name] += 1
    return out


def encoded_samples(
    source: Source, data: DataConfig, encoder: Encoder, packer: Packer, seed: int, skipped: Counter
) -> Iterator[EncodedSample]:
    """A source's samples in shard order, each encoded as the training loader encodes it in epoch 0 (the same calls
    as SlotStream._encode, then the packer's too-long policy); unusable ones are counted in `skipped`."""
    for url in source.urls:
        try:
            for raw in iter_shard(url):
                key = restore_key(source.name, 0, raw)
                try:
                    spec = encoder.spec
                    factor = spec.patch_size * spec.merge_size
                    sample = parse_sample(
                        raw, source.name, data.image.max_decode_pixels, source.format, video=data.video, factor=factor
                    )
                    encoded = packer.check(encoder.encode(sample, rng=sample_rng(seed, key)))
                except SkipSample as exc:
                    skipped[exc.reason] += 1
                    continue
                encoded.meta["restore_key"] = key
                yield encoded
        except ShardError as exc:
            log.warning("source %s: %s; skipping the rest of the shard", source.name, exc)
            skipped["shard_error"] += 1


class SourceWriter:
    """One source's shards DIR/NAME-000000.tar, ...: runs the target over groups of samples that fit one pack."""

    def __init__(self, out: Path, source: Source, samples_per_shard: int, dump: Dumper):
        self.pattern = str(out / f"{source.name}-%06d.tar")
        self.sink = wds.ShardWriter(self.pattern, maxcount=samples_per_shard, verbose=0, encoder=False, mtime=0)
        self.dump = dump
        self.group: list[EncodedSample] = []
        self.sizes = (0, 0, 0)  # the group's tokens, patches, images
        self.samples = self.tokens = 0

    def add(self, sample: EncodedSample) -> None:
        """Buffer a sample; the target runs over the group when the sample would take it over the pack budgets."""
        size = (sample.num_tokens, sample.num_patches, int(sample.image_grid_thw.shape[0]))
        if self.group and self.dump.budget.overflow(*(a + b for a, b in zip(self.sizes, size))) is not None:
            self.flush()
        self.group.append(sample)
        self.sizes = tuple(a + b for a, b in zip(self.sizes, size))

    def flush(self) -> None:
        if not self.group:
            return
        batch = collate(self.group, image_token_id=self.dump.image_token_id).to(self.dump.device)
        with self.dump.autocast():
            features = target_features(self.dump.model, batch, self.dump.layers, self.dump.dtype)
        aux, final = features.aux.cpu(), features.final.cpu()
        bounds = batch.cu_seqlens.tolist()
        for sample, a, b in zip(self.group, bounds[:-1], bounds[1:]):
            key = sample.meta["restore_key"]
            record = {
                "key": key["key"],
                "source": key["source"],
                "task": sample.meta.get("task"),
                "url": key["url"],
                "index": key["index"],
            }
            name = safe_key(key["key"], self.samples)
            self.sink.write(write_sample(name, record, sample, aux[a:b].clone(), final[a:b].clone()))
            self.samples += 1
            self.tokens += sample.num_tokens
        self.group, self.sizes = [], (0, 0, 0)

    def close(self) -> list[str]:
        """Flush and close; the shard file names written (none for a source without samples)."""
        self.flush()
        count = self.sink.shard
        self.sink.close()
        names = [Path(self.pattern % i).name for i in range(count)]
        if self.samples == 0:  # the writer opens its first shard up front
            Path(self.pattern % 0).unlink(missing_ok=True)
            names = []
        return names


class Dumper:
    """The target on its device with what every group's forward needs."""

    def __init__(self, model: VLM, layers: list[int], dtype: str, device: torch.device, bf16: bool, data: DataConfig):
        self.model, self.layers, self.dtype, self.device, self.bf16 = model, tuple(layers), dtype, device, bf16
        self.image_token_id = model.image_token_id
        self.budget = data.pack.budget()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def _layers(spec: str, num_layers: int) -> list[int]:
    if not spec:
        return default_layers(num_layers)
    layers = [int(i) for i in spec.split(",")]
    if len(layers) != 3 or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"--layers {spec}: 3 layers of the target's {num_layers}, e.g. {default_layers(num_layers)}")
    return layers


def dump(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: hidden states go to a folder of their own")
    device = pick_device(args.device, 0)
    loaded = load(args.target, device=device, dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    run_data = read_data_config(loaded.path) if loaded.kind == "vlm_train" else None
    data = resolve_data_config(args.data, args.overrides, run_data)
    seed = args.seed
    if seed is None:  # the target run's own seed: its per-sample image randomness, if any, is reproduced
        seed = int(read_config(loaded.path).get("run", {}).get("seed", 0)) if loaded.kind == "vlm_train" else 0
    layers = _layers(args.layers, model.cfg.llm.num_layers)
    bf16 = use_bf16(EngineConfig(bf16=args.bf16), device)
    # The data's sources (the synthetic shards are made if asked); samples are encoded with the target's tokenizer.
    sources = []
    for source in build_data(data, model.cfg).sources:
        # data.mixture replaces the sources' weights; those it does not name drop out, as in training
        source.weight = float(data.mixture.get(source.name, 0.0)) if data.mixture else source.weight
        if source.weight > 0:
            sources.append(source)
    encoder = build_encoder(tokenizer, data, model.cfg)
    packer = Packer(data.pack, special=encoder.special)
    dumper = Dumper(model, layers, args.dtype, device, bf16, data)
    out.mkdir(parents=True, exist_ok=True)

    listed, report = [], {}
    wanted = quotas(sources, args.num_samples)
    for source in sources:
        skipped: Counter = Counter()
        writer = SourceWriter(out, source, args.samples_per_shard, dumper)
        for sample in encoded_samples(source, data, encoder, packer, seed, skipped):
            writer.add(sample)
            if wanted[source.name] and writer.samples + len(writer.group) >= wanted[source.name]:
                break
        shards = writer.close()
        listed.append(
            {
                "name": source.name,
                "weight": source.weight,
                "format": source.format,
                "shards": shards,
                "samples": writer.samples,
                "tokens": writer.tokens,
                "skipped": dict(skipped),
            }
        )
        report[source.name] = {"samples": writer.samples, "tokens": writer.tokens, "skipped": dict(skipped)}

    head, embed = model.llm.lm_head.weight, model.llm.embed_tokens.weight
    # float32 copies (clones: a tied head and embedding share storage, which safetensors refuses)
    save_file(
        {"lm_head": head.detach().float().cpu().clone(), "embed_tokens": embed.detach().float().cpu().clone()},
        str(out / HEAD_FILE),
    )
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    samples = sum(s["samples"] for s in listed)
    tokens = sum(s["tokens"] for s in listed)
    size = sum((out / name).stat().st_size for s in listed for name in s["shards"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "target": str(args.target),
        "checkpoint": str(loaded.path),
        "kind": loaded.kind,
        **describe_target(model, tokenizer),
        "embed_sha256": tensor_sha256(embed),
        "layers": layers,
        "dtype": args.dtype,
        "image_token_id": model.image_token_id,
        "seed": seed,
        "bf16_autocast": bf16,
        "data": OmegaConf.to_container(OmegaConf.structured(data)),
        "sources": listed,
        "samples": samples,
        "tokens": tokens,
        "bytes": size,
    }
    (out / MANIFEST).write_text(dumps(manifest, indent=1))  # last: a folder without it is an unfinished dump
    return {
        "out": str(out),
        "samples": samples,
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": size / max(tokens, 1),
        "hidden_size": model.cfg.llm.hidden_size,
        "layers": layers,
        "dtype": args.dtype,
        "sources": report,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="one of our run or checkpoint folders, or a HF Qwen2.5-VL")
    parser.add_argument("--out", required=True, help="an empty (or new) folder for the shards and manifest")
    parser.add_argument("--num-samples", type=int, default=0, help="samples in all, split by weight (0: every one)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(STORAGE_DTYPES), help="storage precision")
    parser.add_argument(
        "--layers",
        default="",
        help="the 3 target layers the draft reads, e.g. 1,13,24 (default: "
        "vlm_train.model.draft.default_layers, as eagle3.draft.target_layers=[] reads)",
    )
    parser.add_argument("--data", default="run", help="run (the target's own), a packaged data config name, or a YAML")
    parser.add_argument("--seed", type=int, default=None, help="run.seed of the training to match (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--bf16", default="auto", help="bf16 autocast for the target: auto (on a GPU) | true | false")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("overrides", nargs="*", help="data.KEY=VALUE overrides of the data config")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be at least 1")
    result = dump(args)
    print(dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
