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
reject-reason name, which ``ft-prep`` counts instead of crashing. Every decoder here skips a
packet the codec refuses and a frame it flags corrupt, as FFmpeg's command-line tool does, and
counts them (:class:`Damage`): one bad packet in a long file costs that packet (silence, or the
previous frame repeated), and only a file past ``max_damaged_frac`` is refused (``damaged``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.video.reformatter
import cv2
import numpy as np
import soundfile as sf

AUDIO_RATE = 16_000  # Hz; wav2vec2's rate, so the conditioning audio can be written unchanged
#: Share of a stream's packets that may be undecodable before the file is refused (``damaged``).
MAX_DAMAGED_FRAC = 0.05


class MediaError(ValueError):
    """A file that cannot be used. ``reason`` is a reject-reason name (``ft-prep``'s ``REJECT_REASONS``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Damage:
    """What a tolerant decode of one stream skipped.

    ``packets``: packets with data read; ``damaged``: packets the codec refused plus frames it
    flagged corrupt (each skipped); ``error``: the first decoder message; ``demux_error``: why
    reading the container stopped early (a cut-off file), None if it reached the end.
    """

    packets: int = 0
    damaged: int = 0
    error: str | None = None
    demux_error: str | None = None
    first_pts_s: float | None = None  # time of the first packet read, decodable or not
    tail: int = 0  # damaged packets since the last good one (a cut-off file's last, partial packet)

    def forgive_tail(self) -> None:
        """Stop counting the damaged packets at the very end: in a file known to be truncated the
        last packet is cut in the middle, which is the truncation (reported), not damage."""
        self.damaged -= self.tail
        self.packets -= self.tail
        self.tail = 0

    @property
    def frac(self) -> float:
        return self.damaged / self.packets if self.packets else 0.0

    def check(self, where: str, stream: str, max_damaged_frac: float) -> None:
        """Raise :class:`MediaError` ``damaged`` when more than ``max_damaged_frac`` was skipped."""
        if self.damaged and (not self.packets or self.frac > max_damaged_frac):
            raise MediaError(
                "damaged",
                f"{where}: {self.damaged} of {self.packets} {stream} packets cannot be decoded "
                f"({self.frac:.1%} > max_damaged_frac={max_damaged_frac}; first error: {self.error}); re-encode it",
            )

    def as_dict(self) -> dict:
        return {"packets": self.packets, "damaged": self.damaged, "error": self.error}


def decode_tolerant(container, stream, damage: Damage) -> Iterator:
    """Decoded frames of ``stream``, skipping (and counting in ``damage``) packets the codec
    refuses and frames it flags corrupt; a demux error ends the stream (``damage.demux_error``)."""
    try:
        for packet in container.demux(stream):
            if packet.size:
                damage.packets += 1
                if damage.first_pts_s is None and packet.pts is not None:
                    damage.first_pts_s = float(packet.pts * packet.time_base)
            try:
                frames = stream.decode(packet)  # an empty packet flushes the decoder
            except av.FFmpegError as e:
                damage.damaged += 1
                damage.tail += 1
                damage.error = damage.error or str(e)
                continue
            if packet.size:
                damage.tail = 0
            for frame in frames:
                if frame.is_corrupt:
                    damage.damaged += 1
                    damage.error = damage.error or "frame flagged corrupt by the decoder"
                    continue
                yield frame
    except av.FFmpegError as e:
        damage.demux_error = str(e)


def _silence_like(frame: av.AudioFrame, samples: int) -> av.AudioFrame:
    """A frame of ``samples`` zeros in ``frame``'s format, layout and rate (fills a skipped packet)."""
    out = av.AudioFrame(format=frame.format.name, layout=frame.layout.name, samples=samples)
    for plane in out.planes:
        plane.update(bytes(plane.buffer_size))
    out.sample_rate = frame.sample_rate
    return out


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


def read_video(
    path: str | Path, sample_rate: int = AUDIO_RATE, max_damaged_frac: float = MAX_DAMAGED_FRAC
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Decode an mp4 (or any container FFmpeg reads).

    A frame the decoder flags corrupt is replaced by the previous one and an undecodable packet
    skipped (:func:`decode_tolerant`); more than ``max_damaged_frac`` of either stream's packets
    damaged fails with :class:`MediaError` ``damaged``.

    Returns:
        ``(frames (T, H, W, 3) uint8 RGB, fps, audio)``: the frames upright (:func:`upright`);
        ``audio`` the first audio stream as mono float32 ``(N,)`` at ``sample_rate`` Hz, or None
        when the file has none. AAC decoders drop the encoder's priming samples but keep the
        padding that fills the last 1024-sample frame, so ``N`` can exceed the written length by
        up to ~1024 samples.
    """
    frames, fps, has_audio = _read_frames(Path(path), max_damaged_frac)
    return frames, fps, (read_audio(path, sample_rate, max_damaged_frac=max_damaged_frac) if has_audio else None)


def read_frames(path: str | Path, max_damaged_frac: float = MAX_DAMAGED_FRAC) -> tuple[np.ndarray, float]:
    """The video stream only, as :func:`read_video` decodes it: ``(T, H, W, 3)`` uint8 RGB upright
    frames and the fps. A damaged audio track cannot keep the frames from being read."""
    frames, fps, _ = _read_frames(Path(path), max_damaged_frac)
    return frames, fps


def _read_frames(path: Path, max_damaged_frac: float) -> tuple[np.ndarray, float, bool]:
    damage = Damage()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            vs = container.streams.video[0]
            fps = float(vs.average_rate or vs.guessed_rate or 0.0)
            frames = []
            for f in decode_tolerant(container, vs, damage):
                frames.append(upright(f.to_ndarray(format="rgb24"), f.rotation))
            # A corrupt frame was skipped: repeat its predecessor so the clip keeps its timing.
            expected = vs.frames or 0
            has_audio = bool(container.streams.audio)
    except av.FFmpegError as e:
        raise ValueError(f"{path}: cannot be decoded ({e})") from e
    if not frames:
        raise ValueError(f"{path}: video stream holds no frames")
    damage.check(str(path), "video", max_damaged_frac)
    while expected and damage.damaged and len(frames) < expected:
        frames.append(frames[-1])
    return np.stack(frames), fps, has_audio


def read_audio(
    source: str | Path | bytes,
    sample_rate: int = AUDIO_RATE,
    *,
    with_start: bool = False,
    max_damaged_frac: float = MAX_DAMAGED_FRAC,
    damage: Damage | None = None,
    truncated: bool = False,
) -> np.ndarray | tuple[np.ndarray, float]:
    """Decode the first audio stream of a file (its path, or its bytes) as mono float32 at ``sample_rate`` Hz.

    A packet the decoder refuses is skipped and its time filled with silence (from the next
    packet's timestamp), so later samples stay where the container clock puts them.

    Args:
        damage: if given, filled with what was skipped (``ft-prep`` reports it).
        truncated: the file is known to be cut short: a damaged last packet is not counted.
    Returns:
        the samples ``(N,)`` float32 in [-1, 1] (empty when the stream holds none); with
        ``with_start``, ``(samples, start_s)`` where ``start_s`` is the presentation time of the
        first sample (the first packet's, decodable or not), in the same clock as
        :attr:`VideoInfo.start_s`.

    Raises:
        MediaError: ``no_audio`` if there is no audio stream, ``unreadable`` if it cannot be
        opened, ``damaged`` if more than ``max_damaged_frac`` of its packets cannot be decoded.
    """
    where = "audio bytes" if isinstance(source, bytes) else str(source)
    damage = Damage() if damage is None else damage
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.audio:
                raise MediaError("no_audio", f"{where}: has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks: list[np.ndarray] = []
            next_s = start = None  # where the next frame should start; the first sample (source clock, s)
            seen_damage = 0
            for frame in decode_tolerant(container, stream, damage):
                t = float(frame.pts * frame.time_base) if frame.pts is not None else next_s
                if start is None:
                    # Packets refused before the first frame: the audio still starts at the first packet.
                    start = damage.first_pts_s if damage.damaged and damage.first_pts_s is not None else t
                    next_s = start
                if damage.damaged > seen_damage and t is not None and next_s is not None:
                    # Packets skipped since the last frame: their time stays, as silence.
                    gap = int(round((t - next_s) * frame.sample_rate))
                    if gap > 0:
                        for out in resampler.resample(_silence_like(frame, gap)):
                            chunks.append(out.to_ndarray().reshape(-1))
                seen_damage = damage.damaged
                if t is not None:
                    next_s = t + frame.samples / frame.sample_rate
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as e:
        raise MediaError("unreadable", f"{where}: audio cannot be decoded ({e}); re-encode it") from e
    if truncated:
        damage.forgive_tail()
    if damage.packets and damage.damaged == damage.packets:
        raise MediaError("unreadable", f"{where}: audio cannot be decoded ({damage.error}); re-encode it")
    damage.check(where, "audio", max_damaged_frac)
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
    duration_s: float  # from the demuxed packets: what is really in the file (whole packets only)
    declared_duration_s: float  # what the container header claims
    start_s: float  # presentation time of the first video packet
    has_audio: bool
    packets: int = 0  # video packets present
    declared_frames: int = 0  # frame count the header claims (0: the container does not say)
    truncated: str | None = None  # why the file looks cut short, or None when it is whole

    def truncation(self) -> dict:
        """The report line of a truncated file."""
        return {"packets": self.packets, "declared_frames": self.declared_frames,
                "present_s": round(self.duration_s, 3), "declared_s": round(self.declared_duration_s, 3),
                "detail": self.truncated}


def probe(path: Path, truncation_tolerance_s: float = 0.5) -> VideoInfo:
    """Open ``path`` and demux (not decode) its video packets to check the file is whole.

    A cheap full pass over packets finds files cut short (a download that stopped, a copy that
    failed) before any frame is decoded. Two checks, since containers lie differently when cut:
    the packets present against the header's frame count (AVI's header keeps the full count
    while its duration follows the index that is left), and the packets' end time against the
    header's duration (MP4, MKV). A truncated file gets ``truncated`` set (what the caller does
    with it is its choice) and ``duration_s`` ends before its last packet, which may be partial.

    Raises:
        MediaError: ``unreadable`` (FFmpeg cannot open it), ``no_video`` (no video stream) or
            ``truncated`` (not one video packet is present).
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
        first = last_end = prev_end = None
        packets = 0
        demux_error = None
        try:
            for pkt in container.demux(vs):
                if pkt.pts is None or not pkt.size:
                    continue  # the flush packet
                packets += 1
                t = float(pkt.pts * tb)
                first = t if first is None else min(first, t)
                end = t + float((pkt.duration or 0) * tb)
                prev_end = last_end
                last_end = end if last_end is None else max(last_end, end)
        except av.FFmpegError as e:
            demux_error = str(e)
        if first is None:
            raise MediaError("truncated", f"{path}: video stream holds no frames; re-download it")
        duration = last_end - first
        if vs.duration is not None:
            declared = float(vs.duration * tb)
        elif container.duration is not None:
            declared = container.duration / 1e6
        else:
            declared = duration
        rate = vs.average_rate or vs.guessed_rate or Fraction(25)
        declared_frames = int(vs.frames or 0)
        tolerance_frames = truncation_tolerance_s * float(rate)
        truncated = None
        if demux_error is not None:
            truncated = f"reading stopped after {packets} packets ({demux_error})"
        elif declared_frames and packets < declared_frames - tolerance_frames:
            truncated = f"{packets} of the {declared_frames} frames its header declares are present"
        elif duration < declared - truncation_tolerance_s:
            truncated = f"frames end at {duration:.2f}s but the header says {declared:.2f}s"
        if truncated is not None and prev_end is not None:
            duration = prev_end - first  # the last packet may be cut in the middle
        return VideoInfo(
            path=Path(path),
            width=vs.codec_context.width,
            height=vs.codec_context.height,
            fps=float(rate),
            duration_s=duration,
            declared_duration_s=max(declared, declared_frames / float(rate)),
            start_s=first,
            has_audio=bool(container.streams.audio),
            packets=packets,
            declared_frames=declared_frames,
            truncated=truncated,
        )


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most ``max_side``, both even (yuv420p)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def iter_frames(
    info: VideoInfo, fps: float, max_side: int, threads: int = 1, damage: Damage | None = None
) -> Iterator[np.ndarray]:
    """Decode ``info.path`` resampled to ``fps``: yields (H, W, 3) uint8 RGB frames in order.

    Output frame k shows the source frame nearest to time k / fps (seconds after the first
    frame), so speeding up duplicates frames and slowing down drops them, without drift.
    Frames are resized (area filter) by :func:`output_size` in the same swscale pass that
    converts them to RGB, and only frames that are yielded are converted; a display rotation
    (phone video) is applied after, so frames come out as players show them. Frames end at
    ``info.duration_s`` (a truncated file's whole packets). Corrupt packets and frames are
    skipped (the previous frame stands in) and counted in ``damage``; the caller checks it.
    """
    damage = Damage() if damage is None else damage
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
            for frame in decode_tolerant(container, vs, damage):
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base) - info.start_s
                if t > info.duration_s + 1e-6:
                    break  # past the whole packets of a truncated file
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


def encode_mp4(frames: np.ndarray | list[np.ndarray], fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """(F, H, W, 3) uint8 RGB (an array or a list of frames) → H.264 (yuv420p) mp4 bytes, video
    only, constant ``fps``.

    Sizes must be even (yuv420p). OpenCV converts RGB to yuv420p (BT.601, limited range, as
    FFmpeg's default) ~5x faster than swscale's rgb24 path; its chroma rounds a little
    differently: another bitstream, PSNR against the frames within 0.6 dB (bench/prep_throughput.md)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for f in frames:
            yuv = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2YUV_I420)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")))
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
    "read_frames",
    "read_video",
    "upright",
    "write_video",
]
