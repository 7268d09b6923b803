"""Sync-C/D on face tracks: run_pipeline.py's track rules on hand-made detections, and mediapipe
tracks on a video with a cut between two faces (scikit-image's astronaut photo, which the detector
finds), scored per track and averaged per video."""

import numpy as np
import pytest
import skimage.data
import torch

from ft_train.metrics.facetrack import TrackRules, box_iou, build_tracks, face_tracks, shot_bounds
from ft_train.metrics.sync import SyncMetric, sync_scores, syncnet_face_crops

from .test_metrics_sync import BrightnessEnergyEncoder


def _moving(n, x0=100.0, size=120.0, step=1.0):
    return [np.array([[x0 + step * t, 50, x0 + step * t + size, 50 + size, 0.9]]) for t in range(n)]


def test_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


def test_track_length_rule_is_strictly_more_than_min_track():
    rules = TrackRules(min_track=100)
    assert build_tracks(_moving(100), rules) == []  # 100 detections: not > 100
    (track,) = build_tracks(_moving(101), rules)
    assert list(track.frames) == list(range(101)) and track.boxes.shape == (101, 4)


def test_gaps_are_interpolated_and_a_long_gap_ends_the_track():
    dets = _moving(130)
    for t in range(40, 60):  # 20 frames without a face (< num_failed_det = 25)
        dets[t] = np.zeros((0, 5))
    (track,) = build_tracks(dets, TrackRules(min_track=100))
    assert list(track.frames) == list(range(130))
    np.testing.assert_allclose(track.boxes[50], [150, 50, 270, 170])  # linear between frames 39 and 60
    for t in range(40, 70):  # 30 missing frames: two pieces of 40 and 60, each too short
        dets[t] = np.zeros((0, 5))
    assert build_tracks(dets, TrackRules(min_track=100)) == []
    assert [len(t.frames) for t in build_tracks(dets, TrackRules(min_track=30))] == [40, 60]


def test_small_faces_and_jumps_and_two_people():
    assert build_tracks(_moving(120, size=90), TrackRules()) == []  # mean size 90 ≤ 100 px
    jump = _moving(60) + _moving(60, x0=400)  # a cut to another place: IoU 0 ends the track
    assert [(t.frames[0], len(t.frames)) for t in build_tracks(jump, TrackRules(min_track=50))] == [(0, 60), (60, 60)]
    two = [np.concatenate([a, b]) for a, b in zip(_moving(120), _moving(120, x0=500))]
    tracks = build_tracks(two, TrackRules())
    assert len(tracks) == 2 and {round(t.boxes[0, 0]) for t in tracks} == {100, 500}


def _astronaut_video(n_each=45):
    """A talking-portrait-like clip: the astronaut drifting right, then a hard cut to her mirror
    image further right (another 'person'), 360×360 frames."""
    img = skimage.data.astronaut()[:360, 60:420]  # face ≈ 104 px, at x ≈ 114…218
    frames = [np.roll(img, t, axis=1) for t in range(n_each)]
    frames += [np.roll(img[:, ::-1], 100, axis=1) for _ in range(n_each)]  # face at x ≈ 240…350
    return np.stack(frames)


@pytest.fixture(scope="module")
def astronaut():
    frames = _astronaut_video()
    rules = TrackRules(min_track=40, min_face_size=90)
    return frames, rules, face_tracks(frames, rules)


def test_mediapipe_tracks_follow_the_face_and_split_at_the_cut(astronaut):
    frames, rules, tracks = astronaut
    assert [(int(t.frames[0]), int(t.frames[-1])) for t in tracks] == [(0, 44), (45, 89)]
    first, second = tracks
    drift = first.boxes[-1, 0] - first.boxes[0, 0]
    assert drift == pytest.approx(44, abs=4)  # the box moves with the face
    assert box_iou(first.boxes[-1], second.boxes[0]) < 0.5  # the cut moved the face: the IoU rule splits
    assert second.boxes[0, 0] == pytest.approx(frames.shape[2] - first.boxes[0, 2] + 100, abs=8)  # mirrored face
    assert face_tracks(np.full((60, 64, 64, 3), 120, np.uint8), rules) == []


def test_a_cut_where_the_face_stays_in_place_splits_the_track():
    """A cut between two shots with the face at the same place (the IoU rule cannot see it): the
    shot split ends the track at the cut, as the reference's scene detection does."""
    img = skimage.data.astronaut()[:360, 60:420]
    other = np.ascontiguousarray(img[..., ::-1])  # another shot: colours swapped, the face where it was
    frames = np.stack([np.roll(img, t // 4, axis=1) for t in range(45)] + [np.roll(other, t // 4, axis=1) for t in range(45)])
    assert shot_bounds(frames, 0.3) == [(0, 45), (45, 90)]
    assert shot_bounds(frames, 0.0) == [(0, 90)]
    rules = TrackRules(min_track=40, min_face_size=90)
    split = face_tracks(frames, rules)
    assert [(int(t.frames[0]), int(t.frames[-1])) for t in split] == [(0, 44), (45, 89)]
    whole = face_tracks(frames, TrackRules(min_track=40, min_face_size=90, scene_threshold=0.0))
    assert [(int(t.frames[0]), int(t.frames[-1])) for t in whole] == [(0, 89)]  # one track across the cut


def test_sync_metric_scores_each_track_and_averages_them_per_video(astronaut):
    frames, rules, tracks = astronaut
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    g = np.random.default_rng(0)
    audio = (0.3 * g.standard_normal(len(frames) * 640)).astype(np.float32)
    enc = BrightnessEnergyEncoder()
    m = SyncMetric(net=enc, track=rules)
    m.update(video, audio)
    m.update(torch.full((60, 3, 64, 64), 120, dtype=torch.uint8), audio[: 60 * 640])  # no face: counted
    out = m.compute()
    assert int(out["videos"]) == 1 and int(out["tracks"]) == 2 and int(out["no_face"]) == 1

    per_track = []
    for tr in tracks:  # by hand: crop_video's crop of the track, the track's own audio span
        crops = syncnet_face_crops(video[torch.from_numpy(tr.frames)], tr.boxes, crop_scale=0.4)
        span = audio[tr.frames[0] * 640 : (tr.frames[-1] + 1) * 640]
        per_track.append(sync_scores(enc, crops, span))
    assert float(out["sync_c"]) == pytest.approx(np.mean([r.confidence for r in per_track]), rel=1e-6)
    assert float(out["sync_d"]) == pytest.approx(np.mean([r.min_dist for r in per_track]), rel=1e-6)


def test_bad_rules_and_crop_mode_are_refused():
    with pytest.raises(ValueError, match="scene_threshold"):
        TrackRules(scene_threshold=2.0)
    with pytest.raises(ValueError, match="sync_crop: 'mouth' is not one of face, none"):
        SyncMetric(net=BrightnessEnergyEncoder(), crop="mouth")
    with pytest.raises(ValueError, match="iou"):
        TrackRules(iou=1.5)
