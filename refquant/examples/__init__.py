"""Example model and data that ship with refquant (no network needed).

* ``mtcnn_rnet.onnx``: MTCNN R-Net, facenet-pytorch 2.6.0 weights (MIT licence), opset 17,
  input [b,3,24,24] = (RGB - 127.5) / 128, outputs face probability (Softmax) and box regression.
* ``lfw_subset.npy``: 200 gray 25x25 LFW crops in [0, 1] (scikit-image's ``lfw_subset``);
  the first 100 are faces, the last 100 are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RNET = HERE / "mtcnn_rnet.onnx"
LFW = HERE / "lfw_subset.npy"


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [n, h, w] images with half-pixel centres: x_src = (x + 0.5) * in / out - 0.5."""
    n, h, w = images.shape

    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        matrix = np.zeros((n_out, n_in))
        matrix[np.arange(n_out), lo] += 1 - frac
        matrix[np.arange(n_out), hi] += frac
        return matrix

    rows, cols = taps(h, size), taps(w, size)
    return np.einsum("oh,nhw,pw->nop", rows, images, cols).astype(np.float32)


def lfw_rnet_inputs() -> tuple[np.ndarray, np.ndarray]:
    """(inputs [200,3,24,24] float32 preprocessed for R-Net, labels [200]: 1 face, 0 not)."""
    gray = np.load(LFW).astype(np.float64)
    faces = resize_bilinear(gray, 24)
    x = ((faces * 255.0 - 127.5) / 128.0).astype(np.float32)
    x = np.repeat(x[:, None], 3, axis=1)
    labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    return x, labels
