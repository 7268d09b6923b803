"""Sync's audio as syncnet_python reads it: ffmpeg's channel average and int16 rounding, checked on
stereo files whose channels we wrote ourselves (and against the ffmpeg binary for the rounding)."""

import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from ft_train.media import read_audio
from ft_train.metrics.audio import AudioReadError, ffmpeg_exe, read_sync_audio, to_int16
from ft_train.metrics.mfcc import syncnet_mfcc
from ft_train.metrics.sync import syncnet_embeddings

from .test_metrics_sync import BrightnessEnergyEncoder


def _ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", *map(str, args)], check=True)


def test_stereo_downmix_is_the_channel_average(tmp_path):
    """Left and right with known integer content: mono = (L + R) / 2 exactly (both even, so no
    rounding), L = −R cancels, and equal channels come out at their own level, not √2 louder."""
    g = np.random.default_rng(0)
    left = g.integers(-8000, 8000, 16000) * 2
    right = g.integers(-8000, 8000, 16000) * 2
    sf.write(tmp_path / "lr.wav", np.stack([left, right], 1).astype(np.int16), 16000, subtype="PCM_16")
    got = read_sync_audio(tmp_path / "lr.wav")
    assert got.dtype == np.int16 and np.array_equal(got.astype(int), (left + right) // 2)

    sf.write(tmp_path / "anti.wav", np.stack([left, -left], 1).astype(np.int16), 16000, subtype="PCM_16")
    assert np.abs(read_sync_audio(tmp_path / "anti.wav")).max() == 0

    sf.write(tmp_path / "same.wav", np.stack([left, left], 1).astype(np.int16), 16000, subtype="PCM_16")
    assert np.array_equal(read_sync_audio(tmp_path / "same.wav").astype(int), left)
    # what the issue measured: PyAV's mono is √2 louder on the same file
    pyav = read_audio(tmp_path / "same.wav") * 32768
    assert np.abs(pyav).max() / np.abs(left).max() == pytest.approx(np.sqrt(2), rel=1e-3)


def test_stereo_48k_aac_mp4_gives_the_mfcc_of_its_known_speech(tmp_path):
    """What users have: a 48 kHz stereo AAC track in an mp4. Both channels carry the same 'speech'
    (an amplitude-modulated 300 Hz tone); its MFCC c0 after our read equals that of the known
    signal at 16 kHz (within AAC's loss), where PyAV's mono is ln 2 (√2 in amplitude) too loud."""
    t = np.arange(48000 * 2) / 48000
    speech = 0.3 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 300 * t)
    sf.write(tmp_path / "st.wav", np.stack([speech, speech], 1), 48000, subtype="FLOAT")
    _ffmpeg("-f", "lavfi", "-i", "color=gray:size=64x64:rate=25", "-i", tmp_path / "st.wav", "-t", "2",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k", "-ac", "2", "-ar", "48000",
            tmp_path / "talk.mp4")
    ours = syncnet_mfcc(read_sync_audio(tmp_path / "talk.mp4"))
    known = syncnet_mfcc(to_int16(speech[::3]))  # 300 Hz is far below 8 kHz: decimation is exact enough
    n = min(len(ours), len(known)) - 20  # skip the codec's edges
    c0_ours, c0_known = ours[10:n, 0], known[10:n, 0]
    assert np.median(c0_ours - c0_known) == pytest.approx(0.0, abs=0.05)
    pyav = syncnet_mfcc(read_audio(tmp_path / "talk.mp4"))[10:n, 0]
    assert np.median(pyav - c0_ours) == pytest.approx(np.log(2), abs=0.05)


def test_float_to_int16_rounds_as_ffmpeg_does(tmp_path):
    """Ours against the ffmpeg binary on float32 samples at and between the int16 steps."""
    steps = np.array([0.0, 0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 0.51, 32767.4, 32767.6, 40000, -32768.0, -40000])
    x = np.concatenate([steps / 32768, np.random.default_rng(1).uniform(-1, 1, 2000)]).astype(np.float32)
    sf.write(tmp_path / "f.wav", x, 16000, subtype="FLOAT")
    by_ffmpeg = read_sync_audio(tmp_path / "f.wav")
    assert np.array_equal(to_int16(x), by_ffmpeg)
    assert list(to_int16(x[:4])) == [0, 0, 2, 2]  # halves to even, like lrintf


def test_sync_sees_int16_samples():
    """A float waveform and its int16 rounding give the same SyncNet inputs (and not the unrounded one)."""
    g = np.random.default_rng(0)
    frames = torch.from_numpy(g.integers(0, 255, (12, 3, 32, 32), dtype=np.uint8))
    audio = (0.2 * g.standard_normal(12 * 640)).astype(np.float32)
    enc = BrightnessEnergyEncoder()
    a = syncnet_embeddings(enc, frames, audio)
    b = syncnet_embeddings(enc, frames, to_int16(audio))
    assert torch.equal(a[1], b[1])
    assert not np.array_equal(syncnet_mfcc(audio), syncnet_mfcc(to_int16(audio)))


def test_unreadable_audio_is_one_line_naming_the_file(tmp_path):
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-t", "1", tmp_path / "silent.mp4")
    with pytest.raises(AudioReadError, match=r"silent\.mp4: has no audio stream"):
        read_sync_audio(tmp_path / "silent.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(AudioReadError, match=r"junk\.mp4: audio cannot be decoded by ffmpeg \(.+\)"):
        read_sync_audio(tmp_path / "junk.mp4")


def damaged_audio_mp4(path):
    """A 3 s mp4 (H.264 + 48 kHz stereo AAC) with four audio packets overwritten: the video is whole."""
    import av

    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25", "-f", "lavfi", "-i",
            "sine=frequency=300:sample_rate=48000", "-t", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-ac", "2", path)
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as c:
        packets = [p for p in c.demux(c.streams.audio[0]) if p.pos is not None]
    for p in packets[40:44]:
        data[p.pos + 2 : p.pos + p.size] = b"\xff" * (p.size - 2)
    path.write_bytes(bytes(data))
    return path


def test_damaged_audio_packet_is_refused_not_shifted(tmp_path):
    path = damaged_audio_mp4(tmp_path / "damaged.mp4")
    with pytest.raises(AudioReadError, match=r"damaged\.mp4: the audio track is damaged \(\d+ decoder errors; first: "):
        read_sync_audio(path)
