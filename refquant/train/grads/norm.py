"""Backward of the normalizations: BatchNormalization (inference and training form), LayerNormalization,
InstanceNormalization, GroupNormalization, and Dropout.

The normalized-statistics gradient used by the training forms: with xhat = (x - mean) * r,
r = 1 / sqrt(var + eps), mean and var (biased) taken over M elements, and g = dL/dxhat,
  dL/dx = r * (g - mean(g) - xhat * mean(g * xhat))          (means over the same M elements).
"""

from __future__ import annotations

import numpy as np

from ...errors import RefquantError
from ..backward_registry import register_backward
from .common import compute_dtype, input_grad, like, output_grads


def _channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _normalized_grad(g, xhat, r, axes):
    """dL/dx from dL/dxhat = g for xhat = (x - mean(x)) * r with r = 1/sqrt(var(x) + eps) over ``axes``."""
    mean_g = g.mean(axis=axes, keepdims=True)
    mean_gx = (g * xhat).mean(axis=axes, keepdims=True)
    return r * (g - mean_g - xhat * mean_gx)


@register_backward("BatchNormalization")
def batch_normalization_backward(grads_out, inputs, outputs, *, epsilon=1e-5, momentum=0.9, training_mode=0,
                                 noutputs=1):
    """Inference form y = (x - mean) * r * scale + bias, r = 1/sqrt(var + eps), per channel:
      dx = gy * scale * r, dscale = sum gy * xhat, dbias = sum gy, dmean = -sum gy * scale * r,
      dvar = -1/2 sum gy * scale * (x - mean) * r^3.
    Training form: mean/var are the batch's, so dx goes through them (module docstring); the running
    statistics outputs (input * momentum + batch * (1 - momentum)) pass their gradients on too.
    """
    x, scale, bias, mean, var = inputs[:5]
    dtype = compute_dtype(x)
    gy = output_grads(grads_out[:1], outputs[:1])[0].astype(dtype, copy=False)
    xd = x.astype(dtype, copy=False)
    if not training_mode:
        per_element = scale.ndim > 1  # opset < 9 spatial=0: statistics per (C, *spatial) element
        view = (lambda v: v.astype(dtype)[None]) if per_element else (lambda v: _channel(v.astype(dtype), x.ndim))
        axes = (0,) if per_element else (0,) + tuple(range(2, x.ndim))
        r = 1 / np.sqrt(view(var) + np.asarray(epsilon, dtype))
        centered = xd - view(mean)
        gs = gy * view(scale)
        gx = gs * r
        sum_gy = gy.sum(axis=axes)
        gscale = (gy * centered * r).sum(axis=axes)
        gmean = -(gx.sum(axis=axes))
        gvar = -0.5 * (gs * centered * r ** 3).sum(axis=axes)
        return [like(gx, x), like(gscale.reshape(scale.shape), scale), like(sum_gy.reshape(bias.shape), bias),
                like(gmean.reshape(mean.shape), mean), like(gvar.reshape(var.shape), var)]
    axes = (0,) + tuple(range(2, x.ndim))
    count = x.size // x.shape[1]
    batch_mean = xd.mean(axis=axes, keepdims=True)
    centered = xd - batch_mean
    batch_var = (centered * centered).mean(axis=axes, keepdims=True)
    r = 1 / np.sqrt(batch_var + np.asarray(epsilon, dtype))
    xhat = centered * r
    gx = _normalized_grad(gy * _channel(scale.astype(dtype), x.ndim), xhat, r, axes)
    gscale = (gy * xhat).sum(axis=axes)
    gbias = gy.sum(axis=axes)
    g_run_mean = grads_out[1] if len(grads_out) > 1 else None
    g_run_var = grads_out[2] if len(grads_out) > 2 else None
    gmean_in = np.zeros(mean.shape, dtype=dtype)
    gvar_in = np.zeros(var.shape, dtype=dtype)
    if g_run_mean is not None:  # running_mean = mean * momentum + batch_mean * (1 - momentum)
        gmean_in = g_run_mean * momentum
        gx = gx + _channel(g_run_mean.astype(dtype), x.ndim) * ((1 - momentum) / count)
    if g_run_var is not None:  # running_var = var * momentum + batch_var * (1 - momentum); d var/dx = 2 (x - mu)/M
        gvar_in = g_run_var * momentum
        gx = gx + _channel(g_run_var.astype(dtype), x.ndim) * (2 * (1 - momentum) / count) * centered
    return [like(gx, x), like(gscale.reshape(scale.shape), scale), like(gbias.reshape(bias.shape), bias),
            like(np.asarray(gmean_in), mean), like(np.asarray(gvar_in), var)]


@register_backward("LayerNormalization")
def layer_normalization_backward(grads_out, inputs, outputs, *, axis=-1, epsilon=1e-5, stash_type=1, noutputs=1):
    """y = xhat * scale + bias over the axes from ``axis`` on; the optional Mean and InvStdDev outputs
    pass their gradients on too (d mean/dx = 1/M, d r/dx = -r^3 (x - mean) / M)."""
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    dtype = compute_dtype(x)
    axis %= x.ndim
    axes = tuple(range(axis, x.ndim))
    count = int(np.prod(x.shape[axis:]))
    xd = x.astype(dtype, copy=False)
    gy = output_grads(grads_out[:1], outputs[:1])[0].astype(dtype, copy=False)
    mean = xd.mean(axis=axes, keepdims=True)
    centered = xd - mean
    r = 1 / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + np.asarray(epsilon, dtype))
    xhat = centered * r
    gx = _normalized_grad(gy * scale.astype(dtype), xhat, r, axes)
    if len(grads_out) > 1 and grads_out[1] is not None:
        gx = gx + grads_out[1].astype(dtype) / count
    if len(grads_out) > 2 and grads_out[2] is not None:
        gx = gx - grads_out[2].astype(dtype) * r ** 3 * centered / count
    gscale = input_grad(gy * xhat, scale)
    gbias = None if bias is None else input_grad(gy, bias)
    return [like(gx, x), gscale, gbias][:len(inputs)]


@register_backward("InstanceNormalization")
def instance_normalization_backward(grads_out, inputs, outputs, *, epsilon=1e-5):
    """y = xhat * scale[c] + bias[c], statistics per (n, c) over the spatial dims."""
    x, scale, bias = inputs
    dtype = compute_dtype(x)
    axes = tuple(range(2, x.ndim))
    xd = x.astype(dtype, copy=False)
    gy = grads_out[0].astype(dtype, copy=False)
    centered = xd - xd.mean(axis=axes, keepdims=True)
    r = 1 / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + np.asarray(epsilon, dtype))
    xhat = centered * r
    gx = _normalized_grad(gy * _channel(scale.astype(dtype), x.ndim), xhat, r, axes)
    sum_axes = (0,) + axes
    return [like(gx, x), like((gy * xhat).sum(axis=sum_axes), scale), like(gy.sum(axis=sum_axes), bias)]


def _group_norm_backward(grads_out, inputs, epsilon, num_groups, per_channel):
    x, scale, bias = inputs
    dtype = compute_dtype(x)
    n, c = x.shape[:2]
    grouped = x.astype(dtype, copy=False).reshape(n, num_groups, -1)
    centered = grouped - grouped.mean(axis=2, keepdims=True)
    r = 1 / np.sqrt((centered * centered).mean(axis=2, keepdims=True) + np.asarray(epsilon, dtype))
    xhat = (centered * r).reshape(x.shape)
    gy = grads_out[0].astype(dtype, copy=False)
    full_scale = scale if per_channel else np.repeat(scale, c // num_groups)
    g_xhat = (gy * _channel(full_scale.astype(dtype), x.ndim)).reshape(n, num_groups, -1)
    gx = _normalized_grad(g_xhat, xhat.reshape(n, num_groups, -1), r, (2,)).reshape(x.shape)
    sum_axes = (0,) + tuple(range(2, x.ndim))
    gscale = (gy * xhat).sum(axis=sum_axes)
    gbias = gy.sum(axis=sum_axes)
    if not per_channel:
        gscale = gscale.reshape(num_groups, -1).sum(axis=1)
        gbias = gbias.reshape(num_groups, -1).sum(axis=1)
    return [like(gx, x), like(gscale, scale), like(gbias, bias)]


@register_backward("GroupNormalization")
def group_normalization_backward(grads_out, inputs, outputs, *, epsilon=1e-5, num_groups, stash_type=1):
    """Statistics per (n, group); scale/bias per channel (opset 21) or per group (opset 18), told apart by
    their length."""
    per_channel = inputs[1].size == inputs[0].shape[1]  # when C == num_groups the two forms coincide
    return _group_norm_backward(grads_out, inputs, epsilon, num_groups, per_channel)


@register_backward("Dropout")
def dropout_backward(grads_out, inputs, outputs, *, seed=None, noutputs=1):
    """Inference: dx = gy. Training: dx = gy * mask / (1 - ratio), the mask read from the Mask output or,
    with a seed, regenerated exactly as the forward drew it."""
    x = inputs[0]
    ratio = inputs[1] if len(inputs) > 1 else None
    training_mode = inputs[2] if len(inputs) > 2 else None
    grads = [like(grads_out[0], x)] + [None] * (len(inputs) - 1)
    training = training_mode is not None and bool(np.asarray(training_mode))
    rate = 0.5 if ratio is None else float(np.asarray(ratio))
    if not training or rate == 0:
        return grads
    if len(outputs) > 1 and outputs[1] is not None:
        mask = outputs[1]
    elif seed is not None:
        mask = np.random.default_rng(seed).random(x.shape) >= rate
    else:
        raise RefquantError("Dropout in training mode without a seed or a Mask output: its mask cannot be "
                            "recovered for the backward pass; give the node a seed or a second output")
    grads[0] = like(grads_out[0] * mask / np.asarray(1 - rate, grads_out[0].dtype), x)
    return grads
