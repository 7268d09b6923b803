"""Data: the latent-shard schema, the WebDataset datamodule and synthetic shards."""

from .datamodule import LatentShardDataModule, SyntheticLatentDataModule, resolve_shards
from .schema import SCHEMA_NAME, SCHEMA_VERSION, SchemaError, decode_sample
from .synthetic import write_synthetic_shards

__all__ = [
    "LatentShardDataModule",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "SchemaError",
    "SyntheticLatentDataModule",
    "decode_sample",
    "resolve_shards",
    "write_synthetic_shards",
]
