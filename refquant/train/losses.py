"""Training losses with their gradients: each returns ``(value, {output name: dL/doutput})``.

* ``mse_distill``: ``L = sum_k mean((s_k - t_k)^2)`` over the outputs ``k`` (``s`` the quantized
  model's output, ``t`` the FP32 model's); ``dL/ds_k = 2 (s_k - t_k) / size(s_k)``.
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


def mse_distill(student: dict, teacher: dict):
    value, grads = 0.0, {}
    for name, t in teacher.items():
        s = student[name].astype(np.float64)
        diff = s - t.astype(np.float64)
        value += float(np.mean(diff * diff))
        grads[name] = (2.0 * diff / diff.size).astype(student[name].dtype)
    return value, grads


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


__all__ = ["cross_entropy", "kl_distill", "mse_distill"]
