"""Training losses that exported training graphs carry: NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss.

Both pick, for every sample n (and spatial position d), the class entry named by the target:
  loss[n, d] = -w[t] * input[n, t, d],  t = target[n, d],  w = weight (all 1 without one),
and a target equal to ``ignore_index`` gets w = 0 (it may lie outside [0, C)). Reduction "none" returns
loss (target's shape), "sum" its sum, "mean" sum(loss) / sum(w[t]) (the applied weights, so ignored targets
count for nothing). SoftmaxCrossEntropyLoss applies them to log_softmax(scores) over axis 1.
"""

from __future__ import annotations

import numpy as np

from .registry import register
from .shapes import TensorInfo


def _nll(log_prob, target, weight, reduction, ignore_index):
    if log_prob.ndim < 2 or target.shape != log_prob.shape[:1] + log_prob.shape[2:]:
        raise ValueError(f"target shape {target.shape} must be input shape {log_prob.shape} without axis 1")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    classes = log_prob.shape[1]
    target = np.asarray(target, dtype=np.int64)
    ignored = target == ignore_index if ignore_index is not None else np.zeros(target.shape, bool)
    safe = np.where(ignored, 0, target)
    if ((safe < 0) | (safe >= classes)).any():
        bad = int(safe[(safe < 0) | (safe >= classes)][0])
        raise IndexError(f"target {bad} is outside the {classes} classes (and is not ignore_index)")
    picked = np.take_along_axis(log_prob, np.expand_dims(safe, 1), axis=1)[:, 0]
    w = np.ones(target.shape, log_prob.dtype) if weight is None else np.asarray(weight)[safe].astype(log_prob.dtype)
    w = np.where(ignored, np.zeros((), log_prob.dtype), w)
    loss = -picked * w
    if reduction == "none":
        return loss.astype(log_prob.dtype, copy=False)
    total = loss.sum(dtype=np.float64)
    if reduction == "sum":
        return np.asarray(total, dtype=log_prob.dtype)
    return np.asarray(total / w.sum(dtype=np.float64), dtype=log_prob.dtype)


def _loss_rule(x, target, weight=None, *, reduction="mean", ignore_index=None, noutputs=1):
    loss = TensorInfo(x.dtype, target.shape if reduction == "none" else ())
    return (loss, TensorInfo(x.dtype, x.shape)) if noutputs > 1 else loss


@register("NegativeLogLikelihoodLoss", since=12, infer=_loss_rule)
def negative_log_likelihood_loss(x, target, weight=None, *, reduction="mean", ignore_index=None):
    """loss[n, d] = -weight[t] * x[n, t, d] with t = target[n, d], reduced (module docstring)."""
    return _nll(x, target, weight, reduction, ignore_index)


@register("SoftmaxCrossEntropyLoss", since=12, infer=_loss_rule)
def softmax_cross_entropy_loss(scores, labels, weights=None, *, reduction="mean", ignore_index=None,
                               noutputs=1):
    """The negative log-likelihood of log_prob = log_softmax(scores, axis=1) = s - max - log(sum(exp(s - max)))
    (in float64, rounded to the scores' type); the optional second output is log_prob."""
    wide = scores.astype(np.float64)
    shifted = wide - wide.max(axis=1, keepdims=True)
    log_prob = (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(scores.dtype)
    loss = _nll(log_prob, labels, weights, reduction, ignore_index)
    return (loss, log_prob) if noutputs > 1 else loss
