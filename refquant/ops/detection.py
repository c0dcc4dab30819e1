"""Detection post-processing: NonMaxSuppression (what detectors exported with their NMS end in)."""

from __future__ import annotations

import numpy as np

from .registry import register
from .shapes import TensorInfo


def _corners(boxes: np.ndarray, center_point_box: int) -> np.ndarray:
    """[N, 4] boxes as (y_min, x_min, y_max, x_max) in float32, from either ONNX box encoding:
    0: two opposite corners (y1, x1, y2, x2) in any order; 1: (x_center, y_center, width, height)."""
    b = boxes.astype(np.float32, copy=False)
    if center_point_box:
        half_w, half_h = b[:, 2] / np.float32(2), b[:, 3] / np.float32(2)
        return np.stack([b[:, 1] - half_h, b[:, 0] - half_w, b[:, 1] + half_h, b[:, 0] + half_w], axis=1)
    return np.stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                     np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])], axis=1)


def _suppresses(kept: np.ndarray, box: np.ndarray, iou_threshold: np.float32) -> bool:
    """Whether any kept box overlaps ``box`` with IoU > iou_threshold, as onnxruntime's SuppressByIOU:
    an empty box (area <= 0) or no overlap never suppresses; float32 arithmetic throughout."""
    if not len(kept):
        return False
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    area_kept = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
    inter_h = np.minimum(kept[:, 2], box[2]) - np.maximum(kept[:, 0], box[0])
    inter_w = np.minimum(kept[:, 3], box[3]) - np.maximum(kept[:, 1], box[1])
    intersection = inter_h * inter_w
    union = area_kept + area_box - intersection
    valid = (area_box > 0) & (area_kept > 0) & (inter_h > 0) & (inter_w > 0) & (union > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
    return bool(np.any(valid & (iou > iou_threshold)))


@register("NonMaxSuppression", since=10, infer=lambda *a, **k: TensorInfo(np.dtype(np.int64), (None, 3)))
def non_max_suppression(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None, score_threshold=None,
                        *, center_point_box=0):
    """selected [K, 3] = (batch, class, box) rows: per batch and class, boxes with score > score_threshold
    taken greedily by descending score (equal scores: the lower box index first), each kept unless its
    IoU with an already kept box of that class exceeds iou_threshold, at most max_output_boxes_per_class
    of them (0 or absent: none). Rows are ordered by batch, class, then selection."""
    limit = 0 if max_output_boxes_per_class is None else int(np.asarray(max_output_boxes_per_class).reshape(-1)[0])
    iou_limit = np.float32(0 if iou_threshold is None else np.asarray(iou_threshold).reshape(-1)[0])
    rows = []
    if limit > 0:
        for b in range(scores.shape[0]):
            corners = _corners(boxes[b], center_point_box)
            for c in range(scores.shape[1]):
                s = scores[b, c].astype(np.float32, copy=False)
                candidates = np.arange(s.size)
                if score_threshold is not None:
                    candidates = candidates[s > np.float32(np.asarray(score_threshold).reshape(-1)[0])]
                order = candidates[np.lexsort((candidates, -s[candidates]))]  # score down, index up
                kept: list[int] = []
                for i in order:
                    if len(kept) == limit:
                        break
                    if not _suppresses(corners[kept], corners[i], iou_limit):
                        kept.append(int(i))
                rows.extend((b, c, i) for i in kept)
    return np.array(rows, dtype=np.int64).reshape(-1, 3)
