"""ft-prep end to end on the sample clip plus inputs built to trip each reject reason."""

import hashlib
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import webdataset as wds

from data_tools.make_sample_clip import write_mp4
from data_tools.prep import REJECT_REASONS, PrepConfig, load_config, main, run_prep
from ft_train import media
from ft_train.data import face as facemod
from ft_train.data.raw_format import SAMPLE_KEYS, decode_lip_masks, encode_lip_masks

SAMPLE = Path(__file__).parent / "assets" / "sample_talking.mp4"
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
# Short clips keep the tests fast: 33 frames = 1.32 s at 25 fps; the 4 s sample gives 3 clips.
FAST = dict(num_frames=33, stride=33, progress=False)


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *args], check=True)


def sample_frames_audio(seconds: float):
    info = media.probe(SAMPLE)
    frames = np.stack(list(media.iter_frames(info, 25.0, 512)))[: int(seconds * 25)]
    audio = media.read_audio(SAMPLE)
    return frames, audio[: int(seconds * media.AUDIO_RATE)]


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Write one input per reject reason into ``folder``; returns {file name: expected reason}."""
    frames, audio = sample_frames_audio(1.6)
    data = SAMPLE.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])  # cut-off download
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    ffmpeg("-i", str(SAMPLE), "-an", "-c:v", "copy", str(folder / "no_audio.mp4"))
    ffmpeg("-i", str(SAMPLE), "-vn", "-c:a", "copy", str(folder / "audio_only.mp4"))
    ffmpeg("-i", str(SAMPLE), "-t", "0.8", "-c:v", "libx264", "-c:a", "aac", str(folder / "too_short.mp4"))
    write_mp4(folder / "silent.mp4", frames, np.zeros_like(audio), 25.0, 30)
    from skimage import data as skdata

    coffee = cv2.resize(skdata.coffee(), (512, 384))  # a cup, no face
    write_mp4(folder / "no_face.mp4", np.repeat(coffee[None], len(frames), axis=0), audio, 25.0, 30)
    two = np.concatenate([frames, frames], axis=2)  # two talking astronauts side by side
    write_mp4(folder / "two_faces.mp4", two, audio, 25.0, 30)
    return {
        "truncated.mp4": "truncated",
        "garbage.mp4": "unreadable",
        "no_audio.mp4": "no_audio",
        "audio_only.mp4": "no_video",
        "too_short.mp4": "too_short",
        "silent.mp4": "silent_audio",
        "no_face.mp4": "no_face",
        "two_faces.mp4": "multiple_faces",
    }


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime_ns, sha256)} of every shard and shard record."""
    files = list(out.glob("shard-*.tar")) + list((out / "parts").glob("*.json"))
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One run over the sample clip + every bad input, 3 videos per shard."""
    root = tmp_path_factory.mktemp("prep")
    inputs = root / "videos"
    inputs.mkdir()
    shutil.copy(SAMPLE, inputs / "a_sample.mp4")
    (inputs / "a_sample.txt").write_text("an astronaut talks")
    expected = make_bad_inputs(inputs)
    cfg = PrepConfig(input=str(inputs), output=str(root / "out"), videos_per_shard=3, **FAST)
    report = run_prep(cfg)
    return cfg, report, expected


def read_shards(out: Path) -> list[dict]:
    tars = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def test_batch_completes_and_counts_each_reject_reason(prepared):
    cfg, report, expected = prepared
    out = Path(cfg.output)
    assert report["shards_done"] == report["shards_total"] == 3  # 9 videos / 3 per shard
    assert report["samples"] == 3  # the 4 s sample → 3 clips of 33 frames
    by_source = {Path(r["source"]).name: r["reason"] for r in report["rejects"]}
    for name, reason in expected.items():
        assert by_source.get(name) == reason, f"{name}: {by_source.get(name)} != {reason}"
    assert "a_sample.mp4" not in by_source
    counted = {k: v for k, v in report["rejected"].items() if v}
    assert counted == {reason: 1 for reason in expected.values()}
    assert set(report["rejected"]) == set(REJECT_REASONS)
    # Human-readable summary and on-disk JSON agree with the returned report.
    assert json.loads((out / "report.json").read_text())["rejected"] == report["rejected"]
    text = (out / "report.txt").read_text()
    assert "multiple_faces" in text and "samples (clips): 3" in text
    assert list((out / "previews").glob("a_sample_*.jpg")), "no preview of a kept clip written"
    # One preview per clip-level reject reason (file-level ones have no frames to show), ≥ 256 px a frame.
    shown = {p.name.split("-")[1] for p in (out / "previews").glob("reject-*.jpg")}
    assert shown == {"no_face", "multiple_faces"}
    for p in (out / "previews").glob("*.jpg"):
        assert cv2.imread(str(p)).shape[0] >= 256
    # Where the time went, per model (bench/prep_throughput.md explains the figures).
    assert {"decode", "face_mesh", "face_detect", "pose", "masks", "encode"} <= set(report["timing_s"])
    assert not list(out.glob("*.tmp")), "a temporary shard was left behind"


def test_manifest_matches_shards(prepared):
    cfg, report, _ = prepared
    out = Path(cfg.output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == report["samples"]
    for entry in manifest["shards"]:
        path = out / entry["shard"]
        assert path.stat().st_size == entry["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    # Shards whose videos were all rejected are recorded but no tar is kept.
    assert len(manifest["shards"]) == len(list(out.glob("shard-*.tar"))) == 1


def test_shard_reads_back_with_webdataset(prepared):
    cfg, _, _ = prepared
    samples = read_shards(Path(cfg.output))
    assert len(samples) == 3
    for i, s in enumerate(sorted(samples, key=lambda s: s["__key__"])):
        assert set(SAMPLE_KEYS) <= set(s), s.keys()
        meta = json.loads(s["json"])
        assert meta["clip_index"] == i and meta["num_frames"] == 33 and meta["fps"] == 25.0
        assert meta["caption"] == "an astronaut talks"
        frames = media.decode_mp4(s["mp4"])
        assert frames.shape == (33, 512, 512, 3)
        audio = media.decode_flac(s["flac"])
        assert audio.shape == (round(33 / 25 * media.AUDIO_RATE),) == (meta["audio_samples"],)
        lm = {k: v for k, v in np.load(__import__("io").BytesIO(s["landmarks.npz"])).items()}
        assert lm["face"].shape == (33, 478, 3) and lm["face_found"].mean() >= 0.95
        masks = decode_lip_masks(s["lipmask.npz"])
        assert masks.shape == (33, 512, 512)
        # The stored mask is exactly the mask of the stored landmarks (nothing lost on the way).
        expect = facemod.lip_masks(lm["face"], lm["face_box"], 512, 512, meta["lip_dilation_frac"])
        np.testing.assert_array_equal(masks, expect)
        # And the audio is the sample's audio at that time (aligned, not shifted).
        src = media.read_audio(SAMPLE)
        start = round(meta["start_s"] * media.AUDIO_RATE)
        np.testing.assert_allclose(audio, src[start : start + len(audio)], atol=1.5 / 32768)
        assert meta["omega_l_raw"] > 0


def test_lip_mask_codec_is_lossless():
    masks = np.random.default_rng(0).random((5, 37, 61)) > 0.7  # odd width: packbits pads
    np.testing.assert_array_equal(decode_lip_masks(encode_lip_masks(masks)), masks)
    assert decode_lip_masks(encode_lip_masks(masks)).dtype == bool


def test_rerun_writes_nothing_new(prepared):
    cfg, _, _ = prepared
    out = Path(cfg.output)
    before = snapshot(out)
    report = run_prep(cfg)
    assert report["this_run"]["shards_written"] == 0 and report["this_run"]["shards_skipped"] == 3
    assert snapshot(out) == before


def test_half_written_shard_is_redone(tmp_path):
    inputs = tmp_path / "videos"
    inputs.mkdir()
    ffmpeg("-i", str(SAMPLE), "-t", "1.6", "-c:v", "libx264", "-c:a", "aac", str(inputs / "clip.mp4"))
    cfg = PrepConfig(input=str(inputs), output=str(tmp_path / "out"), **FAST)
    run_prep(cfg)
    out = Path(cfg.output)
    tar = out / "shard-000000.tar"
    good = tar.read_bytes()
    # A crash after the tar rename but before the record was written, with a cut tar.
    (out / "parts" / "shard-000000.json").unlink()
    tar.write_bytes(good[: len(good) // 2])
    (out / "shard-000001.tar.tmp").write_bytes(b"junk")  # leftover of some other crash
    report = run_prep(cfg)
    assert report["this_run"]["shards_written"] == 1
    assert len(read_shards(out)) == 1
    assert tar.stat().st_size == json.loads((out / "manifest.json").read_text())["shards"][0]["bytes"]


@pytest.mark.parametrize(
    "override, reason",
    [({"min_face_px": 400}, "face_too_small"), ({"min_face_confidence": 0.99}, "low_confidence")],
)
def test_configurable_face_filters(tmp_path, override, reason):
    inputs = tmp_path / "videos"
    inputs.mkdir()
    ffmpeg("-i", str(SAMPLE), "-t", "1.6", "-c:v", "libx264", "-c:a", "aac", str(inputs / "clip.mp4"))
    cfg = PrepConfig(input=str(inputs), output=str(tmp_path / "out"), **FAST, **override)
    report = run_prep(cfg)
    assert report["samples"] == 0 and report["rejected"][reason] == 1
    assert report["rejects"][0]["clip"] == 0  # a clip-level reject, the file itself was fine
    assert report["timing_s"].get("pose", 0) == 0  # pose runs only for clips that pass the filters


def test_pose_runs_on_six_spread_frames_of_each_kept_clip_by_default(prepared):
    """The default schedule (pose_samples_per_clip=6, pose_region=face): pose runs after the
    filters on 6 frames of each kept clip, the first, the last and four evenly between; the
    joints stored there equal ClipPose on them with the clip's stored face boxes (the body found
    on the first, the region following the face), the first sample equal to static-image pose;
    the json and stats.json name the schedule."""
    import io

    cfg, report, _ = prepared
    assert cfg.pose_samples_per_clip == 6 and cfg.pose_region == "face"
    samples = [s for s in read_shards(Path(cfg.output)) if json.loads(s["json"])["source"].endswith("a_sample.mp4")]
    samples.sort(key=lambda s: json.loads(s["json"])["clip_index"])
    frames, _ = sample_frames_audio(4.0)
    clip_pose = facemod.ClipPose()
    with facemod.FrameAnalyzer(pose_every=0, pose_on_call=True, pose_static=True) as an:
        for c, s in reversed(list(enumerate(samples))):  # no state from clip to clip: any order
            z = np.load(io.BytesIO(s["landmarks.npz"]))
            stored = z["pose"]
            ran = np.flatnonzero(~np.isnan(stored[:, 0, 0]))
            assert ran.tolist() == [0, 6, 13, 19, 26, 32]
            boxes = np.where(z["face_found"][:, None], z["face_box"], np.nan)[ran]
            expected = np.stack(clip_pose([frames[33 * c + i] for i in ran], boxes))
            np.testing.assert_allclose(stored[ran], expected, atol=1e-5)
            np.testing.assert_allclose(stored[0], an.pose(frames[33 * c]), atol=1e-5)
            meta = json.loads(s["json"])
            assert meta["omega_b_raw"] is not None and meta["pose_schedule"] == "samples:6,region:face"
    clip_pose.close()
    assert json.loads((Path(cfg.output) / "stats.json").read_text())["pose_schedule"] == "samples:6,region:face"
    assert report["pose_schedules"] == {"samples:6,region:face": 3}
    with pytest.raises(SystemExit, match="pose_samples_per_clip=1: ω_b is a variance"):
        main(["input=x", "output=y", "pose_samples_per_clip=1"])
    with pytest.raises(SystemExit, match="pose_region='box' must be one of face, frame"):
        main(["input=x", "output=y", "pose_region=box"])


def test_pose_region_frame_finds_the_body_anew_on_each_sample(tmp_path):
    """pose_region=frame: each of the clip's samples is static-image pose on its own frame, and
    the schedule is recorded as the first version of the key wrote it (samples:6)."""
    import io

    inputs = tmp_path / "videos"
    inputs.mkdir()
    ffmpeg("-i", str(SAMPLE), "-t", "1.4", "-c:v", "libx264", "-c:a", "aac", str(inputs / "clip.mp4"))
    cfg = PrepConfig(input=str(inputs), output=str(tmp_path / "out"), pose_region="frame", **FAST)
    assert run_prep(cfg)["samples"] == 1
    (s,) = read_shards(Path(cfg.output))
    stored = np.load(io.BytesIO(s["landmarks.npz"]))["pose"]
    ran = np.flatnonzero(~np.isnan(stored[:, 0, 0]))
    assert json.loads(s["json"])["pose_schedule"] == "samples:6"
    frames = np.stack(list(media.iter_frames(media.probe(inputs / "clip.mp4"), 25.0, 512)))
    with facemod.FrameAnalyzer(pose_every=0, pose_on_call=True, pose_static=True) as an:
        expected = np.stack([an.pose(frames[i]) for i in reversed(ran)])[::-1]
    np.testing.assert_allclose(stored[ran], expected, atol=1e-5)


def test_clip_pose_follows_the_face_and_finds_a_lost_body_again():
    """ClipPose: its first frame is static-image pose exactly. The same frame shifted by 24 px,
    its face box shifted alike: the region moves with the face and the face and shoulder joints
    move by the 24 px (within 2 px); left where it was, they land up to ~25 px off. A blank frame
    gives None and the frame after it is found anew."""
    import mediapipe as mp

    frames, _ = sample_frames_audio(1.0)
    first = frames[0].copy()
    h, w = first.shape[:2]
    shifted = cv2.warpAffine(first, np.float32([[1, 0, 24], [0, 1, 0]]), (w, h), borderMode=cv2.BORDER_REPLICATE)
    box = np.array([150.0, 120.0, 260.0, 250.0])  # only its motion matters
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as static:
        res = static.process(first).pose_landmarks
        ref_first = np.array([(p.x, p.y, p.z, p.visibility) for p in res.landmark], np.float32)
    cp = facemod.ClipPose()
    blank = np.zeros_like(first)
    out = cp([first, shifted, blank, frames[20].copy()], np.stack([box, box + [24, 0, 24, 0], box * np.nan, box]))
    unfollowed = cp([first, shifted])
    cp.close()
    np.testing.assert_array_equal(out[0], ref_first)
    upper = slice(0, 13)  # face and shoulders: in frame, visible

    def shift_error_px(joints):
        return np.abs((joints[1][upper, :2] - joints[0][upper, :2]) * [w, h] - [24, 0]).max()

    assert shift_error_px(out) < 2.0 and shift_error_px(unfollowed) > 10.0
    assert out[2] is None and out[3] is not None


def test_pose_every_schedule_tracks_every_nth_frame(tmp_path):
    """pose_samples_per_clip=0: pose on the kept clips' frames k with k % pose_every == 0, in
    tracking mode: the stored joints equal a FrameAnalyzer running pose on that schedule over the
    whole video. Rerun into the same output with the other schedule, the report warns that the
    two kinds of ω_b are mixed."""
    import io

    shutil.copy(SAMPLE, tmp_path / "talk.mp4")
    cfg = PrepConfig(input=str(tmp_path / "talk.mp4"), output=str(tmp_path / "out"), pose_samples_per_clip=0, **FAST)
    assert run_prep(cfg)["samples"] == 3
    samples = sorted(read_shards(Path(cfg.output)), key=lambda s: json.loads(s["json"])["clip_index"])
    stored = np.concatenate([np.load(io.BytesIO(s["landmarks.npz"]))["pose"] for s in samples])
    frames, _ = sample_frames_audio(4.0)
    with facemod.FrameAnalyzer(pose_every=cfg.pose_every) as an:
        expected = facemod.stack_results([an(f) for f in frames[: len(stored)]])["pose"]
    ran = ~np.isnan(stored[:, 0, 0])
    assert len(stored) == 99 and (ran == (np.arange(99) % cfg.pose_every == 0)).all()
    np.testing.assert_allclose(stored[ran], expected[ran], atol=1e-5)
    assert np.isnan(expected[~ran]).all()
    assert {json.loads(s["json"])["pose_schedule"] for s in samples} == {"every:4"}
    # A second video in the same output made with the default schedule: both kinds are counted.
    shutil.copy(SAMPLE, tmp_path / "talk2.mp4")
    report = run_prep(PrepConfig(input=str(tmp_path), output=cfg.output, videos_per_shard=1, **FAST))
    assert report["pose_schedules"] == {"every:4": 3, "samples:6,region:face": 3}
    report_txt = (Path(cfg.output) / "report.txt").read_text()
    assert "different pose schedules (3 every:4, 3 samples:6,region:face)" in report_txt


def test_list_file_input_and_missing_file(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "talk.mp4")
    (tmp_path / "list.txt").write_text("# videos\ntalk.mp4\n\nmissing.mp4\n")
    cfg = PrepConfig(input=str(tmp_path / "list.txt"), output=str(tmp_path / "out"), **FAST)
    report = run_prep(cfg)
    assert report["samples"] == 3
    assert [r["reason"] for r in report["rejects"]] == ["unreadable"]
    assert "missing.mp4" in report["rejects"][0]["detail"]


def test_cli_config_and_validation(tmp_path, capsys):
    cfg = load_config(["input=x", "output=y"])
    assert (cfg.fps, cfg.num_frames, cfg.max_side) == (25.0, 81, 512)
    assert (cfg.detect_every, cfg.pose_samples_per_clip, cfg.scene_downscale) == (16, 6, 4)  # the speed settings conf/prep.yaml documents
    with pytest.raises(SystemExit, match="num_frames=80 must be 4k\\+1"):
        main(["input=x", "output=y", "num_frames=80"])
    with pytest.raises(SystemExit, match="detect_every=0 must be ≥ 1"):
        main(["input=x", "output=y", "detect_every=0"])
    with pytest.raises(SystemExit, match="set input, output"):
        main([])
    with pytest.raises(SystemExit, match="input=.*no such folder"):
        main([f"input={tmp_path / 'nope'}", f"output={tmp_path / 'out'}"])


@pytest.mark.slow
def test_parallel_workers_give_the_same_shards(prepared, tmp_path):
    cfg, report, _ = prepared
    par = replace(cfg, output=str(tmp_path / "par"), num_workers=2)
    report2 = run_prep(par)
    assert report2["rejected"] == report["rejected"]
    keys = lambda out: sorted(s["__key__"] for s in read_shards(Path(out)))  # noqa: E731
    assert keys(par.output) == keys(cfg.output)


def test_same_named_wav_supplies_missing_audio(tmp_path):
    inputs = tmp_path / "videos"
    inputs.mkdir()
    ffmpeg("-i", str(SAMPLE), "-t", "1.6", "-an", "-c:v", "libx264", str(inputs / "mute.mp4"))
    ffmpeg("-i", str(SAMPLE), "-t", "1.6", "-vn", "-ac", "1", "-ar", "16000", str(inputs / "mute.wav"))
    cfg = PrepConfig(input=str(inputs), output=str(tmp_path / "out"), **FAST)
    report = run_prep(cfg)
    assert report["samples"] == 1 and not report["rejects"]
    (sample,) = read_shards(Path(cfg.output))
    src = media.read_audio(SAMPLE)
    np.testing.assert_allclose(media.decode_flac(sample["flac"]), src[: round(33 / 25 * 16000)], atol=2e-3)


def test_stats_normalise_motion_to_unit_range(prepared):
    from ft_train.data.raw_format import normalise_motion

    cfg, _, _ = prepared
    stats = json.loads((Path(cfg.output) / "stats.json").read_text())
    raw = [json.loads(s["json"])["omega_l_raw"] for s in read_shards(Path(cfg.output))]
    entry = stats["omega_l"]
    assert entry["count"] == len(raw) == 3
    assert entry["low"] == pytest.approx(np.quantile(raw, 0.05)) and entry["high"] == pytest.approx(np.quantile(raw, 0.95))
    values = [normalise_motion(r, entry) for r in raw]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert normalise_motion(min(raw), entry) == 0.0 and normalise_motion(max(raw), entry) == 1.0
    assert normalise_motion(None, entry) == pytest.approx(normalise_motion(entry["median"], entry))


def test_shot_cuts_on_shrunk_frames_match_full_size():
    """scene_downscale=2 and 4 (the default) flag the same frames as full size: a cut to another picture, and none
    within the talking head (odd sizes included)."""
    from skimage import data as skdata

    from ft_train.data.shots import ShotCuts

    frames, _ = sample_frames_audio(1.2)
    other = cv2.resize(skdata.astronaut(), frames.shape[2:0:-1])[::-1].copy()  # another shot
    video = [*frames[:15], *[other] * 5, *frames[15:25]]
    for crop in (video, [np.ascontiguousarray(f[:375, :511]) for f in video]):
        flagged = {n: [i for i, f in enumerate(crop) if c(f)] for n, c in ((1, ShotCuts(0.3)), (2, ShotCuts(0.3, 2)),
                                                                          (4, ShotCuts(0.3, 4)))}
        assert flagged[1] == flagged[2] == flagged[4] == [15, 20]


def test_the_tail_no_clip_can_use_is_not_analysed_and_a_longer_video_loses_nothing(tmp_path, monkeypatch):
    """The 100-frame sample holds three 33-frame clips (frames 0-98): frame 99 is in none and the
    face analysis skips it. When the video runs past what its packets promised, the frames held
    back are analysed in order once a clip does end, and every stored array is as without holding."""
    import io

    from data_tools import prep

    calls = []
    original = facemod.FrameAnalyzer.__call__

    def counted(self, frame, *args, **kwargs):
        calls.append(1)
        return original(self, frame, *args, **kwargs)

    monkeypatch.setattr(facemod.FrameAnalyzer, "__call__", counted)
    shutil.copy(SAMPLE, tmp_path / "talk.mp4")
    outputs = {}
    for name, expected in (("normal", None), ("underestimated", 40)):
        if expected is not None:
            monkeypatch.setattr(prep, "expected_frames", lambda info, cfg: expected)
        calls.clear()
        cfg = PrepConfig(input=str(tmp_path / "talk.mp4"), output=str(tmp_path / name), **FAST)
        assert run_prep(cfg)["samples"] == 3
        assert len(calls) == 99, name
        outputs[name] = sorted(read_shards(Path(cfg.output)), key=lambda s: s["__key__"])
    for a, b in zip(*outputs.values(), strict=True):
        za, zb = np.load(io.BytesIO(a["landmarks.npz"])), np.load(io.BytesIO(b["landmarks.npz"]))
        for key in za.files:
            np.testing.assert_array_equal(za[key], zb[key], err_msg=key)
        assert json.loads(a["json"]) == json.loads(b["json"])
