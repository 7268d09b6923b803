"""mp4 writing: H.264 + AAC that reads back with the right frames, rate, sound and timing; reading audio."""

from fractions import Fraction

import av
import numpy as np
import pytest

from ft_train.media import AUDIO_RATE, MediaError, MediaWriteError, read_audio, read_video, write_video

AAC_FRAME = 1024  # samples; decoders keep the padding that fills the last AAC frame


def gradient_frames(num_frames=24, height=64, width=96):
    """Smooth frames (x264 keeps them nearly exactly) whose brightness moves frame by frame."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    frames = []
    for t in range(num_frames):
        level = 40 + 7 * t
        red = level + 60 * x + 0 * y
        green = 200 - 80 * y + 0 * x
        blue = np.full((height, width, 1), 30 + 3 * t)
        rgb = np.concatenate([red, green, blue], axis=2)
        frames.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return np.stack(frames)


def burst(seconds, at_s, sample_rate=AUDIO_RATE, length_s=0.05, seed=0):
    """Silence with one noise burst at ``at_s`` (an unambiguous landmark for A/V timing)."""
    audio = np.zeros(int(round(seconds * sample_rate)), np.float32)
    start = int(round(at_s * sample_rate))
    n = int(round(length_s * sample_rate))
    audio[start : start + n] = 0.5 * np.random.default_rng(seed).standard_normal(n)
    return audio


def test_round_trip_frames_fps_and_audio(tmp_path):
    frames = gradient_frames()
    fps = 25.0
    audio = burst(len(frames) / fps, at_s=0.4)
    path = write_video(tmp_path / "sub" / "clip.mp4", frames, fps, audio)
    assert path.is_file()

    got, got_fps, got_audio = read_video(path)
    assert got.shape == frames.shape and got.dtype == np.uint8
    assert got_fps == pytest.approx(fps)
    err = np.abs(got.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 2.0 and np.percentile(err, 99) <= 8
    # frame order kept: each decoded frame is nearest to its own source frame
    means = frames.reshape(len(frames), -1).mean(1)
    got_means = got.reshape(len(got), -1).mean(1)
    assert (np.abs(got_means[:, None] - means[None, :]).argmin(1) == np.arange(len(frames))).all()

    assert got_audio is not None and got_audio.dtype == np.float32
    assert len(audio) <= len(got_audio) <= len(audio) + AAC_FRAME
    # no A/V offset: the burst is where it was written (cross-correlation peak at lag 0 ± 1 sample)
    lags = np.arange(-400, 401)
    ref = audio[2000:10000]
    corr = [float(np.dot(got_audio[2000 + k : 10000 + k], ref)) for k in lags]
    assert abs(lags[int(np.argmax(corr))]) <= 1
    assert max(corr) > 0.7 * float(np.dot(ref, ref))


def test_file_is_a_standard_playable_mp4(tmp_path):
    frames = gradient_frames(num_frames=23, height=48, width=64)
    audio = burst(1.0, at_s=0.5)
    path = write_video(tmp_path / "clip.mp4", frames, 23, audio)
    with av.open(str(path)) as c:
        assert "mp4" in c.format.name
        video, sound = c.streams.video[0], c.streams.audio[0]
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert (video.codec_context.width, video.codec_context.height) == (64, 48)
        assert sound.codec_context.name == "aac" and sound.codec_context.sample_rate == AUDIO_RATE
        assert sound.codec_context.channels == 1
        assert c.duration / 1e6 == pytest.approx(1.0, abs=0.1)
        decoded = sum(1 for _ in c.decode(video=0))
    assert decoded == 23
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")  # faststart: the index precedes the media


def test_fractional_rate_and_silent_video(tmp_path):
    frames = gradient_frames(num_frames=10, height=32, width=32)
    path = write_video(tmp_path / "ntsc.mp4", frames, 24000 / 1001)
    got, fps, audio = read_video(path)
    assert len(got) == 10 and audio is None
    assert fps == pytest.approx(24000 / 1001, rel=1e-4)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(24000, 1001)


def test_long_audio_is_cut_to_the_video(tmp_path):
    frames = gradient_frames(num_frames=12, height=32, width=32)  # 0.5 s at 24 fps
    audio = burst(2.0, at_s=0.2)
    _, _, got = read_video(write_video(tmp_path / "cut.mp4", frames, 24, audio))
    assert 8000 <= len(got) <= 8000 + AAC_FRAME


def test_bad_inputs_fail_clearly(tmp_path):
    frames = gradient_frames(num_frames=2, height=32, width=32)
    with pytest.raises(MediaWriteError, match="uint8"):
        write_video(tmp_path / "a.mp4", frames.astype(np.float32), 25)
    with pytest.raises(MediaWriteError, match="even"):
        write_video(tmp_path / "a.mp4", frames[:, :31], 25)
    with pytest.raises(MediaWriteError, match="mono"):
        write_video(tmp_path / "a.mp4", frames, 25, audio=np.zeros((2, 100), np.float32))
    with pytest.raises(MediaWriteError, match="fps"):
        write_video(tmp_path / "a.mp4", frames, 0)
    with pytest.raises(ValueError, match="cannot be decoded|no video"):
        (tmp_path / "junk.mp4").write_bytes(b"not a video")
        read_video(tmp_path / "junk.mp4")


def test_read_audio_from_a_path_or_bytes_with_its_start_time(tmp_path):
    """One reader for every caller: a file's path or its bytes give the same 16 kHz samples; the
    start time (ft-prep aligns audio to video with it) on request; files without sound fail with
    a reject reason, as a ValueError."""
    frames = gradient_frames(num_frames=10)
    audio = burst(10 / 25, at_s=0.1)
    path = write_video(tmp_path / "clip.mp4", frames, 25.0, audio)
    from_path = read_audio(path)
    assert from_path.dtype == np.float32 and len(audio) <= len(from_path) <= len(audio) + AAC_FRAME
    np.testing.assert_array_equal(read_audio(path.read_bytes()), from_path)
    samples, start = read_audio(path, with_start=True)
    np.testing.assert_array_equal(samples, from_path)
    assert start == pytest.approx(0.0, abs=0.1)
    assert len(read_audio(path, 8000)) == pytest.approx(len(from_path) / 2, abs=AAC_FRAME)

    silent = write_video(tmp_path / "silent.mp4", frames, 25.0)
    with pytest.raises(MediaError, match="no audio stream") as info:
        read_audio(silent)
    assert info.value.reason == "no_audio" and isinstance(info.value, ValueError)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(MediaError, match="cannot be decoded") as info:
        read_audio(tmp_path / "junk.wav")
    assert info.value.reason == "unreadable"


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_phone_video_with_a_display_rotation_comes_out_as_players_show_it(tmp_path, rotation):
    """A video stored landscape with a display rotation (how phones record portrait) decodes as
    FFmpeg's own command-line tool shows it (it applies the rotation by default): the reference
    here. Both the data tools' resampling decoder and read_video turn it."""
    import subprocess

    import imageio_ffmpeg

    from ft_train.media import iter_frames, probe

    stored = gradient_frames(num_frames=5, height=48, width=64)
    stored[:, :12, :8] = (255, 255, 255)  # a white corner: which way the frame is turned
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "1"}
        stream.set_display_rotation(rotation)
        for img in stored:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    size = (48, 64) if rotation == 180 else (64, 48)  # (height, width) as shown
    reference = np.frombuffer(raw, np.uint8).reshape(-1, *size, 3)
    assert len(reference) == 5 and not np.array_equal(reference[0], stored[0][: size[0], : size[1]])

    frames, _, _ = read_video(path)
    assert frames.shape == reference.shape
    assert np.abs(frames.astype(int) - reference.astype(int)).mean() < 2  # two YUV→RGB conversions
    resampled = np.stack(list(iter_frames(probe(path), fps=25, max_side=64)))
    assert resampled.shape == reference.shape
    assert np.abs(resampled.astype(int) - reference.astype(int)).mean() < 2


def _psnr(a, b):
    return 10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2))


def test_clip_encoding_converts_to_yuv_as_well_as_swscale():
    """encode_mp4 converts RGB to yuv420p with OpenCV (5x faster than swscale's rgb24 path): the
    decoded clip is as close to its frames as with swscale's conversion, within 0.7 dB."""
    import io
    from pathlib import Path

    from ft_train import media

    info = media.probe(Path(__file__).parent / "assets" / "sample_talking.mp4")
    frames = np.stack([f for _, f in zip(range(17), media.iter_frames(info, 25.0, 512))])
    buf = io.BytesIO()  # the reference: x264 fed rgb24, converted by swscale
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    swscale = media.decode_mp4(buf.getvalue())
    ours = media.decode_mp4(media.encode_mp4(frames, 25.0))
    assert ours.shape == frames.shape
    assert _psnr(ours, frames) > _psnr(swscale, frames) - 0.7 > 38
