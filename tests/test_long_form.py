"""Long speech in ft-infer (overlapping segments into one video) and audio/video sync, on the tiny
random model of tests/test_infer.py.

Sync is checked end to end with clicks: single loud samples at known times in the speech. Each one
must be, in the waveform a window's wav2vec2 receives, at the sample of its time relative to the
window's first frame (so the model's per-frame audio windows put it under the frame showing that
moment), and in the mp4's audio track at its own time, with both streams starting at 0. An 80 ms
delay in the mp4 or audio one frame (40 ms) off in the model's input fails these checks by
~1280 / 640 samples; they allow 2 ms (the AAC round trip keeps a click within a sample or two).
"""

import functools
import gc

import av
import numpy as np
import pytest
import soundfile
import torch

from ft_train.data.clip_prep import clip_audio_samples
from ft_train.diffusion import FlowMatchSampler, first_frame_mask
from ft_train.infer import TalkingPortraitPipeline, frames_for_audio, infer, load_config, main, read_image, target_size
from ft_train.inference.long_form import (
    Segment, blend_weights, generate_long, known_frames_mask, plan_segments, to_known,
)
from ft_train.inference.adapters import read_adapters
from ft_train.media import read_audio, read_video
from ft_train.models.audio import audio_window_index, clip_audio_tokens

from .test_infer import FPS, SIZE, args, files, one_thread  # noqa: F401  (module fixtures)

RATE = 16000
HOP = 320          # wav2vec2 samples per token
TOLERANCE = 0.002  # s: a click found within 2 ms of where it belongs (one frame at 25 fps is 40 ms)


def speech_with_clicks(seconds: float, clicks: list[float]) -> np.ndarray:
    """A quiet modulated tone (|x| ≤ 0.1, like speech energy) with a 0.95 sample at each click time."""
    t = np.arange(int(round(seconds * RATE))) / RATE
    wave = 0.1 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    for c in clicks:
        wave[int(round(c * RATE))] = 0.95
    return wave.astype(np.float32)


def clicks_in(wave: np.ndarray) -> list[int]:
    """Sample indices of the clicks in a waveform the pipeline passed on unchanged."""
    return [int(i) for i in np.flatnonzero(np.asarray(wave) > 0.5)]


def mp4_click_time(path, near: float, search: float = 0.095) -> float:
    """Time (s) of the sharpest jump in the mp4's decoded audio within ±``search`` s of ``near``."""
    audio = read_audio(path, RATE)
    lo = max(int((near - search) * RATE), 1)
    jump = np.abs(np.diff(audio[lo - 1: int((near + search) * RATE)]))
    return (lo + int(np.argmax(jump))) / RATE


def stream_starts(path) -> dict[str, float]:
    """Start time (s) of each stream, and of the first decoded video frame and audio frame."""
    out = {}
    with av.open(str(path)) as container:
        for stream in container.streams:
            out[stream.type] = float(stream.start_time * stream.time_base)
        for kind in ("video", "audio"):
            container.seek(0)
            frame = next(container.decode(**{kind: 0}))
            out[f"first_{kind}_frame"] = float(frame.pts * frame.time_base)
    return out


class Spy:
    """What the pipeline of an ``infer`` run hands its networks, segment by segment: the known
    frames and the speech of each window, the frames it returns, and per DiT forward the I2V mask
    and the audio features; plus the frames written to the mp4."""

    def __init__(self, monkeypatch):
        import ft_train.media

        self.segments: list[dict] = []
        self.written = None
        load = TalkingPortraitPipeline.load.__func__

        def spied_load(cls, *a, **k):
            pipe = load(cls, *a, **k)
            self.attach(pipe)
            return pipe

        monkeypatch.setattr(TalkingPortraitPipeline, "load", classmethod(spied_load))
        write = ft_train.media.write_video

        def spied_write(path, frames, fps, audio=None, **k):
            self.written = np.array(frames)
            return write(path, frames, fps, audio=audio, **k)

        monkeypatch.setattr(ft_train.media, "write_video", spied_write)

    def attach(self, pipe):
        self.pipe = pipe
        segment, encode = pipe.segment, pipe.audio_encoder

        def spied_segment(cond, wave, num_frames, known=None, **k):
            record = {"wave": np.array(wave), "known": known, "forwards": [], "encoded": [], "conditions": []}
            self.segments.append(record)
            record["frames"] = segment(cond, wave, num_frames, known=known, **k)
            return record["frames"]

        class Encoder:
            def __call__(_, waves):
                out = encode(waves)
                self.segments[-1]["encoded"].append(out[0].clone())
                return out

            def __getattr__(_, name):
                return getattr(encode, name)

        def on_forward(module, a, kwargs):
            hidden, audio = a[0], a[4] if len(a) > 4 else kwargs.get("audio")
            self.segments[-1]["forwards"].append({"mask": hidden[:, 16:20].clone(), "image": a[3].clone(),
                                                  "motion": kwargs.get("motion"),
                                                  "audio": None if audio is None else audio.clone()})

        pipe.segment = spied_segment
        pipe.audio_encoder = Encoder()
        pipe.model.register_forward_pre_hook(on_forward, with_kwargs=True)
        pipe.vae.enc.register_forward_pre_hook(lambda m, a: self.segments[-1]["conditions"].append(a[0].clone())
                                               if self.segments else None)


def check_model_hears_the_clicks(spy: Spy, plan: list[Segment], clicks: list[float], fps: float, expand: int):
    """Every click inside a window reaches that window's wav2vec2 at the sample of its time relative
    to the window's first frame, the model gets those features unchanged, and the click's token
    lies in the audio window of the latent frame that holds the click's video frame."""
    found = 0
    for record, seg in zip(spy.segments, plan, strict=True):
        wave = record["wave"]
        assert len(wave) == clip_audio_samples(seg.frames, fps)
        t0 = seg.start / fps
        inside = [c for c in clicks if t0 <= c < t0 + len(wave) / RATE]
        got = clicks_in(wave)
        assert len(got) == len(inside), (seg, got, inside)
        for c, sample in zip(inside, got):
            assert abs((t0 + sample / RATE) - c) < TOLERANCE, (seg, c, t0 + sample / RATE)
            found += 1
        encoded = record["encoded"]
        assert len(encoded) == 1 and encoded[0].shape[0] == clip_audio_tokens(seg.frames, fps)
        for forward in record["forwards"]:
            assert forward["audio"] is not None
            torch.testing.assert_close(forward["audio"][0], encoded[0].to(forward["audio"]), rtol=0, atol=0)
        index, lengths = audio_window_index(encoded[0].shape[0], seg.frames, expand)
        for c, sample in zip(inside, got):
            frame = int(np.floor((c - t0) * fps))            # the video frame (of the window) showing it
            latent = 0 if frame == 0 else (frame + 3) // 4   # VAE: frame 0 alone, then 4 per latent frame
            if latent < len(lengths):
                assert sample // HOP in index[latent, : lengths[latent]].tolist()
    return found


def check_mp4_in_sync(path, clicks: list[float], speech_seconds: float, num_frames: int, fps: float):
    starts = stream_starts(path)
    assert starts == {"video": 0.0, "audio": 0.0, "first_video_frame": 0.0, "first_audio_frame": 0.0}, starts
    for c in clicks:
        assert abs(mp4_click_time(path, c) - c) < TOLERANCE, (c, mp4_click_time(path, c))
    frames, got_fps, audio = read_video(path)
    assert frames.shape[0] == num_frames and got_fps == pytest.approx(fps)
    # The last sample: the speech's end (AAC fills its last 1024-sample frame: up to 64 ms more).
    end = len(audio) / RATE
    assert speech_seconds - 1e-3 <= end <= speech_seconds + 1024 / RATE + 1e-3, end
    return frames


# ----------------------------------------------------------------------------------------------
# the pieces


def test_known_frames_mask_folds_frames_as_wan_does():
    """K known video frames → the I2V mask: K=1 is Wan's first-frame mask; K=4m+1 fills latent frames
    0…m; other K leave a latent frame partly known (why overlap_frames must be 4m+1)."""
    torch.testing.assert_close(known_frames_mask(17, 1, 3, 2), first_frame_mask(5, 3, 2))
    mask = known_frames_mask(17, 5, 3, 2)
    assert mask.shape == (1, 4, 5, 3, 2)
    assert mask[:, :, :2].eq(1).all() and mask[:, :, 2:].eq(0).all()
    assert known_frames_mask(17, 9, 1, 1)[0, :, :, 0, 0].tolist() == [[1, 1, 1, 0, 0]] * 4
    partial = known_frames_mask(17, 3, 1, 1)[0, :, 1, 0, 0]  # frames 1, 2 known of latent frame 1's 1…4
    assert partial.tolist() == [1, 1, 0, 0]


def test_sampler_takes_the_condition_mask():
    """mask=None is Wan's first-frame mask; another mask reaches the model; a wrong shape is refused."""
    seen = []

    def model(hidden, timestep, text, image, audio, audio_scale=0.0):
        seen.append(hidden[:, 16:20].clone())
        return torch.zeros_like(hidden[:, :16])

    sampler = FlowMatchSampler(steps=1, cfg=1.0, audio_cfg=None)
    latents, text, image = torch.zeros(1, 16, 3, 2, 2), torch.zeros(1, 512, 8), torch.zeros(1, 257, 8)
    sampler(model, latents, image, text)
    torch.testing.assert_close(seen[-1], first_frame_mask(3, 2, 2))
    sampler(model, latents, image, text, mask=known_frames_mask(9, 5, 2, 2))
    assert seen[-1][0, :, :2].eq(1).all() and seen[-1][0, :, 2:].eq(0).all()
    with pytest.raises(ValueError, match=r"mask has shape \(1, 4, 2, 2, 2\), expected \(1 or 1, 4, 3, 2, 2\)"):
        sampler(model, latents, image, text, mask=known_frames_mask(5, 5, 2, 2))


@pytest.mark.parametrize("segment, overlap", [(81, 5), (81, 1), (17, 9), (9, 5), (33, 29)])
def test_segments_cover_the_video_with_the_overlap(segment, overlap):
    for total in range(5, 400, 4):
        plan = plan_segments(total, segment, overlap)
        assert plan[0].start == 0 and plan[0].overlap == 0
        assert plan[-1].start + plan[-1].frames == total
        assert all(s.frames <= segment and (s.frames - 1) % 4 == 0 for s in plan)
        for before, seg in zip(plan, plan[1:]):
            assert seg.overlap == overlap and seg.frames > overlap
            assert seg.start == before.start + before.frames - overlap == before.start + segment - overlap
        assert len(plan) == (1 if total <= segment else 1 + -(-(total - segment) // (segment - overlap)))


def test_a_shorter_plain_window_takes_the_first_condition_latents(files):
    """Validation has a clip's condition latents, not its photo: a shorter window without known
    frames cuts them, which equals encoding the shorter window (the Wan VAE is causal in time)."""
    from ft_train.inference.pipeline import plain_window_latents
    from ft_train.models.vae import WanVAEDecoder

    vae = WanVAEDecoder(files["wan"], key="wan")
    first = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    long = vae.enc.encode_condition(first, 17)
    for frames in (5, 9, 17):
        torch.testing.assert_close(plain_window_latents(long, frames), vae.enc.encode_condition(first, frames),
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cover 5 latent frames; a 21-frame window needs 6"):
        plain_window_latents(long, 21)


def test_blend_is_a_cross_fade():
    assert blend_weights(1).tolist() == [0.5]
    assert blend_weights(5).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])


# ----------------------------------------------------------------------------------------------
# ten seconds of speech


def test_ten_seconds_of_speech_make_one_video_in_sync(files, tmp_path, monkeypatch, capsys):
    """10 s at 25 fps → 253 frames (4k+1 covering 250) in 81-frame segments overlapping by 5
    (starts 0, 76, 152, 228); each segment after the first is conditioned on the previous one's
    last 5 frames (condition video and mask), the shared frames are cross-faded, and the mp4 carries
    the speech in sync."""
    clicks = [0.5, 3.1, 3.3, 6.2, 9.9]  # 3.1 lies in segments 0 and 1, 6.2 in 1 and 2
    soundfile.write(tmp_path / "long.wav", speech_with_clicks(10.0, clicks), RATE)
    spy = Spy(monkeypatch)
    out = tmp_path / "long.mp4"
    assert main(args(files, out, audio=tmp_path / "long.wav")) == 0
    assert "4 segments (long_mode=continue)" in capsys.readouterr().out

    total = frames_for_audio(10.0, FPS, max_frames=10**6)
    plan = plan_segments(total, 81, 5)
    assert total == 253 and [(s.start, s.frames) for s in plan] == [(0, 81), (76, 81), (152, 81), (228, 25)]
    assert len(spy.segments) == 4
    frames = check_mp4_in_sync(out, clicks, 10.0, total, FPS)

    for k, (record, seg) in enumerate(zip(spy.segments, plan)):
        made = record["frames"]
        assert made.shape == (seg.frames, SIZE, 48, 3)
        (condition,) = record["conditions"]  # the VAE encodes one condition video per segment
        masks = {tuple(f["mask"][0, :, :, 0, 0].flatten().tolist()) for f in record["forwards"]}
        assert len(masks) == 1
        mask = record["forwards"][0]["mask"][0]
        if k == 0:
            assert record["known"] is None
            assert mask[:, :1].eq(1).all() and mask[:, 1:].eq(0).all()
            continue
        # The overlap frames of segment k are the last 5 frames segment k−1 made ...
        previous = spy.segments[k - 1]["frames"]
        torch.testing.assert_close(record["known"], to_known(previous[-5:]), rtol=0, atol=0)
        # ... held as known frames in the condition video (zeros after them) and in the mask.
        torch.testing.assert_close(condition[0, :, :5], to_known(previous[-5:]).permute(1, 0, 2, 3))
        assert condition[0, :, 5:].eq(0).all()
        assert mask[:, :2].eq(1).all() and mask[:, 2:].eq(0).all()

    # The identity reference is the photo in every segment: the same CLIP tokens and ω throughout.
    reference = spy.segments[0]["forwards"][0]
    for record in spy.segments:
        for forward in record["forwards"]:
            torch.testing.assert_close(forward["image"], reference["image"], rtol=0, atol=0)
            torch.testing.assert_close(forward["motion"], reference["motion"], rtol=0, atol=0)

    # The video: each segment's own frames, and a cross-fade on the 5 frames two segments share.
    written = spy.written
    assert written.shape == (total, SIZE, 48, 3)
    for k, (record, seg) in enumerate(zip(spy.segments, plan)):
        own = record["frames"].numpy()
        end = plan[k + 1].start if k + 1 < len(plan) else total
        np.testing.assert_array_equal(written[seg.start + seg.overlap: end], own[seg.overlap: end - seg.start])
        if seg.overlap:
            before = spy.segments[k - 1]["frames"].numpy()[-5:].astype(np.float32)
            w = blend_weights(5)[:, None, None, None]
            expected = np.rint((1 - w) * before + w * own[:5].astype(np.float32))
            assert np.abs(written[seg.start: seg.start + 5].astype(np.float32) - expected).max() <= 1
    assert np.abs(frames.astype(np.float32) - written.astype(np.float32)).mean() < 3  # H.264 at crf 18
    assert check_model_hears_the_clicks(spy, plan, clicks, FPS, spy.pipe.model.audio_expand) == 7


def test_restart_mode_starts_every_segment_from_the_photo(files, tmp_path, monkeypatch):
    """long_mode=restart: the same segments, every one conditioned on the photo alone."""
    clicks = [0.3, 1.5]
    soundfile.write(tmp_path / "speech.wav", speech_with_clicks(2.0, clicks), RATE)
    spy = Spy(monkeypatch)
    out = tmp_path / "restart.mp4"
    result = infer(**load_config(args(files, out, audio=tmp_path / "speech.wav", segment_frames=17,
                                      overlap_frames=9, long_mode="restart")))
    plan = plan_segments(53, 17, 9)
    assert result["segments"] == len(plan) == 6 and result["num_frames"] == 53
    assert len(result["segment_seconds"]) == 6
    first = spy.segments[0]["conditions"][0][0, :, 0]
    for record in spy.segments:
        assert record["known"] is None
        (condition,) = record["conditions"]
        torch.testing.assert_close(condition[0, :, 0], first, rtol=0, atol=0)  # the photo
        assert condition[0, :, 1:].eq(0).all()
        mask = record["forwards"][0]["mask"][0]
        assert mask[:, :1].eq(1).all() and mask[:, 1:].eq(0).all()
    check_mp4_in_sync(out, clicks, 2.0, 53, FPS)
    assert check_model_hears_the_clicks(spy, plan, clicks, FPS, spy.pipe.model.audio_expand) >= 2


def test_single_window_is_in_sync(files, tmp_path, monkeypatch):
    """One window (1 s, 25 frames): the click reaches the model at its time and sits at its time in
    the mp4; nothing of the long-form path runs."""
    clicks = [0.52]
    soundfile.write(tmp_path / "speech.wav", speech_with_clicks(1.0, clicks), RATE)
    spy = Spy(monkeypatch)
    out = tmp_path / "one.mp4"
    result = infer(**load_config(args(files, out, audio=tmp_path / "speech.wav")))
    assert result["segments"] == 1 and result["long_mode"] is None and result["num_frames"] == 25
    assert len(spy.segments) == 1 and spy.segments[0]["known"] is None
    check_mp4_in_sync(out, clicks, 1.0, 25, FPS)
    assert check_model_hears_the_clicks(spy, [Segment(0, 25, 0)], clicks, FPS, spy.pipe.model.audio_expand) == 1


def test_speech_longer_than_max_seconds_is_refused(files, tmp_path):
    soundfile.write(tmp_path / "long.wav", speech_with_clicks(3.0, []), RATE)
    with pytest.raises(SystemExit) as info:
        main(args(files, tmp_path / "x.mp4", audio=tmp_path / "long.wav", max_seconds=2.5))
    assert str(info.value) == (f"ft-infer: max_seconds: {tmp_path / 'long.wav'} lasts 3.0 s, longer than "
                               "max_seconds=2.5; raise max_seconds (sampling time grows linearly with the speech) "
                               "or cut the speech")
    assert not (tmp_path / "x.mp4").exists()


# ----------------------------------------------------------------------------------------------
# memory


@functools.cache
def _bench():
    from .test_bench import load_bench

    return load_bench("long_form")


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every tensor storage Python holds, less ``exclude`` (the weights): bench/long_form.py's count."""
    return _bench().live_tensor_bytes(exclude)


def test_memory_stays_one_segment(files):
    """The tensors alive at each DiT forward (activations aside) peak at the same size for 2 and
    for 4 segments: nothing of the finished segments stays behind but the overlap frames."""
    pipe = TalkingPortraitPipeline.load(read_adapters(files["bundle"]), files["wan"], files["wav2vec"],
                                        sampler=FlowMatchSampler(steps=1), device="cpu")
    picture = read_image(files["image"]).resize(target_size(384, 512, SIZE, pipe.grid))
    cond = pipe.conditions(picture)
    weights = set()
    for module in (pipe.model, pipe.image_encoder, pipe.text_encoder, pipe.audio_encoder, pipe.vae.enc):
        weights |= {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    peaks = []
    hook = pipe.model.register_forward_pre_hook(lambda m, a: peaks.append(live_tensor_bytes(weights)))
    speech = speech_with_clicks(2.0, [])
    held = {}
    try:
        for total in (21, 37):
            plan = plan_segments(total, 13, 5)
            out = np.zeros((total, SIZE, 48, 3), np.uint8)
            peaks.clear()
            gc.collect()
            generate_long(pipe, cond, speech, FPS, plan, out, seed=1)
            held[len(plan)] = max(peaks)
    finally:
        hook.remove()
    assert set(held) == {2, 4}
    one_segment = 13 * SIZE * 48 * 3  # a segment's uint8 frames: what a leak would add per segment
    assert held[4] <= held[2] + one_segment // 4, held


@pytest.mark.slow
def test_long_form_bench_runs(tmp_path):
    """bench/long_form.py on short segments: it writes its report, and 2 and 3 segments hold the
    same tensors (each carries one overlap to the next)."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "long_form.py"), "--segments", "2,3",
                           "--segment-frames", "9", "--steps", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("long_form-*.json")]
    rows = {r["segments"]: r for r in report["rows"]}
    assert set(rows) == {2, 3} and all(r["segments_per_s"] > 0 and len(r["segment_seconds"]) == r["segments"]
                                       for r in rows.values())
    assert rows[2]["frames"] == 13 and rows[3]["frames"] == 17
    assert rows[2]["held_bytes_max"] == rows[3]["held_bytes_max"]
    assert (tmp_path / next(tmp_path.glob("long_form-*.json")).with_suffix(".md").name).is_file()
