"""SyncNet MFCC against a direct, loop-by-loop computation of python_speech_features' defaults."""

import math

import numpy as np
import pytest

from ft_train.metrics.mfcc import mel_filterbank, num_mfcc_frames, syncnet_mfcc


def _naive_mfcc(x_int16):
    """Straightforward per-frame computation: explicit DFT sums, explicit triangles, explicit DCT-II."""
    x = x_int16.astype(np.float64)
    y = np.empty_like(x)
    y[0] = x[0]
    for n in range(1, len(x)):
        y[n] = x[n] - 0.97 * x[n - 1]
    n_frames = 1 + math.ceil((len(y) - 400) / 160)
    nfft, nbins = 512, 257
    k = np.arange(nbins)[:, None]
    n = np.arange(400)[None, :]
    dft = np.exp(-2j * np.pi * k * n / nfft)  # 400 samples zero-padded to 512: only n < 400 contribute
    mel = lambda f: 2595 * math.log10(1 + f / 700)
    imel = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = [math.floor(513 * imel(mel(8000) * i / 27) / 16000) for i in range(28)]
    out = []
    for t in range(n_frames):
        frame = np.zeros(400)
        seg = y[160 * t : 160 * t + 400]
        frame[: len(seg)] = seg
        power = np.abs(dft @ frame) ** 2 / nfft
        fb = []
        for j in range(26):
            lo, mid, hi = edges[j], edges[j + 1], edges[j + 2]
            e = sum(power[i] * (i - lo) / (mid - lo) for i in range(lo, mid))
            e += sum(power[i] * (hi - i) / (hi - mid) for i in range(mid, hi))
            fb.append(math.log(e))
        ceps = []
        for q in range(13):
            scale = math.sqrt(1 / 26) if q == 0 else math.sqrt(2 / 26)
            c = scale * sum(fb[m] * math.cos(math.pi * q * (2 * m + 1) / 52) for m in range(26))
            ceps.append(c * (1 + 11 * math.sin(math.pi * q / 22)))
        ceps[0] = math.log(power.sum())
        out.append(ceps)
    return np.array(out)


def _speechlike(n, seed=0):
    g = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    sig = 3000 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + g.normal(0, 500, n)
    return np.clip(sig, -32768, 32767).astype(np.int16)


def test_matches_direct_computation():
    audio = _speechlike(3000)  # 1 + ceil(2600/160) = 18 frames, the last one zero-padded
    ours = syncnet_mfcc(audio)
    ref = _naive_mfcc(audio)
    assert ours.shape == ref.shape == (18, 13)
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n", [401, 559, 560, 561, 16000, 32000])
def test_frame_count(n):
    assert num_mfcc_frames(n) == 1 + math.ceil((n - 400) / 160)
    assert syncnet_mfcc(np.ones(n, dtype=np.int16)).shape == (num_mfcc_frames(n), 13)


def test_two_seconds_give_199_frames_and_four_per_video_frame():
    assert syncnet_mfcc(_speechlike(32000)).shape == (199, 13)


def test_float_input_is_scaled_to_int16_range():
    audio = _speechlike(8000)
    from_int = syncnet_mfcc(audio)
    # float in [−1, 1] is multiplied by 32768 → identical features
    np.testing.assert_allclose(syncnet_mfcc(audio.astype(np.float32) / 32768), from_int, rtol=1e-5, atol=1e-5)
    # scaling the signal by a moves only c0 (log energy), by 2·ln a — the reason float input must be
    # scaled: unscaled [−1, 1] audio would shift c0 by −2·ln 32768 = −20.79
    doubled = syncnet_mfcc(audio.astype(np.int64) * 2)
    np.testing.assert_allclose(doubled[:, 0] - from_int[:, 0], 2 * np.log(2), atol=1e-9)
    np.testing.assert_allclose(doubled[:, 1:], from_int[:, 1:], atol=1e-9)


def test_tone_energy_lands_in_the_right_mel_filter():
    t = np.arange(16000) / 16000
    fb = mel_filterbank()
    for freq in (300.0, 1000.0, 4000.0):
        k = round(freq * 512 / 16000)
        assert fb[:, k].max() > 0
        tone = (10000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
        spec = np.abs(np.fft.rfft(tone[:400], 512)) ** 2
        assert abs(int(np.argmax(fb @ spec)) - int(np.argmax(fb[:, k]))) <= 1


def test_rejects_wrong_rate_and_stereo():
    with pytest.raises(ValueError, match="16000 Hz"):
        syncnet_mfcc(np.zeros(1000), sample_rate=44100)
    with pytest.raises(ValueError, match="mono"):
        syncnet_mfcc(np.zeros((1000, 2)))
