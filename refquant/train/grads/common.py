"""Helpers shared by the backward families: broadcasting reduction, dtype handling, zero cotangents."""

from __future__ import annotations

import numpy as np


def compute_dtype(x: np.ndarray):
    """float64 stays float64 (the gradient tests); every other float computes in float32, as the forward does."""
    return np.float64 if x.dtype == np.float64 else np.float32


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``grad`` over the axes NumPy broadcasting added or stretched, so it has ``shape``.

    The adjoint of broadcasting ``x`` of ``shape`` to ``grad.shape``: leading axes are summed away,
    axes where ``shape`` has 1 are summed with keepdims.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, d in enumerate(shape) if d == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def like(grad: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``grad`` with the element type of the input it belongs to (float32 in, float32 out)."""
    return grad if grad.dtype == x.dtype else grad.astype(x.dtype)


def input_grad(grad: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """The gradient of input ``x`` from a broadcast result's gradient: reduced to x's shape, x's type;
    None for a non-float input (an index or shape computation has no gradient)."""
    if np.asarray(x).dtype.kind != "f":
        return None
    return like(unbroadcast(grad, x.shape), x)


def is_float(x) -> bool:
    return x is not None and np.asarray(x).dtype.kind == "f"


def output_grads(grads_out, outputs) -> list:
    """One array per output, zeros where an output does not reach the loss (grads_out entry None)."""
    return [np.zeros(np.shape(y), dtype=np.asarray(y).dtype) if g is None else g
            for g, y in zip(grads_out, outputs)]
