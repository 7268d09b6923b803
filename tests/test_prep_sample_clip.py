"""The shipped sample talking clip, and mediapipe landmarks / lip masks on it."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from ft_train import media
from ft_train.data import face as facemod

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
    audio = media.read_audio(SAMPLE)
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


@pytest.fixture(scope="module")
def detections(analysed):
    """Per-frame results of the same frames with the detector on every frame and on its default
    schedule, and of a video where the face leaves (sample, a cup, the sample again)."""
    from skimage import data as skdata

    _, frames, _ = analysed
    with facemod.FrameAnalyzer(pose_every=0, detect_every=1) as an:
        every = [an(f) for f in frames]
    with facemod.FrameAnalyzer(pose_every=0) as an:
        sparse = [an(f) for f in frames]
        scheduled = an(frames[0])  # frame 100: due (5 after 95) — the next is not, unless forced
        forced = an(frames[1], detect=True)  # as ft-prep asks at each clip's first frame
        assert scheduled.detected
    cup = np.ascontiguousarray(cv2.resize(skdata.coffee(), frames.shape[2:0:-1]))
    leaves = [*frames[:12], *[cup] * 8, *frames[12:30]]
    with facemod.FrameAnalyzer(pose_every=0) as an:
        left = [an(f) for f in leaves]
    return every, sparse, left, forced


def test_detector_every_nth_frame_keeps_its_answer_in_between(detections):
    every, sparse, _, forced = detections
    assert forced.detected
    ran = np.array([r.detected for r in sparse])
    assert all(r.detected for r in every)
    assert ran[0] and ran.mean() <= 0.3  # the default detect_every=5, plus mesh lost/found events
    gaps = np.diff(np.flatnonzero(ran))
    assert gaps.max() <= 5
    for i in np.flatnonzero(~ran):
        assert (sparse[i].num_faces, sparse[i].confidence) == (sparse[i - 1].num_faces, sparse[i - 1].confidence)
    # Where it ran it saw what the every-frame detector saw; the clip statistics the filters use agree.
    for i in np.flatnonzero(ran):
        assert sparse[i].num_faces == every[i].num_faces
        assert sparse[i].confidence == pytest.approx(every[i].confidence, abs=1e-6)
    assert abs(np.mean([r.confidence for r in sparse]) - np.mean([r.confidence for r in every])) < 0.01
    assert [r.num_faces for r in sparse] == [r.num_faces for r in every] == [1] * len(every)


def test_detector_runs_when_the_mesh_loses_or_finds_the_face(detections):
    _, _, left, _ = detections
    found = np.array([r.face is not None for r in left])
    assert found[:12].all() and not found[13:20].any() and found[-5:].all()
    changes = np.flatnonzero(found[1:] != found[:-1]) + 1
    assert len(changes) >= 2
    for i in changes:
        assert left[i].detected, f"frame {i}: mesh found={found[i]} but the detector did not run"
    assert left[changes[0]].num_faces == 0  # the cup frame's own answer, not the face's held one


def test_detector_samples_a_second_face_that_comes_and_goes(analysed):
    """A second face in 16 of 40 frames: the sampled share matches the every-frame share."""
    _, frames, _ = analysed
    blank = np.full_like(frames[0], 128)
    two = [np.concatenate([f, f if 12 <= i < 28 else blank], axis=1) for i, f in enumerate(frames[:40])]
    shares = {}
    for n in (1, 5, 8, 16):  # 16: ft-prep's default (conf/prep.yaml)
        with facemod.FrameAnalyzer(pose_every=0, detect_every=n) as an:
            shares[n] = np.mean([an(f).num_faces > 1 for f in two])
    assert shares[1] == pytest.approx(0.4, abs=0.05)
    assert shares[5] == pytest.approx(shares[1], abs=0.1)  # one detection interval at each end
    assert shares[8] == pytest.approx(shares[1], abs=0.2)
    assert shares[16] == pytest.approx(shares[1], abs=0.2)


def test_landmarks_to_pixels_matches_the_protobuf_fields(analysed):
    """The fast wire-format read gives the same numbers as walking the message, and a message
    with another layout (visibility set) takes the slow path."""
    _, frames, _ = analysed
    with facemod.FrameAnalyzer(pose_every=0) as an:
        lms = an._mesh.process(frames[0]).multi_face_landmarks[0]
    h, w = frames.shape[1:3]
    slow = np.array([(p.x * w, p.y * h, p.z * w) for p in lms.landmark], dtype=np.float32)
    np.testing.assert_allclose(facemod.landmarks_to_pixels(lms, w, h), slow, rtol=1e-6, atol=1e-4)
    other = type(lms)()
    other.CopyFrom(lms)
    other.landmark[3].visibility = 0.5
    np.testing.assert_allclose(facemod.landmarks_to_pixels(other, w, h), slow, rtol=1e-6, atol=1e-4)


def test_lip_mask_is_the_exact_disc_around_the_lips_and_repeatable(analysed):
    """Every pixel within round(dilation × face width) px of the filled lip polygon, cut to the
    face box — checked against brute force — and the same bits on every call."""
    _, frames, arrays = analysed
    h, w = frames.shape[1:3]
    pick = [0, 37, 81]
    face, box = arrays["face"][pick], arrays["face_box"][pick]
    box[2, 3] = face[2, 17, 1] + 5  # a box cutting the dilated lips just below the lower lip
    masks = facemod.lip_masks(face, box, h, w, 0.15)
    np.testing.assert_array_equal(masks, facemod.lip_masks(face, box, h, w, 0.15))
    for m, f, (x0, y0, x1, y1) in zip(masks, face, box):
        radius = max(1, round(0.15 * (x1 - x0)))
        lips = f[list(facemod.LIP_OUTER), :2]
        fill = np.zeros((h, w), np.uint8)
        cv2.fillPoly(fill, [np.round(lips * 4).astype(np.int32)], 1, shift=2)
        ys, xs = np.nonzero(fill)
        (ax, ay), (bx, by) = lips.min(axis=0).astype(int) - radius - 2, lips.max(axis=0).astype(int) + radius + 3
        yy, xx = np.mgrid[ay:by, ax:bx]  # brute force near the lips; nothing beyond
        d2 = ((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(axis=-1)
        inside = (xx >= np.floor(x0)) & (xx <= np.ceil(x1)) & (yy >= np.floor(y0)) & (yy <= np.ceil(y1))
        np.testing.assert_array_equal(m[ay:by, ax:bx], (d2 <= radius**2) & inside)
        assert m.sum() == m[ay:by, ax:bx].sum()


def test_body_motion_ignores_joints_pose_only_guesses():
    """ω_b counts joints mediapipe sees, not the ones it guesses at visibility ~0.5 (hands below
    the frame): such a joint, flickering in and out, made ω_b depend on which frames pose ran on."""
    rng = np.random.default_rng(0)
    n = 81
    pose = np.zeros((n, facemod.NUM_POSE_JOINTS, 4), np.float32)
    pose[..., 3] = 0.1  # not seen
    seen = list(range(13))  # face and shoulders, swaying a little
    sway = 0.01 * np.sin(np.arange(n) / 5)[:, None]
    pose[:, seen, 0] = np.linspace(0.3, 0.7, len(seen))[None] + sway
    pose[:, seen, 1] = 0.4 + 0.05 * (np.arange(len(seen)) % 3)[None]
    pose[:, 11, 1] = pose[:, 12, 1] = 0.7
    pose[:, seen, 3] = 0.95
    seen_only = facemod.body_motion(pose, 512, 512)
    # A wrist guessed below the frame: it jumps around and its visibility flickers around 0.5.
    guessed = pose.copy()
    guessed[:, 15, :2] = rng.uniform(0.2, 1.3, size=(n, 2))
    guessed[:, 15, 3] = np.where(np.arange(n) % 3 == 0, 0.45, 0.6)
    assert facemod.body_motion(guessed, 512, 512) == pytest.approx(seen_only, rel=1e-9)
    for every in (4, 16):  # ... nor on a sparse schedule of the same frames
        sparse = np.full_like(guessed, np.nan)
        sparse[::every] = guessed[::every]
        assert facemod.body_motion(sparse, 512, 512) == pytest.approx(facemod.body_motion(np.where(
            np.isnan(sparse), np.nan, pose), 512, 512), rel=1e-9)
    # A wrist seen clearly moving does count.
    shown = guessed.copy()
    shown[:, 15, 3] = 0.95
    assert facemod.body_motion(shown, 512, 512) > 2 * seen_only
