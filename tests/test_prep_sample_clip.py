"""The shipped sample talking clip, and mediapipe landmarks / lip masks on it."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from data_tools import face as facemod
from data_tools import media

SAMPLE = Path(__file__).parent / "assets" / "sample_talking.mp4"


@pytest.fixture(scope="module")
def analysed():
    """Frames of the sample at 25 fps / 512 px and the per-frame mediapipe arrays."""
    info = media.probe(SAMPLE)
    frames = np.stack(list(media.iter_frames(info, 25.0, 512)))
    with facemod.FrameAnalyzer(pose_every=4) as analyzer:
        results = [analyzer(f) for f in frames]
    return info, frames, facemod.stack_results(results)


def test_sample_clip_is_small_talking_video_with_audio():
    assert SAMPLE.stat().st_size <= 2 * 1024 * 1024
    info = media.probe(SAMPLE)
    assert (info.width, info.height, info.fps) == (512, 512, 25.0)
    assert info.has_audio and 3.2 <= info.duration_s <= 5.0  # ≥ one 81-frame clip at 25 fps
    audio, _ = media.read_audio(SAMPLE)
    assert media.loudness_dbfs(audio) > -30  # real speech, not silence
    # The mouth moves: frames differ from the first one only around the mouth.
    frames = np.stack(list(media.iter_frames(info, 25.0, 512)))
    diff = np.abs(frames.astype(np.int16) - frames[0]).max(axis=(0, 3))
    ys, xs = np.nonzero(diff > 40)
    assert len(ys) > 100
    assert 120 < ys.mean() < 200 and 180 < xs.mean() < 270  # the astronaut's mouth/chin


def test_landmarks_found_in_95_percent_of_frames(analysed):
    _, frames, arrays = analysed
    assert arrays["face"].shape == (len(frames), 478, 3)
    assert arrays["face_found"].mean() >= 0.95
    # Tracked lips open and close with the speech (inner lip gap, landmarks 13/14).
    gap = arrays["face"][:, 14, 1] - arrays["face"][:, 13, 1]
    assert gap.max() - gap.min() > 3.0  # pixels


def test_lip_mask_contains_mouth_landmarks_and_lies_in_face_box(analysed):
    _, frames, arrays = analysed
    n, h, w = frames.shape[:3]
    masks = facemod.lip_masks(arrays["face"], arrays["face_box"], h, w, dilation_frac=0.15)
    assert masks.shape == (n, h, w) and masks.dtype == bool
    for i in range(n):
        lips = np.round(arrays["face"][i, list(facemod.LIP_INDICES), :2]).astype(int)
        assert masks[i, lips[:, 1], lips[:, 0]].all(), f"frame {i}: a lip landmark is outside the mask"
        x0, y0, x1, y1 = arrays["face_box"][i]
        ys, xs = np.nonzero(masks[i])
        assert xs.min() >= np.floor(x0) and xs.max() <= np.ceil(x1) + 1
        assert ys.min() >= np.floor(y0) and ys.max() <= np.ceil(y1) + 1
        # Dilated beyond the lips (jaw/cheeks) but far smaller than the face.
        lip_area = cv2.contourArea(arrays["face"][i, list(facemod.LIP_OUTER), :2].astype(np.float32))
        face_area = (x1 - x0) * (y1 - y0)
        assert 1.5 * lip_area < masks[i].sum() < 0.6 * face_area


def test_motion_intensity_removes_head_translation_and_scale(analysed):
    _, _, arrays = analysed
    face, found = arrays["face"], arrays["face_found"]
    omega = facemod.landmark_motion(face, found)
    assert omega is not None and omega > 0
    # Moving and zooming the whole head, frame by frame, must not change ω_l.
    rng = np.random.default_rng(0)
    shift = rng.uniform(-30, 30, size=(len(face), 1, 3)).astype(np.float32)
    zoom = rng.uniform(0.7, 1.4, size=(len(face), 1, 1)).astype(np.float32)
    assert facemod.landmark_motion(face * zoom + shift, found) == pytest.approx(omega, rel=1e-3)
    # A frozen face has none.
    still = np.repeat(face[:1], len(face), axis=0)
    assert facemod.landmark_motion(still, found) == pytest.approx(0.0, abs=1e-12)
