"""AdaRound's soft rounding, regularizer and annealing, and the optimizers that minimize its loss.

    W_soft(V) = s * clip(floor(W/s) + h(V), lo, hi)
    h(V)      = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),     zeta = 1.1, gamma = -0.1
    reg(V)    = reg_param * sum over weights of (1 - |2 h(V) - 1|^beta)

``V`` starts where ``h(V) = W/s - floor(W/s)`` (so rounding ``V >= 0`` up is nearest rounding); the regularizer is
off for the first ``warm_start`` fraction of the iterations, then ``beta`` follows AIMET's cosine decay from
``beta_range[0]`` to ``beta_range[1]``. The result is the hard rounding ``s * clip(floor(W/s) + [V >= 0], lo, hi)``.

Adam in NumPy (torch's betas and eps, as AIMET) steps by ``learning_rate``; "scaled" is
``1e-3 * max(1, 10000 / max(200, num_iterations))``: the path length of AIMET's 10,000 steps of 1e-3, since Adam
moves each ``V`` by about its step per iteration. L-BFGS-B runs one bounded minimization per fixed ``beta`` stage.
Measurements: docs/adaround.md.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels.adaround import GAMMA, ZETA, adam_step, soft_weights

ADAM_LR = 1e-3  # AIMET: torch.optim.Adam defaults
STEP_PATH_ITERATIONS = 10000  # "scaled" steps: the path length of this many steps of ADAM_LR (AIMET's default count)
FEWEST_SCALED_ITERATIONS = 200  # below it "scaled" keeps the step of 200 iterations, the fewest measured
LBFGS_STAGES = 10  # L-BFGS-B runs: one per fixed beta of the annealing (plus the warm start)


class SoftRounding:
    """The rectified-sigmoid rounding of one weight (matrix layout), on its encoding's grid.

    ``W_soft(V) = s * clip(floor(W/s) + h(V), lo, hi)``; ``W/s`` in float64 with the float32 scale
    the simulation uses. ``fixed``: weights with ``W/s`` an exact integer (kept, not optimized)."""

    def __init__(self, w: np.ndarray, scale: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.scale = scale.astype(np.float32).astype(np.float64)
        ratio = w.astype(np.float64) / self.scale
        self.base = np.floor(ratio)
        self.lo, self.hi = lo.astype(np.float64), hi.astype(np.float64)
        frac = ratio - self.base
        self.fixed = frac == 0
        self.free = ~self.fixed
        self.v0 = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(v0) = frac

    @staticmethod
    def h(v):
        """``clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` and its derivative, ``sigmoid(V) = 1 / (1 + exp(-V))``."""
        with np.errstate(over="ignore"):  # exp(-V) = inf: sigmoid 0
            sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        inside = (raw > 0) & (raw < 1)
        return np.clip(raw, 0, 1), (ZETA - GAMMA) * sig * (1 - sig) * inside

    def soft(self, v):
        """``W_soft`` and ``dW_soft/dh``."""
        return self.soft_h(self.h(v)[0])

    def soft_h(self, h):
        """``W_soft`` and ``dW_soft/dh`` as functions of ``h`` itself."""
        codes = self.base + h
        return self.scale * np.clip(codes, self.lo, self.hi), self.scale * ((codes >= self.lo) & (codes <= self.hi))

    @staticmethod
    def v_of_h(h):
        """The ``V`` with ``h(V) = h`` (h in [0, 1]; so ``V >= 0`` iff ``h >= 1/2``)."""
        return -np.log((ZETA - GAMMA) / (np.asarray(h, dtype=np.float64) - GAMMA) - 1)

    def up(self, v) -> np.ndarray:
        """AIMET's hard rounding decision ``V >= 0`` (never for fixed weights)."""
        return (v >= 0) & self.free

    def codes(self, up) -> np.ndarray:
        """``clip(floor(W/s) + up, lo, hi)`` for a boolean decision ``up``."""
        return np.clip(self.base + up, self.lo, self.hi)

    def hard(self, up) -> np.ndarray:
        """``W_q = s * codes`` in float32, exactly the grid values ``qdq`` produces."""
        return (self.codes(up).astype(np.float32) * self.scale.astype(np.float32)).astype(np.float32)


def rounding_regularizer(h: np.ndarray, beta: float):
    """``sum(1 - |2h - 1|^beta)`` and its derivative in ``h``."""
    a = 2 * h - 1
    mag = np.abs(a)
    # np.power, not **: the operator turns an exponent of exactly 2 or 0.5 into square/sqrt (other bits than the
    # fused path's np.power)
    return float(np.sum(1 - np.power(mag, beta))), -2 * beta * np.power(mag, beta - 1) * np.sign(a)


def annealed_beta(iteration: int, num_iterations: int, beta_range, warm_start: float) -> float | None:
    """AIMET's schedule: None (no regularization) during the warm start, then
    ``beta = end + (start - end)/2 * (1 + cos(pi * rel))``, ``rel`` from 0 to 1 over the rest."""
    warm = warm_start * num_iterations
    if iteration < warm:
        return None
    start, end = beta_range
    rel = (iteration - warm) / max(1e-12, num_iterations - warm)
    return end + 0.5 * (start - end) * (1 + math.cos(rel * math.pi))


class Objective:
    """``recon(W_soft(V)) + reg_param * reg(h(V), beta)`` and its gradient in ``V`` (fixed weights: 0)."""

    def __init__(self, rounding: SoftRounding, loss, reg_param: float):
        self.rounding, self.loss, self.reg_param = rounding, loss, reg_param

    def __call__(self, v, beta, sample=None, value: bool = True):
        """``(objective or None unless value, gradient in V)``."""
        h, dh_dv = self.rounding.h(v)
        w_soft, dw_dh = self.rounding.soft_h(h)
        loss, grad_w = self.loss(w_soft, sample=sample, value=value)
        grad_h = grad_w * dw_dh
        if beta is not None:
            reg, reg_grad = rounding_regularizer(h, beta)
            loss = loss + self.reg_param * reg if value else None
            grad_h = grad_h + self.reg_param * reg_grad
        return loss, grad_h * dh_dv * self.rounding.free

    def in_h(self, h, beta):
        """The same objective as a function of ``h`` in [0, 1] (for a bound-constrained optimizer)."""
        w_soft, dw_dh = self.rounding.soft_h(h)
        value, grad_w = self.loss(w_soft)
        grad_h = grad_w * dw_dh
        if beta is not None:
            reg, reg_grad = rounding_regularizer(h, beta)
            value += self.reg_param * reg
            grad_h = grad_h + self.reg_param * reg_grad
        return value, grad_h * self.rounding.free

    def recon_hard(self, up) -> float:
        """The reconstruction loss with the hard rounding ``up``."""
        return self.loss(self.rounding.scale * self.rounding.codes(up), grad=False)


def settle(objective: Objective, v, passes: int = 2) -> np.ndarray:
    """The final up/down decisions (bool, matrix layout). Decided weights (``h`` 0 or 1) keep theirs;
    each output channel's undecided weights (``0 < h < 1``: their reconstruction gradient balanced the
    regularizer) are flipped one at a time from ``h >= 1/2`` when that lowers the channel's exact
    loss with hard rounding. Channels are independent in the loss, so all are done at once."""
    rounding, loss = objective.rounding, objective.loss
    h = rounding.h(v)[0]
    up = (v >= 0) & rounding.free
    undecided = (h > 0) & (h < 1) & rounding.free
    if not undecided.any():
        return up
    rank = np.cumsum(undecided, axis=2) - 1  # position of each undecided weight within its channel

    def channel_loss(decision):
        return loss.per_channel(rounding.scale * np.clip(rounding.base + decision, rounding.lo, rounding.hi))

    current = channel_loss(up)
    for _ in range(passes):
        changed = False
        for r in range(int(rank.max()) + 1):
            pick = undecided & (rank == r)  # at most one weight per channel
            trial = up ^ pick
            trial_loss = channel_loss(trial)
            better = trial_loss < current
            if better.any():
                up = np.where(pick & better[:, :, None], trial, up)
                current = np.where(better, trial_loss, current)
                changed = True
        if not changed:
            break
    return up


def adam_learning_rate(learning_rate: float | str, num_iterations: int) -> float:
    """Adam's step size: a number as it is; "scaled": ``ADAM_LR * max(1, 10000 / max(200, num_iterations))``."""
    if learning_rate == "scaled":
        return ADAM_LR * max(1.0, STEP_PATH_ITERATIONS / max(FEWEST_SCALED_ITERATIONS, num_iterations))
    return float(learning_rate)


def optimize_adam(objective: Objective, v, num_iterations, beta_range, warm_start, sample_size=None,
                  rng=None, lr: float = ADAM_LR, fused: bool = True):
    """Adam (torch's defaults: betas 0.9/0.999, eps 1e-8) with the annealed regularizer; a sampled
    loss gets a minibatch of ``sample_size`` cached positions per iteration (:func:`_minibatches`).
    ``fused``: the per-weight work in Numba kernels (NumPy's result, faster)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    v = v.copy()
    m = np.zeros_like(v)
    s = np.zeros_like(v)
    batches = _minibatches(objective.loss, sample_size, rng)
    if fused:
        return _adam_fused(objective, v, m, s, num_iterations, beta_range, warm_start, batches, lr)
    for it in range(num_iterations):
        _, grad = objective(v, annealed_beta(it, num_iterations, beta_range, warm_start), next(batches), value=False)
        m *= 0.9
        m += 0.1 * grad
        s *= 0.999
        s += 0.001 * grad * grad
        # v -= lr * m_hat / (sqrt(s_hat) + eps), m_hat = m / (1 - 0.9^t), s_hat = s / (1 - 0.999^t)
        v -= (lr / (1 - 0.9 ** (it + 1))) * m / (np.sqrt(s / (1 - 0.999 ** (it + 1))) + 1e-8)
    return v


def _adam_fused(objective: Objective, v, m, s, num_iterations, beta_range, warm_start, batches, lr):
    """The loop of :func:`optimize_adam` with the per-weight work in two fused passes
    (:mod:`refquant.kernels.adaround`: the same operations, bit for bit)."""
    r = objective.rounding
    flat = [np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
            for a in np.broadcast_arrays(r.base, r.lo, r.hi, r.scale)]
    free = np.ascontiguousarray(r.free).reshape(-1)
    v_flat, m_flat, s_flat = v.reshape(-1), m.reshape(-1), s.reshape(-1)  # views: v is updated in place
    w_soft = np.empty(v.shape)
    dw_dh, dh_dv, h, magnitude, powed, exp_neg_v = (np.empty(v.size) for _ in range(6))
    for it in range(num_iterations):
        beta = annealed_beta(it, num_iterations, beta_range, warm_start)
        with np.errstate(over="ignore"):  # exp(-v) = inf gives sigmoid 0, as it should
            np.exp(np.negative(v_flat, out=exp_neg_v), out=exp_neg_v)
        soft_weights(exp_neg_v, *flat, w_soft.reshape(-1), dw_dh, dh_dv, h, magnitude)
        _, grad_w = objective.loss(w_soft, sample=next(batches), value=False)
        if beta is not None:  # |2h - 1|^(beta - 1) (unread without a beta)
            np.power(magnitude, beta - 1, out=powed)
        adam_step(v_flat, np.ascontiguousarray(grad_w, dtype=np.float64).reshape(-1), dw_dh, dh_dv, h, free,
                  math.nan if beta is None else beta, powed, objective.reg_param, m_flat, s_flat,
                  lr / (1 - 0.9 ** (it + 1)), 1 - 0.999 ** (it + 1))
    return v


def _minibatches(loss, size, rng):
    """Endless minibatch slices of a sampled loss's cached positions (None: the whole loss). The
    positions are shuffled once, so a minibatch is a contiguous slice (a view, no copy); each epoch
    starts at a random offset, so epochs cut the order into different minibatches."""
    count = getattr(loss, "count", 0)
    if size is None or count <= size or not hasattr(loss, "shuffle"):
        while True:
            yield None
    loss.shuffle(rng)
    per_epoch = count // size
    if per_epoch > 1 and count - per_epoch * size < size // 2:
        per_epoch -= 1  # leave room for the offset to move
    while True:
        offset = int(rng.integers(count - per_epoch * size + 1))
        for k in range(per_epoch):
            yield slice(offset + k * size, offset + (k + 1) * size)


def lbfgs_stages(num_iterations: int, beta_range, warm_start: float, stages: int = LBFGS_STAGES):
    """``[(beta or None, iterations)]``: the warm start, then ``stages`` fixed betas sampled at the
    middle of equal slices of AIMET's cosine schedule."""
    warm = int(round(warm_start * num_iterations))
    rest = num_iterations - warm
    plan = [(None, warm)] if warm else []
    stages = max(1, min(stages, rest))
    for k in range(stages):
        share = rest // stages + (1 if k < rest % stages else 0)
        start, end = beta_range
        beta = end + 0.5 * (start - end) * (1 + math.cos((k + 0.5) / stages * math.pi))
        plan.append((beta, share))
    return [(b, n) for b, n in plan if n > 0]


def optimize_lbfgs(objective: Objective, v, num_iterations, beta_range, warm_start):
    """SciPy L-BFGS-B on the full (cached) loss, one run per annealing stage (each warm-started from
    the last). The variable is ``h`` itself, bounded to [0, 1] (weights with an exact code: [0, 0]):
    through the rectified sigmoid, a quasi-Newton step saturates ``h`` where its gradient is zero
    and the weight can never move back; the bounds let it. ``num_iterations`` is the total number
    of L-BFGS iterations (each ~1 loss + gradient evaluation). Returns ``V`` with ``h(V) = h``."""
    from scipy.optimize import minimize

    shape = v.shape
    h = objective.rounding.h(v)[0].reshape(-1)
    upper = objective.rounding.free.reshape(-1).astype(np.float64)
    bounds = np.stack([np.zeros_like(upper), upper], axis=1)
    for beta, iterations in lbfgs_stages(num_iterations, beta_range, warm_start):
        def fun(flat, beta=beta):
            value, grad = objective.in_h(flat.reshape(shape), beta)
            return value, grad.reshape(-1)

        result = minimize(fun, h, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": iterations, "maxfun": 2 * iterations + 5, "ftol": 0.0, "gtol": 0.0})
        h = np.clip(result.x, 0.0, upper)
    return objective.rounding.v_of_h(h.reshape(shape))


__all__ = ["ADAM_LR", "Objective", "SoftRounding", "adam_learning_rate", "annealed_beta", "lbfgs_stages",
           "optimize_adam", "optimize_lbfgs", "rounding_regularizer", "settle"]
