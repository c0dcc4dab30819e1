"""Recurrent ops: LSTM, GRU, RNN (all directions, layouts, sequence lengths, clip, custom activations).

The input projection X_t W^T + Wb of every time step is one GEMM before the loop; each step then
adds H_{t-1} R^T. Batch entries past their sequence length keep their state and emit zeros.
"""

from __future__ import annotations

import numpy as np
import scipy.special

from ..kernels import mlas
from .registry import register


def _sigmoid(x):
    """float32: MLAS's logistic, onnxruntime's own gate function (bit for bit); other dtypes: expit."""
    return mlas.logistic(x) if x.dtype == np.float32 else scipy.special.expit(x)


def _tanh(x):
    """float32: MLAS's tanh, as onnxruntime's gates compute it; other dtypes: NumPy's."""
    return mlas.tanh(x) if x.dtype == np.float32 else np.tanh(x)


def _activation(name: str, alpha=None, beta=None):
    """ONNX's RNN activation functions by name, with their optional alpha/beta."""
    name = name.lower()
    if name == "sigmoid":
        return _sigmoid
    if name == "tanh":
        return _tanh
    if name == "relu":
        return lambda x: np.maximum(x, 0)
    if name == "affine":
        return lambda x: alpha * x + beta
    if name == "leakyrelu":
        return lambda x: np.where(x >= 0, x, (0.01 if alpha is None else alpha) * x)
    if name == "thresholdedrelu":
        return lambda x: np.where(x > (1.0 if alpha is None else alpha), x, 0)
    if name == "scaledtanh":
        return lambda x: alpha * np.tanh(beta * x)
    if name == "hardsigmoid":
        a, b = (0.2 if alpha is None else alpha), (0.5 if beta is None else beta)
        return lambda x: np.clip(a * x + b, 0, 1)
    if name == "elu":
        return lambda x: np.where(x >= 0, x, (1.0 if alpha is None else alpha) * np.expm1(np.minimum(x, 0)))
    if name == "softsign":
        return lambda x: x / (1 + np.abs(x))
    if name == "softplus":
        return lambda x: np.logaddexp(0, x)
    raise ValueError(f"unsupported RNN activation {name!r}")


_PARAMETRIC = {"affine": 2, "leakyrelu": 1, "thresholdedrelu": 1, "scaledtanh": 2, "hardsigmoid": 2, "elu": 1}


def _activations(names, alphas, betas, defaults, directions):
    """One list of callables per direction; alpha/beta are consumed in order by the activations that take them."""
    names = list(names) if names else defaults * directions
    alphas, betas = list(alphas or []), list(betas or [])
    fns = []
    for name in names:
        takes = _PARAMETRIC.get(name.lower(), 0)
        alpha = alphas.pop(0) if takes >= 1 and alphas else None
        beta = betas.pop(0) if takes >= 2 and betas else None
        fns.append(_activation(name, alpha, beta))
    per = len(fns) // directions
    return [fns[d * per:(d + 1) * per] for d in range(directions)]


def _run(x, sequence_lens, direction, hidden, initial_states, step):
    """Drive ``step(d, inputs_t, states) -> states`` over time (x is time-major) for each direction.

    Returns Y [T, dirs, B, H] and the final states, per direction.
    """
    steps, batch = x.shape[:2]
    lens = np.full(batch, steps) if sequence_lens is None else np.asarray(sequence_lens).astype(np.int64)
    dirs = 2 if direction == "bidirectional" else 1
    y = np.zeros((steps, dirs, batch, hidden), dtype=x.dtype)
    finals = []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        states = [s[d] for s in initial_states]
        for i in range(steps):
            t = steps - 1 - i if reverse else i
            if reverse:  # reversed sequences start at their own last valid step
                active = i < lens
                t_index = np.where(active, lens - 1 - i, 0)
                inputs = x[t_index, np.arange(batch)]
            else:
                active = t < lens
                inputs = x[t]
            new = step(d, inputs, states)
            states = [np.where(active[:, None], n, s) for n, s in zip(new, states)]
            out = np.where(active[:, None], states[0], 0)
            if reverse:
                y[t_index[active], d, np.arange(batch)[active]] = out[active]
            else:
                y[t, d] = out
        finals.append(states)
    return y, finals


def _outputs(y, finals, layout, noutputs, dtype):
    """Y, Y_h (and Y_c) in the requested layout."""
    states = [np.stack([f[k] for f in finals]).astype(dtype) for k in range(len(finals[0]))]
    if layout:
        y = np.transpose(y, (2, 0, 1, 3))
        states = [np.swapaxes(s, 0, 1) for s in states]
    return tuple([y.astype(dtype)] + states)[:max(noutputs, 1)]


def _initial(value, dirs, batch, hidden, dtype, layout):
    if value is None:
        return np.zeros((dirs, batch, hidden), dtype=dtype)
    return np.swapaxes(value, 0, 1) if layout else value


@register("LSTM", since=7)
def lstm(x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *, activation_alpha=None,
         activation_beta=None, activations=None, clip=None, direction="forward", hidden_size=None, input_forget=0,
         layout=0, noutputs=1):
    """i, o, f = f(X W^T + H R^T + P*C + b); c~ = g(...); C = f*C + i*c~; H = o * h(C)  (gates in order i o f c)."""
    dirs, hidden = w.shape[0], w.shape[1] // 4
    batch = x.shape[0 if layout else 1]
    b = np.zeros((dirs, 8 * hidden), x.dtype) if b is None else b
    p = np.zeros((dirs, 3 * hidden), x.dtype) if p is None else p
    fns = _activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh", "Tanh"], dirs)
    xs = np.swapaxes(x, 0, 1) if layout else x
    projected = [np.matmul(xs, w[d].T) + b[d, :4 * hidden] + b[d, 4 * hidden:] for d in range(dirs)]

    def step(d, inputs_t, states):
        h, c = states
        f_act, g_act, h_act = fns[d]
        gates = inputs_t + np.matmul(h, r[d].T)
        if clip is not None:
            gates = np.clip(gates, -clip, clip)
        gi, go, gf, gc = np.split(gates, 4, axis=1)
        pi, po, pf = np.split(p[d], 3)
        i = f_act(gi + pi * c)
        f = 1 - i if input_forget else f_act(gf + pf * c)
        c_new = f * c + i * g_act(gc)
        o = f_act(go + po * c_new)
        return [o * h_act(c_new), c_new]

    y, finals = _run_projected(projected, layout, sequence_lens, direction, hidden,
                               [_initial(initial_h, dirs, batch, hidden, x.dtype, layout),
                                _initial(initial_c, dirs, batch, hidden, x.dtype, layout)], step)
    return _outputs(y, finals, layout, noutputs, x.dtype)


@register("GRU", since=7)
def gru(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, layout=0, linear_before_reset=0,
        noutputs=1):
    """z, r = f(X W^T + H R^T + b); h~ = g(X Wh^T + (r*H) Rh^T + b) (or r*(H Rh^T + Rbh)); H = (1-z)*h~ + z*H"""
    dirs, hidden = w.shape[0], w.shape[1] // 3
    batch = x.shape[0 if layout else 1]
    b = np.zeros((dirs, 6 * hidden), x.dtype) if b is None else b
    fns = _activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh"], dirs)
    xs = np.swapaxes(x, 0, 1) if layout else x
    projected = [np.matmul(xs, w[d].T) + b[d, :3 * hidden] for d in range(dirs)]

    def step(d, inputs_t, states):
        (h,) = states
        f_act, g_act = fns[d]
        rz, rr, rh = np.split(r[d], 3, axis=0)
        bz, br, bh = np.split(b[d, 3 * hidden:], 3)
        xz, xr, xh = np.split(inputs_t, 3, axis=1)
        pre_z = xz + h @ rz.T + bz
        pre_r = xr + h @ rr.T + br
        if clip is not None:
            pre_z, pre_r = np.clip(pre_z, -clip, clip), np.clip(pre_r, -clip, clip)
        z, rt = f_act(pre_z), f_act(pre_r)
        pre_h = xh + (rt * (h @ rh.T + bh) if linear_before_reset else (rt * h) @ rh.T + bh)
        if clip is not None:
            pre_h = np.clip(pre_h, -clip, clip)
        return [(1 - z) * g_act(pre_h) + z * h]

    y, finals = _run_projected(projected, layout, sequence_lens, direction, hidden,
                               [_initial(initial_h, dirs, batch, hidden, x.dtype, layout)], step)
    return _outputs(y, finals, layout, noutputs, x.dtype)


@register("RNN", since=7)
def rnn(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, layout=0, noutputs=1):
    """H = f(X W^T + H R^T + Wb + Rb)"""
    dirs, hidden = w.shape[0], w.shape[1]
    batch = x.shape[0 if layout else 1]
    b = np.zeros((dirs, 2 * hidden), x.dtype) if b is None else b
    fns = _activations(activations, activation_alpha, activation_beta, ["Tanh"], dirs)
    xs = np.swapaxes(x, 0, 1) if layout else x
    projected = [np.matmul(xs, w[d].T) + b[d, :hidden] + b[d, hidden:] for d in range(dirs)]

    def step(d, inputs_t, states):
        pre = inputs_t + states[0] @ r[d].T
        if clip is not None:
            pre = np.clip(pre, -clip, clip)
        return [fns[d][0](pre)]

    y, finals = _run_projected(projected, layout, sequence_lens, direction, hidden,
                               [_initial(initial_h, dirs, batch, hidden, x.dtype, layout)], step)
    return _outputs(y, finals, layout, noutputs, x.dtype)


def _run_projected(projected, layout, sequence_lens, direction, hidden, initial_states, step):
    """_run over per-direction projected inputs [T, B, G] (already in time-major order)."""
    steps, batch = projected[0].shape[:2]
    stacked = np.stack(projected, axis=2)  # [T, B, dirs, G]

    def step_with_direction(d, inputs_t, states):
        return step(d, inputs_t[:, d], states)

    return _run(stacked, sequence_lens, direction, hidden, initial_states, step_with_direction)
