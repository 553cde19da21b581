"""Data: shards -> samples -> encode -> packer -> PackedBatch."""

from vlm_train.data.batch import IGNORE_INDEX, PackedBatch

__all__ = ["IGNORE_INDEX", "PackedBatch"]
