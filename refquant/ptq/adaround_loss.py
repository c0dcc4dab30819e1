"""AdaRound's reconstruction loss for one layer, in two exact forms (each layer uses the cheaper that applies):

* quadratic (no activation in the loss): with ``dW = W_soft - W`` and ``R = y_fp32 - y(W)`` the residual that
  input quantization leaves,

      mean_p ||dW cols_p - R_p||^2 = tr(dW H dW^T) - 2 tr(dW G) + c,
      H = mean cols cols^T,  G = mean cols R^T,  c = mean ||R||^2,

  accumulated over every position of the data while streaming it (memory ``K^2`` per group; an iteration costs
  ``M K^2`` flops whatever the data size);
* sampled (activation ``f`` in the loss, or fewer cached positions than K/2): ``mean_p (f(t_p) - f(W_soft
  cols_p))^2`` on a uniform random sample of at most ``num_columns`` positions (a bottom-k reservoir over the
  stream), their columns and both outputs cached.

Shrinkage (not in the paper or AIMET): each channel's loss moved toward its uncorrelated-inputs form,
``(1 - alpha_o) L_o + alpha_o sum_k H_okk dW_ok^2``, with Schaefer & Strimmer's (2005) intensity ``alpha``: the
estimated variance of the second moment's off-diagonal entries over their squares. With QDrop inputs (each input
element the FP32 model's ``a`` with probability ``q``, else the simulation's ``b``) the quadratic form takes the
exact expectation over the masks: the loss at the mean input plus ``sum_k q (1 - q) mean (a_k - b_k)^2 sum_o
W[o, k]^2``. Measurements: docs/adaround.md.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import RefquantError
from ..kernels.adaround import CLIP, IDENTITY, PRELU, mix_columns, reconstruction_gradient
from .layers import COLUMN_BUDGET, SOFTMAX, LinearLayer, PRelu
from .pointwise import Pointwise

INTENSITY_FLOPS = 1e10  # work of a layer's masked shrinkage intensity; above it, on a sample of its inputs


class _Reservoir:
    """A uniform random sample, without replacement, of at most ``size`` positions of a stream
    (the ``size`` smallest of uniform random keys), with their columns and both outputs. Preallocated
    and position-major: a new batch only writes the positions that enter, over those they evict."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.keys = np.empty(0)
        self.rows = None  # [size, G, K/G], [size, G, M/G] x 2 once the first batch is seen
        self.filled = self.seen = 0

    def offer(self, layer: LinearLayer, columns, z, t) -> None:
        keys = self.rng.random(columns.count)
        self.seen += columns.count
        mine = np.arange(columns.count) if columns.count <= self.size else np.argpartition(keys, self.size)[:self.size]
        if self.rows is None:
            g, mg = layer.index.shape[:2]
            shapes = ((g, columns.height // g), (g, mg), (g, mg))
            self.rows = [np.empty((self.size,) + shape, dtype=np.float32) for shape in shapes]
            self.keys = np.full(self.size, np.inf)
        # slots: the free ones first, then those holding the largest keys, while a new key is smaller
        free = np.arange(self.filled, self.size)
        held = np.argsort(self.keys[:self.filled])[::-1]
        slots = np.concatenate([free, held])
        incoming = mine[np.argsort(keys[mine])]
        limit = min(len(incoming), len(slots))
        # smallest new keys against largest held ones: once one does not enter, none after it does
        enter = np.ones(limit, dtype=bool)
        enter[len(free):] = keys[incoming[len(free):limit]] < self.keys[slots[len(free):limit]]
        accepted = limit if enter.all() else int(np.argmin(enter))
        if accepted == 0:
            return
        slots, incoming = slots[:accepted], incoming[:accepted]
        order = np.argsort(incoming)  # take() wants sorted positions
        slots, incoming = slots[order], incoming[order]
        self.keys[slots] = keys[incoming]
        for store, part in zip(self.rows, (columns.take(incoming), layer.output_matrix(z, incoming),
                                           layer.output_matrix(t, incoming))):
            store[slots] = part.transpose(2, 0, 1)
        self.filled += min(accepted, len(free))

    def arrays(self):
        """``(cols [G, K/G, B], z [G, M/G, B], t [G, M/G, B])`` of the cached positions."""
        return tuple(np.ascontiguousarray(rows[:self.filled].transpose(1, 2, 0)) for rows in self.rows)

    @property
    def complete(self) -> bool:
        return self.seen == self.filled

    def shrink(self, size: int) -> None:
        """Keep the ``size`` smallest keys: still a uniform sample of the stream (bottom-k of bottom-K)."""
        if self.filled <= size:
            return
        keep = np.sort(np.argsort(self.keys[:self.filled])[:size])
        self.rows = [rows[keep] for rows in self.rows]
        self.keys = self.keys[keep]
        self.filled = self.size = size


class _Moments:
    """Streaming ``H = sum cols cols^T``, ``G = sum cols R^T``, ``c = sum R^2`` (float64), ``R = t - z``;
    with QDrop inputs also ``variance = sum q (1 - q) (a - b)^2`` per input row (:meth:`add_variance`)."""

    def __init__(self, fourth: bool = False):
        self.h = self.g = self.c = None
        self.variance = None
        self.want_fourth = fourth
        self.fourth = None  # with fourth: (sum_p ||x_p||^4 [G], sum_p x_pk^4 [G, K/G]) for shrinkage_intensity
        self.count = 0

    def add_variance(self, variance: np.ndarray) -> None:
        """Add a chunk's ``sum_positions q (1 - q) (a - b)^2``, ``[G, K/G]``."""
        self.variance = variance if self.variance is None else self.variance + variance

    def add(self, cols: np.ndarray, residual: np.ndarray | None) -> None:
        cols = cols.astype(np.float64)
        # A @ A.T of one buffer: NumPy calls BLAS syrk (half the work of a GEMM on a transposed copy)
        h = (cols[0] @ cols[0].T)[None] if cols.shape[0] == 1 else np.matmul(cols, cols.transpose(0, 2, 1))
        if residual is None:
            g = np.zeros((cols.shape[0], cols.shape[1], 0))
            c = 0.0
        else:
            residual = residual.astype(np.float64)
            g = _bmm(cols, np.ascontiguousarray(residual.transpose(0, 2, 1)))
            c = np.square(residual).sum(axis=2)
        fourth = fourth_moments(cols) if self.want_fourth else None
        if self.h is None:
            self.h, self.g, self.c, self.fourth = h, g, c, fourth
        else:
            self.h += h
            self.g = self.g + g
            self.c = self.c + c
            if fourth is not None:
                self.fourth = (self.fourth[0] + fourth[0], self.fourth[1] + fourth[1])
        self.count += cols.shape[2]


def fourth_moments(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_p ||x_p||^4, sum_p x_pk^4)`` of the columns ``x_p = cols[g, :, p]``: ``[G]`` and ``[G, K/G]``."""
    square = np.square(cols, dtype=np.float64)
    return np.square(square.sum(axis=1)).sum(axis=1), np.square(square).sum(axis=2)


def shrinkage_intensity(h: np.ndarray, fourth: tuple[np.ndarray, np.ndarray], count: int) -> np.ndarray:
    """Schaefer & Strimmer's (2005, target "D") intensity for shrinking ``H = mean_p x_p x_p^T`` to its diagonal,
    per group: ``alpha = clip(sum_{i != j} Var(H_ij) / sum_{i != j} H_ij^2, 0, 1)`` with
    ``Var(H_ij) = (mean_p x_pi^2 x_pj^2 - H_ij^2) / (n - 1)``; ``h`` ``[G, K, K]``, ``fourth`` from
    :func:`fourth_moments` over the same ``n`` positions. The positions are taken as independent draws (a conv's
    neighbouring positions are not: there alpha comes out low, i.e. conservative)."""
    if count < 2:
        return np.ones(h.shape[0])
    diagonal = np.diagonal(h, axis1=1, axis2=2)
    off_squares = np.square(h).sum(axis=(1, 2)) - np.square(diagonal).sum(axis=1)
    off_fourth = (fourth[0] - fourth[1].sum(axis=1)) / count  # sum_{i != j} mean_p x_pi^2 x_pj^2
    return _intensity(off_fourth, off_squares, count)


def _intensity(off_fourth: np.ndarray, off_squares: np.ndarray, count: int) -> np.ndarray:
    """``clip(V / S, 0, 1)``: ``S = sum_{i != j} H_ij^2``, ``V = (sum_{i != j} mean_p w_pij^2 - S) / (n - 1)`` the
    summed variance of the ``H_ij = mean_p w_pij`` (1 where ``S`` is 0: nothing to keep)."""
    variance = np.maximum(off_fourth - off_squares, 0) / (count - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(off_squares > 0, variance / off_squares, 1.0)
    return np.clip(alpha, 0.0, 1.0)


def masked_shrinkage_intensity(cols: np.ndarray, weights: np.ndarray, rng: np.random.Generator,
                               budget: float = INTENSITY_FLOPS) -> np.ndarray:
    """Schaefer & Strimmer's intensity per output channel for the loss's Gauss-Newton Hessian
    ``H_o = mean_p u_op x_p x_p^T`` (``u = f'(t)^2`` at the FP32 target): :func:`shrinkage_intensity` of the
    samples ``u_op x_p x_p^T``, ``alpha_o = sum_{i != j} Var(H_oij) / sum_{i != j} H_oij^2``; ``cols`` ``[G, K, n]``,
    ``weights`` ``u`` ``[G, M, n]``, the result ``[G, M]``. Above ``budget`` flops both sums run over the pairs of
    ``K' < K`` inputs drawn at random (all ``n`` positions: the noise of each ``H_oij`` is the loss's own)."""
    groups, inputs, count = cols.shape
    outputs = weights.shape[1]
    if count < 2:
        return np.ones((groups, outputs))
    sample = _intensity_inputs(groups, inputs, outputs, count, budget)
    if sample < inputs:
        cols = cols[:, np.sort(rng.choice(inputs, size=sample, replace=False))]
    off_fourth, off_squares = np.empty((groups, outputs)), np.empty((groups, outputs))
    chunk = max(1, COLUMN_BUDGET // (sample * count))  # groups at a time, for memory (a depthwise conv has many)
    for start in range(0, groups, chunk):
        part = slice(start, start + chunk)
        x, u = cols[part].astype(np.float64), weights[part].astype(np.float64)
        square = np.square(x)
        diagonal = np.matmul(u, square.transpose(0, 2, 1)) / count  # [g, M, K]: H_okk
        pair_fourth = np.square(square.sum(axis=1)) - np.square(square).sum(axis=1)  # sum_{i != j} x_pi^2 x_pj^2
        off_fourth[part] = np.matmul(np.square(u), pair_fourth[:, :, None])[:, :, 0] / count
        off_squares[part] = _masked_frobenius(x, u) - np.square(diagonal).sum(axis=2)
    return _intensity(off_fourth, off_squares, count)


def _masked_frobenius(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``||H_o||_F^2`` of ``H_o = (1/n) sum_p u_op x_p x_p^T`` per group and channel, ``[G, M]``: directly
    (``M K^2 n``; each ``H_o``, or with many channels all their row blocks at once, ``u (x_i x_j)^T``) or from
    the Gram matrix, ``u_o^T ((X^T X) o (X^T X)) u_o / n^2`` (``(K + M) n^2``; while ``G n^2`` fits
    :data:`COLUMN_BUDGET`)."""
    groups, inputs, count = x.shape
    outputs = u.shape[1]
    if count * (inputs + outputs) < outputs * inputs * inputs and groups * count * count <= COLUMN_BUDGET:
        gram = np.square(np.matmul(x.transpose(0, 2, 1), x))  # [G, n, n]: memory-capped
        return np.sum(np.matmul(u, gram) * u, axis=2) / (count * count)
    out = np.zeros((groups, outputs))
    if outputs <= inputs:  # few channels (a depthwise conv: one per group): one H_o at a time, batched over groups
        for o in range(outputs):
            h = np.matmul(x * u[:, o:o + 1, :], x.transpose(0, 2, 1)) / count
            out[:, o] = np.square(h).sum(axis=(1, 2))
        return out
    rows = max(1, COLUMN_BUDGET // (groups * inputs * count))
    for start in range(0, inputs, rows):  # rows i of every H_o at once: u [M, n] @ (x_i x_j)_p^T [n, rows K]
        products = (x[:, start:start + rows, None, :] * x[:, None, :, :]).reshape(groups, -1, count)
        out += np.square(np.matmul(u, products.transpose(0, 2, 1)) / count).sum(axis=2)
    return out


def _intensity_inputs(groups: int, inputs: int, outputs: int, count: int, budget: float) -> int:
    """The inputs :func:`masked_shrinkage_intensity` takes: all ``K`` when its work, ``G min(M K^2 n,
    (K + M) n^2)`` flops (the second only while ``n^2`` fits :data:`COLUMN_BUDGET`), is within ``budget``; else
    ``K' = sqrt(budget / (G M n))`` (at least 8) by the direct form."""
    gram = (inputs + outputs) * count * count if count * count <= COLUMN_BUDGET else math.inf
    if groups * min(outputs * inputs * inputs * count, gram) <= budget:
        return inputs
    return int(min(inputs, max(8, math.sqrt(budget / (groups * outputs * count)))))


def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched matmul over groups; one group as a plain 2-D product (BLAS on contiguous operands)."""
    if a.shape[0] == 1:
        return (a[0] @ b[0])[None]
    return np.matmul(a, b)


class QuadraticLoss:
    """``L(W) = sum_g tr(dW H dW^T) - 2 tr(dW G) + c`` over means, ``dW = W_mat - W_fp32``: the exact
    ``sum_channels mean_positions (y_fp32 - y(W))^2`` of all streamed positions (no activation).

    With QDrop inputs (``cols = b`` with probability ``q`` per element, else ``a``) it is the exact expectation
    over the masks: with ``m = (1 - q) a + q b`` and ``D = mean q (1 - q) (a - b)^2`` (a diagonal),
    ``E ||t - W cols - bias||^2 = ||t - W m - bias||^2 + sum_k D_k sum_o W[o, k]^2``: the moments of ``m``
    (:func:`build_objective`) plus ``D`` in ``H``, ``-W_fp32 D`` in ``G`` and ``sum W_fp32^2 D`` in ``c``.

    ``alpha`` (per group, :func:`shrinkage_intensity`): the loss with ``H`` shrunk toward its diagonal,
    ``(1 - alpha) L + alpha sum_{o,k} H_kk dW_ok^2``."""

    def __init__(self, moments: _Moments, w_float: np.ndarray, alpha: np.ndarray | None = None):
        n = max(1, moments.count)
        self.h = moments.h / n
        has_residual = moments.g.shape[2] > 0
        self.g = np.ascontiguousarray((moments.g / n).transpose(0, 2, 1)) if has_residual else np.zeros_like(w_float)
        self.c = moments.c / n if has_residual else np.zeros(w_float.shape[:2])
        self.alpha = np.zeros(self.h.shape[0]) if alpha is None else np.asarray(alpha, dtype=np.float64)
        if alpha is not None:  # before the QDrop term, which is an exact expectation, not an estimate
            self._shrink(self.alpha)
        if moments.variance is not None:
            d = moments.variance / n  # [G, K/G]
            self.h = self.h + d[:, :, None] * np.eye(d.shape[1])
            self.g = self.g - w_float * d[:, None, :]
            self.c = self.c + np.einsum("gmk,gk->gm", w_float * w_float, d)
        self.w = w_float
        self.count = moments.count

    def _shrink(self, alpha: np.ndarray) -> None:
        """``(1 - alpha) L + alpha sum_{o,k} H_kk dW_ok^2`` per group: ``H`` shrunk toward its diagonal, ``G`` and
        ``c`` scaled by ``1 - alpha`` (the second moment of (input, residual) shrunk to its diagonal)."""
        keep = (1 - alpha)[:, None, None]
        diagonal = np.diagonal(self.h, axis1=1, axis2=2)
        self.h = keep * self.h + alpha[:, None, None] * (diagonal[:, :, None] * np.eye(self.h.shape[1]))
        self.g = keep * self.g
        self.c = (1 - alpha)[:, None] * self.c

    def __call__(self, w: np.ndarray, grad: bool = True, sample=None, value: bool = True):
        """The loss (None unless ``value``) and, with ``grad``, ``dL/dW``."""
        dw = w - self.w
        dwh = _bmm(dw, self.h)
        loss = float(np.sum(dwh * dw) - 2 * np.sum(dw * self.g) + np.sum(self.c)) if value or not grad else None
        return (loss, 2 * (dwh - self.g)) if grad else loss

    def per_channel(self, w: np.ndarray) -> np.ndarray:
        """The loss of each output channel, ``[G, M/G]`` (they sum to the loss)."""
        dw = w - self.w
        return np.sum((_bmm(dw, self.h) - 2 * self.g) * dw, axis=2) + self.c


class SampledLoss:
    """``L(W) = sum_channels mean_positions (f(t) - f(z + (W - W_fp32) cols))^2`` on cached positions,
    ``f`` = clip to ``activation`` (identity when None), a :class:`Pointwise` ``f`` with its ``f'``, or for
    :data:`SOFTMAX` the softmax over the
    channels ``s = softmax(y)``, whose backward is ``dL/dy = s * (dL/ds - sum_channels(dL/ds * s))``;
    ``dL/dW = dY @ cols^T``. ``sample``: a slice of the cached positions (Adam's minibatch; after a
    :meth:`shuffle`, a view rather than a gather). After :meth:`shrink`, ``sum_o (1 - alpha_o) L_o + alpha_o
    sum_k D_ok dW_ok^2`` over the output channels (``L_o`` a channel's loss, ``D_o`` the diagonal of its
    Hessian)."""

    def __init__(self, cols: np.ndarray, z: np.ndarray, t: np.ndarray, w_float: np.ndarray, activation):
        self.w = w_float.astype(np.float32)
        self.full_batch = False  # set by build_objective: all positions kept, cheap enough for full-batch Adam
        self.softmax = isinstance(activation, str) and activation == SOFTMAX
        self.pointwise = activation if isinstance(activation, Pointwise) else None
        self.slope = None  # PRelu: the slope of each output channel as [G, M/G, 1]
        if isinstance(activation, PRelu):
            g, mg = z.shape[:2]
            self.slope = np.broadcast_to(activation.slope.astype(np.float32), (g * mg,)).reshape(g, mg, 1)
        self.clipped = isinstance(activation, tuple)
        self.lo, self.hi = activation if self.clipped else (-math.inf, math.inf)
        # the fused kernel's view of the activation (float32 bounds: NumPy compares float32 y with them so)
        self.kind = CLIP if self.clipped else PRELU if self.slope is not None else IDENTITY
        self.lo32, self.hi32 = np.float32(self.lo), np.float32(self.hi)
        self.slope2d = (self.slope[:, :, 0] if self.slope is not None
                        else np.ones(z.shape[:2], dtype=np.float32))
        self._store(cols, z, self._f(t))
        self.count = self.cols.shape[2]
        self.alpha = None  # shrink(): the intensity per channel, [G, M/G]
        self.keep = self.ridge = None  # ... and while any is > 0: 1 - alpha [G, M/G, 1], alpha D [G, M/G, K/G]

    def curvature_weights(self, t: np.ndarray) -> np.ndarray | None:
        """``u = f'(t)^2`` per output and position at the FP32 target's pre-activation ``t``, ``[G, M/G, P]``: the
        weight of ``x_p x_p^T`` in channel ``o``'s Gauss-Newton Hessian ``mean_p u_op x_p x_p^T``; None for the
        identity (``u = 1``). A softmax couples the channels: it has no such weights (an error to ask)."""
        if self.softmax:
            raise RefquantError("adaround: a softmax's loss has no per-channel curvature weights")
        if self.clipped:
            return ((t > self.lo) & (t < self.hi)).astype(np.float32)
        if self.slope is not None:
            return np.where(t >= 0, np.float32(1), np.square(self.slope)).astype(np.float32)
        if self.pointwise is not None:
            return np.square(self.pointwise(t, derivative=True)[1]).astype(np.float32)
        return None

    def shrink(self, alpha: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Mix each channel's loss with its uncorrelated-inputs form: ``(1 - alpha_o) L_o + alpha_o sum_k D_ok
        dW_ok^2``, ``D_ok = mean_p u_op x_pk^2`` over the cached positions (``u``: :meth:`curvature_weights`, 1
        when None). ``alpha``: ``[G]`` or ``[G, M/G]``."""
        groups, outputs = self.target.shape[:2]
        self.alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64).reshape(groups, -1), (groups, outputs))
        if not np.any(self.alpha):
            self.keep = self.ridge = None
            return
        square = np.square(self.cols, dtype=np.float64)
        if weights is None:
            diagonal = np.mean(square, axis=2)[:, None, :]  # [G, 1, K/G]
        else:
            diagonal = np.matmul(weights.astype(np.float64), square.transpose(0, 2, 1)) / self.count
        # both precomputed: an optimizer step then adds two passes over the weights
        self.keep = (1 - self.alpha)[:, :, None]
        self.ridge = np.ascontiguousarray(self.alpha[:, :, None] * diagonal)

    def _shrunk_loss(self, dw, channel_loss, grad):
        """``sum_o (1 - alpha_o) L_o + alpha_o ridge_o`` from :meth:`_loss`'s per-channel loss (or None) and
        gradient (a channel's loss depends on its own weights only: no softmax here)."""
        if grad:
            channel_loss, gradient = channel_loss
        if self.ridge is None:
            loss = None if channel_loss is None else float(channel_loss.sum())
            return (loss, gradient) if grad else loss
        loss = None if channel_loss is None else \
            float(np.sum(self.keep[:, :, 0] * channel_loss) + np.sum(self.ridge * dw * dw))
        if not grad:
            return loss
        gradient *= self.keep  # a new float64 array from _loss: updated in place
        gradient += 2 * self.ridge * dw
        return loss, gradient

    def _f(self, y: np.ndarray) -> np.ndarray:
        if self.softmax:
            return _softmax(y)
        if self.pointwise is not None:
            return self.pointwise.value(y)
        if self.slope is not None:
            return np.where(y >= 0, y, self.slope * y)
        return np.clip(y, self.lo, self.hi) if self.clipped else y

    def _store(self, cols, z, target):
        # both layouts contiguous: [G, K, B] for Y = dW cols, [G, B, K] for dY cols^T (BLAS operands)
        self.cols = np.ascontiguousarray(cols)
        self.cols_t = np.ascontiguousarray(cols.transpose(0, 2, 1))
        self.z = np.ascontiguousarray(z)
        self.target = np.ascontiguousarray(target)

    def shuffle(self, rng: np.random.Generator) -> None:
        """Reorder the cached positions at random."""
        order = rng.permutation(self.count)
        self._store(np.take(self.cols, order, axis=2), np.take(self.z, order, axis=2),
                    np.take(self.target, order, axis=2))

    def __call__(self, w: np.ndarray, grad: bool = True, sample: slice | None = None, value: bool = True):
        """The loss (None unless ``value``) and, with ``grad``, ``dL/dW``."""
        part = sample if sample is not None else slice(None)
        dw = w - self.w
        return self._shrunk_loss(dw, self._loss(dw.astype(np.float32), self.cols[:, :, part], self.cols_t[:, part],
                                                self.z[:, :, part], self.target[:, :, part], grad, value), grad)

    def _loss(self, dw, cols, cols_t, z, target, grad, value):
        """The loss of ``y = dw cols + z`` against ``target``, per channel (``[G, M/G]``), and
        ``dL/dW = dL/dy cols^T``."""
        count = cols.shape[2]
        y = _bmm(dw, cols)
        if grad and not value and not self.softmax and self.pointwise is None:  # Adam's step: float32, one pass
            reconstruction_gradient(y, z, target, self.kind, self.lo32, self.hi32, self.slope2d,
                                    np.float32(2.0 / count))
            return None, _bmm(y, cols_t).astype(np.float64)
        y += z
        if self.pointwise is not None:
            out, slope = self.pointwise(y, derivative=grad)
        else:
            out = self._f(y)  # a new array, except for the identity (then y itself)
        if self.softmax:  # its backward below needs its output
            diff = out - target
        else:
            diff = out
            diff -= target
        # the value in float64 (L-BFGS's line search compares values); Adam does not ask for it
        loss = np.square(diff, dtype=np.float64).sum(axis=2) / count if value or not grad else None
        if not grad:
            return loss
        diff *= np.float32(2.0 / count)  # float32 on purpose: the GEMM below is the cost
        if self.clipped:
            diff *= (y > self.lo) & (y < self.hi)
        elif self.softmax:  # the softmax's Jacobian (symmetric): s * (d - <d, s>) per position
            diff = out * (diff - np.sum(diff * out, axis=1, keepdims=True))
        elif self.slope is not None:
            diff = np.where(y >= 0, diff, self.slope * diff)
        elif self.pointwise is not None:  # dL/dy = dL/df f'(y)
            diff *= slope
        return loss, _bmm(diff, cols_t).astype(np.float64)

    def per_channel(self, w: np.ndarray) -> np.ndarray:
        """The loss of each output channel, ``[G, M/G]`` (they sum to the loss; with a softmax each
        depends on every channel's weights)."""
        y = self.z + _bmm((w - self.w).astype(np.float32), self.cols)
        diff = self._f(y) - self.target
        return self._shrunk_channels(w, np.sum(np.square(diff, dtype=np.float64), axis=2) / self.count)

    def _shrunk_channels(self, w, channel_loss):
        """:meth:`per_channel` after :meth:`shrink`: each channel's ``(1 - alpha) L_o + alpha ridge_o``."""
        if self.ridge is None:
            return channel_loss
        dw = np.asarray(w - self.w, dtype=np.float64)
        return self.keep[:, :, 0] * channel_loss + np.sum(self.ridge * dw * dw, axis=2)


class MixedSampledLoss(SampledLoss):
    """:class:`SampledLoss` on QDrop inputs (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for
    Extremely Low-bit Post-Training Quantization"): ``cols = where(mask, b, a)``, ``mask ~ Bernoulli(q)`` per
    element, ``a`` the simulation's columns, ``b`` the FP32 model's; ``y = W cols + bias_p`` with the layer's
    ``bias_p = z_p - W_fp32 a_p``. A gradient draws a new mask; a value (``grad=False``, :meth:`per_channel`)
    uses one mask drawn at the start, so that roundings are compared on the same inputs. ``q`` is a multiple of
    1/256 (:func:`qdrop_threshold`): the mask is one random byte per element below ``256 q``."""

    def __init__(self, cols, cols_fp32, z, t, w_float, activation, probability: float, rng: np.random.Generator):
        self.cols_fp32 = np.ascontiguousarray(cols_fp32)
        self.threshold, self.rng = qdrop_threshold(probability), rng
        super().__init__(cols, z, t, w_float, activation)
        self.fixed_draws = self._draws(self.cols.shape)

    def _draws(self, shape):
        return np.frombuffer(self.rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)

    def _store(self, cols, z, target):
        self.cols = np.ascontiguousarray(cols)
        self.bias = np.ascontiguousarray(z - _bmm(self.w, self.cols))
        self.target = np.ascontiguousarray(target)

    def shuffle(self, rng: np.random.Generator) -> None:
        order = rng.permutation(self.count)
        self.cols, self.cols_fp32, self.bias, self.target, self.fixed_draws = (
            np.ascontiguousarray(np.take(a, order, axis=2))
            for a in (self.cols, self.cols_fp32, self.bias, self.target, self.fixed_draws))

    def _mixed(self, part: slice, fixed: bool):
        """The mixed columns of positions ``part`` (a slice), ``[G, K, B]``."""
        start, stop, _ = part.indices(self.count)
        shape = self.cols.shape[:2] + (stop - start,)
        out = np.empty(shape, dtype=np.float32)
        if fixed:
            mix_columns(self.cols, self.cols_fp32, self.fixed_draws, start, self.threshold, start, stop, out)
        else:
            mix_columns(self.cols, self.cols_fp32, self._draws(shape), 0, self.threshold, start, stop, out)
        return out

    def __call__(self, w: np.ndarray, grad: bool = True, sample: slice | None = None, value: bool = True):
        part = sample if sample is not None else slice(None)
        cols = self._mixed(part, fixed=not grad)
        # the transposed view: NumPy's matmul hands it to BLAS as is (measured no slower than a contiguous copy)
        return self._shrunk_loss(w - self.w, self._loss(w.astype(np.float32), cols, cols.transpose(0, 2, 1),
                                                       self.bias[:, :, part], self.target[:, :, part], grad, value),
                                grad)

    def per_channel(self, w: np.ndarray) -> np.ndarray:
        y = self.bias + _bmm(w.astype(np.float32), self._mixed(slice(None), fixed=True))
        diff = self._f(y) - self.target
        return self._shrunk_channels(w, np.sum(np.square(diff, dtype=np.float64), axis=2) / self.count)


def qdrop_threshold(probability: float) -> int:
    """``round(256 q)``: QDrop's mask takes the FP32 input where a random byte is below it."""
    return int(round(256 * probability))


def _softmax(y: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (the output channels of ``[G, M/G, B]``)."""
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


__all__ = ["MixedSampledLoss", "QuadraticLoss", "SampledLoss", "fourth_moments", "masked_shrinkage_intensity",
           "qdrop_threshold", "shrinkage_intensity"]
