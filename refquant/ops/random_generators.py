"""Random generators: RandomNormal, RandomUniform, RandomNormalLike, RandomUniformLike, Bernoulli, Multinomial.

No two runtimes draw the same numbers (onnxruntime has its own generator), so these follow ONNX's reference
evaluator: with a ``seed`` attribute, each run draws from ``np.random.RandomState(int(seed))`` in the
reference's order and arithmetic (the same values as ``onnx.reference.ReferenceEvaluator``, and the same
values on every run); without one, each run draws fresh numbers. The runtime never folds these ops into
constants (``runtime._NEVER_FOLD``).
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from .registry import register
from .shapes import TensorInfo


def _state(seed) -> np.random.RandomState:
    return np.random.RandomState() if seed is None or np.isnan(seed) else np.random.RandomState(int(seed))


def _dtype(dtype, like=None) -> np.dtype:
    """The attribute's element type; for the *Like ops without one (or 0), the input's."""
    if dtype:
        return dtypes.to_numpy(dtype)
    if like is not None:
        return like.dtype
    return np.dtype(np.float32)


def _normal(shape, dtype, mean, scale, seed):
    values = _state(seed).randn(*shape).astype(dtype)
    values *= scale  # in place, in the output type, as the reference does
    values += mean
    return values


def _uniform(shape, dtype, low, high, seed):
    # the reference's arithmetic: a float64 draw in [0, 1) cast to the output type can round to 1, and the scaling
    # rounds in that type, so a float32 or float16 value can equal high (float32, [1, 5): measured 1e-7 per draw)
    values = _state(seed).rand(*shape).astype(dtype)
    values *= high - low
    values += low
    return values


def _float_only(dtype, op_type):
    if dtype.kind != "f":
        raise TypeError(f"{op_type} produces float16/float/double, not {dtype}")
    return dtype


@register("RandomNormal", since=1,
          infer=lambda *a, dtype=1, shape, **k: TensorInfo(_dtype(dtype), tuple(shape)))
def random_normal(*, shape, dtype=1, mean=0.0, scale=1.0, seed=None):
    """y ~ N(mean, scale^2), of ``shape`` and ``dtype`` (float by default)."""
    target = _float_only(_dtype(dtype), "RandomNormal")
    return _normal(shape, target, mean, scale, seed)


@register("RandomUniform", since=1,
          infer=lambda *a, dtype=1, shape, **k: TensorInfo(_dtype(dtype), tuple(shape)))
def random_uniform(*, shape, dtype=1, low=0.0, high=1.0, seed=None):
    """y ~ U[low, high) in float64, rounded to ``dtype`` (float by default; so high itself is possible), of
    ``shape``."""
    target = _float_only(_dtype(dtype), "RandomUniform")
    return _uniform(shape, target, low, high, seed)


def _like_rule(x, *, dtype=None, **attrs):
    return TensorInfo(_dtype(dtype, x), x.shape)


@register("RandomNormalLike", since=1, infer=_like_rule)
def random_normal_like(x, *, dtype=None, mean=0.0, scale=1.0, seed=None):
    """y ~ N(mean, scale^2) with x's shape, and x's type unless ``dtype`` is given."""
    target = _float_only(_dtype(dtype, x), "RandomNormalLike")
    return _normal(x.shape, target, mean, scale, seed)


@register("RandomUniformLike", since=1, infer=_like_rule)
def random_uniform_like(x, *, dtype=None, low=0.0, high=1.0, seed=None):
    """y ~ U[low, high) in float64, rounded to x's type unless ``dtype`` is given, with x's shape."""
    target = _float_only(_dtype(dtype, x), "RandomUniformLike")
    return _uniform(x.shape, target, low, high, seed)


@register("Bernoulli", since=15, infer=_like_rule)
def bernoulli(x, *, dtype=None, seed=None):
    """y = 1 with probability x (element-wise), else 0; in x's type unless ``dtype`` is given."""
    if np.any((x < 0) | (x > 1)) or np.isnan(x).any():
        raise ValueError("Bernoulli probabilities must lie in [0, 1]")
    return _state(seed).binomial(1, p=x).astype(_dtype(dtype, x))


def _multinomial_rule(x, *, dtype=6, sample_size=1, seed=None):
    batch = x.shape[0] if x.shape is not None else None
    return TensorInfo(dtypes.to_numpy(dtype), (batch, sample_size))


@register("Multinomial", since=7, infer=_multinomial_rule)
def multinomial(x, *, dtype=6, sample_size=1, seed=None):
    """For each row of x [batch, classes] (unnormalized log-probabilities), ``sample_size`` class indices
    drawn independently with p = softmax(row): the first class whose cumulative probability exceeds a
    uniform draw u in [0, 1) (probabilities in float64)."""
    target = dtypes.to_numpy(dtype)
    if target not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"Multinomial produces int32 or int64, not {target}")
    if x.ndim != 2:
        raise ValueError(f"Multinomial input must be [batch, classes], got shape {x.shape}")
    logits = x.astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    u = _state(seed).random_sample((x.shape[0], sample_size))
    index = (u[:, :, None] >= cdf[:, None, :]).sum(axis=2)  # classes whose cumulative mass is <= u
    return np.minimum(index, x.shape[1] - 1).astype(target)  # a cdf ending at 1 - ulp can leave u above it
