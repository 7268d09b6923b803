"""Video and audio I/O for the data tools: probe, resampled frame stream, 16 kHz audio, encoders.

Everything goes through PyAV (FFmpeg inside the wheel), so any container FFmpeg reads works
(mp4/mov/mkv/avi/webm). Problems with a file are raised as :class:`MediaError` carrying a reject
reason name, which the batch counts instead of crashing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.video.reformatter
import numpy as np
import soundfile as sf

from ft_train.media import upright

AUDIO_RATE = 16_000  # Hz; what wav2vec2 (the audio encoder) expects


class MediaError(Exception):
    """A file that cannot be used. ``reason`` is a reject-reason name (see ``prep.REJECT_REASONS``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class VideoInfo:
    """What :func:`probe` learns about a file (times in seconds, sizes in pixels)."""

    path: Path
    width: int
    height: int
    fps: float  # source average frame rate
    duration_s: float  # from the demuxed packets: what is really in the file
    declared_duration_s: float  # what the container header claims
    start_s: float  # presentation time of the first video packet
    has_audio: bool


def probe(path: Path, truncation_tolerance_s: float = 0.5) -> VideoInfo:
    """Open ``path`` and demux (not decode) its video packets to check the file is whole.

    A cheap full pass over packets finds files cut short (a download that stopped, a copy that
    failed) before any frame is decoded, so a truncated file is rejected as a whole rather than
    leaving clips whose last frames are garbage.

    Raises:
        MediaError: ``unreadable`` (FFmpeg cannot open or demux it), ``no_video`` (no video
            stream) or ``truncated`` (packets end more than ``truncation_tolerance_s`` before the
            duration the header declares).
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise MediaError("unreadable", f"{path}: cannot open ({e}); re-download or re-encode it") from e
    with container:
        if not container.streams.video:
            raise MediaError("no_video", f"{path}: has no video stream; remove it from the input")
        vs = container.streams.video[0]
        tb = vs.time_base
        first = last_end = None
        try:
            for pkt in container.demux(vs):
                if pkt.pts is None:
                    continue  # the flush packet
                t = float(pkt.pts * tb)
                first = t if first is None else min(first, t)
                end = t + float((pkt.duration or 0) * tb)
                last_end = end if last_end is None else max(last_end, end)
        except av.FFmpegError as e:
            raise MediaError("truncated", f"{path}: demux failed at {last_end}s ({e}); re-download it") from e
        if first is None:
            raise MediaError("truncated", f"{path}: video stream holds no frames; re-download it")
        duration = last_end - first
        if vs.duration is not None:
            declared = float(vs.duration * tb)
        elif container.duration is not None:
            declared = container.duration / 1e6
        else:
            declared = duration
        if duration < declared - truncation_tolerance_s:
            raise MediaError(
                "truncated",
                f"{path}: frames end at {duration:.2f}s but the header says {declared:.2f}s; re-download it",
            )
        rate = vs.average_rate or vs.guessed_rate or Fraction(25)
        return VideoInfo(
            path=Path(path),
            width=vs.codec_context.width,
            height=vs.codec_context.height,
            fps=float(rate),
            duration_s=duration,
            declared_duration_s=declared,
            start_s=first,
            has_audio=bool(container.streams.audio),
        )


def read_audio(path: Path) -> tuple[np.ndarray, float]:
    """Decode the first audio stream of ``path`` as 16 kHz mono float32.

    Returns:
        ``(samples (N,) float32 in [-1, 1], start_s)`` where ``start_s`` is the presentation
        time of the first sample, in the same clock as :attr:`VideoInfo.start_s`.

    Raises:
        MediaError: ``no_audio`` if there is no audio stream, ``unreadable`` if decoding fails.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError("no_audio", f"{path}: has no audio stream and no same-named .wav beside it")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            chunks: list[np.ndarray] = []
            start = None
            for frame in container.decode(stream):
                if start is None and frame.pts is not None:
                    start = float(frame.pts * frame.time_base)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as e:
        raise MediaError("unreadable", f"{path}: audio cannot be decoded ({e}); re-encode it") from e
    if not chunks:
        raise MediaError("no_audio", f"{path}: audio stream is empty; supply a same-named .wav")
    return np.concatenate(chunks).astype(np.float32), (start or 0.0)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most ``max_side``, both even (yuv420p)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def iter_frames(
    info: VideoInfo, fps: float, max_side: int, threads: int = 1
) -> Iterator[np.ndarray]:
    """Decode ``info.path`` resampled to ``fps``: yields (H, W, 3) uint8 RGB frames in order.

    Output frame k shows the source frame nearest to time k / fps (seconds after the first
    frame), so speeding up duplicates frames and slowing down drops them, without drift.
    Frames are resized (area filter) by :func:`output_size` in the same swscale pass that
    converts them to RGB, and only frames that are yielded are converted; a display rotation
    (phone video) is applied after, so frames come out as players show them.
    """
    width, height = output_size(info.width, info.height, max_side)
    step = 1.0 / fps
    k = 0
    prev_frame = prev_t = None
    prev_rgb = None
    # One reformatter for the whole video keeps its swscale context (filters, tables) instead
    # of building one per frame as VideoFrame.to_ndarray(width=...) does.
    reformatter = av.video.reformatter.VideoReformatter()

    def rgb(frame: av.VideoFrame) -> np.ndarray:
        out = reformatter.reformat(frame, width=width, height=height, format="rgb24", interpolation="AREA")
        return upright(out.to_ndarray(), frame.rotation)  # phone video: portrait stored as landscape

    try:
        with av.open(str(info.path)) as container:
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            vs.codec_context.thread_count = threads
            for frame in container.decode(vs):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base) - info.start_s
                if prev_frame is not None:
                    midpoint = (prev_t + t) / 2
                    while k * step < midpoint:
                        if prev_rgb is None:
                            prev_rgb = rgb(prev_frame)
                        yield prev_rgb
                        k += 1
                prev_frame, prev_t, prev_rgb = frame, t, None
            if prev_frame is not None:
                end = prev_t + 1.0 / max(info.fps, 1e-6)
                while k * step < min(end, info.duration_s + 1e-6):
                    if prev_rgb is None:
                        prev_rgb = rgb(prev_frame)
                    yield prev_rgb
                    k += 1
    except av.FFmpegError as e:
        raise MediaError("truncated", f"{info.path}: decoding failed after {k} frames ({e}); re-download it") from e


def audio_segment(audio: np.ndarray, audio_start_s: float, video_start_s: float, t0: float, t1: float) -> np.ndarray:
    """Samples of 16 kHz ``audio`` between video times ``t0`` and ``t1`` (seconds), zero-padded.

    Video time 0 is the first video frame; the audio clock may start earlier or later (AAC
    priming, edit lists), so the offset between the two streams is applied here.
    """
    offset = video_start_s - audio_start_s
    n = int(round((t1 - t0) * AUDIO_RATE))
    start = int(round((t0 + offset) * AUDIO_RATE))
    out = np.zeros(n, dtype=np.float32)
    lo, hi = max(start, 0), min(start + n, len(audio))
    if hi > lo:
        out[lo - start : hi - start] = audio[lo:hi]
    return out


def loudness_dbfs(audio: np.ndarray) -> float:
    """RMS level in dB relative to full scale (0 dBFS = a full-scale square wave); -inf for silence."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """(F, H, W, 3) uint8 RGB → H.264 (yuv420p) mp4 bytes, video only, constant ``fps``."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """mp4 bytes → (F, H, W, 3) uint8 RGB (reading a shard's ``mp4`` back)."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def encode_flac(audio: np.ndarray) -> bytes:
    """(N,) float32 16 kHz mono → FLAC bytes (lossless over 16-bit PCM)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), AUDIO_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    """FLAC bytes → (N,) float32 mono."""
    audio, _ = sf.read(io.BytesIO(data), dtype="float32")
    return audio
