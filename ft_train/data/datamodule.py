"""WebDataset datamodule over latent shards (schema in ``schema.py``); raw shards: ``raw.py``."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader, default_collate

from .schema import decode_sample
from .synthetic import write_synthetic_shards

log = logging.getLogger(__name__)


def resolve_shards(spec: str | Sequence[str], key: str = "data.shards") -> list[str]:
    """Expand a shard spec into a sorted list of ``.tar`` paths.

    ``spec`` is one or a list of: a directory (all ``*.tar`` in it), a brace pattern
    (``shard-{000000..000009}.tar``) or a glob. Raises a one-line error naming ``key`` when
    nothing matches.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            urls += sorted(str(p) for p in Path(item).glob("*.tar"))
            continue
        for pattern in braceexpand(item):
            matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            urls += [m for m in matches if os.path.isfile(m)]
    if not urls:
        raise FileNotFoundError(f"{key}: no .tar shards found at {spec!r}; point it at a shard folder or pattern")
    return urls


class SkipCounter:
    """WebDataset error handler: warn with the shard and key, count, and keep going."""

    def __init__(self) -> None:
        self.skipped = 0

    def __call__(self, exn: Exception) -> bool:
        self.skipped += 1
        log.warning("skipping bad sample (%d so far): %s", self.skipped, exn)
        return True


def virtual_worker(batches_consumed: int) -> tuple[int, int]:
    """(stream index, number of workers) of the current loader worker after a resume.

    A ``DataLoader`` over an endless ``IterableDataset`` takes batch ``i`` from worker
    ``i mod W``, and a fresh loader starts again at worker 0. After ``k`` batches, the batch the
    uninterrupted run would take next came from stream ``k mod W``; so real worker ``r`` of the
    resumed loader continues stream ``(r + k) mod W``.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + batches_consumed) % info.num_workers, info.num_workers


class WorkerSplit:
    """WebDataset worker splitter: stream ``v`` of ``W`` reads shards ``v, v+W, …`` (see
    :func:`virtual_worker`)."""

    def __init__(self, batches_consumed: int = 0):
        self.batches_consumed = batches_consumed

    def __call__(self, urls):
        stream, streams = virtual_worker(self.batches_consumed)
        for i, url in enumerate(urls):
            if i % streams == stream:
                yield url


class ResumeSkip:
    """Pipeline stage that drops the samples this worker's stream delivered before a resume.

    The sample stream is a pure function of (seed, epoch, rank, stream). After ``k`` batches,
    stream ``v`` of ``W`` has produced ``ceil((k − v) / W)`` batches; dropping exactly those
    samples puts every stream where the uninterrupted run was. It runs after decoding, so samples
    that were skipped as unreadable are not counted.
    """

    def __init__(self, batches_consumed: int, batch_size: int):
        self.batches_consumed = batches_consumed
        self.batch_size = batch_size
        self.remaining: int | None = None  # per worker process (each worker has its own copy)
        self.dropped = 0

    def __call__(self, src):
        if self.remaining is None:
            stream, streams = virtual_worker(self.batches_consumed)
            mine = max(0, -(-(self.batches_consumed - stream) // streams))
            self.remaining = mine * self.batch_size
        for sample in src:
            if self.remaining > 0:
                self.remaining -= 1
                self.dropped += 1
                continue
            yield sample


class Endless(torch.utils.data.IterableDataset):
    """Pass over a one-epoch WebDataset pipeline again and again (each pass reshuffles the shards
    by epoch); the run length is ``trainer.max_steps``.

    WebDataset's own ``repeat()`` ends the stream at the first pass that yields nothing, meant
    for an empty dataset; but a resume that skips more samples than one pass holds (a small
    dataset, many epochs in) empties whole passes on purpose. Here a pass only ends the stream
    when it yielded nothing and :class:`ResumeSkip` dropped nothing either: no usable sample at
    all in this worker's shards (logged, as the skipped samples were).

    Each sample also gets ``skipped``: how many unreadable samples this worker skipped since its
    previous sample. Workers are separate processes, so this is how their skip counts reach the
    training loop, which sums them (``data/skipped``) and stops a run whose data is mostly broken
    (``faults.max_skipped_fraction``).
    """

    def __init__(self, pipeline: wds.WebDataset, resume_skip: ResumeSkip | None = None,
                 skips: SkipCounter | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.resume_skip = resume_skip  # the very stage inside `pipeline` (pickled together)
        self.skips = skips  # the pipeline's own error handler (pickled together, so the same object)

    def __iter__(self):
        reported = self.skips.skipped if self.skips is not None else 0
        while True:
            dropped = self.resume_skip.dropped if self.resume_skip is not None else 0
            yielded = 0
            for sample in self.pipeline:
                yielded += 1
                if self.skips is not None:
                    sample["skipped"] = self.skips.skipped - reported
                    reported = self.skips.skipped
                yield sample
            if not yielded and (self.resume_skip is None or self.resume_skip.dropped == dropped):
                log.warning("data: a whole pass over this loader's shards gave no usable sample; its stream ends")
                return


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` over the keys every sample has.

    Optional members (``face``) may be present in some shards and not in others (shards written
    before the member existed); a batch mixing both drops the key, so the model falls back for
    that batch (the identity branch to the CLIP tokens) instead of the loader crashing.
    """
    keys = set(samples[0]).intersection(*samples[1:])
    dropped = set(samples[0]).union(*samples[1:]) - keys
    if dropped:
        log.debug("batch mixes samples with and without %s: dropped for this batch", sorted(dropped))
    shapes = {tuple(s["latents"].shape) for s in samples if torch.is_tensor(s.get("latents"))}
    if len(shapes) > 1:
        raise ValueError(
            f"data.batch_size={len(samples)}: one batch met clips of different sizes (latents {sorted(shapes)}); "
            "use data.batch_size=1 for shards of mixed sizes, or encode them into one size (buckets)"
        )
    return default_collate([{k: s[k] for k in keys} for s in samples])


class LatentShardDataModule(L.LightningDataModule):
    """Training batches from latent shards.

    Each rank reads a disjoint subset of shards (``split_by_node``), each loader worker a subset of
    those; the stream repeats forever and training length is set by ``trainer.max_steps``. The
    order is a pure function of the seed, the epoch and the (rank, worker), and on resume the
    samples already trained on are skipped (:class:`ResumeSkip`), so a resumed run sees exactly
    the batches the uninterrupted run would have (with the same ``num_workers`` and batch size).

    Args:
        shards: directory, brace pattern, glob, or list of them.
        batch_size: samples per rank per micro-step.
        num_workers: loader processes per rank (reduced when there are fewer shards per rank).
        shuffle_buffer: samples in the shuffle buffer (0 = read in order).
        seed: seeds the shard order and shuffle buffer.
    Batch: the dict of :func:`ft_train.data.schema.decode_sample`, stacked along dim 0.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        batch_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        self.shards = shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.skips = SkipCounter()
        self.null_text: torch.Tensor | None = None

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str | None = None) -> None:
        # Before the LightningModule's on_fit_start, which hands null_text to the loss; the
        # loader (and dataset()) may only be built after it.
        self.load_null_text(resolve_shards(self.shards))

    def load_null_text(self, urls: list[str]) -> None:
        """``null_text.npy`` beside the shards (the encode pass writes it): the empty prompt's
        embedding that text dropout substitutes."""
        null = Path(urls[0]).parent / "null_text.npy"
        if null.is_file():
            self.null_text = torch.from_numpy(np.load(null)).float()

    def shard_stream(self, urls: list[str], batches_consumed: int) -> wds.WebDataset:
        """The samples of this rank's share of the shards, as undecoded tar members, shuffled."""
        _, world = self._world()
        if len(urls) < world:
            raise ValueError(
                f"data.shards: {len(urls)} shards cannot feed {world} ranks; write at least one shard per rank"
            )
        ds = wds.WebDataset(
            urls,
            handler=self.skips,
            shardshuffle=len(urls) if self.shuffle_buffer else False,
            detshuffle=True,
            seed=self.seed,
            nodesplitter=wds.split_by_node,
            workersplitter=WorkerSplit(batches_consumed),
            empty_check=False,
        )
        if self.shuffle_buffer:
            ds = ds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=self.seed)
        return ds

    def samples(self, ds: wds.WebDataset, skip: ResumeSkip | None) -> wds.WebDataset:
        """Tar members → training samples, minus those trained on before a resume (``skip``)."""
        ds = ds.decode(handler=self.skips).map(decode_sample, handler=self.skips)
        return ds.compose(skip) if skip is not None else ds

    def dataset(self, batches_consumed: int = 0) -> Endless:
        urls = resolve_shards(self.shards)
        self.load_null_text(urls)
        skip = ResumeSkip(batches_consumed, self.batch_size) if batches_consumed else None
        return Endless(self.samples(self.shard_stream(urls, batches_consumed), skip), skip, self.skips)

    def batches_consumed(self) -> int:
        """Batches this rank trained on before now: non-zero when resuming from a checkpoint."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        seen = getattr(trainer.lightning_module, "batches_seen", None)  # counts skipped steps too
        return int(seen) if seen is not None else trainer.global_step * max(1, trainer.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(self.batches_consumed())
        _, world = self._world()
        shards_per_rank = len(resolve_shards(self.shards)) // world
        workers = min(self.num_workers, shards_per_rank)
        if workers < self.num_workers:
            log.info("data.num_workers reduced to %d: only %d shards per rank", workers, shards_per_rank)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=workers, persistent_workers=workers > 0,
                          collate_fn=collate_samples)

    def state(self) -> dict[str, Any]:
        return {"skipped": self.skips.skipped}


class SyntheticLatentDataModule(LatentShardDataModule):
    """:class:`LatentShardDataModule` over synthetic shards it writes itself on first use.

    The tiny CPU default and the tests use it, so ``ft-train experiment=tiny_cpu`` needs no data.
    Shape arguments must match the model (``text_dim``/``image_dim`` of the transformer config).
    """

    def __init__(
        self,
        root: str,
        num_samples: int = 32,
        samples_per_shard: int = 8,
        num_frames: int = 81,
        fps: float = 23.0,
        latent_hw: Sequence[int] = (8, 8),
        text_dim: int = 4096,
        image_dim: int = 1280,
        audio_dim: int = 768,
        **kwargs: Any,
    ):
        super().__init__(shards=root, **kwargs)
        self.synthetic = dict(
            num_samples=num_samples, samples_per_shard=samples_per_shard, num_frames=num_frames, fps=fps,
            latent_hw=tuple(latent_hw), text_dim=text_dim, image_dim=image_dim, audio_dim=audio_dim,
        )

    def prepare_data(self) -> None:
        write_synthetic_shards(self.shards, seed=self.seed, **self.synthetic)
