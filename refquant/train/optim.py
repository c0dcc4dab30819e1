"""Optimizers and learning-rate schedules over named NumPy parameters.

An optimizer updates ``{name: array}`` in place from ``{name: gradient}``; its state (moments, step
count) is a flat ``{key: array}`` dict so that a checkpoint stores and restores it exactly.

* SGD with momentum (PyTorch's form): ``b = mu b + (g + wd p)``; ``p -= lr b`` (Nesterov: ``p -= lr (g + mu b)``).
* Adam (Kingma & Ba): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
  ``p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``; weight decay is added to ``g`` (L2).

Schedules map the step index ``t`` (0-based) to a learning rate:
``constant``: ``lr``; ``step``: ``lr gamma^floor(t / step_size)``;
``cosine``: ``eta_min + (lr - eta_min) (1 + cos(pi t / T)) / 2`` over ``T`` total steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from ..errors import RefquantError


class Optimizer(ABC):
    """Common state and step loop; subclasses give the per-parameter update."""

    def __init__(self, lr: float, weight_decay: float = 0.0):
        if not lr > 0:
            raise RefquantError(f"learning rate must be positive, got {lr!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.state: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Update every parameter that has a gradient, in place."""
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        for name, g in grads.items():
            if g is None:
                continue
            p = params[name]
            g = np.asarray(g, dtype=np.float64)
            if self.weight_decay:
                g = g + self.weight_decay * p
            update = self._update(name, g, lr)
            params[name] = (p - update).astype(p.dtype, copy=False) if isinstance(p, np.ndarray) else p - update

    @abstractmethod
    def _update(self, name: str, g: np.ndarray, lr: float) -> np.ndarray:
        """The amount to subtract from parameter ``name`` given its gradient ``g``."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"t": np.asarray(self.t), **{k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])
        self.state = {k: np.array(v) for k, v in state.items() if k != "t"}


class SGD(Optimizer):
    """SGD with momentum ``mu`` (0: plain SGD), optionally Nesterov."""

    def __init__(self, lr: float, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _update(self, name, g, lr):
        if not self.momentum:
            return lr * g
        key = "momentum/" + name
        buf = self.state.get(key)
        buf = g.copy() if buf is None else self.momentum * buf + g
        self.state[key] = buf
        return lr * (g + self.momentum * buf if self.nesterov else buf)


class Adam(Optimizer):
    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps = float(eps)

    def _update(self, name, g, lr):
        m = self.state.get("m/" + name)
        v = self.state.get("v/" + name)
        m = (1 - self.b1) * g if m is None else self.b1 * m + (1 - self.b1) * g
        v = (1 - self.b2) * g * g if v is None else self.b2 * v + (1 - self.b2) * g * g
        self.state["m/" + name], self.state["v/" + name] = m, v
        m_hat = m / (1 - self.b1 ** self.t)
        v_hat = v / (1 - self.b2 ** self.t)
        return lr * m_hat / (np.sqrt(v_hat) + self.eps)


def make_optimizer(name: str, lr: float, **options) -> Optimizer:
    """``"adam"`` or ``"sgd"`` (momentum 0.9 unless given)."""
    if name == "adam":
        return Adam(lr, **options)
    if name == "sgd":
        return SGD(lr, **options)
    raise RefquantError(f"optimizer {name!r} is not 'adam' or 'sgd'")


def schedule(name: str, lr: float, total_steps: int, step_size: int | None = None, gamma: float = 0.1,
             eta_min: float = 0.0):
    """A function ``t -> learning rate`` (module docstring); ``step_size`` defaults to a third of the run."""
    if name == "constant":
        return lambda t: lr
    if name == "step":
        size = step_size or max(1, total_steps // 3)
        return lambda t: lr * gamma ** (t // size)
    if name == "cosine":
        total = max(1, total_steps)
        return lambda t: eta_min + (lr - eta_min) * (1 + math.cos(math.pi * min(t, total) / total)) / 2
    raise RefquantError(f"learning-rate schedule {name!r} is not 'constant', 'step' or 'cosine'")


__all__ = ["Adam", "Optimizer", "SGD", "make_optimizer", "schedule"]
