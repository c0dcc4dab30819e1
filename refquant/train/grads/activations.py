"""Backward of the activations and of Softmax / LogSoftmax.

Subgradients at kinks: at x = 0, LeakyRelu and PRelu take the x >= 0 branch (slope 1), the branch their
forward's ``where(x >= 0, ...)`` picks, and Relu takes 0; HardSigmoid and HardSwish pass the linear
piece's slope only strictly inside it.
"""

from __future__ import annotations

import numpy as np
import scipy.special

from ..backward_registry import register_backward
from .common import input_grad, like


def _f(value, like_array):
    return np.asarray(value, dtype=like_array.dtype)


def _elementwise(op_type, derivative):
    """Register the backward of y = f(x; attrs) with dy/dx = derivative(x, y, **attrs)."""

    @register_backward(op_type)
    def backward(grads_out, inputs, outputs, **attrs):
        x = inputs[0]
        with np.errstate(over="ignore"):
            return [like(grads_out[0] * derivative(x, outputs[0], **attrs), x)]

    backward.__name__ = f"{op_type.lower()}_backward"
    return backward


def _relu(x, y):
    return x > 0


def _leaky_relu(x, y, alpha=0.01):
    return np.where(x >= 0, _f(1, x), _f(alpha, x))


def _elu(x, y, alpha=1.0):
    return np.where(x > 0, _f(1, x), y + _f(alpha, x))  # alpha e^x = y + alpha on the negative side


def _celu(x, y, alpha=1.0):
    return np.where(x > 0, _f(1, x), np.exp(np.minimum(x, 0) / _f(alpha, x)))


def _selu(x, y, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return _f(gamma, x) * np.where(x > 0, _f(1, x), _f(alpha, x) * np.exp(np.minimum(x, 0)))


def _thresholded_relu(x, y, alpha=1.0):
    return x > _f(alpha, x)


def _sigmoid(x, y):
    return y * (1 - y)


def _hard_sigmoid(x, y, alpha=0.2, beta=0.5):
    linear = x * _f(alpha, x) + _f(beta, x)
    return np.where((linear > 0) & (linear < 1), _f(alpha, x), _f(0, x))


def _hard_swish(x, y):
    """y = x * clip(x/6 + 1/2, 0, 1): dy/dx = clip(.) + x/6 inside (-3, 3)"""
    linear = x / _f(6, x) + _f(0.5, x)
    inside = (linear > 0) & (linear < 1)
    return np.clip(linear, 0, 1) + np.where(inside, x / _f(6, x), _f(0, x))


def _softplus(x, y):
    return scipy.special.expit(x).astype(x.dtype, copy=False)


def _softsign(x, y):
    return 1 / np.square(1 + np.abs(x))


def _mish(x, y):
    """y = x tanh(sp(x)), sp = softplus: dy/dx = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)"""
    t = np.tanh(np.logaddexp(0, x))
    return t + x * (1 - t * t) * scipy.special.expit(x)


def _gelu(x, y, approximate="none"):
    if approximate == "tanh":
        c = np.sqrt(2 / np.pi)
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    return 0.5 * (1 + scipy.special.erf(x / np.sqrt(2))) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


for _op, _derivative in (("Relu", _relu), ("LeakyRelu", _leaky_relu), ("Elu", _elu), ("Celu", _celu),
                         ("Selu", _selu), ("ThresholdedRelu", _thresholded_relu), ("Sigmoid", _sigmoid),
                         ("HardSigmoid", _hard_sigmoid), ("HardSwish", _hard_swish), ("Softplus", _softplus),
                         ("Softsign", _softsign), ("Mish", _mish), ("Gelu", _gelu)):
    _elementwise(_op, _derivative)


@register_backward("PRelu")
def prelu_backward(grads_out, inputs, outputs):
    """y = x if x >= 0 else slope * x: dx = gy (x >= 0) or gy * slope; d slope = gy * x where x < 0, summed
    over the axes the slope was broadcast along."""
    x, slope = inputs
    gy = grads_out[0]
    negative = x < 0
    zero = np.zeros((), dtype=gy.dtype)
    gx = np.where(negative, gy * slope.astype(gy.dtype, copy=False), gy)
    return [like(gx, x), input_grad(np.where(negative, gy * x, zero), slope)]


# ----------------------------------------------------------------------------- softmax family
def _normalized_axes(y, axis, log):
    """The axes Softmax normalized over: one axis (opset >= 13) or every axis from ``axis`` on (the 2-D
    coercion before opset 13). The op's version is not passed to a backward, and the two forms differ
    only when dims follow ``axis``; then the output tells them apart: the one-axis form sums to 1 along
    ``axis`` at every position, the coerced form sums to 1 only over all trailing axes together.
    """
    axis %= max(y.ndim, 1)
    tail = tuple(range(axis, y.ndim))
    if len(tail) == 1 or all(y.shape[a] == 1 for a in tail[1:]):
        return (axis,)
    probabilities = np.exp(y) if log else y
    along_axis = probabilities.sum(axis=axis, dtype=np.float64)
    return (axis,) if np.allclose(along_axis, 1, rtol=0, atol=1e-3) else tail


def _default_axis(attrs_axis, y, log):
    """No axis attribute: -1 (opset 13) or 1 (before); the output says which one normalized."""
    if attrs_axis is not None:
        return attrs_axis
    if y.ndim <= 2:
        return -1  # the two defaults agree on 1-D and 2-D inputs
    probabilities = np.exp(y) if log else y
    last = probabilities.sum(axis=-1, dtype=np.float64)
    return -1 if np.allclose(last, 1, rtol=0, atol=1e-3) else 1


@register_backward("Softmax")
def softmax_backward(grads_out, inputs, outputs, *, axis=None):
    """y = softmax(x): dx = y * (gy - sum(gy * y)) over the normalized axes."""
    y = outputs[0]
    gy = grads_out[0]
    axes = _normalized_axes(y, _default_axis(axis, y, False), False)
    return [like(y * (gy - (gy * y).sum(axis=axes, keepdims=True)), inputs[0])]


@register_backward("LogSoftmax")
def log_softmax_backward(grads_out, inputs, outputs, *, axis=None):
    """y = x - logsumexp(x): dx = gy - softmax(x) * sum(gy) over the normalized axes."""
    y = outputs[0]
    gy = grads_out[0]
    axes = _normalized_axes(y, _default_axis(axis, y, True), True)
    return [like(gy - np.exp(y) * gy.sum(axis=axes, keepdims=True), inputs[0])]


@register_backward("Hardmax")
def hardmax_backward(grads_out, inputs, outputs, *, axis=None):
    """Piecewise constant: zero gradient."""
    return [np.zeros_like(inputs[0])]
