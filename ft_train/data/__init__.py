"""Data: the latent-shard schema, the WebDataset datamodules (latent and raw shards) and synthetic shards."""

from .datamodule import LatentShardDataModule, SyntheticLatentDataModule, resolve_shards
from .raw import RawShardDataModule
from .schema import SCHEMA_NAME, SCHEMA_VERSION, SchemaError, decode_sample, training_sample
from .synthetic import write_synthetic_shards

__all__ = [
    "LatentShardDataModule",
    "RawShardDataModule",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "SchemaError",
    "SyntheticLatentDataModule",
    "decode_sample",
    "resolve_shards",
    "training_sample",
    "write_synthetic_shards",
]
