"""Video and audio I/O, for every part of the project: the one place that decodes and encodes media.

Everything goes through PyAV (FFmpeg inside the wheel, no external binary), so any container
FFmpeg reads works (mp4/mov/mkv/avi/webm), and every reader agrees on frames, rotation and the
16 kHz mono audio (:data:`AUDIO_RATE`) that wav2vec2 expects:

* sample videos: :func:`write_video` writes H.264 ``yuv420p`` + AAC in an mp4 with the index at
  the front (``faststart``), the combination every browser, player and experiment logger plays
  (the official inference code writes the same streams); :func:`read_video` reads one back;
* audio: :func:`read_audio`, from a file or its bytes;
* ``ft-prep``'s decoding: :func:`probe` (is the file whole?), :func:`iter_frames` (frames
  resampled to a target fps), :func:`audio_segment`, and the shard members' codecs
  (:func:`encode_mp4` / :func:`decode_mp4`, :func:`encode_flac` / :func:`decode_flac`), which
  raw-mode training decodes with too.

Problems with an input file are raised as :class:`MediaError` (a ``ValueError``) carrying a
reject-reason name, which ``ft-prep`` counts instead of crashing.
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

AUDIO_RATE = 16_000  # Hz; wav2vec2's rate, so the conditioning audio can be written unchanged


class MediaError(ValueError):
    """A file that cannot be used. ``reason`` is a reject-reason name (``ft-prep``'s ``REJECT_REASONS``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
            has_audio = bool(container.streams.audio)
    except av.FFmpegError as e:
        raise ValueError(f"{path}: cannot be decoded ({e})") from e
    if not frames:
        raise ValueError(f"{path}: video stream holds no frames")
    return np.stack(frames), fps, (read_audio(path, sample_rate) if has_audio else None)


def read_audio(
    source: str | Path | bytes, sample_rate: int = AUDIO_RATE, *, with_start: bool = False
) -> np.ndarray | tuple[np.ndarray, float]:
    """Decode the first audio stream of a file (its path, or its bytes) as mono float32 at ``sample_rate`` Hz.

    Returns:
        the samples ``(N,)`` float32 in [-1, 1] (empty when the stream holds none); with
        ``with_start``, ``(samples, start_s)`` where ``start_s`` is the presentation time of the
        first sample, in the same clock as :attr:`VideoInfo.start_s`.

    Raises:
        MediaError: ``no_audio`` if there is no audio stream, ``unreadable`` if decoding fails.
    """
    where = "audio bytes" if isinstance(source, bytes) else str(source)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.audio:
                raise MediaError("no_audio", f"{where}: has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
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
        raise MediaError("unreadable", f"{where}: audio cannot be decoded ({e}); re-encode it") from e
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return (samples, start or 0.0) if with_start else samples


# ----------------------------------------------------------------------------------------------
# ft-prep's decoding and the raw shard members' codecs


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


__all__ = [
    "AUDIO_RATE",
    "MediaError",
    "MediaWriteError",
    "VideoInfo",
    "audio_segment",
    "decode_flac",
    "decode_mp4",
    "encode_flac",
    "encode_mp4",
    "iter_frames",
    "loudness_dbfs",
    "output_size",
    "probe",
    "read_audio",
    "read_video",
    "upright",
    "write_video",
]
