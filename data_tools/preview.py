"""Preview images for people: frames with the lip mask, landmarks and face box drawn over them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ft_train.data.face import LIP_INDICES


def draw_frame(frame: np.ndarray, face: np.ndarray, box: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame with overlays: mask tinted red, landmarks green (lips
    yellow), face box blue. ``face`` (478, 3) pixels, ``box`` (4,) pixels, ``mask`` (H, W) bool."""
    out = frame.copy()
    red = np.array([255, 0, 0], dtype=np.float32)
    out[mask] = (0.55 * out[mask] + 0.45 * red).astype(np.uint8)
    for x, y in face[:, :2]:
        cv2.circle(out, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1)
    for x, y in face[list(LIP_INDICES), :2]:
        cv2.circle(out, (int(round(x)), int(round(y))), 1, (255, 255, 0), -1)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    cv2.rectangle(out, (x0, y0), (x1, y1), (0, 128, 255), 1)
    return out


def save_preview(
    path: Path, frames: np.ndarray, face: np.ndarray, box: np.ndarray, masks: np.ndarray, count: int = 4
) -> None:
    """Write a JPEG strip of ``count`` evenly spaced frames of one clip, overlays drawn.

    Shapes: ``frames`` (F, H, W, 3) uint8 RGB, ``face`` (F, 478, 3), ``box`` (F, 4), ``masks`` (F, H, W).
    """
    idx = np.linspace(0, len(frames) - 1, count).round().astype(int)
    strip = np.concatenate([draw_frame(frames[i], face[i], box[i], masks[i]) for i in idx], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
