"""Build ``tests/assets/sample_talking.mp4``: a real face that talks, made from shipped parts.

The clip is the astronaut photo that scikit-image ships (``skimage.data.astronaut()``, 512×512,
a face mediapipe finds) with the jaw and lips moved in time with speech synthesised by espeak-ng.
It is a build-time script: espeak-ng is needed only to *remake* the clip; the committed mp4 is
what tests and the demo use, so nothing at run time depends on espeak.

How the mouth moves (per video frame k at time k/fps seconds):
  * ``opening[k]`` ∈ [0, 1] is the speech loudness around that time (RMS over a 40 ms window,
    normalised by its 95th percentile, then smoothed with a fast attack / slow release so the
    mouth closes a little after a syllable, as real lips do);
  * the lower face (lower lip, chin) is pulled down by ``max_jaw_px * opening`` pixels with a
    smooth displacement field (``cv2.remap``) that is zero above the mouth and fades out on the
    neck and towards the cheeks, so mediapipe still sees a plausible face;
  * the gap between the lips is filled with a soft dark ellipse (the mouth cavity).

Usage::

    python -m data_tools.make_sample_clip --out tests/assets/sample_talking.mp4
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from ft_train.media import AUDIO_RATE

# A pangram-ish sentence with many open/closed mouth alternations (plosives, open vowels).
DEFAULT_TEXT = "Hello! Papa bought a big map of Paris today."


def synthesize_speech(text: str, words_per_minute: int = 160) -> np.ndarray:
    """Speak ``text`` with espeak-ng; returns (N,) float32 mono audio at 16 kHz in [-1, 1]."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng not found: install it (apt-get install -y espeak-ng) to remake the clip")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([espeak, "-s", str(words_per_minute), "-w", str(wav), text], check=True)
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    # Polyphase resampling from espeak's 22.05 kHz to 16 kHz (exact rational ratio 320/441).
    from scipy.signal import resample_poly

    audio = resample_poly(audio, AUDIO_RATE, rate).astype(np.float32)
    return 0.9 * audio / max(1e-6, float(np.abs(audio).max()))


def mouth_opening(audio: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """Per-frame mouth opening in [0, 1], shape (num_frames,), from 16 kHz mono ``audio``."""
    half = int(0.020 * AUDIO_RATE)
    rms = np.zeros(num_frames, dtype=np.float64)
    for k in range(num_frames):
        c = int(round(k / fps * AUDIO_RATE))
        seg = audio[max(0, c - half) : c + half]
        rms[k] = np.sqrt(np.mean(seg.astype(np.float64) ** 2)) if seg.size else 0.0
    ref = np.percentile(rms, 95)
    level = np.clip(rms / max(ref, 1e-8), 0.0, 1.0)
    level[level < 0.08] = 0.0  # breath noise and espeak's trailing silence: keep the mouth shut
    out = np.zeros_like(level)
    for k in range(num_frames):
        prev = out[k - 1] if k else 0.0
        rate = 0.8 if level[k] > prev else 0.35  # fast attack, slower release
        out[k] = prev + rate * (level[k] - prev)
    return out.astype(np.float32)


def face_landmarks(image: np.ndarray) -> np.ndarray:
    """mediapipe face mesh on one RGB image; returns (478, 2) float32 pixel coordinates (x, y)."""
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as fm:
        res = fm.process(image)
    if not res.multi_face_landmarks:
        raise SystemExit("mediapipe found no face in the source photo; use a frontal portrait")
    h, w = image.shape[:2]
    pts = np.array([[p.x * w, p.y * h] for p in res.multi_face_landmarks[0].landmark], dtype=np.float32)
    return pts


def animate(image: np.ndarray, landmarks: np.ndarray, opening: np.ndarray, max_jaw_px: float) -> np.ndarray:
    """Render the talking frames: (F, H, W, 3) uint8 from one (H, W, 3) uint8 photo.

    ``landmarks`` (478, 2) pixels locate the mouth (13/14 inner lips, 61/291 corners, 152 chin).
    """
    h, w = image.shape[:2]
    cx = float((landmarks[61, 0] + landmarks[291, 0]) / 2)
    y_mid = float((landmarks[13, 1] + landmarks[14, 1]) / 2)  # between the closed lips
    half_mouth = float(abs(landmarks[291, 0] - landmarks[61, 0]) / 2)
    y_chin = float(landmarks[152, 1])
    face_half = float((landmarks[:, 0].max() - landmarks[:, 0].min()) / 2)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Horizontal fall-off: the jaw moves as a whole under the mouth, fading towards the cheeks.
    wx = np.clip(1.0 - np.abs(xx - cx) / (0.85 * face_half), 0.0, 1.0)
    wx = 0.5 - 0.5 * np.cos(np.pi * wx)
    # Vertical: 0 above the lips, 1 from just under the lip line to the chin, fading on the neck.
    ramp_up = np.clip((yy - y_mid) / 3.0, 0.0, 1.0)
    ramp_down = np.clip(1.0 - (yy - y_chin) / 30.0, 0.0, 1.0)
    weight = wx * ramp_up * ramp_down

    frames = np.empty((len(opening), h, w, 3), dtype=np.uint8)
    for k, o in enumerate(opening):
        drop = max_jaw_px * float(o)
        # Backward map: the pixel at y shows what was at y - drop·weight (content moves down).
        frame = cv2.remap(image, xx, yy - drop * weight, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if drop > 0.5:
            cavity = np.zeros((h, w), dtype=np.float32)
            centre = (int(round(cx * 4)), int(round((y_mid + drop / 2) * 4)))
            axes = (int(round(half_mouth * (0.55 + 0.25 * o) * 4)), int(round(max(drop / 2, 0.5) * 4)))
            cv2.ellipse(cavity, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA, shift=2)
            cavity = cv2.GaussianBlur(cavity, (0, 0), 1.0)[..., None]
            dark = np.array([45, 12, 14], dtype=np.float32)
            frame = (frame.astype(np.float32) * (1 - cavity) + dark * cavity).astype(np.uint8)
        frames[k] = frame
    return frames


def write_mp4(path: Path, frames: np.ndarray, audio: np.ndarray, fps: float, crf: int) -> None:
    """Mux (F, H, W, 3) uint8 RGB ``frames`` and 16 kHz mono ``audio`` into an H.264 + AAC mp4."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    _, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "a.wav"
        sf.write(wav, audio, AUDIO_RATE, subtype="PCM_16")
        cmd = [
            ffmpeg, "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
            "-i", str(wav),
            "-c:v", "libx264", "-preset", "slow", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "64k", "-shortest", "-movflags", "+faststart",
            str(path),
        ]  # fmt: skip
        subprocess.run(cmd, input=frames.tobytes(), check=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/assets/sample_talking.mp4"))
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length; speech is padded/cut to it")
    ap.add_argument("--max-jaw-px", type=float, default=11.0, help="jaw drop at full loudness, pixels at 512 px")
    ap.add_argument("--crf", type=int, default=24)
    args = ap.parse_args(argv)

    from skimage import data

    image = np.ascontiguousarray(data.astronaut())  # (512, 512, 3) uint8 RGB
    speech = synthesize_speech(args.text)
    n_audio = int(round(args.seconds * AUDIO_RATE))
    lead = int(0.2 * AUDIO_RATE)  # a short silence first, so the clip starts with a closed mouth
    audio = np.zeros(n_audio, dtype=np.float32)
    seg = speech[: n_audio - lead]
    audio[lead : lead + len(seg)] = seg
    num_frames = int(round(args.seconds * args.fps))
    opening = mouth_opening(audio, num_frames, args.fps)
    frames = animate(image, face_landmarks(image), opening, args.max_jaw_px)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(args.out, frames, audio, args.fps, args.crf)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {num_frames} frames, {args.seconds} s)")


if __name__ == "__main__":
    main()
