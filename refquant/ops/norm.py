"""Normalizations and Dropout: BatchNormalization, InstanceNormalization, LayerNormalization,
GroupNormalization, LpNormalization, MeanVarianceNormalization, Dropout."""

from __future__ import annotations

import numpy as np

from .. import parallel
from .registry import register, register_inplace
from .shapes import TensorInfo, same_as_first


def _channel(v, ndim):
    """A per-channel vector shaped to broadcast over [N, C, *spatial]."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@register("BatchNormalization", since=1, infer=same_as_first)
def batch_normalization(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, noutputs=1):
    """y = (x - mean) / sqrt(var + epsilon) * scale + bias, per channel (axis 1).

    training_mode=1: mean/var are the batch's (biased variance), and the running statistics
    running = input * momentum + batch * (1 - momentum) are returned too.
    """
    dtype = x.dtype
    if training_mode:
        axes = (0,) + tuple(range(2, x.ndim))
        batch_mean = x.mean(axis=axes, dtype=np.float64)
        batch_var = x.var(axis=axes, dtype=np.float64)
        a = scale / np.sqrt(batch_var + epsilon)
        y = (x - _channel(batch_mean, x.ndim)) * _channel(a, x.ndim) + _channel(bias, x.ndim)
        running_mean = mean * momentum + batch_mean * (1 - momentum)
        running_var = var * momentum + batch_var * (1 - momentum)
        return y.astype(dtype), running_mean.astype(mean.dtype), running_var.astype(var.dtype)
    a = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    b = bias.astype(np.float64) - mean.astype(np.float64) * a
    if a.ndim > 1:  # opset < 9 spatial=0: statistics per (C, *spatial) element
        return (x * a.astype(dtype)[None] + b.astype(dtype)[None]).astype(dtype)
    return _affine_into(np.empty_like(x), x, _channel(a.astype(dtype), x.ndim), _channel(b.astype(dtype), x.ndim))


def _affine_into(out, x, a, b):
    """out = x * a + b in one threaded pass over cache-sized blocks (rounded after the product, as before)."""

    def multiply_add(x, a, b, out):
        np.multiply(x, a, out=out)
        out += b

    return parallel.elementwise(multiply_add, out, x, a, b)


@register_inplace(batch_normalization)
def batch_normalization_inplace(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0,
                                noutputs=1):
    if training_mode or noutputs > 1 or x.dtype.kind != "f" or scale.ndim != 1:
        return None
    a = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    b = bias.astype(np.float64) - mean.astype(np.float64) * a
    return _affine_into(x, x, _channel(a.astype(x.dtype), x.ndim), _channel(b.astype(x.dtype), x.ndim))


@register("InstanceNormalization", since=1, infer=same_as_first)
def instance_normalization(x, scale, bias, *, epsilon=1e-5):
    """y = scale * (x - mean) / sqrt(var + epsilon) + bias, statistics per (n, c) over spatial dims."""
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    var = x.var(axis=axes, keepdims=True, dtype=np.float64)
    y = (x - mean) / np.sqrt(var + epsilon) * _channel(scale, x.ndim) + _channel(bias, x.ndim)
    return y.astype(x.dtype)


def _layer_norm_rule(x, scale=None, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    if x.shape is None:
        return TensorInfo(x.dtype, None)
    axis %= len(x.shape)
    stats = tuple(x.shape[:axis]) + (1,) * (len(x.shape) - axis)
    return TensorInfo(x.dtype, x.shape), TensorInfo(np.dtype(np.float32), stats), \
        TensorInfo(np.dtype(np.float32), stats)


@register("LayerNormalization", since=17, infer=_layer_norm_rule)
def layer_normalization(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1, noutputs=1):
    """y = (x - mean) / sqrt(var + epsilon) * scale + bias over the axes from ``axis`` on.

    Extra outputs: Mean and InvStdDev = 1 / sqrt(var + epsilon), with reduced axes kept as 1.
    """
    axis %= x.ndim
    axes = tuple(range(axis, x.ndim))
    stash = np.float32 if stash_type == 1 else x.dtype
    xs = x.astype(stash)
    mean = xs.mean(axis=axes, keepdims=True)
    centered = xs - mean
    inv_std = 1 / np.sqrt(np.mean(centered * centered, axis=axes, keepdims=True) + np.asarray(epsilon, stash))
    y = centered * inv_std * scale.astype(stash)
    if bias is not None:
        y = y + bias.astype(stash)
    y = y.astype(x.dtype)
    if noutputs == 1:
        return y
    return y, mean.astype(stash), inv_std.astype(stash)


def _group_norm(x, scale, bias, num_groups, epsilon, stash_type, per_channel):
    n, c = x.shape[:2]
    stash = np.float32 if stash_type == 1 else x.dtype
    grouped = x.astype(stash).reshape(n, num_groups, -1)
    mean = grouped.mean(axis=2, keepdims=True)
    var = grouped.var(axis=2, keepdims=True)
    normalized = ((grouped - mean) / np.sqrt(var + np.asarray(epsilon, stash))).reshape(x.shape)
    if not per_channel:  # opset 18: scale and bias are per group
        scale = np.repeat(scale, c // num_groups)
        bias = np.repeat(bias, c // num_groups)
    return (normalized * _channel(scale.astype(stash), x.ndim) + _channel(bias.astype(stash), x.ndim)).astype(x.dtype)


@register("GroupNormalization", since=18, infer=same_as_first)
def group_normalization_18(x, scale, bias, *, epsilon=1e-5, num_groups, stash_type=1):
    """Normalization over channel groups; opset 18 scales and shifts per group."""
    return _group_norm(x, scale, bias, num_groups, epsilon, stash_type, per_channel=False)


@register("GroupNormalization", since=21, infer=same_as_first)
def group_normalization(x, scale, bias, *, epsilon=1e-5, num_groups, stash_type=1):
    """Normalization over channel groups; from opset 21 scale and bias are per channel."""
    return _group_norm(x, scale, bias, num_groups, epsilon, stash_type, per_channel=True)


def _dropout_rule(x, ratio=None, training_mode=None, *, seed=None):
    return TensorInfo(x.dtype, x.shape), TensorInfo(np.dtype(bool), x.shape)


@register("LpNormalization", since=1, infer=same_as_first)
def lp_normalization(x, *, axis=-1, p=2):
    """y = x / ||x||_p along ``axis`` (p = 1 or 2); a zero norm gives 0, as onnxruntime."""
    norm = np.sum(np.abs(x), axis=axis, keepdims=True) if p == 1 else \
        np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm == 0, np.zeros((), x.dtype), x / norm).astype(x.dtype, copy=False)


@register("MeanVarianceNormalization", since=9, infer=same_as_first)
def mean_variance_normalization(x, *, axes=(0, 2, 3)):
    """y = (x - mean) / sqrt(mean(x^2) - mean^2) over ``axes`` (no epsilon, as the ONNX function body)."""
    axes = tuple(int(a) % x.ndim for a in axes)
    mean = np.mean(x, axis=axes, keepdims=True)
    variance = np.mean(np.square(x), axis=axes, keepdims=True) - np.square(mean)
    return ((x - mean) / np.sqrt(variance)).astype(x.dtype, copy=False)


@register("Dropout", since=12, infer=_dropout_rule)
def dropout(x, ratio=None, training_mode=None, *, seed=None, noutputs=1):
    """Inference: y = x, mask all True. Training: y = x * mask / (1 - ratio), mask ~ Bernoulli(1 - ratio)."""
    training = training_mode is not None and bool(np.asarray(training_mode))
    rate = 0.5 if ratio is None else float(np.asarray(ratio))
    if not training or rate == 0:
        return (x, np.ones(x.shape, dtype=bool)) if noutputs > 1 else x
    rng = np.random.default_rng(seed)
    mask = rng.random(x.shape) >= rate
    y = (x * mask / np.asarray(1 - rate, x.dtype)).astype(x.dtype)
    return (y, mask) if noutputs > 1 else y
