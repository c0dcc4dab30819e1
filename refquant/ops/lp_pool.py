"""Lp pooling: LpPool and GlobalLpPool, y = (sum over the window of |x|^p)^(1/p)."""

from __future__ import annotations

import numpy as np

from .nn import conv_geometry
from .registry import register
from .shapes import TensorInfo


def _compute_dtype(x):
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _lp_pool(x, kernel_shape, p, strides, dilations, pads, auto_pad, ceil_mode):
    if kernel_shape is None or len(kernel_shape) != x.ndim - 2:
        raise ValueError(f"kernel_shape {kernel_shape} must give one size per spatial dim of X {x.shape}")
    n_spatial = x.ndim - 2
    strides = list(strides or [1] * n_spatial)
    dilations = list(dilations or [1] * n_spatial)
    begin, end, out = conv_geometry(list(x.shape[2:]), kernel_shape, strides, dilations, pads, auto_pad,
                                    bool(ceil_mode), pool=True)
    dtype = _compute_dtype(x)
    powered = np.abs(x.astype(dtype, copy=False)) ** dtype.type(p)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations)]
    # zeros (which add nothing to the sum) before, after, and as far as the last ceil-mode window reaches
    reach = [(o - 1) * s + e for o, s, e in zip(out, strides, extent)]
    widths = [(b, max(r - b - i, 0)) for b, r, i in zip(begin, reach, x.shape[2:])]
    padded = np.pad(powered, [(0, 0), (0, 0)] + widths)
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, x.ndim)))
    picked = windows[(slice(None), slice(None)) + tuple(slice(0, o * s, s) for o, s in zip(out, strides))
                     + tuple(slice(None, None, d) for d in dilations)]
    total = picked.sum(axis=tuple(range(x.ndim, 2 * x.ndim - 2)))
    return (total ** dtype.type(1.0 / p)).astype(x.dtype, copy=False)


def _lp_pool_rule(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, p=2, pads=None,
                  strides=None):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    spatial = list(x.shape[2:])
    if all(isinstance(d, int) for d in spatial):
        _, _, out = conv_geometry(spatial, kernel_shape, strides, dilations, pads, auto_pad, bool(ceil_mode), True)
    else:
        out = [None] * len(spatial)
    return TensorInfo(x.dtype, (x.shape[0], x.shape[1], *out))


@register("LpPool", since=1, infer=_lp_pool_rule)
def lp_pool_1(x, *, auto_pad="NOTSET", kernel_shape=None, p=2.0, pads=None, strides=None):
    """Opset 1: p is a float attribute."""
    return _lp_pool(x, kernel_shape, p, strides, None, pads, auto_pad, 0)


@register("LpPool", since=2, infer=_lp_pool_rule)
def lp_pool_2(x, *, auto_pad="NOTSET", kernel_shape=None, p=2, pads=None, strides=None):
    """Opsets 2-17: integer p, no dilations or ceil_mode."""
    return _lp_pool(x, kernel_shape, p, strides, None, pads, auto_pad, 0)


@register("LpPool", since=18, infer=_lp_pool_rule)
def lp_pool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, p=2, pads=None,
            strides=None):
    """y = (sum over each (dilated, strided) window of |x|^p)^(1/p); padding contributes nothing."""
    return _lp_pool(x, kernel_shape, p, strides, dilations, pads, auto_pad, ceil_mode)


@register("GlobalLpPool", since=1, infer=lambda x, **a: TensorInfo(
    x.dtype, None if x.shape is None else tuple(x.shape[:2]) + (1,) * (len(x.shape) - 2)))
def global_lp_pool(x, *, p=2):
    """y[n, c] = (sum over all spatial positions of |x[n, c]|^p)^(1/p)"""
    dtype = _compute_dtype(x)
    powered = np.abs(x.astype(dtype, copy=False)) ** dtype.type(p)
    total = powered.sum(axis=tuple(range(2, x.ndim)), keepdims=True)
    return (total ** dtype.type(1.0 / p)).astype(x.dtype, copy=False)
