"""ft-prep on imperfect footage: a damaged audio packet (stereo 48 kHz AC-3 / AAC), a sidecar
.wav against an embedded track at known offsets, truncated AVI/MP4, a dangling symlink. Every
input is made here from the sample clip with the imageio-ffmpeg binary and Python."""

import json
import os
import subprocess
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data_tools.prep import PrepConfig, run_prep
from ft_train import media

SAMPLE = Path(__file__).parent / "assets" / "sample_talking.mp4"
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
FAST = dict(num_frames=33, stride=33, progress=False, previews_per_shard=0)
RATE = media.AUDIO_RATE


def ffmpeg(*args) -> None:
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *map(str, args)], check=True)


def corrupt_middle_packet(src: Path, dst: Path) -> tuple[float, float]:
    """Copy ``src`` to ``dst`` with bytes of its middle audio packet flipped (past the AC-3
    sync word / inside the AAC payload, so the demuxer still finds the packet and the decoder
    refuses it). Returns that packet's (start, end) time in seconds."""
    with av.open(str(src)) as c:
        packets = [(p.pos, p.size, float(p.pts * p.time_base), float(p.duration * p.time_base))
                   for p in c.demux(c.streams.audio[0]) if p.size]
    pos, size, t, dur = packets[len(packets) // 2]
    data = bytearray(src.read_bytes())
    for j in range(4, min(size, 36)):
        data[pos + j] ^= 0xFF
    dst.write_bytes(bytes(data))
    return t, t + dur


def read_shards(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("codec, ext", [("ac3", "mkv"), ("aac", "mp4")])
def test_one_bad_audio_packet_is_skipped_as_silence_and_counted(tmp_path, codec, ext):
    clean = tmp_path / f"clean.{ext}"
    ffmpeg("-i", SAMPLE, "-c:v", "copy", "-c:a", codec, "-ac", 2, "-ar", 48000, clean)
    bad = tmp_path / f"bad.{ext}"
    t0, t1 = corrupt_middle_packet(clean, bad)
    with av.open(str(bad)) as c:  # the stock decode loop refuses the file (what ft-prep did before)
        with pytest.raises(av.FFmpegError):
            for _ in c.decode(audio=0):
                pass

    ref, ref_start = media.read_audio(clean, with_start=True)
    damage = media.Damage()
    got, start = media.read_audio(bad, with_start=True, damage=damage)
    assert damage.damaged == 1 and damage.packets > 100 and "send_packet" in damage.error
    assert start == ref_start and abs(len(got) - len(ref)) <= 1
    # Before the lost packet every sample is the clean decode's; in its place, silence; after it,
    # the clean decode again, not shifted by a packet (the next packet or two decode a little
    # differently: MDCT codecs overlap each frame with the one before, then the resampler's reach).
    a, b = int((t0 - start) * RATE), int((t1 - start) * RATE)
    n = min(len(got), len(ref))
    np.testing.assert_allclose(got[: a - 64], ref[: a - 64], atol=1e-6)
    assert np.abs(got[a + 16 : b - 16]).max() < 1e-3 < np.abs(ref[a:b]).max()
    after = slice(b + 3 * (b - a), n)
    np.testing.assert_allclose(got[after], ref[after], atol=0.02)
    shifted = np.abs(got[after.start : n - (b - a)] - ref[after.start + b - a : n]).max()
    assert shifted > 0.1  # a one-packet shift would be seen
    # ft-eval's reader takes it too; with no tolerance the file is refused naming the count.
    frames, _, audio = media.read_video(bad)
    assert len(frames) == 100 and len(audio) == len(got)
    with pytest.raises(media.MediaError, match="1 of .* audio packets cannot be decoded") as err:
        media.read_audio(bad, max_damaged_frac=0.0)
    assert err.value.reason == "damaged"

    inputs = tmp_path / "videos"
    inputs.mkdir()
    bad.rename(inputs / bad.name)
    report = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "out"), **FAST))
    assert report["samples"] == 3 and not report["rejects"]
    (entry,) = report["damaged"]
    assert entry["source"].endswith(bad.name) and entry["audio"]["damaged"] == 1
    assert "damaged (skipped)" in (tmp_path / "out" / "report.txt").read_text()
    strict = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "strict"), max_damaged_frac=0.0, **FAST))
    assert strict["samples"] == 0 and strict["rejected"]["damaged"] == 1


def test_corrupt_video_frame_is_skipped_and_counted(tmp_path):
    path = tmp_path / "v.mp4"
    ffmpeg("-i", SAMPLE, "-c", "copy", path)
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[50]
    data = bytearray(path.read_bytes())
    for j in range(size // 3, size // 3 + 30):
        data[pos + j] ^= 0xFF
    path.write_bytes(bytes(data))
    damage = media.Damage()
    frames = list(media.iter_frames(media.probe(path), 25.0, 128, damage=damage))
    assert len(frames) == 100 and damage.damaged >= 1  # the frame flagged corrupt stands in for by its predecessor
    frames_rv, _, _ = media.read_video(path)
    assert len(frames_rv) == 100
    frames_rf, _ = media.read_frames(path)  # ft-eval's video-only read decodes it the same way
    assert np.array_equal(frames_rf, frames_rv)


def xcorr_lag(clip: np.ndarray, speech: np.ndarray, max_lag: int) -> int:
    """Lag (samples) at which ``speech`` delayed by it best matches ``clip``."""
    n = len(clip)
    scores = [float(np.dot(clip[lag:], speech[: n - lag])) / max(n - lag, 1) for lag in range(0, max_lag)]
    return int(np.argmax(scores))


def test_sidecar_and_embedded_audio_are_aligned_as_documented(tmp_path):
    """A sidecar .wav starts at the first video frame; an embedded track sits where its
    container clock puts it. Known offsets: the sidecar holds the speech 0.25 s late, the
    'late' file's track starts 0.4 s after its video."""
    speech = media.read_audio(SAMPLE)
    inputs = tmp_path / "videos"
    inputs.mkdir()
    ffmpeg("-i", SAMPLE, "-t", 1.6, "-c:v", "libx264", "-c:a", "aac", inputs / "both.mp4")
    sf.write(inputs / "both.wav", np.concatenate([np.zeros(int(0.25 * RATE), np.float32), speech]), RATE)
    ffmpeg("-i", SAMPLE, "-itsoffset", 0.4, "-i", SAMPLE, "-map", "0:v", "-map", "1:a", "-t", 1.6,
           "-c:v", "libx264", "-c:a", "aac", inputs / "late.mkv")

    def lags(report, out):
        assert report["samples"] == 2, report["rejects"]
        result = {}
        for s in read_shards(out):
            meta = json.loads(s["json"])
            result[Path(meta["source"]).stem] = (meta["audio_source"], xcorr_lag(media.decode_flac(s["flac"]), speech, 9000))
        return result

    out = tmp_path / "auto"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), **FAST))
    got = lags(report, out)
    assert got["both"][0] == "sidecar" and abs(got["both"][1] - 0.25 * RATE) <= 16
    assert got["late"][0] == "embedded" and abs(got["late"][1] - 0.4 * RATE) <= 16
    assert report["audio_sources"] == {"sidecar": 1, "embedded": 1}

    out = tmp_path / "embedded"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), audio_source="embedded", **FAST))
    got = lags(report, out)
    assert got["both"][0] == "embedded" and got["both"][1] <= 16  # the track, aligned with its video
    report = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "side"), audio_source="sidecar", **FAST))
    assert report["rejected"]["no_audio"] == 1 and "late.mkv" in report["rejects"][0]["detail"]


def test_truncated_files_and_dangling_links_are_reported(tmp_path):
    inputs = tmp_path / "videos"
    inputs.mkdir()
    full = tmp_path / "full.avi"
    ffmpeg("-i", SAMPLE, "-c:v", "mpeg4", "-q:v", 5, "-c:a", "pcm_s16le", full)
    data = full.read_bytes()
    (inputs / "cut.avi").write_bytes(data[: len(data) * 6 // 10])  # header still says 100 frames
    mp4 = SAMPLE.read_bytes()
    (inputs / "cut.mp4").write_bytes(mp4[: len(mp4) * 6 // 10])
    os.symlink(tmp_path / "gone.mp4", inputs / "link.mp4")

    info = media.probe(inputs / "cut.avi")
    assert info.declared_frames == 100 and info.packets < 70 and info.truncated
    assert media.probe(SAMPLE).truncated is None and media.probe(full).truncated is None

    out = tmp_path / "keep"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), **FAST))
    truncated = {Path(t["source"]).name: t for t in report["truncated"]}
    assert set(truncated) == {"cut.avi", "cut.mp4"} and truncated["cut.avi"]["declared_frames"] == 100
    # ~61 of 100 frames left in the AVI: one whole 33-frame clip, decoded frames all real.
    assert report["samples"] == 1
    (sample,) = read_shards(out)
    assert json.loads(sample["json"])["source"].endswith("cut.avi")
    clip = media.decode_mp4(sample["mp4"])
    ref = np.stack(list(media.iter_frames(media.probe(full), 25.0, 512)))[:33]
    assert np.abs(clip.astype(int) - ref.astype(int)).mean() < 3
    reasons = {Path(r["source"]).name: (r["reason"], r["detail"]) for r in report["rejects"]}
    assert reasons["cut.mp4"][0] == "truncated"  # 7 frames left: no clip
    assert reasons["link.mp4"][0] == "unreadable" and "dangling symlink" in reasons["link.mp4"][1]
    assert "truncated: " in (out / "report.txt").read_text()

    report = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "reject"), truncated="reject", **FAST))
    assert report["samples"] == 0 and report["rejected"]["truncated"] == 2 and report["rejected"]["unreadable"] == 1


def second_face(frames: np.ndarray) -> np.ndarray:
    """Another person for the cut: the talking astronaut mirrored, zoomed in and re-tinted."""
    h, w = frames.shape[1:3]
    zoom = frames[:, h // 10 : h - h // 10, ::-1][:, :, w // 10 : w - w // 10]
    import cv2

    out = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in zoom])
    return np.clip(out.astype(np.int16) * np.array([0.7, 1.0, 1.25]), 0, 255).astype(np.uint8)


def test_no_clip_spans_a_cut_between_two_faces(tmp_path):
    from data_tools.make_sample_clip import write_mp4

    info = media.probe(SAMPLE)
    frames = np.stack(list(media.iter_frames(info, 25.0, 256)))  # 100 frames
    audio = media.read_audio(SAMPLE)
    cut = np.concatenate([frames[:50], second_face(frames[50:])])  # a cut at frame 50 (2.0 s)
    inputs = tmp_path / "videos"
    inputs.mkdir()
    write_mp4(inputs / "dialogue.mp4", cut, audio, 25.0, 23)

    out = tmp_path / "out"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), min_face_px=32, min_face_confidence=0.5, **FAST))
    # Clips of 33: [0, 33) kept; [33, 66) would span the cut: dropped; clips restart at 50: [50, 83).
    assert report["rejected"]["shot_cut"] == 1, report["rejects"]
    assert "shot cut at frame 50" in report["rejects"][0]["detail"]
    starts = sorted(json.loads(s["json"])["start_frame"] for s in read_shards(out))
    assert starts == [0, 50]
    # The clip after the cut is the second face only: its frames match the second shot, not the first.
    second = next(s for s in read_shards(out) if json.loads(s["json"])["start_frame"] == 50)
    got = media.decode_mp4(second["mp4"]).astype(int)
    assert np.abs(got - cut[50:83]).mean() < 4 < np.abs(got - frames[50:83]).mean()

    report = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "off"), scene_detector="none",
                                 min_face_px=32, min_face_confidence=0.5, **FAST))
    assert report["samples"] == 3 and report["rejected"]["shot_cut"] == 0  # before: a clip across the cut


def test_reference_frame_skips_a_fade_in(tmp_path):
    """A clip that fades in from black: the reference is the first frame with a bright, sharp
    face, its index is in the sample json, and raw mode / the encode pass take the image
    condition, CLIP and face tokens from it."""
    import torch

    from data_tools.make_sample_clip import write_mp4
    from ft_train.data.clip_prep import encode_clips
    from ft_train.data.raw_clip import clip_tensors, load_clip
    from ft_train.models.encoders import load_encoders
    from ft_train.tiny import save_tiny_encoders

    info = media.probe(SAMPLE)
    frames = np.stack(list(media.iter_frames(info, 25.0, 256)))[:40]
    alpha = np.clip(np.arange(len(frames)) / 8.0, 0, 1)[:, None, None, None]
    faded = (frames * alpha).astype(np.uint8)  # frame 0 black, full brightness from frame 8
    inputs = tmp_path / "videos"
    inputs.mkdir()
    write_mp4(inputs / "fade.mp4", faded, media.read_audio(SAMPLE)[: 40 * RATE // 25], 25.0, 18)
    out = tmp_path / "out"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), min_face_px=32, **FAST))
    assert report["samples"] == 1, report["rejects"]
    (raw,) = read_shards(out)
    meta = json.loads(raw["json"])
    ref = meta["reference_frame"]
    assert 2 <= ref <= 6 and meta["reference_brightness"] >= 40 and meta["reference_sharpness"] >= 30
    clip_frames = media.decode_mp4(raw["mp4"])
    assert clip_frames[0].mean() < 5 and clip_frames[ref].mean() > 30

    stats = json.loads((out / "stats.json").read_text())
    clip = load_clip(raw, stats, num_frames=17, size=(64, 64))
    assert clip.reference == ref and clip.meta["reference_frame"] == ref
    later = load_clip(raw, stats, start=8, num_frames=17, size=(64, 64))
    assert later.reference == 0  # a window past the fade: its own first frame

    save_tiny_encoders(tmp_path / "wan", tmp_path / "wav2vec", image_dim=48, text_dim=40, audio_dim=24, image_size=32, patch_size=8)
    encoders = load_encoders(tmp_path / "wan", tmp_path / "wav2vec")
    t = clip_tensors(clip)
    enc = encode_clips(encoders, t["frames"][None], [t["audio"].numpy()], t["lip_masks"][None], [""],
                       reference=[clip.reference])
    # Same clip with the reference frame moved to the front: frame 0 is the condition there.
    moved = torch.cat([t["frames"][ref:ref + 1], t["frames"][1:]])[None]
    want = encode_clips(encoders, moved, [t["audio"].numpy()], t["lip_masks"][None], [""])
    torch.testing.assert_close(enc["image_latents"], want["image_latents"])
    torch.testing.assert_close(enc["clip"], want["clip"])
    black = encode_clips(encoders, t["frames"][None], [t["audio"].numpy()], t["lip_masks"][None], [""])
    assert not torch.allclose(black["clip"], enc["clip"])


def test_a_smaller_second_face_is_background_a_similar_one_competes(tmp_path):
    """The speaker (512 px frame) beside a second, smaller talking face (320 px: ~1/3 of the
    speaker's face area as the detector boxes it). Under max_second_face_area_frac it is a
    background face (kept, counted in the json); over it, the clip is multiple_faces, by the
    similar-size rule."""
    import cv2

    from data_tools.make_sample_clip import write_mp4

    info = media.probe(SAMPLE)
    frames = np.stack(list(media.iter_frames(info, 25.0, 512)))[:40]
    panel = np.full((len(frames), 512, 320, 3), 128, np.uint8)
    panel[:, :320] = np.stack([cv2.resize(f, (320, 320), interpolation=cv2.INTER_AREA) for f in frames[::-1]])
    inputs = tmp_path / "videos"
    inputs.mkdir()
    write_mp4(inputs / "interview.mp4", np.concatenate([frames, panel], axis=2),
              media.read_audio(SAMPLE)[: 40 * RATE // 25], 25.0, 20)

    report = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "strict"), max_side=832, **FAST))
    assert report["samples"] == 0 and report["rejected"]["multiple_faces"] == 1, report["rejects"]
    assert "rule similar_size" in report["rejects"][0]["detail"]
    out = tmp_path / "kept"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), max_second_face_area_frac=0.5, max_side=832,
                                 min_face_frames_frac=0.5, **FAST))  # the mesh locks on after ~10 frames here
    assert report["samples"] == 1, report["rejects"]
    meta = json.loads(read_shards(out)[0]["json"])
    assert meta["background_face_frames_frac"] > 0.9
    assert meta["face_box"][0] < 512 / 2 < meta["face_box"][2]  # the speaker's face, not the small one


def test_sync_shift_moves_the_audio_the_right_way():
    """A synthetic offset: a click at video time 1.0 s in the audio, lips showing it 3 frames
    (0.12 s) later — SyncNet's offset +3 (video lags audio). The corrected clip audio has the
    click where the lips are."""
    from data_tools.prep import sync_shift_s

    audio = np.zeros(3 * RATE, np.float32)
    audio[RATE] = 1.0  # the sound, at 1.0 s
    shift = sync_shift_s(3)
    assert shift == pytest.approx(0.12)
    fixed = media.audio_segment(audio, 0.0, 0.0, 0.5 - shift, 1.5 - shift)  # clip 0.5-1.5 s
    assert np.argmax(fixed) / RATE == pytest.approx(1.12 - 0.5, abs=1 / RATE)


def test_sync_measured_with_random_syncnet_weights(tmp_path):
    """The whole path with a random SyncNet: each kept clip's json has the offset and confidence,
    the report their distribution; impossible thresholds reject every clip as out_of_sync."""
    import torch

    from ft_train.metrics.syncnet import SyncNet

    torch.manual_seed(0)
    weights = tmp_path / "syncnet_v2.model"
    torch.save(SyncNet().state_dict(), weights)
    inputs = tmp_path / "videos"
    inputs.mkdir()
    ffmpeg("-i", SAMPLE, "-t", 1.6, "-c:v", "libx264", "-c:a", "aac", inputs / "talk.mp4")
    out = tmp_path / "out"
    report = run_prep(PrepConfig(input=str(inputs), output=str(out), sync=str(weights), max_av_shift_frames=15,
                                 min_sync_confidence=-1e9, **FAST))
    assert report["samples"] == 1
    meta = json.loads(read_shards(out)[0]["json"])
    assert abs(meta["av_offset_frames"]) <= 15 and np.isfinite(meta["sync_confidence"])
    assert report["sync"]["clips"] == 1 and report["sync"]["offset_frames"] == {str(meta["av_offset_frames"]): 1}
    if meta["av_offset_frames"]:
        assert meta["audio_shift_s"] == pytest.approx(meta["av_offset_frames"] / 25)
    strict = run_prep(PrepConfig(input=str(inputs), output=str(tmp_path / "strict"), sync=str(weights),
                                 min_sync_confidence=1e9, **FAST))
    assert strict["samples"] == 0 and strict["rejected"]["out_of_sync"] == 1
    with pytest.raises(ValueError, match="sync=.*no such file"):
        PrepConfig(input="x", output="y", sync=str(tmp_path / "missing.model"))
