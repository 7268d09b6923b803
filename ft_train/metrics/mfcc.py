"""MFCC exactly as SyncNet's reference scorer computes it (python_speech_features 0.6 ``mfcc`` defaults).

joonson/syncnet_python ``SyncNetInstance.evaluate`` calls ``python_speech_features.mfcc(audio,
16000)`` on the **int16** samples of a 16 kHz mono wav. Re-implemented here in numpy/scipy
(no extra dependency) with the library's defaults:

- pre-emphasis y[n] = x[n] − 0.97·x[n−1] (y[0] = x[0]);
- frames of 0.025 s = 400 samples every 0.01 s = 160 samples (100 Hz), rectangular window; count
  ``1 + ceil((N − 400) / 160)`` (1 if N ≤ 400), the last frame zero-padded;
- power spectrum |rfft(frame, 512)|² / 512;
- 26 triangular mel filters on 0–8000 Hz, filter edges at bins ``floor(513 · mel2hz(m) / 16000)``;
- log of the filter energies (0 → float eps), orthonormal DCT-II, first 13 coefficients;
- lifter 1 + 11·sin(πn/22);
- c0 replaced by the log of the frame's total power (``appendEnergy=True``).

Input scale matters: float audio in [−1, 1] would shift c0 by −2·ln 32768 ≈ −20.79, so float input
is multiplied by 32768 first.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from ..media import AUDIO_RATE as SAMPLE_RATE  # the reference's rate: 16 kHz
WIN_LENGTH = 400  # 0.025 s
HOP_LENGTH = 160  # 0.01 s
NFFT = 512
NUM_FILTERS = 26
NUM_CEPS = 13
PREEMPH = 0.97
CEP_LIFTER = 22


def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(num_filters: int = NUM_FILTERS, nfft: int = NFFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular mel filters ``(num_filters, nfft // 2 + 1)`` on 0 … sample_rate/2, python_speech_features style."""
    mels = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), num_filters + 2)
    bins = np.floor((nfft + 1) * mel_to_hz(mels) / sample_rate)
    fb = np.zeros((num_filters, nfft // 2 + 1))
    k = np.arange(nfft // 2 + 1)
    for j in range(num_filters):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        rise = (k >= lo) & (k < mid)
        fall = (k >= mid) & (k < hi)
        fb[j, rise] = (k[rise] - lo) / (mid - lo)
        fb[j, fall] = (hi - k[fall]) / (hi - mid)
    return fb


def num_mfcc_frames(num_samples: int) -> int:
    """Frames produced for ``num_samples`` audio samples: 1 + ceil((N − 400) / 160), at least 1."""
    if num_samples <= WIN_LENGTH:
        return 1
    return 1 + int(np.ceil((num_samples - WIN_LENGTH) / HOP_LENGTH))


def syncnet_mfcc(audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCC of mono 16 kHz audio → ``(num_frames, 13)`` float64, 100 frames per second.

    Args:
        audio: 1-D samples; integer arrays are taken as int16 values, float arrays as [−1, 1]
            and scaled by 32768 to the int16 range the reference sees.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"SyncNet MFCC needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; resample first")
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"SyncNet MFCC needs mono 1-D audio, got shape {x.shape}")
    x = x.astype(np.float64) * (1.0 if np.issubdtype(x.dtype, np.integer) else 32768.0)
    x = np.append(x[:1], x[1:] - PREEMPH * x[:-1])

    n_frames = num_mfcc_frames(len(x))
    padded = np.concatenate([x, np.zeros((n_frames - 1) * HOP_LENGTH + WIN_LENGTH - len(x))])
    idx = np.arange(WIN_LENGTH)[None, :] + HOP_LENGTH * np.arange(n_frames)[:, None]
    frames = padded[idx]

    power = np.abs(np.fft.rfft(frames, NFFT)) ** 2 / NFFT
    energy = power.sum(1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    feat = power @ mel_filterbank().T
    feat = np.where(feat == 0, np.finfo(float).eps, feat)

    cep = scipy.fft.dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :NUM_CEPS]
    cep *= 1.0 + (CEP_LIFTER / 2.0) * np.sin(np.pi * np.arange(NUM_CEPS) / CEP_LIFTER)
    cep[:, 0] = np.log(energy)
    return cep
