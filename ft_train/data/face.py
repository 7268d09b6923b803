"""mediapipe analysis of frames: face landmarks, face box/confidence, body joints, lip masks, motion.

In the library because three parts must agree on it: ``ft-prep`` stores these landmarks, boxes,
masks and ω values; raw-mode training recomputes ω over a window (:mod:`ft_train.data.raw`); and
``ft-infer`` finds the photo's face the same way (:func:`ft_train.inference.adapters.detect_face_box`).

Uses the legacy ``mediapipe.solutions`` graphs of mediapipe 0.10.21, whose models ship inside the
wheel (no download): face mesh with ``refine_landmarks`` (478 points), face detection (for a
confidence score and the number of faces; the mesh reports neither) and pose (33 joints; only the
"full" model, ``model_complexity=1``, is bundled — the lite/heavy ones would be downloaded).
Pose by clip (:class:`ClipPose`) runs the pose graph's two registered subgraphs on their own.

Cost per 512 px frame on one core of the dev machine (``bench/prep_throughput.md``): face mesh
in tracking mode ~2.5 ms, full-range face detection ~3.8 ms, pose ~20 ms tracked (body detector
~15 ms more when found anew). Hence the detector and pose run on a subset of frames
(``detect_every``, ``pose_every``, ft-prep's ``pose_samples_per_clip``); the mesh on every frame.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

# mediapipe logs through glog/TFLite straight to stderr; keep worker output readable.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NUM_FACE_LANDMARKS = 478
NUM_POSE_JOINTS = 33

# mediapipe face-mesh lip contours, each in drawing order (a closed polygon).
# Outer: from the left mouth corner (61) along the lower lip to 17 (bottom), the right corner
# (291), then back along the upper lip through 0 (top). Inner: same order through 14 and 13.
LIP_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIP_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
#: The 40 lip landmarks (outer + inner contour); the mask must contain all of them.
LIP_INDICES = tuple(sorted(LIP_OUTER + LIP_INNER))

# Pose joints that a talking-head framing can show: face (0-10), shoulders, elbows, wrists,
# hands (11-22). Hips and legs (23-32) are usually out of frame and mediapipe then guesses them.
UPPER_BODY_JOINTS = tuple(range(23))

# A face mesh NormalizedLandmarkList on the protobuf wire: per landmark the bytes
# `0a 0f | 0d x | 15 y | 1d z` (a 15-byte sub-message of three little-endian float32 fields).
# Reading that with numpy takes ~0.03 ms for 478 points, walking the Python protobuf objects
# ~0.2 ms — 5% of a frame's budget. Anything else on the wire (e.g. visibility set) takes the
# slow path, so the result never depends on this layout holding.
_WIRE = np.dtype([("head", "u1", 3), ("x", "<f4"), ("ty", "u1"), ("y", "<f4"), ("tz", "u1"), ("z", "<f4")])
_WIRE_HEAD = np.array([0x0A, 0x0F, 0x0D], dtype=np.uint8)


def landmarks_to_pixels(landmarks, width: int, height: int) -> np.ndarray:
    """A mediapipe ``NormalizedLandmarkList`` (x, y in [0, 1]) → (N, 3) float32 pixels (z in x's scale)."""
    raw = landmarks.SerializeToString()
    rec = np.frombuffer(raw, dtype=_WIRE) if len(raw) % _WIRE.itemsize == 0 else None
    if (
        rec is not None
        and len(rec) == len(landmarks.landmark)
        and (rec["head"] == _WIRE_HEAD).all()
        and (rec["ty"] == 0x15).all()
        and (rec["tz"] == 0x1D).all()
    ):
        xyz = np.stack([rec["x"], rec["y"], rec["z"]], axis=1)
    else:
        xyz = np.array([(p.x, p.y, p.z) for p in landmarks.landmark], dtype=np.float32)
    return xyz * np.array([width, height, width], dtype=np.float32)


@dataclass
class FrameResult:
    """mediapipe output for one (H, W, 3) frame.

    Attributes:
        face: (478, 3) float32 landmarks in pixels (x, y; z in the same scale as x), or None.
        num_faces: faces found by the detector (score ≥ its minimum confidence).
        confidence: best face-detection score in [0, 1]; 0.0 when none.
        pose: (33, 4) float32 (x, y in [0, 1] of width/height, z, visibility), or None when pose
            was not run on this frame (see ``pose_every``) or found no body.
        detected: whether the detector ran on this frame; when False, ``num_faces``,
            ``confidence`` and ``second_face`` are those of the latest frame it ran on (see
            ``detect_every``).
        second_face: area of the second-largest detected face over the largest's (0.0 when one
            or none): a small face in the background is ~0.05, two speakers side by side ~1.
        second_box: that second face's box (x0, y0, x1, y1) in pixels, or None.
    """

    face: np.ndarray | None
    num_faces: int
    confidence: float
    pose: np.ndarray | None
    detected: bool = True
    second_face: float = 0.0
    second_box: tuple[float, float, float, float] | None = None


# mediapipe's static-image pose (legacy ``Pose(static_image_mode=True)``) split in its two
# subgraphs, both registered in the wheel: the body detector and its region of interest, then
# the landmark model on a region. Run on the same frame and region they give the static result.
_POSE_REGION_GRAPH = """
input_stream: "image"
output_stream: "roi"
node { calculator: "ImagePropertiesCalculator" input_stream: "IMAGE_CPU:image" output_stream: "SIZE:image_size" }
node { calculator: "PoseDetectionCpu" input_stream: "IMAGE:image" output_stream: "DETECTIONS:detections" }
node {
  calculator: "SplitDetectionVectorCalculator" input_stream: "detections" output_stream: "detection"
  options { [mediapipe.SplitVectorCalculatorOptions.ext] { ranges { begin: 0 end: 1 } element_only: true } }
}
node {
  calculator: "PoseDetectionToRoi" input_stream: "DETECTION:detection" input_stream: "IMAGE_SIZE:image_size"
  output_stream: "ROI:roi"
}
"""
_POSE_LANDMARK_GRAPH = """
input_stream: "image"
input_stream: "roi"
output_stream: "landmarks"
input_side_packet: "model_complexity"
input_side_packet: "enable_segmentation"
node {
  calculator: "PoseLandmarkByRoiCpu" input_stream: "IMAGE:image" input_stream: "ROI:roi"
  output_stream: "LANDMARKS:landmarks"
  input_side_packet: "MODEL_COMPLEXITY:model_complexity" input_side_packet: "ENABLE_SEGMENTATION:enable_segmentation"
}
"""


def _follow(roi, anchor: np.ndarray, box: np.ndarray, shape: tuple):
    """The pose region ``roi`` (a NormalizedRect found when the face box was ``anchor``) moved
    and scaled as the face box moved to ``box`` (x0 y0 x1 y1 pixels) in a frame of ``shape``."""
    from mediapipe.framework.formats import rect_pb2

    h, w = shape[:2]
    a, b = np.asarray(anchor, float), np.asarray(box, float)
    scale = (b[2] - b[0]) / max(a[2] - a[0], 1e-6)
    return rect_pb2.NormalizedRect(
        x_center=roi.x_center + ((b[0] + b[2]) - (a[0] + a[2])) / 2 / w,
        y_center=roi.y_center + ((b[1] + b[3]) - (a[1] + a[3])) / 2 / h,
        width=roi.width * scale, height=roi.height * scale, rotation=roi.rotation,
    )  # fmt: skip


class ClipPose:
    """Body joints on a few frames of one clip, finding the body once (ft-prep's
    ``pose_region: face``).

    mediapipe's static-image pose runs a body detector (~40 % of a run) and then the landmark
    model on the region the detector gives. Here the detector runs on the clip's first frame,
    and its region serves the frames after it, moved and scaled as the face box moved (given
    ``face_boxes``; else it stays). A frame where the landmark model finds no body in that
    region gets its own detection, and the region starts from there. The first frame's joints
    equal static-image pose exactly; a shifted frame's move with it (tests); over 40 swaying
    test clips ω_b ranks as faithfully as finding the body anew on each sample
    (``bench/pose_schedule_fidelity.py``). No state crosses calls: each starts with a detection.
    """

    def __init__(self):
        from google.protobuf import text_format
        from mediapipe.framework import calculator_pb2
        from mediapipe.python.solution_base import SolutionBase

        def graph(text: str, **side) -> SolutionBase:
            config = text_format.Parse(text, calculator_pb2.CalculatorGraphConfig())
            return SolutionBase(graph_config=config, side_inputs=side or None)

        self._region = graph(_POSE_REGION_GRAPH)
        self._landmarks = graph(_POSE_LANDMARK_GRAPH, model_complexity=1, enable_segmentation=False)

    def _joints(self, frame: np.ndarray, roi) -> np.ndarray | None:
        res = self._landmarks.process({"image": frame, "roi": roi}).landmarks
        if res is None:
            return None
        return np.array([(p.x, p.y, p.z, p.visibility) for p in res.landmark], dtype=np.float32)

    def __call__(self, frames, face_boxes=None) -> list[np.ndarray | None]:
        """(33, 4) float32 joints (x, y in [0, 1], z, visibility) per frame, in the order given
        (time order), or None where no body is found. ``face_boxes``: (x0, y0, x1, y1) pixels per
        frame (NaN: none); the region then follows the face (shift and scale) from the frame
        it was found on."""
        out, roi, anchor = [], None, None
        for i, frame in enumerate(frames):
            frame.flags.writeable = False
            joints = None
            if roi is not None:
                use = roi
                if anchor is not None and face_boxes is not None and not np.isnan(face_boxes[i][0]):
                    use = _follow(roi, anchor, face_boxes[i], frame.shape)
                joints = self._joints(frame, use)
            if joints is None:
                found = self._region.process(frame).roi
                if found is not None:
                    joints = self._joints(frame, found)
                    if joints is not None:
                        roi = found
                        anchor = None if face_boxes is None or np.isnan(face_boxes[i][0]) else face_boxes[i]
            out.append(joints)
        return out

    def close(self) -> None:
        self._region.close()
        self._landmarks.close()


class FrameAnalyzer:
    """Runs face mesh, face detection and pose on consecutive frames of ONE video.

    Face mesh and pose run in tracking mode (``static_image_mode=False``): they follow the face
    from frame to frame, which is faster and steadier than detecting anew; so make a new analyzer
    for each video. Use as a context manager or call :meth:`close`.

    The face mesh runs on every frame. The face detector — which only feeds the clip filters
    (mean confidence, share of frames with several faces) — runs when any of these holds: it
    has not run for ``detect_every`` frames; the mesh just lost or found the face (a cut, a
    turn away); the caller passes ``detect=True``. Frames in between keep its
    latest answer, so per-frame shares and means weigh each answer by how long it stood.

    Args:
        pose_every: run pose on every n-th frame only (0: never). Pose costs ~19 ms/frame at
            512 px, 3× face mesh + detection together, and ω_b is a variance over a 3 s clip:
            1 frame in 4 still gives ~20 samples per 81-frame clip.
        detect_every: run the face detector at least every n-th frame (1: every frame). It costs
            ~3.8 ms/frame, 1.5× the mesh. A second face on screen for ``max_multi_face_frac``
            of an 81-frame clip (8 frames) is still sampled when n ≤ 8.
        min_detection_confidence: detector score for a face to count (for ``num_faces``).
        timing: if given, seconds spent in each graph are added to its ``face_mesh``,
            ``face_detect`` and ``pose`` keys (ft-prep's report, the throughput bench).
        pose_on_call: make :meth:`pose` work even with ``pose_every=0`` (a caller that picks
            its own pose frames, e.g. ft-prep's ``pose_samples_per_clip``).
        pose_static: pose in static-image mode (each frame found anew; ~1.4x a tracking run).
            For frames far apart: tracking from a box 10 frames old gave ω_b further from
            every-frame pose than finding the body anew (bench/prep_throughput.md).

    The pose graph is built on the first pose run (~0.25 s to load the model), so a video
    whose clips are all rejected never pays for it.
    """

    def __init__(
        self,
        pose_every: int = 4,
        detect_every: int = 5,
        min_detection_confidence: float = 0.5,
        timing: Counter | None = None,
        pose_on_call: bool = False,
        pose_static: bool = False,
    ):
        import mediapipe as mp

        if detect_every < 1:
            raise ValueError(f"detect_every={detect_every} must be ≥ 1 (the face filters need the detector)")
        self.pose_every = pose_every
        self.detect_every = detect_every
        self.timing = Counter() if timing is None else timing
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, refine_landmarks=True, max_num_faces=1,
            min_detection_confidence=0.5, min_tracking_confidence=0.5,
        )  # fmt: skip
        # model_selection=1 ("full range", faces up to ~5 m) so a second person in the
        # background is still seen by the several-faces filter.
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_detection_confidence
        )
        self._pose_enabled = pose_every > 0 or pose_on_call
        self._pose_static = pose_static
        self._pose = None
        self._clip_pose = None
        self._index = 0
        self._last_detection: tuple | None = None  # (frame index, faces, score, second/first area, second box)
        self._had_face: bool | None = None

    def __call__(self, frame: np.ndarray, detect: bool = False, pose: bool | None = None) -> FrameResult:
        """Analyse one (H, W, 3) uint8 RGB frame; ``detect=True`` forces the face detector.

        ``pose``: None = on the ``pose_every`` schedule; False = not on this frame (a caller that
        runs :meth:`pose` itself later, only on the frames it keeps); True = on this frame.
        """
        h, w = frame.shape[:2]
        frame.flags.writeable = False  # lets mediapipe use the buffer without a copy
        t = time.perf_counter()
        mesh = self._mesh.process(frame)
        face = landmarks_to_pixels(mesh.multi_face_landmarks[0], w, h) if mesh.multi_face_landmarks else None
        t1 = time.perf_counter()
        self.timing["face_mesh"] += t1 - t

        last = self._last_detection
        run_detector = (
            detect
            or last is None
            or self._index - last[0] >= self.detect_every
            or (face is not None) != self._had_face
        )
        if run_detector:
            det = self._detector.process(frame)
            detections = det.detections or []
            scores = [d.score[0] for d in detections]
            boxes = sorted(
                ((b.width * b.height, b) for b in (d.location_data.relative_bounding_box for d in detections)),
                key=lambda ab: -ab[0],
            )
            second, second_box = 0.0, None
            if len(boxes) > 1 and boxes[0][0] > 0:
                second = float(boxes[1][0] / boxes[0][0])
                b = boxes[1][1]
                second_box = (b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h)
            last = self._last_detection = (self._index, len(scores), max(scores, default=0.0), second, second_box)
            self.timing["face_detect"] += time.perf_counter() - t1
        self._had_face = face is not None

        if pose is None:
            pose = self.pose_every > 0 and self._index % self.pose_every == 0
        joints = self.pose(frame) if pose else None
        self._index += 1
        return FrameResult(face, last[1], last[2], joints, detected=run_detector, second_face=last[3], second_box=last[4])

    def pose(self, frame: np.ndarray) -> np.ndarray | None:
        """Body joints of one frame: (33, 4) float32 (x, y in [0, 1], z, visibility), or None when
        no body is found or the analyzer was made with ``pose_every=0`` (and not ``pose_on_call``).
        Tracking mode: call it on frames in time order (gaps are fine; the tracker re-detects when
        it loses the body)."""
        if not self._pose_enabled:
            return None
        frame.flags.writeable = False
        t = time.perf_counter()
        if self._pose is None:
            import mediapipe as mp

            self._pose = mp.solutions.pose.Pose(static_image_mode=self._pose_static, model_complexity=1)
        res = self._pose.process(frame)
        joints = None
        if res.pose_landmarks:
            joints = np.array([(p.x, p.y, p.z, p.visibility) for p in res.pose_landmarks.landmark], dtype=np.float32)
        self.timing["pose"] += time.perf_counter() - t
        return joints

    def pose_clip(self, frames, face_boxes=None) -> list[np.ndarray | None]:
        """Joints on a few frames of one clip, in time order, with one body detection whose
        region follows ``face_boxes`` (:class:`ClipPose`); None per frame when no body is found
        or pose is off (as :meth:`pose`)."""
        if not self._pose_enabled:
            return [None] * len(frames)
        t = time.perf_counter()
        if self._clip_pose is None:
            self._clip_pose = ClipPose()
        out = self._clip_pose(frames, face_boxes)
        self.timing["pose"] += time.perf_counter() - t
        return out

    def close(self) -> None:
        for graph in (self._mesh, self._detector, self._pose, self._clip_pose):
            if graph is not None:
                graph.close()

    def __enter__(self) -> FrameAnalyzer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stack_results(results: list[FrameResult]) -> dict[str, np.ndarray]:
    """Per-frame results → arrays for one clip of F frames.

    Frames where the mesh lost the face get the landmarks of the nearest frame that has them
    (``face_found`` says which are real), so every frame has a lip mask: a clip passes the
    face filter only when almost all frames have a face, and a gap of a frame or two is a
    blink of the tracker, not a face that left.

    Returns:
        face (F, 478, 3) float32 pixels; face_found (F,) bool; face_box (F, 4) float32 pixels
        (x0, y0, x1, y1, the landmarks' extent); face_conf (F,) float32; num_faces (F,) uint8;
        second_face (F,) float32 (:attr:`FrameResult.second_face`); second_box (F, 4) float32
        pixels, NaN without a second face; pose (F, 33, 4) float32, NaN where pose was not run
        or found nothing.
    """
    n = len(results)
    found = np.array([r.face is not None for r in results])
    face = np.zeros((n, NUM_FACE_LANDMARKS, 3), dtype=np.float32)
    if found.any():
        idx = np.flatnonzero(found)
        for i, r in enumerate(results):
            src = r if r.face is not None else results[idx[np.argmin(np.abs(idx - i))]]
            face[i] = src.face
    box = np.concatenate([face[..., :2].min(axis=1), face[..., :2].max(axis=1)], axis=1)
    pose = np.full((n, NUM_POSE_JOINTS, 4), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if r.pose is not None:
            pose[i] = r.pose
    return {
        "face": face,
        "face_found": found,
        "face_box": box.astype(np.float32),
        "face_conf": np.array([r.confidence for r in results], dtype=np.float32),
        "num_faces": np.array([min(r.num_faces, 255) for r in results], dtype=np.uint8),
        "second_face": np.array([r.second_face for r in results], dtype=np.float32),
        "second_box": np.array([r.second_box or (np.nan,) * 4 for r in results], dtype=np.float32).reshape(n, 4),
        "pose": pose,
    }


def lip_masks(face: np.ndarray, face_box: np.ndarray, height: int, width: int, dilation_frac: float) -> np.ndarray:
    """Per-frame lip masks: (F, H, W) bool from (F, 478, 3) pixel landmarks and (F, 4) face boxes.

    The mask is the filled outer-lip polygon (``LIP_OUTER``; the inner contour lies inside it)
    grown by ``dilation_frac × face width`` pixels (every pixel within that Euclidean distance of
    the polygon), then cut to the face box.

    Why dilate: the lip-tracing loss should weight every pixel that moves with speech — the
    lips, but also the chin, the jaw line under the lips and the cheeks beside the mouth
    corners. Scaling the dilation with face width keeps that region the same *part of the face*
    whatever the face size. The default 0.15 reaches from the nose base to the chin on a frontal
    face. Why cut to the face box: the loss weight must not spill onto hair, collar or
    background, which do not move with the audio.
    """
    n = face.shape[0]
    masks = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        x0, y0, x1, y1 = face_box[i]
        radius = max(1, int(round(dilation_frac * (x1 - x0))))
        poly = face[i, list(LIP_OUTER), :2]
        # Work in a small window around the lips (the rest of the frame stays False).
        lo = np.floor(poly.min(axis=0)).astype(int) - radius - 1
        hi = np.ceil(poly.max(axis=0)).astype(int) + radius + 2
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, [width, height])
        # ... and write only its part inside the face box.
        cut_lo = np.maximum(lo, [int(np.floor(x0)), int(np.floor(y0))])
        cut_hi = np.minimum(hi, [int(np.ceil(x1)) + 1, int(np.ceil(y1)) + 1])
        if (hi <= lo).any() or (cut_hi <= cut_lo).any():
            continue  # lips entirely outside the frame or the box
        outside = np.ones((hi[1] - lo[1], hi[0] - lo[0]), dtype=np.uint8)
        pts = np.round((poly - lo) * 4).astype(np.int32)  # 2 fractional bits (shift=2)
        cv2.fillPoly(outside, [pts], 0, lineType=cv2.LINE_8, shift=2)
        # Distance to the polygon (exact Euclidean transform) rather than a dilation with a
        # disc kernel: the same disc, but the cost is linear in the window's pixels instead of
        # × the kernel's (0.12 vs 0.25 ms/frame for a 90 px face, 0.4 vs 3 ms for a 270 px one).
        dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        (cx0, cy0), (cx1, cy1) = cut_lo - lo, cut_hi - lo
        # Pixel distances are √(integer) but come back ±1 ulp, not the same ulp from call to
        # call; cutting halfway between r² and r² + 1 makes the mask exact and repeatable.
        within = dist[cy0:cy1, cx0:cx1] <= np.sqrt(radius**2 + 0.5)
        masks[i, cut_lo[1] : cut_hi[1], cut_lo[0] : cut_hi[0]] = within
    return masks


def landmark_motion(face: np.ndarray, found: np.ndarray) -> float | None:
    """ω_l (raw): how much the face moves *within itself* over a clip. Dimensionless.

    From the (F, 478, 3) pixel landmarks of frames where the face was found, per frame: subtract
    the landmarks' centroid (head translation) and divide by their RMS distance to it (head
    scale, i.e. moving towards the camera). Then take each landmark's variance over time (x and
    y summed) and average over the 478 landmarks. Units: (fraction of the face's RMS radius)².
    Head rotation is kept on purpose: nodding and turning are part of the expressiveness the
    model is asked to control. z is left out: mediapipe's depth is a guess from one image.
    Returns None with fewer than 2 frames with a face.
    """
    pts = face[found, :, :2].astype(np.float64)
    if len(pts) < 2:
        return None
    centred = pts - pts.mean(axis=1, keepdims=True)
    scale = np.sqrt(np.mean(np.sum(centred**2, axis=-1), axis=1))
    norm = centred / scale[:, None, None]
    return float(norm.var(axis=0).sum(axis=-1).mean())


#: A joint counts on a frame only when mediapipe is this sure it sees it. At 0.5, joints it guesses
#: (hands and elbows below the frame) flicker in and out, and as they move far more than the seen
#: ones, which frames pose ran on decided ω_b: on 16 swaying test clips every 4th frame ranked
#: clips against every frame at Spearman 0.88 (one clip 5.8x off); at 0.8, 0.97 (0.94 for 6
#: static samples a clip). bench/prep_throughput.md, "ω_b fidelity".
BODY_MIN_VISIBILITY = 0.8


def body_motion(
    pose: np.ndarray, width: int, height: int, min_visibility: float = BODY_MIN_VISIBILITY,
    min_valid_frac: float = 0.5,
) -> float | None:
    """ω_b (raw): variance of upper-body joints over a clip, in (shoulder widths)². Dimensionless.

    ``pose`` is (F, 33, 4) (x, y in [0, 1] of width/height, z, visibility), NaN where not run.
    Joints in ``UPPER_BODY_JOINTS`` visible (≥ ``min_visibility``) in at least
    ``min_valid_frac`` of the frames where pose ran contribute the variance of their (x, y) in
    pixels (frame ``width`` × ``height``) over time, summed over x and y, divided by the median
    squared shoulder width in pixels (so a person near the camera does not count as moving
    more); the mean over joints is returned.
    Translation is kept: swaying and gesturing are body motion. Returns None when no body is
    seen in most frames or the shoulders are not visible (the datamodule then uses the
    dataset median).
    """
    ran = ~np.isnan(pose[:, 0, 0])
    if ran.sum() < 2:
        return None
    p = pose[ran].astype(np.float64)
    p[..., 0] *= width
    p[..., 1] *= height
    vis = p[..., 3] >= min_visibility
    shoulders = vis[:, 11] & vis[:, 12]
    if shoulders.mean() < min_valid_frac:
        return None
    shoulder = np.median(np.linalg.norm(p[shoulders, 11, :2] - p[shoulders, 12, :2], axis=-1))
    if shoulder <= 0:
        return None
    variances = []
    for j in UPPER_BODY_JOINTS:
        ok = vis[:, j]
        if ok.mean() >= min_valid_frac and ok.sum() >= 2:
            variances.append(p[ok, j, :2].var(axis=0).sum())
    if not variances:
        return None
    return float(np.mean(variances) / shoulder**2)


def detect_face_boxes(
    frames, min_confidence: float = 0.5, model_selection: int = 1
) -> list[np.ndarray]:
    """Every face the mediapipe detector finds in each frame, independently (no tracking).

    For metrics that build their own face tracks (Sync-C/D's track pipeline). ``frames``: an
    iterable of (H, W, 3) uint8 RGB frames. Returns one ``(n, 5)`` float32 array per frame:
    ``x1, y1, x2, y2`` in pixels and the detector score (``n`` may be 0).
    """
    import mediapipe as mp

    out: list[np.ndarray] = []
    with mp.solutions.face_detection.FaceDetection(
        model_selection=model_selection, min_detection_confidence=min_confidence
    ) as det:
        for frame in frames:
            frame = np.ascontiguousarray(frame)
            h, w = frame.shape[:2]
            res = det.process(frame)
            boxes = []
            for d in res.detections or []:
                b = d.location_data.relative_bounding_box
                x1, y1 = b.xmin * w, b.ymin * h
                boxes.append((x1, y1, x1 + b.width * w, y1 + b.height * h, d.score[0]))
            out.append(np.array(boxes, dtype=np.float32).reshape(-1, 5))
    return out
