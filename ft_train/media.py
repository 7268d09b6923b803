"""Sample videos on disk: H.264 mp4 with the speech muxed in as AAC, and reading them back.

Written with PyAV (FFmpeg inside the wheel, no external binary), as H.264 ``yuv420p`` + AAC in an
mp4 with the index at the front (``faststart``): the combination every browser, player and
experiment logger plays. The official inference code writes the same streams (libx264 + AAC,
../shared/research/paper.md §3.2).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 16_000  # Hz; wav2vec2's rate, so the conditioning audio can be written unchanged


class MediaWriteError(ValueError):
    """Frames or audio that cannot be written as a playable mp4."""


def write_video(
    path: str | Path,
    frames,
    fps: float,
    audio=None,
    sample_rate: int = AUDIO_RATE,
    crf: int = 18,
    preset: str = "veryfast",
    audio_bitrate: int = 128_000,
) -> Path:
    """Write ``frames`` (and ``audio``) as an H.264 + AAC mp4.

    Args:
        path: output file (``.mp4``); parent folders are created.
        frames: ``(T, H, W, 3)`` uint8 RGB (NumPy array or CPU tensor); H and W even (yuv420p).
        fps: frames per second (e.g. 23, the official FantasyTalking rate; 25 for HDTF).
        audio: mono waveform ``(N,)`` float in [-1, 1] at ``sample_rate`` Hz, or None for a silent
            video. Audio longer than the video (``T / fps`` s) is cut to it, as ``ffmpeg -shortest``
            does in the official code; shorter audio is written as is.
        sample_rate: audio rate in Hz.
        crf: x264 constant-rate factor (lower = better; 18 is visually near-lossless).
        preset: x264 speed preset.
        audio_bitrate: AAC bit rate, bits/s.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise MediaWriteError(
            f"{path}: frames must be a non-empty (T, H, W, 3) uint8 RGB array, got {frames.shape} {frames.dtype}"
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise MediaWriteError(f"{path}: H.264 yuv420p needs even sizes, got {width}×{height}; crop or pad the frames")
    if not fps > 0:
        raise MediaWriteError(f"{path}: fps must be > 0, got {fps}")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise MediaWriteError(f"{path}: audio must be a mono waveform (N,), got shape {audio.shape}")
        audio = np.clip(audio[: int(round(len(frames) / fps * sample_rate))], -1.0, 1.0)

    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        vs = out.add_stream("libx264", rate=rate)
        vs.width, vs.height = width, height
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": str(crf), "preset": preset}
        stream_a = None
        if audio is not None and len(audio):
            stream_a = out.add_stream("aac", rate=sample_rate, layout="mono")
            stream_a.bit_rate = audio_bitrate
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts, vf.time_base = i, 1 / rate
            out.mux(vs.encode(vf))
        out.mux(vs.encode())
        if stream_a is not None:
            # The encoder re-chunks into AAC's 1024-sample frames and converts to planar float.
            chunk = 1024
            for start in range(0, len(audio), chunk):
                af = av.AudioFrame.from_ndarray(audio[None, start : start + chunk], format="flt", layout="mono")
                af.sample_rate = sample_rate
                af.pts, af.time_base = start, Fraction(1, sample_rate)
                out.mux(stream_a.encode(af))
            out.mux(stream_a.encode())
    return path


def upright(rgb: np.ndarray, rotation: int | float) -> np.ndarray:
    """A decoded ``(H, W, 3)`` frame turned as players show it.

    Phones store portrait video as landscape frames plus a display-matrix rotation
    (``av.VideoFrame.rotation``, degrees counter-clockwise); FFmpeg's library API returns the
    frames as stored, so a face would be sideways. Multiples of 90° only (others do not occur).
    """
    turns = int(round(float(rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def read_video(path: str | Path, sample_rate: int = AUDIO_RATE) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Decode an mp4 (or any container FFmpeg reads).

    Returns:
        ``(frames (T, H, W, 3) uint8 RGB, fps, audio)``: the frames upright (:func:`upright`);
        ``audio`` the first audio stream as mono float32 ``(N,)`` at ``sample_rate`` Hz, or None
        when the file has none. AAC decoders drop the encoder's priming samples but keep the
        padding that fills the last 1024-sample frame, so ``N`` can exceed the written length by
        up to ~1024 samples.
    """
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            vs = container.streams.video[0]
            fps = float(vs.average_rate or vs.guessed_rate or 0.0)
            frames = [upright(f.to_ndarray(format="rgb24"), f.rotation) for f in container.decode(vs)]
        audio = None
        with av.open(str(path)) as container:
            if container.streams.audio:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                chunks = []
                for frame in container.decode(container.streams.audio[0]):
                    chunks.extend(o.to_ndarray().reshape(-1) for o in resampler.resample(frame))
                chunks.extend(o.to_ndarray().reshape(-1) for o in resampler.resample(None))
                audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    except av.FFmpegError as e:
        raise ValueError(f"{path}: cannot be decoded ({e})") from e
    if not frames:
        raise ValueError(f"{path}: video stream holds no frames")
    return np.stack(frames), fps, audio


__all__ = ["AUDIO_RATE", "MediaWriteError", "read_video", "upright", "write_video"]
