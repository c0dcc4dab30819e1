"""Training losses with their gradients: each returns ``(value, {output name: dL/doutput})``.

* ``mse_distill``: ``L = sum_k mean((s_k - t_k)^2) / v_k`` over the outputs ``k`` (``s`` the quantized
  model's output, ``t`` the FP32 model's) with ``v_k = var(t_k)``, the variance of all elements of the
  teacher's output in the batch (``normalize=False``: ``v_k = 1``, the raw sum; a constant teacher output,
  ``var = 0``, also gets ``v_k = 1``); ``dL/ds_k = 2 (s_k - t_k) / (size(s_k) v_k)``. Each term is the
  output's error relative to its own spread (1 - R^2, unexplained variance): outputs in different units
  (R-Net's face probabilities in [0, 1] and its box offsets) weigh the same, and the loss does not change
  when an output is rescaled. ``v_k`` depends on the teacher only, so it is a constant of the gradient.
* ``sqnr_distill``: minus the sum over the outputs of their SQNR in dB against the teacher,
  ``L = sum_k 10 log10(mse_k / P_k)`` with ``mse_k = mean((s_k - t_k)^2)`` (floored at ``1e-12 P_k``, i.e.
  SQNR at most 120 dB) and ``P_k = mean(t_k^2)``; ``dL/ds_k = (10 / ln 10) 2 (s_k - t_k) / (size(s_k) mse_k)``.
  Scale-free like the normalized MSE, and each output's gradient is divided by its current error, so an
  output that is already much closer to the teacher keeps an equal say (a dB gained on any output counts
  the same): the loss is the metric the benches report.
* ``kl_distill`` (Hinton et al.): per output, rows along the last axis, temperature ``T``:
  ``L = T^2 mean_rows sum_j p_j (log p_j - log q_j)`` with ``p = softmax(t/T)``, ``q = softmax(s/T)``;
  ``dL/ds = T (q - p) / rows``.
* ``cross_entropy``: ``L = mean_rows -log softmax(s)[label]``; ``dL/ds = (softmax(s) - onehot) / rows``.
"""

from __future__ import annotations

import numpy as np

from ..errors import RefquantError


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mse_distill(student: dict, teacher: dict, normalize: bool = True):
    value, grads = 0.0, {}
    for name, t in teacher.items():
        s = student[name].astype(np.float64)
        t64 = t.astype(np.float64)
        diff = s - t64
        spread = float(np.var(t64)) if normalize else 1.0
        spread = spread if spread > 0 else 1.0
        value += float(np.mean(diff * diff)) / spread
        grads[name] = (2.0 * diff / (diff.size * spread)).astype(student[name].dtype)
    return value, grads


def sqnr_distill(student: dict, teacher: dict):
    value, grads = 0.0, {}
    for name, t in teacher.items():
        s = student[name].astype(np.float64)
        t64 = t.astype(np.float64)
        diff = s - t64
        power = float(np.mean(t64 * t64))
        power = power if power > 0 else 1.0
        mse = max(float(np.mean(diff * diff)), 1e-12 * power)
        value += 10.0 * np.log10(mse / power)
        grads[name] = (10.0 / np.log(10.0) * 2.0 * diff / (diff.size * mse)).astype(student[name].dtype)
    return float(value), grads


def kl_distill(student: dict, teacher: dict, temperature: float = 1.0):
    value, grads = 0.0, {}
    T = float(temperature)
    for name, t in teacher.items():
        s = student[name].astype(np.float64)
        rows = s.size // s.shape[-1]
        log_p = _log_softmax(t.astype(np.float64) / T)
        log_q = _log_softmax(s / T)
        p = np.exp(log_p)
        value += float(T * T * np.sum(p * (log_p - log_q)) / rows)
        grads[name] = (T * (np.exp(log_q) - p) / rows).astype(student[name].dtype)
    return value, grads


def cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """``(value, dL/dlogits)`` for logits ``[rows, classes]`` (extra axes are flattened into classes)."""
    x = logits.reshape(len(logits), -1).astype(np.float64)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(x):
        raise RefquantError(f"cross entropy: {len(labels)} labels for a batch of {len(x)}")
    if labels.min() < 0 or labels.max() >= x.shape[1]:
        raise RefquantError(f"cross entropy: labels must lie in [0, {x.shape[1] - 1}], got "
                            f"[{labels.min()}, {labels.max()}]")
    log_q = _log_softmax(x)
    rows = np.arange(len(x))
    value = float(-np.mean(log_q[rows, labels]))
    grad = np.exp(log_q)
    grad[rows, labels] -= 1.0
    return value, (grad / len(x)).reshape(logits.shape).astype(logits.dtype)


__all__ = ["cross_entropy", "kl_distill", "mse_distill", "sqnr_distill"]
