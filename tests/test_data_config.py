"""A user's own data config: only `sources`, picked with data=NAME from a --config-dir, everything else defaulted."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from vlm_train.data.loader import build_loader
from vlm_train.train.builders import build_data, build_stream

from test_loader import write_shards


def _config(conf_dir, *overrides):
    with initialize_config_module(config_module="vlm_train.conf", version_base=None):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{conf_dir}]", *overrides])
    return OmegaConf.to_object(cfg)


def test_a_user_data_config_with_only_sources_trains_from_its_shards(tmp_path):
    urls = write_shards(tmp_path, 2, 4)
    (tmp_path / "conf" / "data").mkdir(parents=True)
    pattern = str(tmp_path / "shard-{000..001}.tar")
    (tmp_path / "conf" / "data" / "mine.yaml").write_text(
        f"sources:\n  - name: web\n    urls: {pattern}\n    weight: 2\n    format: caption\n"
    )
    cfg = _config(tmp_path / "conf", "data=mine", "data.pack.buffer_size=2")
    assert not cfg.data.use_synthetic and cfg.data.num_workers == 0 and cfg.data.shuffle_buffer == 256
    setup = build_data(cfg.data, cfg.model)
    assert [(s.name, s.urls, s.weight, s.format) for s in setup.sources] == [("web", urls, 2.0, "caption")]
    pack = next(build_loader(build_stream(setup, cfg.data, seed=0), 0))
    assert pack.num_samples >= 1 and {m["source"] for m in pack.meta} == {"web"}


def test_shell_command_urls_need_the_config_to_allow_them(tmp_path):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "piped.yaml").write_text(
        "sources:\n  - name: web\n    urls: 'pipe:cat /x/{0..1}.tar'\n"
    )
    cfg = _config(tmp_path / "conf", "data=piped")
    with pytest.raises(ValueError, match="allow_pipe"):
        build_data(cfg.data, cfg.model)
    (tmp_path / "conf" / "data" / "nourls.yaml").write_text("sources:\n  - name: web\n")
    with pytest.raises(Exception, match=r"sources\[0\]\.urls"):
        _config(tmp_path / "conf", "data=nourls")


def test_resize_method_is_chosen_from_the_data_config():
    from vlm_train.data.config import DataConfig
    from vlm_train.model.config import ModelConfig
    from vlm_train.train.builders import patch_spec

    data = DataConfig()
    data.image.resize = "torch"
    assert patch_spec(ModelConfig(), data).resize == "torch"
    data.image.resize = "lanczos"
    with pytest.raises(ValueError, match="resize"):
        patch_spec(ModelConfig(), data)
