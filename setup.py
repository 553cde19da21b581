"""Install vlm_train. The Hydra configs in conf/ ship inside the package as vlm_train.conf."""

from setuptools import find_packages, setup

setup(
    name="vlm_train",
    version="0.1.0",
    description="Packed-sequence pretraining of vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["vlm_train", "vlm_train.*"]) + ["vlm_train.conf"],
    package_dir={"vlm_train.conf": "conf"},
    package_data={"vlm_train.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.100",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.24",
        "av>=14",  # PyAV: video decoding (its wheels bundle FFmpeg with H.264, VP9 and AV1 decoders)
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2.4,<3", "matplotlib>=3.7", "ruff==0.17.6"],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "vlm-train=vlm_train.train.main:main",
            "vlm-generate=vlm_train.cli:vlm_generate",
            "vlm-evaluate=vlm_train.cli:vlm_evaluate",
            "vlm-convert-hf=vlm_train.cli:vlm_convert_hf",
            "vlm-merge-checkpoints=vlm_train.cli:vlm_merge_checkpoints",
            "vlm-make-shards=vlm_train.cli:vlm_make_shards",
            "vlm-inspect-shards=vlm_train.cli:vlm_inspect_shards",
            "vlm-speculate=vlm_train.cli:vlm_speculate",
            "vlm-export-eagle3=vlm_train.cli:vlm_export_eagle3",
            "vlm-dump-hidden-states=vlm_train.cli:vlm_dump_hidden_states",
        ]
    },
)
