"""The fixed validation list: which clips validation samples, and the speech that goes with them.

The clips are the first ``num_samples`` samples of latent shards, or those a list file names
(sample keys or source videos, HDTF-style splits). Latent shards hold wav2vec features, not
waveforms, so Sync and the samples' sound read the speech from an audio folder or from the raw
shards the latents were encoded from.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..media import read_audio

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")


def read_clip_list(path: str | Path, key: str = "callbacks.validation.clips") -> list[str]:
    """Entries of a validation list file: one per line, a sample key (``<video>_<hash>_<clip>``, as
    ``ft-prep`` names them) or a source video (its name, with or without extension or folder);
    blank lines and ``#`` comments are ignored."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}: no file at {path}; give a text file with one clip key or video name per line")
    entries = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        raise ValueError(f"{key}: {path} lists no clips")
    return entries


def _video_of(sample_key: str) -> str:
    """The source-video part of an ``ft-prep`` sample key (``<stem>_<8 hex>_<5 digits>``)."""
    parts = sample_key.rsplit("_", 2)
    if len(parts) == 3 and len(parts[1]) == 8 and parts[2].isdigit():
        return parts[0]
    return sample_key


def _entry_video(entry: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(entry).stem if Path(entry).suffix else Path(entry).name)


def read_validation_samples(
    shards: str | Sequence[str], num_samples: int, key: str, clips: str | Path | None = None
) -> list[dict[str, Any]]:
    """The validation list: with ``clips`` (:func:`read_clip_list`), the listed clips in the list's
    order (a video entry contributes its first clip in shard order); without, the first
    ``num_samples`` samples of the latent shards (sorted shard order, no shuffling)."""
    import webdataset as wds

    from .datamodule import resolve_shards
    from .schema import decode_sample

    urls = resolve_shards(shards, key=key)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    if clips is not None:
        entries = read_clip_list(clips)
        found: dict[str, dict[str, Any]] = {}
        for raw in ds.decode():
            sample_key = raw["__key__"]
            for entry in entries:
                if entry in found:
                    continue
                if entry == sample_key or _entry_video(entry) == _video_of(sample_key):
                    found[entry] = raw
            if len(found) == len(entries):
                break
        missing = [e for e in entries if e not in found]
        if missing:
            raise ValueError(
                f"callbacks.validation.clips: {len(missing)} of {len(entries)} entries of {clips} are not in "
                f"{key} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); fix the list or the shards"
            )
        out = []
        for entry in entries:
            sample = decode_sample(found[entry])
            sample["__key__"] = found[entry]["__key__"]
            out.append(sample)
        return out
    out: list[dict[str, Any]] = []
    for raw in ds.decode():
        sample = decode_sample(raw)
        sample["__key__"] = raw["__key__"]
        out.append(sample)
        if len(out) == num_samples:
            break
    if not out:
        raise ValueError(f"{key}: no samples in {shards!r}")
    if len(out) < num_samples:
        log.warning("%s: only %d validation samples found (num_samples=%d)", key, len(out), num_samples)
    return out


def find_audio(keys: Sequence[str], audio_dir: str | Path | None, raw_shards: Any) -> dict[str, np.ndarray]:
    """Waveforms of the validation clips by sample key, from ``<audio_dir>/<key>.<ext>`` or raw shards' ``flac``."""
    found: dict[str, np.ndarray] = {}
    if audio_dir:
        folder = Path(audio_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"callbacks.validation.audio_dir: no folder at {folder}")
        for k in keys:
            for ext in AUDIO_EXTENSIONS:
                if (folder / f"{k}{ext}").is_file():
                    found[k] = read_audio(folder / f"{k}{ext}")
                    break
    if raw_shards and len(found) < len(keys):
        import webdataset as wds

        from .datamodule import resolve_shards

        wanted = set(keys) - set(found)
        urls = resolve_shards(raw_shards, key="callbacks.validation.raw_shards")
        for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None):
            if raw["__key__"] in wanted and "flac" in raw:
                found[raw["__key__"]] = read_audio(raw["flac"])
                wanted.discard(raw["__key__"])
                if not wanted:
                    break
    return found


__all__ = ["AUDIO_EXTENSIONS", "find_audio", "read_clip_list", "read_validation_samples"]
