"""Raw-mode training (``data=raw``): batches encoded on the fly from ft-prep's raw shards agree with
the latent-cache pass, windows are random yet aligned and resumable, and ft-train trains on them."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from ft_train import media
from ft_train.data import LatentShardDataModule, RawShardDataModule
from ft_train.data.datamodule import collate_samples
from ft_train.data.face import landmark_motion
from ft_train.data.raw_clip import apply_geometry, plan_geometry
from ft_train.data.raw_format import decode_lip_masks, decode_npz, normalise_motion
from ft_train.models.audio import clip_audio_tokens, split_audio_windows
from ft_train.data.clip_prep import crop_face, encode_clips
from ft_train.models.encoders import load_encoders
from ft_train.train import train

from .conftest import CONF
from .test_encode_pass import FPS, FRAMES, read, setup  # noqa: F401  (setup: the shared fixture)

WINDOW = 9  # 3 latent frames out of the raw clips' 17 frames: 9 possible starts


def raw_module(root, **kwargs):
    args = dict(shards=str(root / "raw"), encoders={"wan": str(root / "wan"), "wav2vec": str(root / "wav2vec")},
                num_frames=WINDOW, height=None, width=None, crop="center", encode_on="worker",
                batch_size=1, num_workers=0, shuffle_buffer=0, seed=0)
    args.update(kwargs)
    return RawShardDataModule(**args)


def take(dm, n):
    return list(itertools.islice(iter(dm.train_dataloader()), n))


@pytest.fixture(scope="module")
def encoders(setup):  # noqa: F811
    root, _ = setup
    return load_encoders(root / "wan", root / "wav2vec")


def test_raw_batch_equals_the_cached_batch(setup):  # noqa: F811
    """Window = the whole clip at its own size: raw mode computes what the encode pass stored."""
    root, _ = setup
    dm = raw_module(root, num_frames=FRAMES)
    dm.setup("fit")
    raw = {b["__key__"][0]: b for b in take(dm, 3)}
    cached_dm = LatentShardDataModule(str(root / "latent"), batch_size=1, num_workers=0, shuffle_buffer=0)
    cached_dm.setup("fit")
    # Read in setup(), i.e. before the LightningModule's on_fit_start hands it to the loss.
    assert cached_dm.null_text is not None and dm.null_text is not None
    cached = {b["__key__"][0]: b for b in take(cached_dm, 3)}
    assert sorted(raw) == sorted(cached) and len(raw) == 3
    tol = dict(atol=2e-2, rtol=1e-2)  # the cache stores float16
    for key, r in raw.items():
        c = cached[key]
        assert set(r) == set(c) | {"start_frame"} and "face" in r
        assert int(r["start_frame"]) == 0 and int(r["text_len"]) == int(c["text_len"])
        for name in ("latents", "image_latents", "clip", "face", "text", "audio", "lip_mask", "motion", "fps"):
            assert r[name].shape == c[name].shape, name
            torch.testing.assert_close(r[name], c[name], **tol, msg=f"{key}: {name}")
        # The frame-level audio windows the model cuts from both are the same windows.
        rw, rl = split_audio_windows(r["audio"], FRAMES)
        cw, cl = split_audio_windows(c["audio"], FRAMES)
        assert torch.equal(rl, cl)
        torch.testing.assert_close(rw, cw, **tol)
    torch.testing.assert_close(dm.null_text, cached_dm.null_text, **tol)


def test_random_windows_are_aligned_with_frames_audio_masks_and_motion(setup, encoders):  # noqa: F811
    """Every part of a window's sample is the encoders' output on exactly frames s…s+8 of the clip:
    the audio from sample round(s/fps·16000), the lip masks and the face box of frame s, ω over
    those frames."""
    root, _ = setup
    stats = json.loads((root / "raw" / "stats.json").read_text())
    raws = {s["__key__"]: s for s in read(root / "raw", decode=False)}
    cached = {s["__key__"]: s for s in read(root / "latent")}
    batches = take(raw_module(root), 6)  # every clip twice (the stream repeats)
    starts = [int(b["start_frame"]) for b in batches]
    assert all(0 <= s <= FRAMES - WINDOW for s in starts)
    assert len(set(starts)) > 1  # a new window per visit
    # ...drawn from the seed (the first three windows of a fresh loader: each costs a decode and an encode)
    assert [int(b["start_frame"]) for b in take(raw_module(root), 3)] == starts[:3]
    assert [int(b["start_frame"]) for b in take(raw_module(root, seed=1), 3)] != starts[:3]
    for b in batches:
        key, s = b["__key__"][0], int(b["start_frame"])
        raw = raws[key]
        frames = torch.from_numpy(media.decode_mp4(raw["mp4"])[s : s + WINDOW])
        masks = torch.from_numpy(decode_lip_masks(raw["lipmask.npz"])[s : s + WINDOW])
        first = round(s / FPS * 16000)
        audio = media.decode_flac(raw["flac"])[first : first + int(WINDOW / FPS * 16000)]
        landmarks = decode_npz(raw["landmarks.npz"])
        meta = json.loads(raw["json"])
        want = encode_clips(encoders, frames[None], [audio], masks[None], [meta["caption"]],
                            face_boxes=[landmarks["face_box"][s].tolist()])
        assert b["audio"].shape[1] == clip_audio_tokens(WINDOW, FPS)
        for name in ("latents", "image_latents", "clip", "face", "lip_mask"):
            torch.testing.assert_close(b[name][0], want[name][0], atol=1e-4, rtol=1e-4, msg=f"{key}@{s}: {name}")
        torch.testing.assert_close(b["audio"][0], want["audio"][0], atol=1e-4, rtol=1e-4)
        sl = slice(s, s + WINDOW)
        omega_l = normalise_motion(landmark_motion(landmarks["face"][sl], landmarks["face_found"][sl]), stats["omega_l"])
        assert float(b["motion"][0, 0]) == pytest.approx(omega_l, abs=1e-6)
        # ft-prep's default pose schedule (6 samples a clip): a window keeps the clip's ω_b.
        assert meta["pose_schedule"] == "samples:6,region:face"
        omega_b = normalise_motion(meta["omega_b_raw"], stats["omega_b"])
        assert float(b["motion"][0, 1]) == pytest.approx(omega_b, abs=1e-6)
        if s == 0:  # the causal VAE: the window's latents are the cached clip's first latent frames
            torch.testing.assert_close(b["latents"][0], cached[key]["latents"][:, :3], atol=2e-2, rtol=1e-2)


def test_window_body_motion_follows_the_pose_schedule():
    """Pose on every 4th frame (tracked): a window's ω_b is body_motion over its own frames; pose
    on a few samples per clip: the clip's ω_b (a window would hold two or three samples)."""
    from ft_train.data.face import body_motion
    from ft_train.data.raw_clip import window_motion

    rng = np.random.default_rng(0)
    n, w, h = 33, 512, 512
    pose = np.full((n, 33, 4), np.nan, np.float32)
    ran = np.arange(0, n, 4)
    pose[ran, :, :2] = 0.5 + 0.002 * rng.standard_normal((len(ran), 33, 2))
    pose[ran, 11, 0], pose[ran, 12, 0] = 0.4, 0.6  # shoulders 0.2 of the width apart
    pose[ran, :, 3] = 1.0
    pose[ran[ran >= 16], :, :2] += 0.05 * rng.standard_normal((int((ran >= 16).sum()), 33, 2))  # moves more later
    landmarks = {"face": np.zeros((n, 478, 3), np.float32), "face_found": np.ones(n, bool), "pose": pose}
    clip = body_motion(pose, w, h)
    tracked = window_motion(landmarks, {"pose_schedule": "every:4", "omega_b_raw": clip}, 16, 17, w, h)[1]
    assert tracked == pytest.approx(body_motion(pose[16:33], w, h)) and tracked > 1.5 * clip
    sampled = window_motion(landmarks, {"pose_schedule": "samples:6", "omega_b_raw": clip}, 16, 17, w, h)[1]
    assert sampled == clip
    # Samples from before the key: their schedule was every 4th frame.
    assert window_motion(landmarks, {"omega_b_raw": clip}, 16, 17, w, h)[1] == pytest.approx(tracked)


def test_resize_and_crop_follow_the_face():
    """Frames are scaled to cover the training size and cut around the face; masks and the face
    box move with them."""
    h, w = 96, 160
    frames = np.zeros((1, h, w, 3), np.uint8)
    box = [100.0, 30.0, 140.0, 70.0]  # right of centre
    frames[0, 30:70, 100:140] = 255
    masks = np.zeros((1, h, w), bool)
    masks[0, 50:60, 110:130] = True
    geo = plan_geometry(h, w, (64, 64), crop="face", face_box=box)
    assert (geo.height, geo.width) == (96, 96) and geo.top == 0 and geo.left == 64  # clamped to the frame
    out, out_masks = apply_geometry(frames, masks, geo)
    assert out.shape == (1, 64, 64, 3) and out_masks.shape == (1, 64, 64) and out_masks.dtype == np.uint8
    x0, y0, x1, y1 = geo.box(box)
    assert (x0, y0, x1, y1) == pytest.approx((24, 20, 50.667, 46.667), abs=1e-3)
    inside = out[0, int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1]
    assert inside.min() == 255 and out[0, :, : int(x0) - 1].max() == 0
    ys, xs = np.nonzero(out_masks[0] > 127)  # source rows 50-59, cols 110-129 → ×2/3 after the cut
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (33, 39, 31, 43)
    centred = plan_geometry(h, w, (64, 64), crop="center", face_box=box)
    assert centred.left == 32
    same = plan_geometry(h, w, None, size_multiple=32)  # the encode pass: own size, cut to multiples
    assert (same.out_height, same.out_width, same.top, same.left) == (96, 160, 0, 0) and not same.resized


def test_batches_at_the_training_resolution(setup):  # noqa: F811
    root, _ = setup
    (batch,) = take(raw_module(root, height=64, width=48, crop="face"), 1)
    assert batch["latents"].shape == batch["image_latents"].shape == (1, 16, 3, 8, 6)
    assert batch["lip_mask"].shape == (1, 3, 8, 6) and batch["lip_mask"].max() > 0
    assert batch["face"].shape == batch["clip"].shape == (1, 257, 1280)
    assert not torch.allclose(batch["face"], batch["clip"])  # the face crop, not the whole frame
    assert "face" not in take(raw_module(root, face="none"), 1)[0]
    assert "face" not in take(raw_module(root, face=False), 1)[0]  # the setting's older boolean form


def test_face_pixels_for_the_arcface_encoder(setup):  # noqa: F811
    """data.face=pixels: ``face`` is the reference frame's 112×112 face crop in [-1, 1] (what
    model.identity.encoder=arcface reads), cut as the encode pass cuts it."""
    root, _ = setup
    dm = raw_module(root, num_frames=FRAMES, face="pixels")
    raw = {s["__key__"]: s for s in read(root / "raw", decode=False)}
    for batch in take(dm, 2):
        assert batch["face"].shape == (1, 3, 112, 112) and batch["face"].dtype == torch.float32
        source = raw[batch["__key__"][0]]
        box = decode_npz(source["landmarks.npz"])["face_box"][0]
        crop = crop_face(media.decode_mp4(source["mp4"])[0], box, size=112)
        expected = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(batch["face"][0], expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="data.face='arcface' must be one of clip, pixels, none"):
        raw_module(root, face="arcface")


def test_device_mode_encodes_after_transfer_like_the_workers(setup):  # noqa: F811
    root, _ = setup
    dm = raw_module(root, encode_on="device")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].dtype == torch.uint8 and "latents" not in batch  # workers only decode
    encoded = dm.on_after_batch_transfer(batch, 0)
    (expected,) = take(raw_module(root), 1)
    assert set(encoded) == set(expected)
    for name, value in expected.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(encoded[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert encoded[name] == value


def test_resumed_stream_continues_with_the_same_windows(setup, tmp_path):  # noqa: F811
    """Two shards, two loader workers: a loader rebuilt after k batches (as on resume) yields the
    uninterrupted run's batches k, k+1, … — same clips, same windows, same tensors."""
    root, _ = setup
    samples = sorted(read(root / "raw", decode=False), key=lambda s: s["__key__"])
    (tmp_path / "raw").mkdir()
    shutil.copy(root / "raw" / "stats.json", tmp_path / "raw")
    for i, group in enumerate((samples[:2], samples[2:])):
        with wds.TarWriter(str(tmp_path / "raw" / f"shard-{i:06d}.tar")) as sink:
            for s in group:
                sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    for name in ("wan", "wav2vec"):
        (tmp_path / name).symlink_to(root / name)
    dm = raw_module(tmp_path, shuffle_buffer=2, batch_size=1)

    def batches(consumed, n):
        loader = DataLoader(dm.dataset(consumed), batch_size=1, num_workers=2, collate_fn=collate_samples)
        return list(itertools.islice(iter(loader), n))

    full = batches(0, 7)
    resumed = batches(3, 4)
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[3:]]
    for a, b in zip(full[3:], resumed):
        assert int(a["start_frame"]) == int(b["start_frame"])
        torch.testing.assert_close(a["latents"], b["latents"], atol=0, rtol=0)


def test_corrupt_samples_are_skipped_and_counted(setup, tmp_path):  # noqa: F811
    root, _ = setup
    samples = sorted(read(root / "raw", decode=False), key=lambda s: s["__key__"])
    (tmp_path / "raw").mkdir()
    shutil.copy(root / "raw" / "stats.json", tmp_path / "raw")
    with wds.TarWriter(str(tmp_path / "raw" / "shard-000000.tar")) as sink:
        for i, s in enumerate(samples):
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if i == 0:
                s["mp4"] = b"\x00not a video" * 50
            elif i == 1:
                del s["flac"]
            sink.write(s)
    dm = raw_module(root, shards=str(tmp_path / "raw"))
    assert [b["__key__"][0] for b in take(dm, 2)] == [samples[2]["__key__"]] * 2
    assert dm.skips.skipped >= 2


def test_settings_the_data_cannot_meet_fail_early_naming_the_key(setup, tmp_path):  # noqa: F811
    root, _ = setup
    with pytest.raises(ValueError, match=r"data.num_frames=10 must be 4k\+1"):
        raw_module(root, num_frames=10)
    with pytest.raises(ValueError, match="data.height=100, data.width=64 must be multiples of 16"):
        raw_module(root, height=100, width=64)
    with pytest.raises(ValueError, match="data.encode_on='gpu' must be one of"):
        raw_module(root, encode_on="gpu")
    with pytest.raises(FileNotFoundError, match=r"^data\.encoders\.wan: no folder"):
        raw_module(root, encoders={"wan": str(tmp_path / "nope"), "wav2vec": str(root / "wav2vec")})
    with pytest.raises(ValueError, match="data.num_frames=21: the raw clips have 17 frames"):
        raw_module(root, num_frames=21).setup("fit")
    with pytest.raises(ValueError, match="latent shards: use data=latent"):
        raw_module(root, shards=str(root / "latent")).setup("fit")
    (tmp_path / "raw").mkdir()
    shutil.copy(next((root / "raw").glob("*.tar")), tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="data.stats: no ω statistics"):
        raw_module(root, shards=str(tmp_path / "raw")).setup("fit")


def test_ft_train_trains_from_raw_shards(setup, tmp_path):  # noqa: F811
    """`ft-train experiment=tiny_cpu data=raw …`: stage 2 (frame-level audio, lip loss) with the
    identity (face crop) and motion branches on, encoding in a loader worker."""
    root, _ = setup
    overrides = [
        "experiment=tiny_cpu", "data=raw", f"data.shards={root / 'raw'}", f"data.encoders.wan={root / 'wan'}",
        f"data.encoders.wav2vec={root / 'wav2vec'}", f"data.num_frames={WINDOW}", "data.height=64", "data.width=64",
        "data.num_workers=1", "data.shuffle_buffer=2", "stages=null", "stage=frame", "stage.max_steps=3",
        "model.identity.enabled=true", "model.motion.enabled=true", f"paths.output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    result = train(cfg)
    assert result["trainer"].global_step == 3
    assert np.isfinite(result["metrics"]["train/loss"])
    assert isinstance(result["datamodule"], RawShardDataModule)
    assert result["datamodule"].resolved_encode_on() == "worker"  # CPU trainer
    assert result["module"].loss.null_text is not None  # the empty prompt reached text dropout
    assert (tmp_path / "tiny_cpu" / "frame" / "checkpoints" / "step-00000003" / "model.ckpt").is_file()


def test_aspect_ratio_buckets_pick_the_nearest_shape():
    from ft_train.data.raw_clip import check_buckets, nearest_bucket

    buckets = [(512, 512), (480, 832), (832, 480)]
    assert nearest_bucket(720, 1280, buckets) == (480, 832)  # 16:9 landscape
    assert nearest_bucket(1280, 720, buckets) == (832, 480)  # portrait phone video
    assert nearest_bucket(500, 500, buckets) == (512, 512)
    assert nearest_bucket(480, 640, buckets) == (480, 832)  # 4:3 is nearer 0.58 than 1 in log aspect
    assert nearest_bucket(100, 100, [(480, 832), (832, 480)]) == (480, 832)  # a tie: the first listed
    assert check_buckets([[512, 512], [480, 832]], "data.buckets") == [(512, 512), (480, 832)]
    with pytest.raises(ValueError, match=r"data.buckets: \[\(500, 512\)\] — give \[height, width\] pairs, multiples of 16"):
        check_buckets([[500, 512]], "data.buckets")
    with pytest.raises(ValueError, match=r"data.buckets=512 must be a list of \[height, width\] pairs"):
        check_buckets(512, "data.buckets")


def test_raw_clips_train_at_their_bucket(setup):  # noqa: F811
    root, _ = setup
    # The raw clips are square (96×96): of these two, 48×80 (log aspect −0.51) is nearer than 96×32 (+1.10).
    (batch,) = take(raw_module(root, buckets=[[48, 80], [96, 32]], crop="face"), 1)
    assert batch["latents"].shape == batch["image_latents"].shape == (1, 16, 3, 6, 10)
    assert batch["lip_mask"].shape == (1, 3, 6, 10) and batch["lip_mask"].max() > 0
    with pytest.raises(ValueError, match=r"data.buckets holds 2 sizes but data.batch_size=2: .* data.batch_size=1"):
        raw_module(root, buckets=[[48, 80], [96, 32]], batch_size=2)


def test_a_batch_of_mixed_sizes_fails_naming_the_setting():
    a = {"latents": torch.zeros(16, 3, 8, 8), "text": torch.zeros(4)}
    b = {"latents": torch.zeros(16, 3, 6, 10), "text": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"data.batch_size=2: one batch met clips of different sizes .* data.batch_size=1"):
        collate_samples([a, b])
    assert collate_samples([a, dict(a)])["latents"].shape == (2, 16, 3, 8, 8)
