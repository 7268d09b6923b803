"""Latent shards: the synthetic writer, the schema decoder and the datamodule."""

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from ft_train.data import LatentShardDataModule, SchemaError, decode_sample, write_synthetic_shards
from ft_train.data.datamodule import collate_samples
from ft_train.data.schema import SCHEMA_VERSION


def read_raw(shard):
    return list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode())


def test_synthetic_shards_follow_the_schema(tmp_path):
    shards = write_synthetic_shards(tmp_path, num_samples=5, samples_per_shard=2, num_frames=33, fps=25.0, latent_hw=(4, 6))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    raw = read_raw(shards[0])
    assert len(raw) == 2
    sample = decode_sample(raw[0])
    assert sample["latents"].shape == (16, 9, 4, 6)
    assert sample["image_latents"].shape == (16, 9, 4, 6)
    assert torch.equal(sample["image_latents"][:, 0], sample["latents"][:, 0])  # VAE(first frame, zeros...)
    assert sample["image_latents"][:, 1:].abs().sum() == 0
    assert sample["clip"].shape == (257, 1280)
    assert sample["text"].shape == (512, 4096)
    n = int(sample["text_len"])
    assert sample["text"][n:].abs().sum() == 0 and sample["text"][:n].abs().sum() > 0
    assert sample["audio"].shape == (65, 768)  # 33 frames at 25 fps = 1.32 s = 21,120 samples -> 65 tokens
    assert sample["lip_mask"].shape == (9, 4, 6) and set(sample["lip_mask"].unique().tolist()) == {0.0, 1.0}
    assert 0 <= sample["motion"].min() and sample["motion"].max() <= 1


def test_rewriting_with_same_parameters_reuses_shards(tmp_path):
    first = write_synthetic_shards(tmp_path, num_samples=2, samples_per_shard=2, num_frames=9)
    mtime = first[0].stat().st_mtime_ns
    again = write_synthetic_shards(tmp_path, num_samples=2, samples_per_shard=2, num_frames=9)
    assert again == first and first[0].stat().st_mtime_ns == mtime


def test_wrong_schema_version_is_a_clear_error(tmp_path):
    shard = write_synthetic_shards(tmp_path, num_samples=1, samples_per_shard=1, num_frames=9)[0]
    raw = read_raw(shard)[0]
    raw["json"]["version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaError, match="schema version 2.*re-run the encode pass"):
        decode_sample(raw)
    raw["json"]["schema"] = "something-else"
    with pytest.raises(SchemaError, match="not a latent shard"):
        decode_sample(raw)


def corrupt_one_sample(src, dst):
    """Copy a shard, giving its second sample an unreadable latents.npy."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        members = tin.getmembers()
        keys = sorted({m.name.split(".")[0] for m in members})
        for m in members:
            data = tin.extractfile(m).read()
            if m.name.startswith(keys[1]) and m.name.endswith("latents.npy") and "image" not in m.name:
                data = b"not a numpy file"
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    return keys


def test_datamodule_skips_and_counts_a_bad_sample(tmp_path):
    src = write_synthetic_shards(tmp_path / "src", num_samples=3, samples_per_shard=3, num_frames=9)[0]
    (tmp_path / "bad").mkdir()
    keys = corrupt_one_sample(src, tmp_path / "bad" / "shard-000000.tar")
    dm = LatentShardDataModule(str(tmp_path / "bad"), batch_size=1, num_workers=0, shuffle_buffer=0)
    it = iter(dm.train_dataloader())
    seen = [next(it)["__key__"][0] for _ in range(4)]
    assert keys[1] not in seen
    assert set(seen) == {keys[0], keys[2]}
    assert dm.skips.skipped >= 1


def test_missing_shards_name_the_key(tmp_path):
    dm = LatentShardDataModule(str(tmp_path / "nothing-here"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="data.shards: no .tar shards"):
        dm.train_dataloader()


def test_face_member_is_optional(tmp_path):
    """Shards with the identity branch's ``face.npy`` give ``face``; older shards without it still
    load (same schema version), and a batch mixing both leaves ``face`` out."""
    src = write_synthetic_shards(tmp_path / "src", num_samples=4, samples_per_shard=2, num_frames=9)
    out = tmp_path / "mixed"
    out.mkdir()
    rng = np.random.default_rng(0)
    for i, shard in enumerate(src):
        with wds.TarWriter(str(out / shard.name)) as sink:
            for s in read_raw(shard):
                s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                if i == 0:
                    s["face.npy"] = rng.standard_normal((257, s["clip.npy"].shape[1])).astype(np.float16)
                sink.write(s)
    with_face = [decode_sample(r) for r in read_raw(out / src[0].name)]
    without = [decode_sample(r) for r in read_raw(out / src[1].name)]
    assert all(x["face"].shape == (257, 1280) and x["face"].dtype == torch.float32 for x in with_face)
    assert all("face" not in x for x in without)
    dm = LatentShardDataModule(str(out), batch_size=2, num_workers=0, shuffle_buffer=0)
    first, second = itertools.islice(iter(dm.train_dataloader()), 2)
    assert first["face"].shape == (2, 257, 1280) and "face" not in second
    assert "face" not in collate_samples([with_face[0], without[0]])
    bad = read_raw(out / src[0].name)[0]
    bad["face.npy"] = np.zeros((2, 257, 4), np.float16)
    with pytest.raises(SchemaError, match="face must be"):
        decode_sample(bad)


def test_face_pixels_member_becomes_the_face_crop_in_minus_one_to_one(tmp_path):
    """``face_pixels.npy`` (uint8, encode.face=pixels) gives ``face`` = the crop as float in
    [-1, 1], what the ArcFace encoder reads; a sample with both face forms, or pixels that are
    not uint8, is rejected."""
    (shard,) = write_synthetic_shards(tmp_path, num_samples=1, samples_per_shard=1, num_frames=9)
    raw = read_raw(shard)[0]
    crop = np.random.default_rng(0).integers(0, 256, (3, 112, 112), dtype=np.uint8)
    crop[:, 0, 0] = (0, 255, 128)
    sample = decode_sample({**raw, "face_pixels.npy": crop})
    assert sample["face"].shape == (3, 112, 112) and sample["face"].dtype == torch.float32
    assert sample["face"][:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    torch.testing.assert_close(sample["face"], torch.from_numpy(crop).float() / 127.5 - 1)
    with pytest.raises(SchemaError, match="face_pixels must be uint8"):
        decode_sample({**raw, "face_pixels.npy": crop.astype(np.float16)})
    with pytest.raises(SchemaError, match="holds both face and face_pixels"):
        decode_sample({**raw, "face_pixels.npy": crop, "face.npy": np.zeros((257, 1280), np.float16)})


def test_resume_past_whole_passes_over_the_data(tmp_path):
    """A resume that skips more samples than one pass over the shards holds (a small dataset, many
    epochs in) continues the stream where the uninterrupted run was, rather than ending it."""
    write_synthetic_shards(tmp_path, num_samples=3, samples_per_shard=3, num_frames=9)
    dm = LatentShardDataModule(str(tmp_path), batch_size=1, num_workers=0, shuffle_buffer=2)

    def keys(ds, n):
        return [s["__key__"] for s in itertools.islice(iter(ds), n)]

    full = keys(dm.dataset(0), 10)
    assert keys(dm.dataset(7), 3) == full[7:10]


def test_skip_counts_cross_from_loader_workers(tmp_path):
    """Workers are processes: their skips reach the training loop inside the batches."""
    src = write_synthetic_shards(tmp_path / "src", num_samples=3, samples_per_shard=3, num_frames=9)[0]
    (tmp_path / "bad").mkdir()
    corrupt_one_sample(src, tmp_path / "bad" / "shard-000000.tar")
    dm = LatentShardDataModule(str(tmp_path / "bad"), batch_size=1, num_workers=1, shuffle_buffer=0)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 6))  # three passes over 2 good samples
    assert [int(b["skipped"].sum()) for b in batches] == [0, 1, 0, 1, 0, 1]
    assert dm.skips.skipped == 0  # the main process's own counter never sees them


def _train_on(shards, out, *extra):
    from hydra import compose, initialize_config_dir

    from ft_train.train import train

    from .conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=tiny_cpu", "stages=null", "stage.max_steps=6", "data=latent", f"data.shards={shards}",
            "data.num_workers=1", "data.shuffle_buffer=0", f"paths.output_dir={out}", "trainer.log_every_n_steps=1",
            *extra])
    return train(cfg)


def test_training_counts_skipped_samples_and_stops_when_too_many(tmp_path):
    src = write_synthetic_shards(tmp_path / "src", num_samples=3, samples_per_shard=3, num_frames=9)[0]
    (tmp_path / "bad").mkdir()
    corrupt_one_sample(src, tmp_path / "bad" / "shard-000000.tar")  # 1 of every 3 samples is unreadable

    result = _train_on(tmp_path / "bad", tmp_path / "ok", "faults.max_skipped_fraction=0.5", "faults.skip_check_after=2")
    # 6 steps read 6 good samples and skipped the bad one 3 times (the sixth good one ends pass 3)
    assert result["module"].samples_used == 6 and result["module"].samples_skipped == 3
    assert result["metrics"]["data/skipped"] == 3.0

    with pytest.raises(RuntimeError, match=r"1 of 3 samples.*faults.max_skipped_fraction=0.2"):
        _train_on(tmp_path / "bad", tmp_path / "stop", "faults.max_skipped_fraction=0.2", "faults.skip_check_after=3")
