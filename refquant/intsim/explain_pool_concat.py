"""Explanations of one output element of the integer average pool, concat and softmax layers, written as
onnxruntime 1.32's CPU kernels compute them (the kernels refquant reproduces bit for bit:
:func:`refquant.ops.qoperators.qlinear_average_pool`, :func:`~refquant.ops.qoperators.qlinear_concat`,
:func:`refquant.intsim.contrib.qlinear_softmax`):

* ``QLinearAveragePool``: each tap inside the input is dequantized in float32, ``x' = f32(x_scale * (q - x_zp))``;
  the window's taps are summed in float32 in row-major order (padding adds nothing); ``mean = f32(sum / count)``
  with ``count`` the kernel size (``count_include_pad``) or the taps inside the input; then
  ``t = f32(f32(mean / y_scale) + y_zp)``, ``code = clamp(nearbyint(t))``. A kernel that covers the whole
  unpadded image takes the integer global-average path instead: ``acc = sum q - N x_zp``,
  ``m = f32(x_scale / f32(y_scale N))``, ``code = clamp(rint(f32(acc) m) + y_zp)``.
* ``QLinearConcat`` (inputs on other grids than the output) and ``Concat`` (every input on the output's grid):
  the output element comes from one input; on the output's grid it is copied, else it is that input's
  256-entry table ``MlasQuantizeLinear(f32(x_scale * (q - x_zp)), y_scale, y_zp)``:
  ``f = f32(x' / y_scale)`` clamped to ``[qmin - y_zp, qmax - y_zp]``, rounded half to even, ``+ y_zp``.
* ``QLinearSoftmax`` (uint8 / int8): the row's codes index onnxruntime's float32 exp table
  ``table[i] = f32(exp((i - 255 + shift) x_scale))``, ``shift = max(0, ln(FLT_MAX / D) - 5) / x_scale``, at
  ``255 - x_max + x_j`` (the row's largest code lands on entry 255); ``sum`` adds the row's D entries in float32
  left to right; ``code = nearbyint(f32(f32(e_j floor(1 / y_scale)) / sum)) + y_zp``, saturated (uint8: at 255,
  inf included; int8: to [-128, 127]).

Each function returns ``(lines, code, inputs read)``; the caller checks ``code`` against the program's.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..ops import nn as _nn
from .contrib import softmax_table
from .explain_elementwise import _global_average

F32 = np.float32
POOL_CONCAT_OPS = {"QLinearAveragePool", "QLinearConcat", "Concat", "QLinearSoftmax"}


def _text(index) -> str:
    return ",".join(map(str, index))


def _scalars(get, names):
    """(scale float32, zero point int) pairs of program constants."""
    scale, zp = (get(n) for n in names)
    return F32(np.asarray(scale).reshape(())), int(np.asarray(zp).reshape(()))


def explain_pool_concat(node, get, producers, index, label=lambda name: name) -> tuple[list, int, dict]:
    """(lines, code, inputs read) of output ``index`` of program node ``node`` (see the module docstring)."""
    op = node.op_type
    if op == "QLinearAveragePool":
        return _average_pool(node, get, index, label)
    if op in ("QLinearConcat", "Concat"):
        return _concat(node, get, index, label)
    return _softmax(node, get, index, label)


# ---------------------------------------------------------------------------------------------- average pool
def _average_pool(node, get, index, label):
    X = get(node.inputs[0])
    xs, xz = _scalars(get, node.inputs[1:3])
    ys, yz = _scalars(get, node.inputs[3:5])
    attrs = node.attrs
    if attrs.get("channels_last", 0):
        raise ValueError("explain: a channels-last QLinearAveragePool is not explained")
    spatial = list(X.shape[2:])
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = list(attrs.get("strides") or [1] * len(spatial))
    begin, end, _ = _nn.conv_geometry(spatial, kernel, strides, None, attrs.get("pads"),
                                      attrs.get("auto_pad", "NOTSET"), bool(attrs.get("ceil_mode", 0)), True)
    if spatial == kernel and not any(begin) and not any(end):
        lines, code, inputs = _global_average(node, get, index, label)
        return ["kernel covers the whole unpadded image: onnxruntime runs its integer global average"] + lines, \
            code, inputs
    n, c, out_pos = index[0], index[1], index[2:]
    starts = [o * s - b for o, s, b in zip(out_pos, strides, begin)]
    taps, total = [], F32(0)
    for tap in itertools.product(*[range(k) for k in kernel]):  # row-major, as the kernel adds its taps
        pos = tuple(s + t for s, t in zip(starts, tap))
        if all(0 <= p < d for p, d in zip(pos, spatial)):
            q = int(X[(n, c) + pos])
            value = F32(xs * F32(q - xz))
            total = F32(total + value)
            taps.append((pos, q, value))
    inside = len(taps)
    count = F32(math.prod(kernel)) if attrs.get("count_include_pad", 0) else F32(inside)
    mean = F32(total / count)
    t = F32(F32(mean / ys) + F32(yz))
    info = np.iinfo(X.dtype)
    r = float(np.rint(np.float64(t))) if abs(float(t)) < 2.0 ** 31 else -2.0 ** 31
    code = int(np.clip(r, info.min, info.max))
    window = " x ".join(f"{s}..{s + k - 1}" for s, k in zip(starts, kernel))
    name = label(node.inputs[0])
    lines = [f"input {name!r}: scale {float(xs):.9g}, zero point {xz}; window {window} of channel {c} "
             f"(kernel {'x'.join(map(str, kernel))}, strides {strides}, begin pads {list(begin)}): {inside} of "
             f"{math.prod(kernel)} taps inside the input"]
    shown = taps if len(taps) <= 12 else taps[:9] + [None] + taps[-3:]
    for entry in shown:
        if entry is None:
            lines.append(f"    ... {len(taps) - 12} more taps ...")
            continue
        pos, q, value = entry
        lines.append(f"    {name}[{_text((n, c) + pos)}] = {q:>6}   x' = f32({float(xs):.9g} * ({q} - {xz})) = "
                     f"{float(value):.9g}")
    counted = "kernel size (count_include_pad=1)" if attrs.get("count_include_pad", 0) else "taps inside the input"
    lines += [f"float32 sum of the taps, row-major: {float(total):.9g}",
              f"count = {counted} = {int(count)}; mean = f32(sum / count) = {float(mean):.9g}",
              f"t = f32(f32(mean / y_scale) + y_zp) = f32({float(mean):.9g} / {float(ys):.9g} + {yz}) = {float(t):.9g}",
              f"rounding  nearbyint, round half to even ({_tie(float(t))}), saturate to [{info.min}, {info.max}] "
              f"-> code {code}"]
    return lines, code, {name: [q for _, q, _ in taps]}


# ---------------------------------------------------------------------------------------------- concat
def _concat(node, get, index, label):
    axis = int(node.attrs["axis"])
    if node.op_type == "QLinearConcat":
        ys, yz = _scalars(get, node.inputs[0:2])
        triples = [node.inputs[i:i + 3] for i in range(2, len(node.inputs), 3)]
    else:  # every input already on the output's grid: a copy
        ys, yz = None, None
        triples = [(name, None, None) for name in node.inputs if name]
    arrays = [get(t[0]) for t in triples]
    axis %= arrays[0].ndim
    position, offset = index[axis], 0
    for k, (triple, array) in enumerate(zip(triples, arrays)):
        if position < offset + array.shape[axis]:
            break
        offset += array.shape[axis]
    local = tuple(i - offset if d == axis else i for d, i in enumerate(index))
    q = int(array[local])
    name = label(triple[0])
    lines = [f"output position {position} along axis {axis}: input {k} ({name!r}, positions {offset}.."
             f"{offset + array.shape[axis] - 1}), element [{_text(local)}] = code {q}"]
    if node.op_type == "Concat":
        lines.append("every input is on the output's grid (same scale and zero point): the code is copied")
        return lines, q, {name: q}
    xs, xz = _scalars(get, triple[1:3])
    lines.append(f"input grid: scale {float(xs):.9g}, zero point {xz}; output grid: scale {float(ys):.9g}, zero "
                 f"point {yz}")
    if xs == ys and xz == yz:
        lines.append("same grid as the output: QLinearConcat copies the code")
        return lines, q, {name: q}
    info = np.iinfo(array.dtype)
    x = F32(xs * F32(q - xz))
    with np.errstate(all="ignore"):
        f = F32(x / ys)
    fc = min(max(f, F32(info.min - yz)), F32(info.max - yz))
    y = int(np.rint(fc))
    code = y + yz
    lines += ["other grid: QLinearConcat requantizes through the input's 256-entry table (QlinearBuildLookupTable "
              "with the identity, MlasQuantizeLinear):",
              f"x' = f32(x_scale * (q - x_zp)) = f32({float(xs):.9g} * ({q} - {xz})) = {float(x):.9g}",
              f"f = f32(x' / y_scale) = {float(f):.9g}; clamp to [qmin - y_zp, qmax - y_zp] = "
              f"[{info.min - yz}, {info.max - yz}] -> {float(fc):.9g}",
              f"rounding  round half to even ({_tie(float(fc))}) -> {y}; + y_zp {yz} -> code {code}"]
    return lines, code, {name: q}


# ---------------------------------------------------------------------------------------------- softmax
def _softmax(node, get, index, label):
    X = get(node.inputs[0])
    xs, _ = _scalars(get, node.inputs[1:3])
    ys, yz = _scalars(get, node.inputs[3:5])
    opset = int(node.attrs.get("opset", 13))
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % X.ndim
    if opset >= 13:  # reduce along one axis
        where = index[:axis] + (slice(None),) + index[axis + 1:]
        row, j = X[where].reshape(-1), index[axis]
        described = f"[{_text(index[:axis])}{',' if axis else ''}:{',' if axis < X.ndim - 1 else ''}" \
                    f"{_text(index[axis + 1:])}] along axis {axis}"
    else:  # opset < 13: the flattened dims from axis on
        row = X[index[:axis]].reshape(-1)
        j = int(np.ravel_multi_index(index[axis:], X.shape[axis:]))
        described = f"[{_text(index[:axis])}{',' if axis else ''}...] flattened from axis {axis} (opset {opset})"
    d = int(row.size)
    table = softmax_table(xs, d)
    shift = max(0.0, math.log(float(np.finfo(F32).max) / d) - 5.0) / float(xs)
    codes = row.astype(np.int64)
    x_max = int(codes.max())
    e = table[255 - x_max + codes]
    total = F32(0)
    for value in e:  # sequential float32 sum, as the kernel's loop
        total = F32(total + value)
    scale = F32(np.floor(F32(1.0) / ys))
    with np.errstate(all="ignore"):
        product = F32(e[j] * scale)
        ratio = F32(product / total)
    r = float(np.rint(np.float64(ratio)))
    if X.dtype == np.int8:
        code = int(np.clip(r + yz, -128, 127)) if np.isfinite(r) else 127
        saturate = "saturate to [-128, 127] (inf -> 127)"
    else:
        t = r + yz
        code = 255 if not np.isfinite(t) or t > 255 else int(t)
        saturate = "saturate at 255 (inf -> 255)"
    name = label(node.inputs[0])
    x_j = int(codes[j])
    lines = [f"input {name!r} row {described}: D = {d} codes (scale {float(xs):.9g}; the zero point plays no part)",
             f"row codes: {codes.tolist() if d <= 16 else codes[:12].tolist() + ['...']}; x_max = {x_max}, "
             f"x_j = {x_j} (position {j})",
             f"exp table  table[i] = f32(exp((i - 255 + shift) * x_scale)), shift = max(0, ln(FLT_MAX / D) - 5) / "
             f"x_scale = {shift:.9g}",
             f"e_j = table[255 - x_max + x_j] = table[{255 - x_max + x_j}] = {float(e[j]):.9g}  (the row's maximum "
             f"reads table[255] = {float(table[255]):.9g})",
             f"sum = float32 sum of the row's {d} entries, left to right = {float(total):.9g}",
             f"output scale  floor(1 / y_scale) = floor(1 / {float(ys):.9g}) = {float(scale):.9g}",
             f"f32(f32(e_j * {float(scale):.9g}) / sum) = f32({float(product):.9g} / {float(total):.9g}) = "
             f"{float(ratio):.9g}",
             f"rounding  nearbyint, round half to even ({_tie(float(ratio))}) -> {r:.0f}; + y_zp {yz}, {saturate} "
             f"-> code {code}"]
    return lines, code, {name: x_j}


def _tie(t: float) -> str:
    if not math.isfinite(t):
        return "not finite"
    frac = t - math.floor(t)
    return "an exact .5 tie" if frac == 0.5 else f"fraction {frac:.6g}, not a tie"

