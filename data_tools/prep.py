"""``ft-prep``: raw talking videos → WebDataset shards with lip masks, landmarks and motion.

Usage::

    ft-prep input=videos/ output=shards/ [num_workers=8] [fps=23] [num_frames=81] ...
    ft-prep input=list.txt output=shards/ task_index=3 num_tasks=16   # one SLURM array task
    ft-prep input=list.txt output=shards/ mode=merge                  # manifest/stats/report
    ft-prep task=encode input=shards/ output=latents/ encoders.wan=... encoders.wav2vec=...
                                      # latent-cache pass: data_tools/encode.py, conf/encode.yaml

Options are the keys of ``conf/prep.yaml`` (Hydra override syntax). Output folder:

    shard-000000.tar ...   WebDataset shards (sample layout: ``ft_train/data/raw_format.py``)
    parts/shard-*.json     one record per finished shard: its sources, samples, rejects, timing
    manifest.json          per shard: samples, bytes, sha256
    stats.json             ω_l / ω_b quantiles, to normalise both to [0, 1] (:func:`ft_train.data.raw_format.normalise_motion`)
    report.json/.txt       counts per reject reason, timing; every rejected file/clip with why
    previews/*.jpg         kept clips with lip mask, lip landmarks and face box drawn (previews_per_shard),
                           and reject-<reason>-<key>.jpg: one per reject reason and shard, showing why

Shard i holds the clips of input videos [i·videos_per_shard, (i+1)·videos_per_shard) of the
sorted input list, so every process and every re-run agrees on what each shard contains. A shard
is written to ``shard-XXXXXX.tar.tmp`` and renamed when complete, then its ``parts/`` record is
written (also by rename): a shard is done only when its record exists and matches the tar, so a
re-run skips finished shards and redoes any that a crash cut short.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ft_train.data.shots import SCENE_DETECTORS, ShotCuts
from ft_train import media
from ft_train.cli import Tool
from ft_train.config import compose_tool_config
from ft_train.data.raw_format import encode_lip_masks, encode_npz, sample_key
from ft_train.media import AUDIO_RATE, MediaError


#: Every reason a file or clip is rejected; the report counts each.
REJECT_REASONS = {
    "unreadable": "file missing, a dangling symlink, a folder that cannot be listed, or FFmpeg cannot open it",
    "truncated": "file ends before the frames/duration its header declares (cut-off download/copy) and "
    "truncated=reject, or too little of it is left for one clip",
    "damaged": "more than max_damaged_frac of the audio packets, or of a clip's frames, cannot be decoded",
    "no_video": "no video stream",
    "no_audio": "no audio for audio_source: no audio stream and no same-named .wav beside it",
    "silent_audio": "audio quieter than silence_dbfs (whole file, or the clip's window)",
    "too_short": "fewer than num_frames frames at the target fps",
    "shot_cut": "a clip window interrupted by a shot cut (clips start again at the cut; scene_detector)",
    "no_face": "face mesh found a face in fewer than min_face_frames_frac of the clip's frames",
    "multiple_faces": "a second face at least max_second_face_area_frac of the speaker's area in more than "
    "max_multi_face_frac of frames (smaller background faces are kept)",
    "face_too_small": "median face-box width below min_face_px pixels",
    "low_confidence": "mean face-detection score below min_face_confidence",
    "out_of_sync": "SyncNet's audio-video offset beyond max_av_shift_frames or its confidence below "
    "min_sync_confidence (only with sync= weights)",
    "no_reference": "no frame of the clip can be the reference image: none has the face found, "
    "min_ref_brightness and min_ref_sharpness",
}


#: How pose finds the body on a clip's samples (``pose_samples_per_clip``): ``face`` = its
#: detector runs on the first sample and the region follows the face to the others
#: (:class:`ft_train.data.face.ClipPose`); ``frame`` = found anew on each (static-image pose).
POSE_REGIONS = ("face", "frame")

#: Where a clip's audio comes from: ``auto`` = a same-named .wav beside the video when there is
#: one (a user puts it there on purpose), else the video's own track.
AUDIO_SOURCES = ("auto", "sidecar", "embedded")


@dataclass
class PrepConfig:
    """All options of ``ft-prep``; documented in ``conf/prep.yaml``."""

    input: str
    output: str
    fps: float = 25.0
    num_frames: int = 81
    stride: int = 81
    max_side: int = 512
    videos_per_shard: int = 16
    num_workers: int = 0
    decode_threads: int = 1
    crf: int = 18
    preset: str = "veryfast"
    lip_dilation_frac: float = 0.15
    pose_every: int = 4
    pose_samples_per_clip: int = 6
    pose_region: str = "face"
    detect_every: int = 16
    min_face_frames_frac: float = 0.9
    min_face_px: int = 64
    max_multi_face_frac: float = 0.1
    max_second_face_area_frac: float = 0.25
    min_face_confidence: float = 0.8
    silence_dbfs: float = -50.0
    truncation_tolerance_s: float = 0.5
    truncated: str = "keep_whole_clips"
    max_damaged_frac: float = media.MAX_DAMAGED_FRAC
    audio_source: str = "auto"
    min_ref_brightness: float = 40.0
    min_ref_sharpness: float = 30.0
    sync: str | None = None
    max_av_shift_frames: int = 3
    min_sync_confidence: float = 3.0
    scene_detector: str = "ffmpeg_scene"
    scene_threshold: float = 0.3
    scene_downscale: int = 4
    stats_quantiles: tuple[float, float] = (0.05, 0.95)
    previews_per_shard: int = 1
    extensions: tuple[str, ...] = ("mp4", "mov", "mkv", "avi", "webm")
    task_index: int = 0
    num_tasks: int = 1
    mode: str = "run"
    progress: bool = True

    def __post_init__(self) -> None:
        self.stats_quantiles = tuple(self.stats_quantiles)
        self.extensions = tuple(e.lower().lstrip(".") for e in self.extensions)
        problems = []
        if self.num_frames < 1 or self.num_frames % 4 != 1:
            problems.append(f"num_frames={self.num_frames} must be 4k+1 (the VAE's time stride is 4); e.g. 81")
        if self.stride < 1:
            problems.append(f"stride={self.stride} must be ≥ 1")
        if self.fps <= 0:
            problems.append(f"fps={self.fps} must be > 0")
        if self.max_side < 16:
            problems.append(f"max_side={self.max_side} must be ≥ 16")
        if self.detect_every < 1:
            problems.append(f"detect_every={self.detect_every} must be ≥ 1 (1 = the face detector on every frame)")
        if self.pose_every < 0:
            problems.append(f"pose_every={self.pose_every} must be ≥ 0 (0 = no pose unless pose_samples_per_clip is set; ω_b is then missing)")
        if not 0 <= self.pose_samples_per_clip <= self.num_frames:
            problems.append(f"pose_samples_per_clip={self.pose_samples_per_clip} must be in [0, num_frames="
                            f"{self.num_frames}] (0 = pose on every pose_every-th frame instead)")
        elif self.pose_samples_per_clip == 1:
            problems.append("pose_samples_per_clip=1: ω_b is a variance over time and needs ≥ 2 samples")
        if self.pose_region not in POSE_REGIONS:
            problems.append(f"pose_region={self.pose_region!r} must be one of {', '.join(POSE_REGIONS)}")
        if self.videos_per_shard < 1:
            problems.append("videos_per_shard must be ≥ 1")
        if not 0 <= self.task_index < self.num_tasks:
            problems.append(f"task_index={self.task_index} must be in [0, num_tasks={self.num_tasks})")
        if self.truncated not in ("keep_whole_clips", "reject"):
            problems.append(f"truncated={self.truncated!r} must be 'keep_whole_clips' or 'reject'")
        if self.sync and not Path(self.sync).is_file():
            problems.append(f"sync={self.sync}: no such file; give the path of syncnet_v2.model or leave it null")
        if self.max_av_shift_frames < 0:
            problems.append(f"max_av_shift_frames={self.max_av_shift_frames} must be ≥ 0")
        if self.scene_downscale < 1:
            problems.append(f"scene_downscale={self.scene_downscale} must be ≥ 1 (1 = score every pixel)")
        if self.scene_detector not in SCENE_DETECTORS:
            problems.append(f"scene_detector={self.scene_detector!r} must be one of {', '.join(SCENE_DETECTORS)}")
        if self.audio_source not in AUDIO_SOURCES:
            problems.append(f"audio_source={self.audio_source!r} must be one of {', '.join(AUDIO_SOURCES)}")
        if not 0 <= self.max_damaged_frac <= 1:
            problems.append(f"max_damaged_frac={self.max_damaged_frac} must be in [0, 1]")
        if self.mode not in ("run", "merge"):
            problems.append(f"mode={self.mode!r} must be 'run' or 'merge'")
        lo, hi = self.stats_quantiles
        if not 0 <= lo < hi <= 1:
            problems.append(f"stats_quantiles={self.stats_quantiles} must be two increasing values in [0, 1]")
        if problems:
            raise ValueError("conf/prep.yaml: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# inputs


def list_inputs(cfg: PrepConfig) -> list[Path]:
    """Input videos, sorted: every file with a video extension under a folder (recursively), or
    the lines of a list file (blank lines and ``#`` comments skipped; relative paths are taken
    from the list file's folder). Listed files that do not exist, dangling symlinks and
    sub-folders that cannot be listed are kept: they are rejected as ``unreadable`` and
    reported with their path, not silently dropped."""
    src = Path(cfg.input)
    if src.is_dir():
        files: list[Path] = []

        def unlistable(err: OSError) -> None:
            files.append(Path(err.filename))

        for folder, _, names in os.walk(src, onerror=unlistable):
            for name in names:
                if name.rsplit(".", 1)[-1].lower() in cfg.extensions and "." in name:
                    files.append(Path(folder) / name)  # a dangling symlink too: reported, not lost
        return sorted(files)
    if src.is_file():
        if src.suffix.lower().lstrip(".") in cfg.extensions:
            return [src]
        lines = [ln.strip() for ln in src.read_text().splitlines()]
        paths = [Path(ln) for ln in lines if ln and not ln.startswith("#")]
        return sorted(p if p.is_absolute() else src.parent / p for p in paths)
    raise SystemExit(f"input={cfg.input}: no such folder or list file; pass a folder of videos or a text file of paths")


def check_readable(source: Path) -> None:
    """Raise ``unreadable`` naming what is wrong with a path that cannot be opened."""
    if source.is_symlink() and not source.exists():
        raise MediaError("unreadable", f"{source}: dangling symlink to {os.readlink(source)}; fix or remove the link")
    if source.is_dir():
        raise MediaError("unreadable", f"{source}: folder cannot be listed (permission denied?); fix its permissions")
    if not source.is_file():
        raise MediaError("unreadable", f"{source}: file not found; fix the input list")
    if not os.access(source, os.R_OK):
        raise MediaError("unreadable", f"{source}: permission denied; make it readable")


def shard_sources(inputs: list[Path], cfg: PrepConfig) -> list[list[Path]]:
    n = cfg.videos_per_shard
    return [inputs[i : i + n] for i in range(0, len(inputs), n)]


# --------------------------------------------------------------------------------------------
# one video → clips


@dataclass
class Reject:
    source: str
    reason: str
    detail: str
    clip: int | None = None  # None: the whole file
    # What a preview of this reject draws: {"frames", optional "face", "box", "second_box", "labels"}.
    preview: dict | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        return {"source": self.source, "reason": self.reason, "detail": self.detail, "clip": self.clip}


@dataclass
class FileNote:
    """Facts about one input file that the report lists even when its clips were kept."""

    source: str
    audio_source: str | None = None  # "embedded" | "sidecar"
    damaged: dict = field(default_factory=dict)  # stream -> {packets, damaged, error}, when any was skipped
    truncated: dict | None = None  # :meth:`ft_train.media.VideoInfo.truncation`
    shot_cuts: list[int] = field(default_factory=list)  # frames (at cfg.fps) where a new shot starts


@dataclass
class ShardRecord:
    """What ``parts/shard-XXXXXX.json`` holds: enough to skip, merge and report."""

    shard: str
    sources: list[str]
    tar: str | None  # None when every clip of these sources was rejected
    samples: int = 0
    frames: int = 0
    bytes: int = 0
    sha256: str | None = None
    rejects: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # FileNote of files with anything to report
    audio_sources: dict[str, int] = field(default_factory=dict)  # samples per audio source
    sync: list[list[float]] = field(default_factory=list)  # (offset, confidence) of kept clips (sync=)
    omega_l: list[float | None] = field(default_factory=list)
    omega_b: list[float | None] = field(default_factory=list)
    pose_schedules: dict[str, int] = field(default_factory=dict)  # samples per pose_schedule()
    timing_s: dict[str, float] = field(default_factory=dict)


def _clip_starts_frame(k: int, cfg: PrepConfig) -> bool:
    """True if frame k (counted from the start of its shot) is the last frame of a clip (clips
    start at multiples of stride from the shot's first frame)."""
    first = k - (cfg.num_frames - 1)
    return first >= 0 and first % cfg.stride == 0


def pose_schedule(cfg: PrepConfig) -> str:
    """How pose ran on a clip, as the sample json and stats.json record it: ``samples:N`` (N
    static-image runs spread over the clip), ``every:N`` (tracking, every N-th frame) or ``none``.
    Raw ω_b depends on it (bench/prep_throughput.md): shards made with two must not share stats."""
    if cfg.pose_samples_per_clip > 0:
        # "samples:N" alone: each sample found anew (pose_region=frame, the first version).
        return f"samples:{cfg.pose_samples_per_clip}" + (",region:face" if cfg.pose_region == "face" else "")
    return f"every:{cfg.pose_every}" if cfg.pose_every > 0 else "none"


def pose_frames(n: int, start: int, cfg: PrepConfig) -> list[int]:
    """Indices in a kept clip of ``n`` frames starting at video frame ``start`` that pose runs on."""
    if cfg.pose_samples_per_clip > 0:
        return sorted(set(np.round(np.linspace(0, n - 1, min(cfg.pose_samples_per_clip, n))).astype(int).tolist()))
    if cfg.pose_every > 0:
        return list(range(-start % cfg.pose_every, n, cfg.pose_every))
    return []


def _frame_used(k: int, cfg: PrepConfig) -> bool:
    """False for frames between clips (stride > num_frames): they are decoded but not analysed."""
    return cfg.stride <= cfg.num_frames or (k % cfg.stride) < cfg.num_frames


def expected_frames(info: media.VideoInfo, cfg: PrepConfig) -> int:
    """How many frames decoding ``info`` at ``cfg.fps`` should give (its whole packets' duration)."""
    return int(info.duration_s * cfg.fps + 1e-6)


def _frame_needed(j: int, origin: int, last: int, cfg: PrepConfig) -> bool:
    """Whether frame ``j`` of the shot that starts at video frame ``origin`` lies in a clip that
    ends by video frame ``last``: the earliest clip holding it starts at the first multiple of
    ``stride`` ≥ j - num_frames + 1."""
    first = -(-max(0, j - cfg.num_frames + 1) // cfg.stride) * cfg.stride
    return first <= j and origin + first + cfg.num_frames - 1 <= last


def load_audio(source: Path, info: media.VideoInfo, cfg: PrepConfig, note: FileNote) -> tuple[np.ndarray, float]:
    """The clip audio of ``source`` as ``cfg.audio_source`` says (:data:`AUDIO_SOURCES`).

    Alignment: embedded audio is placed by the container clock (its first sample's timestamp
    against the first video frame's); a sidecar ``.wav`` has no clock shared with the video, so
    its first sample is taken to be at the first video frame. Returns (16 kHz mono samples, start
    time in the video's clock); ``note`` gets the source used and any skipped packets.
    """
    wav = source.with_suffix(".wav")
    use_wav = cfg.audio_source == "sidecar" or (cfg.audio_source == "auto" and wav.is_file())
    damage = media.Damage()
    if use_wav:
        if not wav.is_file():
            raise MediaError("no_audio", f"{source}: audio_source=sidecar but there is no {wav.name} beside it; add one")
        file, audio, start = wav, media.read_audio(wav, max_damaged_frac=cfg.max_damaged_frac, damage=damage), info.start_s
    elif info.has_audio:
        file = source
        audio, start = media.read_audio(source, with_start=True, max_damaged_frac=cfg.max_damaged_frac, damage=damage,
                                        truncated=info.truncated is not None)
    else:
        raise MediaError("no_audio", f"{source}: has no audio stream and no {wav.name} beside it; add one or drop the file")
    note.audio_source = "sidecar" if use_wav else "embedded"
    if damage.damaged:
        note.damaged["audio"] = damage.as_dict()
    if not audio.size:
        raise MediaError("no_audio", f"{file}: audio stream is empty; supply a same-named .wav")
    return audio, start


def process_video(source: Path, cfg: PrepConfig, timing: Counter):
    """Yield, for each clip of ``source``, either a ``(sample dict, preview data)`` pair or a
    :class:`Reject`; a whole-file problem yields one Reject and stops. Last comes the file's
    :class:`FileNote`."""
    note = FileNote(str(source))
    yield from _process_video(source, cfg, timing, note)
    yield note


def _process_video(source: Path, cfg: PrepConfig, timing: Counter, note: FileNote):
    from ft_train.data import face as facemod

    t = time.perf_counter()
    try:
        check_readable(source)
        info = media.probe(source, cfg.truncation_tolerance_s)
        if info.truncated is not None:
            note.truncated = info.truncation()
            if cfg.truncated == "reject":
                raise MediaError("truncated", f"{source}: {info.truncated}; re-download it (or truncated=keep_whole_clips)")
        if int(info.duration_s * cfg.fps + 1e-6) < cfg.num_frames:
            reason = "truncated" if info.truncated else "too_short"
            raise MediaError(
                reason, f"{source}: {info.duration_s:.2f}s{' left of a truncated file' if info.truncated else ''} "
                f"is under {cfg.num_frames} frames at {cfg.fps} fps"
            )
        audio, audio_start = load_audio(source, info, cfg, note)
        if media.loudness_dbfs(audio) < cfg.silence_dbfs:
            raise MediaError("silent_audio", f"{source}: audio is silent (< {cfg.silence_dbfs} dBFS)")
    except MediaError as e:
        timing["probe"] += time.perf_counter() - t
        yield Reject(str(source), e.reason, str(e))
        return
    timing["probe"] += time.perf_counter() - t

    window: deque = deque(maxlen=cfg.num_frames)
    damaged_at: deque = deque(maxlen=cfg.num_frames)  # damage count when each window frame was decoded
    video_damage = media.Damage()
    clip_index = 0
    caption_file = source.with_suffix(".txt")
    caption = caption_file.read_text().strip() if caption_file.is_file() else None
    # The analyzer adds its graphs' seconds to timing["face_mesh"/"face_detect"/"pose"].
    with facemod.FrameAnalyzer(pose_every=cfg.pose_every, detect_every=cfg.detect_every, timing=timing,
                               pose_on_call=cfg.pose_samples_per_clip > 0,
                               pose_static=cfg.pose_samples_per_clip > 0 and cfg.pose_region == "frame") as analyzer:
        frames = media.iter_frames(info, cfg.fps, cfg.max_side, cfg.decode_threads, damage=video_damage)
        k = 0
        origin = 0  # first frame of the current shot: clips are laid out from it
        cuts = ShotCuts(cfg.scene_threshold, cfg.scene_downscale) if cfg.scene_detector != "none" else None
        pose_done: dict[int, np.ndarray | None] = {}  # frame index -> joints, shared by overlapping clips
        # Frames in no clip that can end before the video does (its tail, about half a clip) are
        # held unanalysed; if the video runs on and such a clip does end, they are analysed then,
        # in order, so the results are the same as analysing each frame as it comes.
        last = expected_frames(info, cfg) - 1
        held: list = []

        def analyse(entry: list, j: int) -> None:
            entry[1] = analyzer(entry[0], detect=j % cfg.stride == 0, pose=False)

        def clip_pose(frames: list[np.ndarray], face_boxes: np.ndarray, start: int) -> np.ndarray:
            """(F, 33, 4) joints of a kept clip, NaN where pose did not run: on
            ``pose_samples_per_clip`` frames evenly spread over the clip (first and last included;
            the body found on the first, its region following the face box to the others, or
            each found anew: ``pose_region``), else on its frames k with k % pose_every == 0 (in
            time order, so the tracker follows)."""
            out = np.full((len(frames), facemod.NUM_POSE_JOINTS, 4), np.nan, dtype=np.float32)
            if cfg.pose_samples_per_clip > 0 or cfg.pose_every > 0:
                ran = pose_frames(len(frames), start, cfg)
                if cfg.pose_samples_per_clip > 0 and cfg.pose_region == "face":
                    todo = [i for i in ran if start + i not in pose_done]
                    for i, joints in zip(todo, analyzer.pose_clip([frames[i] for i in todo], face_boxes[todo])):
                        pose_done[start + i] = joints
                for i in ran:
                    if start + i not in pose_done:
                        pose_done[start + i] = analyzer.pose(frames[i])
                    if pose_done[start + i] is not None:
                        out[i] = pose_done[start + i]
                for old in [f for f in pose_done if f < start]:
                    del pose_done[old]
            return out

        try:
            while True:
                t = time.perf_counter()
                frame = next(frames, None)
                timing["decode"] += time.perf_counter() - t
                if frame is None:
                    break
                if cuts is not None:
                    t = time.perf_counter()
                    cut = cuts(frame)
                    timing["shots"] += time.perf_counter() - t
                    if cut:
                        # Windows begun in the old shot and not yet complete: each would span the cut.
                        j = k - origin
                        for s0 in range(-(-max(0, j - cfg.num_frames + 1) // cfg.stride) * cfg.stride, j, cfg.stride):
                            # The preview shows the two sides of the cut.
                            sides = {"frames": np.stack([window[-1][0], frame]),
                                     "labels": [f"frame {k - 1}: before the cut", f"frame {k}: after"]} if window else None
                            yield Reject(str(source), "shot_cut", f"{source} clip {clip_index} (frames {origin + s0}-"
                                         f"{origin + s0 + cfg.num_frames - 1}): shot cut at frame {k} "
                                         f"({k / cfg.fps:.2f}s)", clip_index, sides)
                            clip_index += 1
                        note.shot_cuts.append(k)
                        window.clear()
                        held.clear()
                        damaged_at.clear()
                        origin = k
                j = k - origin
                if _frame_used(j, cfg):
                    # Detector at each clip's first frame: a clip's face scores are its own.
                    # Pose waits until a clip has passed the filters (_make_clip): it is the slowest
                    # model and only ω_b of kept clips needs it.
                    entry = [frame, None]
                    window.append(entry)
                    if _frame_needed(j, origin, last, cfg):
                        analyse(entry, j)
                    else:
                        held.append((entry, j))
                    damaged_at.append(video_damage.damaged)
                if _clip_starts_frame(j, cfg):
                    for entry, i in held:
                        analyse(entry, i)
                    held.clear()
                    start = k - cfg.num_frames + 1
                    # Skipped frames in this clip (each shown as the frame before it).
                    lost = damaged_at[-1] - damaged_at[0]
                    if lost > cfg.max_damaged_frac * cfg.num_frames:
                        yield Reject(str(source), "damaged", f"{source} clip {clip_index}: {lost} of {cfg.num_frames} "
                                     f"frames cannot be decoded (> max_damaged_frac={cfg.max_damaged_frac})", clip_index)
                    else:
                        yield _make_clip(source, info, clip_index, start, list(window), audio, audio_start, caption,
                                         cfg, timing, note, lambda frames, boxes, s=start: clip_pose(frames, boxes, s))
                    clip_index += 1
                k += 1
        except MediaError as e:
            yield Reject(str(source), e.reason, str(e))
            return
        finally:
            if video_damage.damaged:
                note.damaged["video"] = video_damage.as_dict()
    if clip_index == 0:
        reason = "truncated" if info.truncated else "too_short"
        yield Reject(str(source), reason, f"{source}: decoded {k} frames, fewer than num_frames={cfg.num_frames}")


_SYNCNET: dict = {}  # path -> loaded SyncNet, one per process


def measure_sync(frames: list[np.ndarray], boxes: np.ndarray, audio: np.ndarray, fps: float, weights: str):
    """SyncNet's (offset in 25 fps frames, > 0: the video lags the audio; confidence) of one clip,
    on face crops cut around ``boxes`` (F, 4) as the Sync-C/Sync-D metric cuts them
    (:mod:`ft_train.metrics.sync`); None when the clip is shorter than one 5-frame window."""
    import torch

    from ft_train.metrics.sync import resample_fps, sync_scores, syncnet_face_crops
    from ft_train.metrics.syncnet import load_syncnet

    if weights not in _SYNCNET:
        _SYNCNET[weights] = load_syncnet(weights)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    crops = resample_fps(syncnet_face_crops(video, boxes), fps)
    result = sync_scores(_SYNCNET[weights], crops, audio)
    return None if result is None else (result.offset, result.confidence)


def sync_shift_s(offset_frames: int) -> float:
    """Seconds to delay the audio by for a SyncNet offset (25 fps frames; > 0: video lags audio):
    the sound the lips show at video time t was recorded at t − offset/25, so the clip's audio
    is read from [t0 − shift, t1 − shift)."""
    from ft_train.metrics.sync import SYNC_FPS

    return offset_frames / SYNC_FPS


def reference_frame(frames: list[np.ndarray], arrays: dict, cfg: PrepConfig) -> tuple[int | None, float, float]:
    """The clip's reference (image-to-video condition) frame: the first frame where the face mesh
    found the face and the face box is bright enough (mean luma ≥ ``min_ref_brightness``, 0-255)
    and sharp enough (variance of the Laplacian of its luma ≥ ``min_ref_sharpness``: ~800 for
    the sample's face at 512 px, ~12 after a 3 px Gaussian blur). Returns (index or None, its
    brightness, its sharpness) — for None, the best values seen."""
    import cv2

    best = (0.0, 0.0)
    h, w = frames[0].shape[:2]
    for i in np.flatnonzero(arrays["face_found"]):
        x0, y0, x1, y1 = arrays["face_box"][i]
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        gray = cv2.cvtColor(np.ascontiguousarray(frames[i][y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
        brightness, sharpness = float(gray.mean()), float(cv2.Laplacian(gray, cv2.CV_64F).var())
        if brightness >= cfg.min_ref_brightness and sharpness >= cfg.min_ref_sharpness:
            return int(i), brightness, sharpness
        best = max(best, (brightness, sharpness))
    return None, *best


def _make_clip(source, info, clip_index, start, window, audio, audio_start, caption, cfg, timing, note, pose_fn=None):
    """Filter one clip; return (sample, preview data) or a Reject. ``pose_fn(frames, face_boxes)``
    (boxes NaN where the face was not found) gives the (F, 33, 4) joints of a clip that passed
    the filters (else the window's own pose results). Frames stay a list of (H, W, 3) arrays."""
    from ft_train.data import face as facemod

    t = time.perf_counter()
    # The decoded frames as they are, not stacked: a 40-60 MB copy per clip (20-25 ms, and its
    # page faults when fresh) that nothing here needs; SyncNet stacks its crops itself.
    frames = [f for f, _ in window]
    arrays = facemod.stack_results([r for _, r in window])
    n, (h, w) = len(frames), frames[0].shape[:2]
    t0, t1 = start / cfg.fps, (start + n) / cfg.fps
    clip_audio = media.audio_segment(audio, audio_start, info.start_s, t0, t1)

    found = arrays["face_found"]
    widths = arrays["face_box"][:, 2] - arrays["face_box"][:, 0]
    reason = detail = None
    # Several faces first: the mesh tracks one face only, and often none when two are small.
    # A second face counts only when it competes with the speaker's in size (a dialogue two-shot);
    # a small face in the background (an interview, a street) does not.
    several = arrays["num_faces"] > 1
    competing = several & (arrays["second_face"] > cfg.max_second_face_area_frac)
    if competing.mean() > cfg.max_multi_face_frac:
        reason = "multiple_faces"
        detail = (f"rule similar_size: a second face ≥ {cfg.max_second_face_area_frac:.0%} of the speaker's area "
                  f"(median {np.median(arrays['second_face'][competing]):.0%}) in {competing.mean():.0%} of frames "
                  f"(> max_multi_face_frac={cfg.max_multi_face_frac})")
    elif found.mean() < cfg.min_face_frames_frac:
        reason, detail = "no_face", f"face in {found.mean():.0%} of frames (< {cfg.min_face_frames_frac:.0%})"
    elif np.median(widths[found]) < cfg.min_face_px:
        reason, detail = "face_too_small", f"median face width {np.median(widths[found]):.0f}px < {cfg.min_face_px}px"
    elif arrays["face_conf"][found].mean() < cfg.min_face_confidence:
        reason = "low_confidence"
        detail = f"mean detector score {arrays['face_conf'][found].mean():.2f} < {cfg.min_face_confidence}"
    elif media.loudness_dbfs(clip_audio) < cfg.silence_dbfs:
        reason, detail = "silent_audio", f"clip audio {media.loudness_dbfs(clip_audio):.0f} dBFS < {cfg.silence_dbfs}"
    else:
        ref, ref_brightness, ref_sharpness = reference_frame(frames, arrays, cfg)
        if ref is None:
            reason = "no_reference"
            detail = (f"no frame with the face found, brightness ≥ {cfg.min_ref_brightness} and sharpness ≥ "
                      f"{cfg.min_ref_sharpness} (best {ref_brightness:.0f}, {ref_sharpness:.0f})")
    if reason is not None:
        timing["filter"] += time.perf_counter() - t
        preview = {"frames": frames, "face": arrays["face"], "box": arrays["face_box"], "second_box": arrays["second_box"]}
        return Reject(str(source), reason, f"{source} clip {clip_index} ({t0:.2f}-{t1:.2f}s): {detail}", clip_index, preview)

    sync_meta = {}
    if cfg.sync:
        t_sync = time.perf_counter()
        measured = measure_sync(frames, arrays["face_box"], clip_audio, cfg.fps, cfg.sync)
        timing["sync"] += time.perf_counter() - t_sync
        if measured is not None:
            offset, confidence = measured
            sync_meta = {"av_offset_frames": offset, "sync_confidence": round(confidence, 4)}
            if abs(offset) > cfg.max_av_shift_frames or confidence < cfg.min_sync_confidence:
                timing["filter"] += time.perf_counter() - t
                return Reject(str(source), "out_of_sync", f"{source} clip {clip_index} ({t0:.2f}-{t1:.2f}s): SyncNet "
                              f"offset {offset} frames (max_av_shift_frames={cfg.max_av_shift_frames}), confidence "
                              f"{confidence:.2f} (min_sync_confidence={cfg.min_sync_confidence})", clip_index)
            if offset:
                shift = sync_shift_s(offset)
                clip_audio = media.audio_segment(audio, audio_start, info.start_s, t0 - shift, t1 - shift)
                sync_meta["audio_shift_s"] = shift

    if pose_fn is not None:
        timing["masks"] += time.perf_counter() - t  # pose adds to timing["pose"] itself
        arrays["pose"] = pose_fn(frames, np.where(found[:, None], arrays["face_box"], np.nan))
        t = time.perf_counter()
    masks = facemod.lip_masks(arrays["face"], arrays["face_box"], h, w, cfg.lip_dilation_frac)
    omega_l = facemod.landmark_motion(arrays["face"], found)
    omega_b = facemod.body_motion(arrays["pose"], w, h)
    timing["masks"] += time.perf_counter() - t

    t = time.perf_counter()
    conf = arrays["face_conf"][found]
    meta = {
        "source": str(source),
        "clip_index": clip_index,
        "start_frame": start,
        # The image-to-video reference: the first good frame (reference_frame()), not frame 0 blindly.
        "reference_frame": ref,
        "reference_brightness": round(ref_brightness, 2),
        "reference_sharpness": round(ref_sharpness, 2),
        "start_s": t0,
        "end_s": t1,
        "fps": cfg.fps,
        "num_frames": n,
        "width": w,
        "height": h,
        "source_fps": info.fps,
        "source_size": [info.width, info.height],
        "audio_rate": AUDIO_RATE,
        "audio_samples": int(clip_audio.shape[0]),
        "audio_source": note.audio_source,  # embedded (container clock) | sidecar (.wav from the first frame)
        "face_box": [float(v) for v in np.median(arrays["face_box"][found], axis=0)],  # x0 y0 x1 y1 px
        "face_confidence": float(conf.mean()),
        "face_frames_frac": float(found.mean()),
        # Frames with a smaller face in the background (kept: below max_second_face_area_frac).
        "background_face_frames_frac": float((several & ~competing).mean()),
        "audio_dbfs": media.loudness_dbfs(clip_audio),
        "omega_l_raw": omega_l,
        "omega_b_raw": omega_b,
        "pose_schedule": pose_schedule(cfg),  # raw mode keeps the clip's ω_b for windows when samples:N
        "lip_dilation_frac": cfg.lip_dilation_frac,
        "caption": caption,
        **sync_meta,  # av_offset_frames, sync_confidence (SyncNet, before the shift), audio_shift_s
    }
    sample = {
        "__key__": sample_key(source, clip_index),
        "mp4": media.encode_mp4(frames, cfg.fps, cfg.crf, cfg.preset),
        "flac": media.encode_flac(clip_audio),
        "landmarks.npz": encode_npz(**arrays),
        "lipmask.npz": encode_lip_masks(masks),
        "json": json.dumps(meta).encode(),
    }
    timing["encode"] += time.perf_counter() - t
    return sample, (frames, arrays, masks)


# --------------------------------------------------------------------------------------------
# one shard


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def shard_is_done(out: Path, index: int, sources: list[Path]) -> bool:
    """A shard is finished if its record exists, lists the same sources and its tar (if any)
    has the recorded size. Anything else (no record, a ``.tmp`` left by a crash, another input
    list) means: do it again."""
    record = out / "parts" / f"{shard_name(index)}.json"
    if not record.is_file():
        return False
    try:
        rec = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    if rec.get("sources") != [str(s) for s in sources]:
        return False
    if rec.get("tar") is None:
        return True
    tar = out / rec["tar"]
    return tar.is_file() and tar.stat().st_size == rec.get("bytes")


def process_shard(index: int, sources: list[Path], cfg: PrepConfig) -> dict:
    """Process the videos of one shard; write ``shard-XXXXXX.tar`` and its ``parts/`` record.
    Returns the record (a dict, see :class:`ShardRecord`)."""
    import webdataset as wds

    from data_tools.preview import save_preview

    out = Path(cfg.output)
    name = shard_name(index)
    tmp = out / f"{name}.tar.tmp"
    final = out / f"{name}.tar"
    rec = ShardRecord(shard=name, sources=[str(s) for s in sources], tar=None)
    timing: Counter = Counter()
    t_start = time.perf_counter()
    previews = 0
    reject_previews: set[str] = set()
    with wds.TarWriter(str(tmp)) as writer:
        for source in sources:
            for item in process_video(source, cfg, timing):
                if isinstance(item, FileNote):
                    if item.damaged or item.truncated:
                        rec.files.append(asdict(item))
                    continue
                if isinstance(item, Reject):
                    rec.rejects.append(item.record())
                    if cfg.previews_per_shard and item.preview is not None and item.reason not in reject_previews:
                        # One preview per reject reason and shard: what was dropped, and why.
                        jpg = f"reject-{item.reason}-{sample_key(Path(item.source), item.clip or 0)}.jpg"
                        save_preview(out / "previews" / jpg, **item.preview)
                        reject_previews.add(item.reason)
                    continue
                sample, (frames, arrays, masks) = item
                t = time.perf_counter()
                writer.write(sample)
                timing["write"] += time.perf_counter() - t
                rec.samples += 1
                rec.frames += len(frames)
                meta = json.loads(sample["json"])
                rec.audio_sources[meta["audio_source"]] = rec.audio_sources.get(meta["audio_source"], 0) + 1
                if "av_offset_frames" in meta:
                    rec.sync.append([meta["av_offset_frames"], meta["sync_confidence"]])
                rec.omega_l.append(meta["omega_l_raw"])
                rec.omega_b.append(meta["omega_b_raw"])
                rec.pose_schedules[meta["pose_schedule"]] = rec.pose_schedules.get(meta["pose_schedule"], 0) + 1
                if previews < cfg.previews_per_shard:
                    save_preview(out / "previews" / f"{sample['__key__']}.jpg", frames, arrays["face"], arrays["face_box"], masks)
                    previews += 1
    if rec.samples:
        rec.bytes = tmp.stat().st_size
        rec.sha256 = _sha256(tmp)
        rec.tar = final.name
        os.replace(tmp, final)
    else:
        tmp.unlink()
        final.unlink(missing_ok=True)  # an old shard from another input list must not linger
    timing["total"] = time.perf_counter() - t_start
    rec.timing_s = {k: round(v, 4) for k, v in timing.items()}
    _write_json_atomic(out / "parts" / f"{name}.json", asdict(rec))
    return asdict(rec)


def _process_shard_task(args) -> dict:
    return process_shard(*args)


# --------------------------------------------------------------------------------------------
# merge: manifest, statistics, report


def motion_stats(values: list[float | None], quantiles: tuple[float, float]) -> dict:
    """Quantiles of raw motion values (None dropped): ``low``/``high`` map to 0/1."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"count": 0, "low": 0.0, "high": 0.0, "median": 0.0, "quantiles": {}}
    qs = sorted({0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, *quantiles})
    return {
        "count": int(v.size),
        "low": float(np.quantile(v, quantiles[0])),
        "high": float(np.quantile(v, quantiles[1])),
        "median": float(np.median(v)),
        "quantiles": {f"{q:g}": float(np.quantile(v, q)) for q in qs},
    }


def sync_summary(pairs: list) -> dict:
    """Distribution of kept clips' SyncNet offsets (count per offset) and confidences (quantiles)."""
    if not pairs:
        return {"clips": 0}
    offsets = Counter(int(o) for o, _ in pairs)
    conf = np.array([c for _, c in pairs], dtype=np.float64)
    return {
        "clips": len(pairs),
        "offset_frames": {str(k): offsets[k] for k in sorted(offsets)},
        "confidence_quantiles": {f"{q:g}": round(float(np.quantile(conf, q)), 3) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
    }


def merge(cfg: PrepConfig, num_shards: int, run_info: dict | None = None) -> dict:
    """Build ``manifest.json``, ``stats.json`` and ``report.json``/``report.txt`` from every
    ``parts/`` record. Safe to run any number of times (e.g. after each SLURM array task)."""
    from ft_train.data.face import BODY_MIN_VISIBILITY

    out = Path(cfg.output)
    records = []
    missing = []
    for i in range(num_shards):
        p = out / "parts" / f"{shard_name(i)}.json"
        if p.is_file():
            records.append(json.loads(p.read_text()))
        else:
            missing.append(shard_name(i))
    manifest = {
        "shards": [
            {"shard": r["tar"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
            for r in records
            if r["tar"]
        ]
    }
    manifest["total_samples"] = sum(s["samples"] for s in manifest["shards"])
    _write_json_atomic(out / "manifest.json", manifest)

    omega_l = [v for r in records for v in r["omega_l"]]
    omega_b = [v for r in records for v in r["omega_b"]]
    # Shards kept from an earlier run may have been made with another pose schedule (samples
    # from before the key: "unrecorded"); their raw ω_b is on another scale.
    schedules: Counter = Counter()
    for r in records:
        schedules.update(r.get("pose_schedules") or ({"unrecorded": r["samples"]} if r["samples"] else {}))
    stats = {
        "omega_l": motion_stats(omega_l, cfg.stats_quantiles),
        "omega_b": motion_stats(omega_b, cfg.stats_quantiles),
        "normalisation": "omega = clip((raw - low) / (high - low), 0, 1); raw None -> median",
        "omega_l_definition": "ft_train.data.face.landmark_motion",
        "omega_b_definition": f"ft_train.data.face.body_motion(min_visibility={BODY_MIN_VISIBILITY})",
        "pose_schedule": next(iter(schedules)) if len(schedules) == 1 else dict(schedules),
        # The clips' frame rate and length: training records them in its bundles, ft-infer samples at that fps.
        "fps": cfg.fps,
        "num_frames": cfg.num_frames,
    }
    _write_json_atomic(out / "stats.json", stats)

    rejects = [x for r in records for x in r["rejects"]]
    counts = Counter(x["reason"] for x in rejects)
    timing: Counter = Counter()
    for r in records:
        timing.update(r["timing_s"])
    frames = sum(r["frames"] for r in records)
    report = {
        "shards_total": num_shards,
        "shards_done": len(records),
        "shards_missing": missing,
        "videos": sum(len(r["sources"]) for r in records),
        "samples": manifest["total_samples"],
        "frames": frames,
        "rejected": {reason: counts.get(reason, 0) for reason in REJECT_REASONS},
        "rejected_files": sum(1 for x in rejects if x["clip"] is None),
        "rejected_clips": sum(1 for x in rejects if x["clip"] is not None),
        "rejects": rejects,
        # Samples per audio source (embedded track or sidecar .wav).
        "audio_sources": dict(sum((Counter(r.get("audio_sources", {})) for r in records), Counter())),
        "pose_schedules": dict(schedules),  # samples per pose schedule (ω_b is comparable within one)
        # Files with skipped packets/frames (kept or not), and files cut short, with their counts.
        "damaged": [{"source": f["source"], **f["damaged"]} for r in records for f in r.get("files", []) if f["damaged"]],
        "sync": sync_summary([x for r in records for x in r.get("sync", [])]),
        "truncated": [{"source": f["source"], **f["truncated"]} for r in records for f in r.get("files", [])
                      if f["truncated"]],
        "timing_s": {k: round(v, 3) for k, v in sorted(timing.items())},
        "frames_per_s_per_process": round(frames / timing["total"], 2) if timing["total"] else None,
        "this_run": run_info or {},
    }
    _write_json_atomic(out / "report.json", report)
    (out / "report.txt").write_text(format_report(report))
    return report


def format_report(report: dict) -> str:
    """The human-readable summary of ``report.json``."""
    lines = [
        f"shards: {report['shards_done']}/{report['shards_total']} done"
        + (f" (missing: {', '.join(report['shards_missing'][:5])}...)" if report["shards_missing"] else ""),
        f"videos: {report['videos']}   samples (clips): {report['samples']}   frames: {report['frames']}",
        f"rejected: {report['rejected_files']} files, {report['rejected_clips']} clips",
    ]
    for reason, n in report["rejected"].items():
        if n:
            lines.append(f"  {reason:<16} {n:>6}   {REJECT_REASONS[reason]}")
    if report.get("sync", {}).get("clips"):
        sync = report["sync"]
        lines.append(f"SyncNet: {sync['clips']} clips, offsets (frames: clips) {sync['offset_frames']}, "
                     f"median confidence {sync['confidence_quantiles']['0.5']}")
    if len(report.get("pose_schedules") or {}) > 1:
        lines.append("warning: samples made with different pose schedules ("
                     + ", ".join(f"{n} {k}" for k, n in sorted(report["pose_schedules"].items()))
                     + "): their ω_b is not comparable; delete the output's parts/ and run again with one setting")
    if report.get("audio_sources"):
        lines.append("audio: " + ", ".join(f"{n} samples {k}" for k, n in sorted(report["audio_sources"].items())))
    for entry in report.get("damaged", []):
        counts = ", ".join(f"{s} {entry[s]['damaged']}/{entry[s]['packets']} packets" for s in ("audio", "video") if s in entry)
        lines.append(f"damaged (skipped): {entry['source']}: {counts}")
    for entry in report.get("truncated", []):
        lines.append(f"truncated: {entry['source']}: {entry['detail']}")
    lines.append("time in each step, summed over processes (s):")
    for step, s in report["timing_s"].items():
        lines.append(f"  {step:<16} {s:>10.1f}")
    if report["frames_per_s_per_process"]:
        lines.append(f"throughput: {report['frames_per_s_per_process']} frames/s per process")
    run = report.get("this_run") or {}
    if run:
        lines.append(f"this run: {run.get('shards_written', 0)} shards written, "
                     f"{run.get('shards_skipped', 0)} already done, {run.get('wall_s', 0):.1f}s wall")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# driver


def run_prep(cfg: PrepConfig) -> dict:
    """Process this task's unfinished shards (in ``num_workers`` processes), then merge.

    Returns the report dict (also written to ``output/report.json``)."""
    out = Path(cfg.output)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    inputs = list_inputs(cfg)
    groups = shard_sources(inputs, cfg)
    if cfg.mode == "merge":
        return merge(cfg, len(groups))
    if not cfg.sync:
        print("ft-prep: no sync= SyncNet weights given: audio-video sync is not measured or corrected")
    mine = [i for i in range(len(groups)) if i % cfg.num_tasks == cfg.task_index]
    todo = [i for i in mine if not shard_is_done(out, i, groups[i])]
    t0 = time.perf_counter()
    tasks = [(i, groups[i], cfg) for i in todo]
    with _progress(total=len(todo), disable=not cfg.progress) as bar:
        if cfg.num_workers > 0 and len(tasks) > 1:
            # spawn, not fork: mediapipe's graphs start threads that a forked child must not inherit.
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(cfg.num_workers, len(tasks))) as pool:
                for rec in pool.imap_unordered(_process_shard_task, tasks):
                    bar.update(1, rec)
        else:
            for task in tasks:
                bar.update(1, _process_shard_task(task))
    run_info = {
        "shards_written": len(todo),
        "shards_skipped": len(mine) - len(todo),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    return merge(cfg, len(groups), run_info)


class _progress:
    """tqdm bar over shards showing samples written and clips/files rejected so far."""

    def __init__(self, total: int, disable: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="shard", disable=disable, dynamic_ncols=True)
        self.samples = self.rejects = 0

    def update(self, n: int, rec: dict) -> None:
        self.samples += rec["samples"]
        self.rejects += len(rec["rejects"])
        self._bar.set_postfix(samples=self.samples, rejected=self.rejects)
        self._bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()


def load_config(overrides: list[str]) -> PrepConfig:
    """Compose ``conf/prep.yaml`` with Hydra override strings into a :class:`PrepConfig`."""
    return PrepConfig(**compose_tool_config("prep", overrides, "ft-prep", "ft-prep input=videos/ output=shards/"))


TOOL = Tool("ft-prep", "prep", __doc__, "ft-prep input=videos/ output=shards/", log_format=None,
            build=lambda cfg: PrepConfig(**cfg), run=lambda cfg: (run_prep(cfg), cfg),
            report=lambda done: format_report(done[0]) + f"output: {Path(done[1].output).resolve()}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``ft-prep key=value ...`` (keys of ``conf/prep.yaml``); ``task=encode``
    runs the latent-cache pass instead (keys of ``conf/encode.yaml``)."""
    argv = sys.argv[1:] if argv is None else argv
    tasks = [a.split("=", 1)[1] for a in argv if a.startswith("task=")]
    task = tasks[-1] if tasks else "prep"
    argv = [a for a in argv if not a.startswith("task=")]
    if task == "encode":
        from data_tools.encode import TOOL as ENCODE

        return ENCODE.main(argv)
    if task != "prep":
        raise SystemExit(f"ft-prep: task={task} is not a task; use task=prep (default) or task=encode")
    return TOOL.main(argv)


if __name__ == "__main__":
    sys.exit(main())
