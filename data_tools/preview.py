"""Preview images for people: what ft-prep kept, and why it dropped what it dropped.

Each frame is drawn at ≥ 256 px (smaller frames are scaled up first, so the overlays stay
readable): the lip mask tinted and outlined, the 40 lip landmarks, the face box, and for a
``multiple_faces`` reject the competing second face's box.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ft_train.data.face import LIP_INDICES

MIN_SIDE = 256  # px: the smaller side of each drawn frame
MASK_RGB = (255, 40, 40)
LIPS_RGB = (255, 255, 0)
BOX_RGB = (0, 160, 255)
SECOND_RGB = (255, 0, 255)


def draw_frame(
    frame: np.ndarray,
    face: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    second_box: np.ndarray | None = None,
    label: str | None = None,
) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame scaled to ≥ ``MIN_SIDE`` px with overlays: mask tinted and
    outlined red, lip landmarks yellow, face box blue, a second face's box magenta, ``label``
    written top left. ``face`` (478, 3) pixels, ``box``/``second_box`` (4,) pixels (NaN: none),
    ``mask`` (H, W) bool — all in the frame's own pixels."""
    h, w = frame.shape[:2]
    scale = max(1.0, MIN_SIDE / min(h, w))
    size = (int(round(w * scale)), int(round(h * scale)))
    out = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR) if scale > 1 else frame.copy()
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) if scale > 1 else mask.astype(np.uint8)
        sel = m.astype(bool)
        out[sel] = (0.65 * out[sel] + 0.35 * np.array(MASK_RGB, np.float32)).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, MASK_RGB, 2)
    if face is not None:
        for x, y in face[list(LIP_INDICES), :2] * scale:
            cv2.circle(out, (int(round(x)), int(round(y))), 2, LIPS_RGB, -1)
    for b, color in ((box, BOX_RGB), (second_box, SECOND_RGB)):
        if b is not None and np.isfinite(b).all():
            x0, y0, x1, y1 = (int(round(v * scale)) for v in b)
            cv2.rectangle(out, (x0, y0), (x1, y1), color, 2)
    if label:
        cv2.putText(out, label, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, label, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def save_preview(
    path: Path,
    frames: np.ndarray | list[np.ndarray],
    face: np.ndarray | None = None,
    box: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    count: int = 4,
    second_box: np.ndarray | None = None,
    labels: list[str] | None = None,
) -> None:
    """Write a JPEG strip of ``count`` evenly spaced frames of one clip, overlays drawn.

    Shapes: ``frames`` (F, H, W, 3) uint8 RGB (an array or a list of frames), ``face``
    (F, 478, 3), ``box``/``second_box`` (F, 4), ``masks`` (F, H, W); any overlay may be None.
    ``labels``: one per frame.
    """
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)

    def at(a, i):
        return None if a is None else a[i]

    strip = np.concatenate(
        [draw_frame(frames[i], at(face, i), at(box, i), at(masks, i), at(second_box, i),
                    labels[i] if labels else f"frame {i}") for i in idx],
        axis=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
