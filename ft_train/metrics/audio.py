"""The audio SyncNet sees, read as the reference scorer reads it: ffmpeg → 16 kHz mono int16.

joonson/syncnet_python extracts audio with ``ffmpeg -async 1 -ac 1 -vn -acodec pcm_s16le -ar
16000`` and feeds the int16 samples to the MFCC unchanged. Two details move the MFCC if they are
not matched (c0 is the log frame energy):

* **downmix**: ffmpeg's ``-ac 1`` averages the channels (0.5·L + 0.5·R for stereo). PyAV's
  resampler graph keeps the −3 dB pan law instead (≈0.707·(L + R)), which is √2 louder on
  correlated stereo and shifts c0 by ln 2 ≈ +0.69.
* **rounding**: float samples become int16 by ``lrintf(x·32768)`` with clipping (swresample's
  float → s16 conversion); scaling floats by 32768 without rounding leaves a sub-LSB difference.

So files are decoded by the ffmpeg binary itself (the one imageio-ffmpeg ships), with the
reference's options; waveforms we already hold as float (validation's 16 kHz mono clips) are
rounded as ffmpeg would (:func:`to_int16`). Not reproduced: ``run_pipeline.py`` first re-muxes
the video into an AVI, which re-encodes the audio as MP3 before the wav is extracted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from ..media import AUDIO_RATE

SYNC_AUDIO_RATE = AUDIO_RATE  # 16 kHz, the rate of the reference's wav


class AudioReadError(ValueError):
    """The file's audio could not be decoded (no stream, or ffmpeg failed)."""


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def to_int16(audio) -> np.ndarray:
    """Float samples in [−1, 1] → int16 as ffmpeg converts them (round half to even of x·32768, clipped).

    Integer input is returned as int16 unchanged (values outside int16 are clipped).
    """
    x = np.asarray(audio)
    if np.issubdtype(x.dtype, np.integer):
        return np.clip(x, -32768, 32767).astype(np.int16)
    return np.clip(np.rint(x.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def read_sync_audio(path: str | Path, sample_rate: int = SYNC_AUDIO_RATE, timeout_s: float = 600) -> np.ndarray:
    """The first audio stream of ``path`` as the reference reads it: int16 ``(N,)`` mono at 16 kHz.

    Runs ``ffmpeg -i path -vn -ac 1 -ar 16000 -acodec pcm_s16le`` with ``-async 1``'s start
    correction (``aresample=async=1:first_pts=0``; the option itself is gone from current
    ffmpeg) and reads the samples from a pipe.

    Raises:
        AudioReadError: the file has no audio stream, ffmpeg cannot decode it, or it reports
            decoding errors (a damaged packet: ffmpeg skips it and the rest of the track would
            come early by the lost samples). One line naming the file and ffmpeg's message.
    """
    path = Path(path)
    cmd = [
        ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path),
        "-vn", "-af", "aresample=async=1:first_pts=0", "-ac", "1", "-ar", str(int(sample_rate)),
        "-acodec", "pcm_s16le", "-f", "s16le", "-",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise AudioReadError(f"{path}: ffmpeg did not finish decoding the audio in {timeout_s:.0f} s") from None
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        last = err[-1] if err else f"exit code {proc.returncode}"
        if any("does not contain any stream" in line or "matches no streams" in line for line in err):
            raise AudioReadError(f"{path}: has no audio stream")
        raise AudioReadError(f"{path}: audio cannot be decoded by ffmpeg ({last})")
    if err:
        # ffmpeg goes on past a packet it cannot decode, so everything after it comes early by the
        # lost samples: SyncNet would score a shifted track. Refuse it instead.
        raise AudioReadError(f"{path}: the audio track is damaged ({len(err)} decoder errors; first: {err[0]})")
    samples = np.frombuffer(proc.stdout, dtype="<i2").astype(np.int16)
    if samples.size == 0:
        raise AudioReadError(f"{path}: has no audio samples" + (f" ({err[-1]})" if err else ""))
    return samples


__all__ = ["AudioReadError", "SYNC_AUDIO_RATE", "read_sync_audio", "to_int16"]
