"""``ft-prep task=encode`` on raw shards made from the sample clip: latent shards that the training
data path reads, consistent with the raw clips, idempotent, and robust to corrupt samples."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.encode import REJECT_REASONS, EncodeConfig, run_encode
from data_tools.prep import PrepConfig, main, run_prep
from ft_train import media
from ft_train.data import decode_sample
from ft_train.data.raw_format import decode_lip_masks, decode_npz, normalise_motion
from ft_train.models.audio import clip_audio_tokens
from ft_train.data.clip_prep import crop_face
from ft_train.models.encoders import load_encoders
from ft_train.tiny import save_tiny_encoders

SAMPLE = Path(__file__).parent / "assets" / "sample_talking.mp4"
# 3 clips of 17 frames (5 latent frames) at 96×96 px (12×12 latent): small enough for CPU.
FRAMES, SIDE, FPS = 17, 96, 25.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    videos = root / "videos"
    videos.mkdir()
    shutil.copy(SAMPLE, videos / "talk.mp4")
    (videos / "talk.txt").write_text("an astronaut is talking")
    prep = PrepConfig(input=str(videos), output=str(root / "raw"), num_frames=FRAMES, stride=2 * FRAMES,
                      max_side=SIDE, min_face_px=8, min_face_confidence=0.5, previews_per_shard=0, progress=False)
    assert run_prep(prep)["samples"] == 3
    wan, wav2vec = root / "wan", root / "wav2vec"
    save_tiny_encoders(wan, wav2vec)  # real widths, tiny depth
    args = [f"input={root / 'raw'}", f"output={root / 'latent'}", f"encoders.wan={wan}",
            f"encoders.wav2vec={wav2vec}", "batch_size=2", "progress=false"]
    assert main(["task=encode", *args]) == 0  # through ft-prep's own entry point
    return root, args


def read(folder: Path, decode: bool = True) -> list[dict]:
    ds = wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False, empty_check=False)
    return list(ds.decode().map(decode_sample)) if decode else list(ds)


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    files = [*out.glob("*.tar"), *(out / "parts").glob("*.json"), out / "null_text.npy"]
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def test_latent_shards_follow_the_schema(setup):
    root, _ = setup
    samples = read(root / "latent")
    raw = {s["__key__"]: s for s in read(root / "raw", decode=False)}
    assert sorted(s["__key__"] for s in samples) == sorted(raw)  # same keys, nothing lost
    f_lat, h_lat = (FRAMES - 1) // 4 + 1, SIDE // 8
    for s in samples:
        assert s["latents"].shape == s["image_latents"].shape == (16, f_lat, h_lat, h_lat)
        assert s["clip"].shape == (257, 1280)
        assert s["text"].shape == (512, 4096) and int(s["text_len"]) == 5  # 4 words + </s>
        assert s["text"][5:].abs().sum() == 0
        assert s["audio"].shape == (clip_audio_tokens(FRAMES, FPS), 768)
        assert s["lip_mask"].shape == (f_lat, h_lat, h_lat)
        assert s["face"].shape == (257, 1280) and not torch.allclose(s["face"], s["clip"])  # encode.face=true
        assert float(s["fps"]) == FPS
        # Latent frame 0 of the clip is VAE(frame 0), as is the condition's (causal VAE).
        torch.testing.assert_close(s["image_latents"][:, 0], s["latents"][:, 0], atol=2e-3, rtol=0)
    report = json.loads((root / "latent" / "report.json").read_text())
    assert report["samples"] == 3 and report["skipped_total"] == 0
    assert report["widths"] == {"image": 1280, "text": 4096, "audio": 768}
    null = np.load(root / "latent" / "null_text.npy")
    assert null.shape == (1, 4096)  # the empty prompt is </s> alone


def test_latents_match_the_raw_clip(setup):
    """Every stored tensor is the encoders' output on exactly the raw sample's frames/audio/caption."""
    root, _ = setup
    enc = load_encoders(root / "wan", root / "wav2vec")
    stats = json.loads((root / "raw" / "stats.json").read_text())
    raw = sorted(read(root / "raw", decode=False), key=lambda s: s["__key__"])[1]
    (lat,) = [s for s in read(root / "latent", decode=False) if s["__key__"] == raw["__key__"]]
    meta = json.loads(raw["json"])
    frames = torch.from_numpy(media.decode_mp4(raw["mp4"]))
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    stored = {k: torch.from_numpy(np.load(io.BytesIO(lat[f"{k}.npy"]))).float()
              for k in ("latents", "image_latents", "clip", "text", "audio", "face")}
    torch.testing.assert_close(stored["latents"], enc.vae(video)[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(stored["image_latents"], enc.vae.encode_condition(video[:, :, 0], FRAMES)[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(stored["clip"], enc.image(video[:, :, 0])[0], atol=2e-2, rtol=1e-2)
    # face: CLIP tokens of the square crop around frame 0's own face box (landmarks.npz).
    box = decode_npz(raw["landmarks.npz"])["face_box"][0]
    crop = torch.from_numpy(crop_face(frames[0].numpy(), box)).permute(2, 0, 1)[None].float() / 127.5 - 1
    torch.testing.assert_close(stored["face"], enc.image(crop)[0], atol=2e-2, rtol=1e-2)
    assert json.loads(lat["json"])["face_ref_box"] == pytest.approx(box.tolist())
    torch.testing.assert_close(stored["text"], enc.text(["an astronaut is talking"])[0], atol=2e-2, rtol=1e-2)
    # Exactly the clip's audio: F / fps seconds from frame 0.
    audio = media.decode_flac(raw["flac"])[: int(FRAMES / FPS * 16000)]
    torch.testing.assert_close(stored["audio"], enc.audio([audio])[0], atol=2e-2, rtol=1e-2)
    out_meta = json.loads(lat["json"])
    assert out_meta["omega_l"] == pytest.approx(normalise_motion(meta["omega_l_raw"], stats["omega_l"]))
    assert out_meta["omega_b"] == pytest.approx(normalise_motion(meta["omega_b_raw"], stats["omega_b"]))
    assert 0 <= out_meta["omega_l"] <= 1 and out_meta["caption"] == "an astronaut is talking"
    assert (out_meta["num_frames"], out_meta["height"], out_meta["width"]) == (FRAMES, SIDE, SIDE)
    torch.testing.assert_close(torch.from_numpy(np.load(root / "latent" / "null_text.npy")).float(),
                               enc.text([""])[0], atol=2e-2, rtol=1e-2)


def test_latent_lip_mask_lies_on_the_pixel_mask(setup):
    root, _ = setup
    raw = {s["__key__"]: s for s in read(root / "raw", decode=False)}
    for s in read(root / "latent"):
        pixel = decode_lip_masks(raw[s["__key__"]]["lipmask.npz"]).astype(np.float32)  # (F, H, W)
        cells = pixel.reshape(FRAMES, SIDE // 8, 8, SIDE // 8, 8).mean((2, 4))  # coverage per latent cell
        lat = s["lip_mask"].numpy()
        assert lat.sum() > 0 and lat.max() <= 1
        # Nothing outside the cells the mouth covers in some frame...
        assert lat[:, cells.max(0) == 0].sum() == 0
        # ...and the latent mask's centre is the pixel mask's centre on the latent grid.
        ys, xs = np.mgrid[: SIDE // 8, : SIDE // 8]
        centre = lambda m: np.array([(m * ys).sum(), (m * xs).sum()]) / m.sum()  # noqa: E731
        assert np.abs(centre(lat.sum(0)) - centre(cells.sum(0))).max() < 1.0


def test_rerun_writes_nothing_new(setup):
    root, args = setup
    out = root / "latent"
    before = snapshot(out)
    assert main(["task=encode", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["this_run"]["shards_written"] == 0 and report["this_run"]["shards_skipped"] == 1
    assert report["this_run"]["device"] is None  # nothing loaded: all shards were done
    assert snapshot(out) == before
    assert not list(out.glob("*.tmp"))


def test_corrupt_samples_are_skipped_and_counted(setup, tmp_path):
    root, _ = setup
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    shutil.copy(root / "raw" / "stats.json", raw_dir)
    samples = sorted(read(root / "raw", decode=False), key=lambda s: s["__key__"])
    with wds.TarWriter(str(raw_dir / "shard-000000.tar")) as sink:
        for i, s in enumerate(samples):
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if i == 0:
                s["mp4"] = b"\x00not a video" * 50
            elif i == 1:
                del s["flac"]
            sink.write(s)
    # A second shard cut off inside its first sample (an interrupted copy).
    (raw_dir / "shard-000001.tar").write_bytes((raw_dir / "shard-000000.tar").read_bytes()[:3000])
    cfg = EncodeConfig(input=str(raw_dir), output=str(tmp_path / "latent"),
                       encoders={"wan": str(root / "wan"), "wav2vec": str(root / "wav2vec")}, progress=False)
    report = run_encode(cfg)
    assert report["samples"] == 1 and report["shards_done"] == 2
    first = [r for r in report["rejects"] if r["shard"] == "shard-000000.tar"]
    assert [(r["key"], r["reason"]) for r in first] == [
        (samples[0]["__key__"], "unreadable_video"), (samples[1]["__key__"], "missing_member")]
    assert report["skipped"]["unreadable_shard"] == 1  # the cut tar: counted once, no crash
    assert set(report["skipped"]) == set(REJECT_REASONS)
    assert not (tmp_path / "latent" / "shard-000001.tar").exists()
    assert "unreadable_video" in (tmp_path / "latent" / "report.txt").read_text()
    assert [s["__key__"] for s in read(tmp_path / "latent")] == [samples[2]["__key__"]]


def test_face_tokens_can_be_switched_off(setup, tmp_path):
    """encode.face=none: no face member (a precomputed identity branch then falls back to the CLIP tokens)."""
    root, args = setup
    assert main(["task=encode", args[0], f"output={tmp_path / 'latent'}", *args[2:], "face=none"]) == 0
    samples = read(tmp_path / "latent", decode=False)
    assert len(samples) == 3 and all("face.npy" not in s and "clip.npy" in s for s in samples)
    assert all("face_pixels.npy" not in s and "face_ref_box" not in json.loads(s["json"]) for s in samples)
    assert all("face" not in s for s in read(tmp_path / "latent"))


def test_face_pixels_for_the_arcface_encoder(setup, tmp_path):
    """encode.face=pixels: face_pixels.npy = frame 0's face crop at 112×112, uint8 (for
    model.identity.encoder=arcface), and no face.npy; training reads it as ``face`` in [-1, 1]."""
    root, args = setup
    assert main(["task=encode", args[0], f"output={tmp_path / 'latent'}", *args[2:], "face=pixels"]) == 0
    raw = {s["__key__"]: s for s in read(root / "raw", decode=False)}
    stored = read(tmp_path / "latent", decode=False)
    assert len(stored) == 3
    for lat in stored:
        assert "face.npy" not in lat
        crop = np.load(io.BytesIO(lat["face_pixels.npy"]))
        assert crop.dtype == np.uint8 and crop.shape == (3, 112, 112)
        source = raw[lat["__key__"]]
        box = decode_npz(source["landmarks.npz"])["face_box"][0]
        frame0 = media.decode_mp4(source["mp4"])[0]
        np.testing.assert_array_equal(crop, crop_face(frame0, box, size=112).transpose(2, 0, 1))
        assert json.loads(lat["json"])["face_ref_box"] == pytest.approx(box.tolist())
    for s in read(tmp_path / "latent"):
        assert s["face"].shape == (3, 112, 112) and -1 <= s["face"].min() and s["face"].max() <= 1


def test_config_errors_name_the_key(setup, tmp_path):
    root, args = setup
    with pytest.raises(SystemExit, match="set encoders.wan, encoders.wav2vec"):
        main(["task=encode", f"input={root / 'raw'}", f"output={tmp_path}"])
    with pytest.raises(SystemExit, match=r"^ft-prep task=encode: encoders\.wan: no folder"):
        main(["task=encode", *args[:2], f"encoders.wan={tmp_path / 'nope'}", args[3]])
    with pytest.raises(SystemExit, match="input=.*no such folder"):
        main(["task=encode", f"input={tmp_path / 'nope'}", *args[1:]])
    with pytest.raises(SystemExit, match="batch_size=0 must be"):
        main(["task=encode", *args, "batch_size=0"])
    with pytest.raises(SystemExit, match="face='arcface' must be one of clip, pixels, none"):
        main(["task=encode", *args, "face=arcface"])
    with pytest.raises(SystemExit, match="task=decode is not a task"):
        main(["task=decode"])


def test_encode_pass_writes_each_clip_at_its_bucket(setup, tmp_path):
    root, args = setup
    out = tmp_path / "bucketed"
    args = [a if not a.startswith("output=") else f"output={out}" for a in args]
    assert main(["task=encode", *args, "buckets=[[64,96],[96,48]]"]) == 0
    samples = read(out)
    assert len(samples) == 3
    for s in samples:  # 96×96 clips: 64×96 (log aspect −0.41) is nearer than 96×48 (+0.69)
        assert s["latents"].shape == (16, (FRAMES - 1) // 4 + 1, 8, 12)
        assert s["lip_mask"].shape[-2:] == (8, 12)
    with pytest.raises(SystemExit, match=r"conf/encode.yaml: buckets: \[\(60, 96\)\] — give \[height, width\] pairs"):
        main(["task=encode", *args, "buckets=[[60,96]]"])


def test_every_sample_reject_reason_is_counted(setup, tmp_path):
    """One raw sample damaged each way the encode pass (and raw mode, same loader) must refuse;
    a good copy of the same sample is kept, so each refusal is the damage and nothing else."""
    from ft_train.data.raw_format import encode_lip_masks

    root, _ = setup
    good = sorted(read(root / "raw", decode=False), key=lambda s: s["__key__"])[0]
    good = {k: v for k, v in good.items() if not k.startswith("__")}
    frames = media.decode_mp4(good["mp4"])
    audio = media.decode_flac(good["flac"])
    masks = decode_lip_masks(good["lipmask.npz"])
    damaged = {
        "bad_metadata": {"json": b"{not json"},
        "unreadable_audio": {"flac": b"fLaC but no stream"},
        "unreadable_mask": {"lipmask.npz": b"PK not a zip"},
        "unreadable_landmarks": {"landmarks.npz": b"PK not a zip"},
        "frame_count": {"mp4": media.encode_mp4(frames[:-1], FPS)},  # a frame lost: 16 ≠ json's 17
        "short_audio": {"flac": media.encode_flac(audio[: len(audio) // 2])},
        "too_small": {"mp4": media.encode_mp4(frames[:, :8, :16], FPS), "lipmask.npz": encode_lip_masks(masks[:, :8, :16])},
    }
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    shutil.copy(root / "raw" / "stats.json", raw_dir)
    with wds.TarWriter(str(raw_dir / "shard-000000.tar")) as sink:
        sink.write({"__key__": "a_good", **good})
        for reason, change in damaged.items():
            sink.write({"__key__": f"b_{reason}", **good, **change})
    cfg = EncodeConfig(input=str(raw_dir), output=str(tmp_path / "latent"),
                       encoders={"wan": str(root / "wan"), "wav2vec": str(root / "wav2vec")}, progress=False)
    report = run_encode(cfg)
    assert report["samples"] == 1
    assert {r["key"]: r["reason"] for r in report["rejects"]} == {f"b_{reason}": reason for reason in damaged}
    assert all(report["skipped"][reason] == 1 for reason in damaged)

    # Raw-mode training's own reason: a clip shorter than the training window.
    from ft_train.data.raw_clip import SampleError, load_clip

    stats = json.loads((root / "raw" / "stats.json").read_text())
    assert load_clip({"__key__": "a", **good}, stats, num_frames=FRAMES).frames.shape[0] == FRAMES
    with pytest.raises(SampleError, match="no 21-frame window") as err:
        load_clip({"__key__": "a", **good}, stats, num_frames=FRAMES + 4)
    assert err.value.reason == "too_short"
