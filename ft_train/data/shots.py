"""Shot cuts in frames already decoded: no ft-prep clip spans two shots (two speakers), and no
Sync-C/D face track does.

FFmpeg's own scene-change score (the ``select`` filter's ``scene`` variable: the mean absolute
difference of a frame from the one before, less the motion the previous pair already had, in
[0, 1]) run through PyAV's filter graph on RGB frames already decoded: a maintained
detector, ~0.2 ms a 512 px frame, no second decode. PySceneDetect was the first choice, but its
wheel requires the ``opencv-python`` wheel, a second OpenCV beside the ``opencv-contrib-python``
that mediapipe needs (two wheels writing one ``cv2`` package).
"""

from __future__ import annotations

from fractions import Fraction

import av
import cv2
import numpy as np

#: ``scene_detector`` values: ``ffmpeg_scene`` (FFmpeg's scene score) or ``none`` (no cut detection).
SCENE_DETECTORS = ("ffmpeg_scene", "none")


class ShotCuts:
    """Feed frames in order; ``__call__`` says whether a frame starts a new shot.

    Args:
        threshold: scene score above which a frame is a cut (``scene_threshold``; FFmpeg's docs
            suggest 0.3-0.4; a talking head moving scores < 0.05, a cut between two faces > 0.4).
        downscale: score the frame shrunk n× (nearest neighbour, ``scene_downscale``). The score is a
            mean over pixels, so 2 changed it by < 0.0001 on the shipped sample and costs a
            quarter of the full frame's time.
    """

    def __init__(self, threshold: float, downscale: int = 1):
        if downscale < 1:
            raise ValueError(f"downscale={downscale} must be ≥ 1")
        self.threshold = threshold
        self.downscale = downscale
        self._graph = None
        self._shape = None
        self._index = 0

    def _build(self, height: int, width: int) -> None:
        graph = av.filter.Graph()
        src = graph.add_buffer(width=width, height=height, format="rgb24", time_base=Fraction(1, 25))
        # Only frames whose score passes the threshold come out of the filter.
        select = graph.add("select", f"gt(scene\\,{self.threshold})")
        sink = graph.add("buffersink")
        src.link_to(select)
        select.link_to(sink)
        graph.configure()
        self._graph, self._shape = graph, (height, width)

    def __call__(self, frame: np.ndarray) -> bool:
        """``frame`` (H, W, 3) uint8 RGB; True when it is the first frame of a new shot."""
        if self.downscale > 1:  # = frame[::n, ::n], but numpy's strided copy is 10x slower
            h, w = frame.shape[:2]
            n = self.downscale
            frame = cv2.resize(frame, (-(-w // n), -(-h // n)), interpolation=cv2.INTER_NEAREST)
        if self._shape != frame.shape[:2]:
            self._build(*frame.shape[:2])
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts, vf.time_base = self._index, Fraction(1, 25)
        self._index += 1
        self._graph.push(vf)
        cut = False
        while True:
            try:
                cut = self._graph.pull().pts == self._index - 1 or cut
            except (av.BlockingIOError, av.EOFError):
                return cut and self._index > 1
