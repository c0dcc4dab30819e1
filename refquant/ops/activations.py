"""Activations and normalized exponentials: Relu family, sigmoid family, Gelu, Softmax, LogSoftmax, Hardmax."""

from __future__ import annotations

import numpy as np
import scipy.special

from .. import parallel
from ..kernels import mlas
from .registry import register, register_inplace
from .shapes import TensorInfo, same_as_first


def _f(value, like: np.ndarray):
    """A Python float attribute as a scalar of the tensor's own type (no float64 promotion)."""
    return np.asarray(value, dtype=like.dtype)


@register("Relu", since=6, infer=same_as_first)
def relu(x):
    if type(x) is np.ndarray and x.dtype.kind == "f":
        return parallel.elementwise(np.maximum, np.empty_like(x), x, _f(0, x))
    return np.maximum(x, _f(0, x))


@register_inplace(relu)
def relu_inplace(x):
    return parallel.elementwise(np.maximum, x, x, _f(0, x)) if x.dtype.kind == "f" else None


@register("LeakyRelu", since=6, infer=same_as_first)
def leaky_relu(x, *, alpha=0.01):
    """y = x if x >= 0 else alpha * x"""
    return np.where(x >= 0, x, x * _f(alpha, x))


@register("PRelu", since=7, infer=lambda x, slope: TensorInfo(x.dtype, x.shape))
def prelu(x, slope):
    """y = x if x >= 0 else slope * x, slope broadcast to x (unidirectionally)."""
    return np.where(x >= 0, x, x * slope.astype(x.dtype, copy=False))


@register("Elu", since=6, infer=same_as_first)
def elu(x, *, alpha=1.0):
    """y = x if x > 0 else alpha * (exp(x) - 1)"""
    with np.errstate(over="ignore"):
        return np.where(x > 0, x, _f(alpha, x) * np.expm1(np.minimum(x, _f(0, x))))


@register("Celu", since=12, infer=same_as_first)
def celu(x, *, alpha=1.0):
    """y = max(0, x) + min(0, alpha * (exp(x / alpha) - 1))"""
    a = _f(alpha, x)
    return np.maximum(x, _f(0, x)) + np.minimum(_f(0, x), a * np.expm1(np.minimum(x, _f(0, x)) / a))


@register("Selu", since=6, infer=same_as_first)
def selu(x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    """y = gamma * (x if x > 0 else alpha * (exp(x) - 1))"""
    neg = _f(alpha, x) * np.expm1(np.minimum(x, _f(0, x)))
    return _f(gamma, x) * np.where(x > 0, x, neg)


@register("ThresholdedRelu", since=10, infer=same_as_first)
def thresholded_relu(x, *, alpha=1.0):
    return np.where(x > _f(alpha, x), x, _f(0, x))


@register("Sigmoid", since=6, infer=same_as_first)
def sigmoid(x):
    """y = 1 / (1 + exp(-x)). float32 bit for bit as onnxruntime computes it (MlasComputeLogistic:
    v = clamp(x, -18, 18), p = v (((a9 v^2 + a7) v^2 + a5) v^2 + a3) v^2 + a1),
    q = ((((b10 v^2 + b8) v^2 + b6) v^2 + b4) v^2 + b2) v^2 + b0 with FMAs, y = max(p / q + 1/2, 0);
    :func:`refquant.kernels.mlas.logistic`). Its absolute error (<= 6e-8, one ulp of 1/2) is what
    onnxruntime shows for tiny probabilities (a wake-word score of 1e-8 comes out as 0 or 9e-8), and a
    dynamically quantized model requantizes the result, where one ulp can flip a code.
    Other dtypes: scipy's expit (no overflow for large |x|)."""
    if type(x) is np.ndarray and x.dtype == np.float32:
        return mlas.logistic(x)
    return scipy.special.expit(x).astype(x.dtype, copy=False)


@register("Shrink", since=9, infer=same_as_first)
def shrink(x, *, bias=0.0, lambd=0.5):
    """y = x - bias if x > lambd; x + bias if x < -lambd; 0 otherwise."""
    out = np.where(x > _f(lambd, x), x - _f(bias, x), np.where(x < -_f(lambd, x), x + _f(bias, x), _f(0, x)))
    return out.astype(x.dtype, copy=False)


@register("HardSigmoid", since=6, infer=same_as_first)
def hard_sigmoid(x, *, alpha=0.2, beta=0.5):
    """y = clip(alpha * x + beta, 0, 1)"""
    return np.clip(x * _f(alpha, x) + _f(beta, x), _f(0, x), _f(1, x))


@register("HardSwish", since=14, infer=same_as_first)
def hard_swish(x):
    """y = x * clip(x / 6 + 1/2, 0, 1)  (HardSigmoid with alpha = 1/6)"""
    return x * np.clip(x * _f(1 / 6, x) + _f(0.5, x), _f(0, x), _f(1, x))


@register("Softplus", since=1, infer=same_as_first)
def softplus(x):
    """y = log(1 + exp(x)), computed as logaddexp(0, x) to avoid overflow."""
    return np.logaddexp(_f(0, x), x)


@register("Softsign", since=1, infer=same_as_first)
def softsign(x):
    """y = x / (1 + |x|)"""
    return x / (_f(1, x) + np.abs(x))


@register("Mish", since=18, infer=same_as_first)
def mish(x):
    """y = x * tanh(softplus(x))"""
    return x * np.tanh(np.logaddexp(_f(0, x), x))


_HALF, _ONE, _SQRT1_2 = np.float32(0.5), np.float32(1.0), np.float32(0.70710678118654752440)
_GELU_B, _GELU_C = np.float32(0.7978845608028654), np.float32(0.035677408136300125)


@register("Gelu", since=20, infer=same_as_first)
def gelu(x, *, approximate="none"):
    """none: y = x/2 (1 + erf(x / sqrt 2)); tanh: y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    float32 bit for bit as onnxruntime's kernel: t = erf(x * f32(1/sqrt 2)) or
    t = tanh(x * ((C x) x + B)) (B = f32(sqrt(2/pi)), C = f32(0.044715 sqrt(2/pi))), both MLAS's
    (:mod:`refquant.kernels.mlas`), then y = (0.5 x) (t + 1), each step a rounded float32 operation."""
    if type(x) is np.ndarray and x.dtype == np.float32:
        with np.errstate(all="ignore"):  # IEEE results for +-inf and NaN, as onnxruntime's
            if approximate == "tanh":
                t = mlas.tanh(x * ((_GELU_C * x) * x + _GELU_B))
            else:
                t = mlas.erf(x * _SQRT1_2)
            return (_HALF * x) * (t + _ONE)
    if approximate == "tanh":
        inner = _f(np.sqrt(2 / np.pi), x) * (x + _f(0.044715, x) * x * x * x)
        return _f(0.5, x) * x * (_f(1, x) + np.tanh(inner))
    return (_f(0.5, x) * x * (_f(1, x) + scipy.special.erf(x * _f(1 / np.sqrt(2), x)))).astype(x.dtype, copy=False)


# ------------------------------------------------------------------------ softmax family
def _softmax(x, axis):
    """exp(x - max) / sum(exp(x - max)) along ``axis``: the max shift keeps exp from overflowing."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x, axis):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _hardmax(x, axis):
    first_max = np.argmax(x, axis=axis)
    return (np.arange(x.shape[axis]).reshape([-1] + [1] * (x.ndim - axis % x.ndim - 1))
            == np.expand_dims(first_max, axis)).astype(x.dtype)


def _coerced_2d(fn):
    """Before opset 13: flatten to [prod(shape[:axis]), prod(shape[axis:])], apply along axis 1."""
    def kernel(x, *, axis=1):
        axis = axis % x.ndim if x.ndim else 0
        if x.size == 0:
            return np.empty_like(x)
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return fn(flat, 1).reshape(x.shape)
    return kernel


def _one_axis(fn):
    def kernel(x, *, axis=-1):
        if x.size == 0:  # an empty tensor (a zero-length sequence): nothing to normalize, as onnxruntime
            return np.empty_like(x)
        return fn(x, axis)
    return kernel


for _name, _fn in (("Softmax", _softmax), ("LogSoftmax", _log_softmax), ("Hardmax", _hardmax)):
    register(_name, since=1, infer=same_as_first)(_coerced_2d(_fn))
    register(_name, since=13, infer=same_as_first)(_one_axis(_fn))
