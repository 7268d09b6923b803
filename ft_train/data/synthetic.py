"""Synthetic latent shards in the ``ft-latent`` schema, for tests and the tiny CPU default.

The samples are random but not meaningless: each clip has a fixed "identity" latent, and inside a
mouth box (which is also the sample's lip mask) the latents of every latent frame move with that
frame's audio window through a fixed linear map. So the audio adapter has something real to learn
— lip motion that only the audio explains — and the lip-weighted loss has a region to focus on.

Usage: ``python -m ft_train.data.synthetic OUT_DIR [--num-samples N] ...``
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from ..models.audio import clip_audio_tokens, latent_frame_to_video_frames, num_latent_frames
from .schema import SCHEMA_NAME, SCHEMA_VERSION

COMPLETE_MARKER = "_SYNTHETIC_COMPLETE.json"


def mouth_box(height: int, width: int) -> tuple[slice, slice]:
    """Lower-centre box of the latent grid standing in for the mouth."""
    top = height * 5 // 8
    return slice(top, max(top + 1, height * 7 // 8)), slice(width // 4, max(width // 4 + 1, 3 * width // 4))


def make_sample(
    rng: np.random.Generator,
    audio_map: np.ndarray,
    num_frames: int,
    fps: float,
    latent_hw: tuple[int, int],
    text_dim: int,
    image_dim: int,
    audio_dim: int,
) -> dict[str, object]:
    """Arrays of one synthetic clip (float16), keyed by schema field."""
    f_lat = num_latent_frames(num_frames)
    h, w = latent_hw
    n_audio = clip_audio_tokens(num_frames, fps)
    # Smooth audio features: random walk, normalised per channel.
    audio = np.cumsum(rng.standard_normal((n_audio, audio_dim)), axis=0)
    audio = (audio - audio.mean(0)) / (audio.std(0) + 1e-6)
    identity = rng.standard_normal((16, h, w)) * 0.8
    latents = np.repeat(identity[:, None], f_lat, axis=1)
    rows, cols = mouth_box(h, w)
    tokens_per_frame = n_audio / num_frames
    for f in range(f_lat):
        frames = latent_frame_to_video_frames(f)
        lo = int(frames.start * tokens_per_frame)
        hi = max(lo + 1, int(frames.stop * tokens_per_frame))
        motion = audio_map @ audio[lo:hi].mean(0)  # (16,)
        latents[:, f, rows, cols] += motion[:, None, None]
    latents += rng.standard_normal(latents.shape) * 0.05
    image_latents = np.zeros_like(latents)
    image_latents[:, 0] = latents[:, 0]
    lip = np.zeros((f_lat, h, w), dtype=np.float16)
    lip[:, rows, cols] = 1
    text_len = int(rng.integers(4, 25))
    return {
        "latents.npy": latents.astype(np.float16),
        "image_latents.npy": image_latents.astype(np.float16),
        "clip.npy": (rng.standard_normal((257, image_dim)) * 0.5).astype(np.float16),
        "text.npy": (rng.standard_normal((text_len, text_dim)) * 0.1).astype(np.float16),
        "audio.npy": audio.astype(np.float16),
        "lip_mask.npy": lip,
    }


def write_synthetic_shards(
    out_dir: str | Path,
    num_samples: int = 32,
    samples_per_shard: int = 8,
    num_frames: int = 81,
    fps: float = 23.0,
    latent_hw: tuple[int, int] = (8, 8),
    text_dim: int = 4096,
    image_dim: int = 1280,
    audio_dim: int = 768,
    seed: int = 0,
) -> list[Path]:
    """Write ``ceil(num_samples / samples_per_shard)`` shards ``shard-NNNNNN.tar`` to ``out_dir``.

    Deterministic in ``seed``. Each shard is written to a temporary name and renamed when
    complete; a marker file records the parameters, and a second call with the same parameters
    reuses the shards instead of rewriting them.
    """
    if (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "num_samples": num_samples, "samples_per_shard": samples_per_shard, "num_frames": num_frames,
        "fps": fps, "latent_hw": list(latent_hw), "text_dim": text_dim, "image_dim": image_dim,
        "audio_dim": audio_dim, "seed": seed, "schema": SCHEMA_NAME, "version": SCHEMA_VERSION,
    }
    marker = out / COMPLETE_MARKER
    num_shards = -(-num_samples // samples_per_shard)
    shards = [out / f"shard-{i:06d}.tar" for i in range(num_shards)]
    if marker.is_file() and json.loads(marker.read_text()) == params and all(s.is_file() for s in shards):
        return shards
    rng = np.random.default_rng(seed)
    audio_map = rng.standard_normal((16, audio_dim)) / np.sqrt(audio_dim) * 1.5
    index = 0
    for shard in shards:
        tmp = shard.with_name(shard.name + f".tmp{os.getpid()}")
        with wds.TarWriter(str(tmp)) as sink:
            for _ in range(min(samples_per_shard, num_samples - index)):
                sample = make_sample(rng, audio_map, num_frames, fps, latent_hw, text_dim, image_dim, audio_dim)
                sample["__key__"] = f"synthetic-{index:06d}"
                sample["json"] = {
                    "schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "fps": fps, "num_frames": num_frames,
                    "height": latent_hw[0] * 8, "width": latent_hw[1] * 8,
                    "omega_l": float(rng.uniform()), "omega_b": float(rng.uniform()),
                    "caption": "a person is talking", "source": "synthetic",
                }
                sink.write(sample)
                index += 1
        os.replace(tmp, shard)
    tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")  # runs sharing an output_dir may write it at once
    tmp.write_text(json.dumps(params, indent=1))
    os.replace(tmp, marker)
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--fps", type=float, default=23.0)
    parser.add_argument("--latent-hw", type=int, nargs=2, default=(8, 8))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shards = write_synthetic_shards(
        args.out_dir, args.num_samples, args.samples_per_shard, args.num_frames, args.fps,
        tuple(args.latent_hw), seed=args.seed,
    )
    print(f"wrote {len(shards)} shards to {args.out_dir}")


if __name__ == "__main__":
    main()
