"""Explain one output element of one integer layer: the arithmetic a target performs, step by step.

    ex = explain(isim, "conv1", index=(0, 3, 4, 4), feeds=feeds)
    print(ex)            # input codes and zero points, products, int32 accumulator, bias, multiplier, rounding
    ex.code, ex.acc      # the result code and the accumulator

For a Conv (QLinearConv, or ConvInteger + Requantize) the terms are the receptive field of the element; for a
Gemm / MatMul (QGemm, QLinearMatMul, or MatMulInteger + Requantize) the row of A and the column of B. Then::

    acc  = sum_k (x_k - x_zp)(w_k - w_zp[c]) + bias[c]          exact, int32 on the target
    M    = x_scale * w_scale[c] / y_scale                       the real multiplier, M = M0 * 2^(shift - 31)
    y    = R(acc * M)                                           with the scheme's arithmetic and rounding
    code = clamp(y + y_zp, qmin, qmax)  (then a fused Relu/Clip's clamp);   value = (code - y_zp) * y_scale

The values come from the program's own constants and its run on ``feeds``: the explained code is checked
against the code the program computed (a mismatch would be a bug and raises). Explanations cover the layers
that accumulate and requantize (Conv, Gemm, MatMul), in :mod:`refquant.intsim.explain_elementwise` Add, Mul,
GlobalAveragePool and the lookup tables, and in :mod:`refquant.intsim.explain_pool_concat` AveragePool, Concat and
Softmax; other nodes raise an error that says what they became.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..errors import OpError, RefquantError
from ..ops import nn as _nn
from .explain_elementwise import ELEMENTWISE_OPS, ElementExplanation, explain_elementwise
from .explain_pool_concat import POOL_CONCAT_OPS, explain_pool_concat
from .overflow import raise_for_layer
from .requant import (
    INT32_MAX,
    INT32_MIN,
    as_scheme,
    exact_multiplier,
    ort_multiplier,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    tflite_multiplier,
)

F32 = np.float32
SHOW_TERMS = 12  # terms printed in full before the list is shortened (totals are always printed)
_GEMM_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@dataclass
class Term:
    position: str  # where the input code is, e.g. "x[0,2,3,4]" or "pad"
    x_code: int | None  # None for padding (contributes x_zp - x_zp = 0)
    w_position: str
    w_code: int
    product: int


@dataclass
class Explanation:
    node: str
    op_type: str
    program_ops: list
    scheme: str
    output: str
    index: tuple
    shape: tuple
    x_name: str
    w_name: str
    x_scale: float
    x_zp: int
    w_scale: float
    w_zp: int
    channel: int
    terms: list
    sum_products: int
    bias: int | None
    acc: int
    y_scale: float
    y_zp: int
    y_dtype: np.dtype
    multiplier: float  # the exact real multiplier x_scale * w_scale / y_scale (as float64)
    fixed_point: tuple  # (M0, shift) of tflite::QuantizeMultiplier(M)
    steps: list  # the scheme's arithmetic, one line each
    requantized: int  # code before a fused clamp
    clamp: tuple | None
    code: int
    value: float
    feeds_note: str = ""
    where: str = ""  # receptive field / row and column description

    def __str__(self) -> str:
        idx = ",".join(map(str, self.index))
        lines = [f"explain: node {self.node!r} ({self.op_type} -> {' + '.join(self.program_ops)}), requant="
                 f"{self.scheme}", f"output {self.output!r} element [{idx}] of shape {list(self.shape)}"]
        if self.feeds_note:
            lines.append(f"feeds: {self.feeds_note}")
        lines.append(f"input  {self.x_name!r}: codes x, scale {self.x_scale:.9g}, zero point x_zp = {self.x_zp}")
        lines.append(f"weight {self.w_name!r} (channel {self.channel}): codes w, scale {self.w_scale:.9g}, "
                     f"zero point w_zp = {self.w_zp}")
        lines.append(f"{self.where} ({len(self.terms)} terms):")
        shown = self.terms if len(self.terms) <= SHOW_TERMS else self.terms[:SHOW_TERMS - 3] + [None] + self.terms[-3:]
        for t in shown:
            if t is None:
                lines.append(f"    ... {len(self.terms) - SHOW_TERMS + 2} more terms ...")
            elif t.x_code is None:
                lines.append(f"    {t.position:<18} pad: (x - x_zp) = 0      {t.w_position}={t.w_code:>6}   "
                             f"product {t.product:>8}")
            else:
                lines.append(f"    {t.position:<18} {t.x_code:>6} - {self.x_zp:<4} = {t.x_code - self.x_zp:>6}   "
                             f"{t.w_position}={t.w_code:>6} - {self.w_zp} = {t.w_code - self.w_zp:>6}   "
                             f"product {t.product:>8}")
        lines.append(f"sum of products  sum (x - x_zp)(w - w_zp) = {self.sum_products}")
        if self.bias is None:
            lines.append("bias: none")
        else:
            bias_scale = F32(F32(self.x_scale) * F32(self.w_scale))
            lines.append(f"bias  int32 {self.bias} (= round(b / bias_scale), bias_scale = x_scale * w_scale = "
                         f"{float(bias_scale):.9g})")
        lines.append(f"accumulator  acc = {self.sum_products} + {self.bias or 0} = {self.acc}  (int32 range "
                     f"[{INT32_MIN}, {INT32_MAX}])")
        lines.append(f"real multiplier  M = x_scale * w_scale / y_scale = {self.x_scale:.9g} * {self.w_scale:.9g} / "
                     f"{self.y_scale:.9g} = {self.multiplier:.12g}")
        m0, shift = self.fixed_point
        lines.append(f"fixed point  M = M0 * 2^(shift - 31): M0 = {m0}, shift = {shift} "
                     f"(M0 * 2^{shift - 31} = {m0 * 2.0 ** (shift - 31):.12g})")
        lines += [f"  {s}" for s in self.steps]
        info = np.iinfo(self.y_dtype)
        lines.append(f"output  code = clamp(y + y_zp, {info.min}, {info.max}) = {self.requantized}  "
                     f"({self.y_dtype.name}, y_zp = {self.y_zp})")
        if self.clamp is not None:
            lines.append(f"fused activation clamp [{self.clamp[0]}, {self.clamp[1]}] -> {self.code}")
        lines.append(f"result  code {self.code} stands for (code - y_zp) * y_scale = ({self.code} - {self.y_zp}) * "
                     f"{self.y_scale:.9g} = {self.value:.9g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry point
def explain(isim, node: str, index=None, feeds=None) -> Explanation | ElementExplanation:
    """Explain element ``index`` (a flat index or a tuple; default 0) of the output of layer ``node`` (a node
    name of the simulated model, or its output tensor's name) on ``feeds`` (default: a deterministic random
    feed, :func:`default_feeds`)."""
    src = isim.sim.graph
    src_node = _find_node(src, node)
    entry = next((e for e in isim.program.lowered if e.node == src_node.name), None)
    if entry is None:
        raise RefquantError(f"explain: node {src_node.name!r} ({src_node.op_type}) was fused into another layer's "
                            "output clamp; explain that layer")
    final = src_node.outputs[0]
    if entry.note.startswith("fused "):
        fused = next(n for n in src.nodes if entry.note.endswith(repr(n.name)))
        final = fused.outputs[0]
    if final not in isim.program.tensors:
        raise RefquantError(f"explain: the output {final!r} of node {src_node.name!r} ({src_node.op_type}) is not held "
                            f"as integer codes (it became {' + '.join(entry.ops) or 'nothing'}, {entry.mode}, with an "
                            "unquantized output), so there is no result code to explain")
    chain = _chain(isim.graph, isim.program.tensors[final].name)
    kind = chain["accumulate"].op_type
    known = kind in _GEMM_OPS or kind in ELEMENTWISE_OPS or (kind in POOL_CONCAT_OPS and entry.mode == "integer")
    if not known or kind not in entry.ops:
        raise RefquantError(f"explain: node {src_node.name!r} ({src_node.op_type}) became "
                            f"{' + '.join(entry.ops) or 'nothing'} ({entry.mode}); explain shows the arithmetic of "
                            "layers that accumulate and requantize (Conv, Gemm, MatMul), of QLinearAdd, QLinearMul, "
                            "QLinearGlobalAveragePool, QLinearAveragePool, Concat / QLinearConcat, QLinearSoftmax "
                            "and of lookup tables (ops on codes copy them unchanged)")
    note = ""
    if feeds is None:
        feeds = default_feeds(isim)
        note = "deterministic random feed (seed 0, uniform over each input's encoding range); pass data to use yours"
    codes_name = isim.program.tensors[final].name
    producers = isim.graph.producers()
    reads = {n for node_ in chain.values() if node_ is not None for n in node_.inputs}
    if kind == "Gather":  # the table's index comes from Cast(codes) (+ a row offset)
        source = producers[chain["accumulate"].inputs[1]]
        reads |= set(source.inputs) | (set(producers[source.inputs[0]].inputs) if source.op_type == "Add" else set())
    wanted = sorted({codes_name} | {n for n in reads if n and n not in isim.session.constants})
    try:
        values = isim.session.run(feeds, outputs=wanted)
    except OpError as exc:  # an int32 accumulator overflow on these feeds names the layer
        raise_for_layer(isim, exc)

    def get(name):
        if not name:
            return None
        return values[name] if name in values else isim.session.constants[name]

    out = get(codes_name)
    index = _index(index, out.shape, src_node.name)
    if kind in _GEMM_OPS:
        ex = _explain_layer(isim, src_node, entry, chain, get, out.shape, index)
    else:
        ex = _explain_elementwise_layer(isim, src_node, entry, chain, get, producers, out.shape, index, final)
    ex.output, ex.feeds_note = final, note
    if ex.code != int(out[index]):
        raise RefquantError(f"explain: internal mismatch at {src_node.name!r}[{index}]: explained code {ex.code}, "
                            f"the program computed {int(out[index])}")
    return ex


def _explain_elementwise_layer(isim, src_node, entry, chain, get, producers, shape, index, final):
    names = {}
    for original, q in isim.program.tensors.items():
        names.setdefault(q.name, original)
    explain_op = explain_pool_concat if chain["accumulate"].op_type in POOL_CONCAT_OPS else explain_elementwise
    lines, requantized, inputs = explain_op(chain["accumulate"], get, producers, index,
                                            lambda name: names.get(name, name))
    grid = isim.program.tensors[final]
    clamp = None
    code = requantized
    if chain["clamp"] is not None:
        lo, hi = (int(np.asarray(get(n)).reshape(())) for n in chain["clamp"].inputs[1:3])
        clamp = (lo, hi)
        code = min(max(requantized, lo), hi)
    value = float(F32(F32(code - grid.zero_point) * grid.scale))
    return ElementExplanation(src_node.name, src_node.op_type, list(entry.ops), isim.program.scheme, final, index,
                              tuple(shape), lines, requantized, code, float(grid.scale), grid.zero_point, value, clamp,
                              inputs=inputs)


def default_feeds(isim, seed: int = 0) -> dict:
    """One sample per graph input, uniform over its input encoding's range (N(0,1) for unquantized inputs)."""
    from ..feeds import random_feeds

    feeds = random_feeds(isim.graph, batch=1, seed=seed)
    rng = np.random.default_rng(seed)
    for name, array in feeds.items():
        q = isim.program.tensors.get(name)
        if q is not None and array.dtype.kind == "f":
            lo, hi = float(np.min(q.encoding.min)), float(np.max(q.encoding.max))
            feeds[name] = rng.uniform(lo, hi, size=array.shape).astype(array.dtype)
    return feeds


def _find_node(graph, name: str):
    for n in graph.nodes:
        if n.name == name:
            return n
    for n in graph.nodes:
        if name in n.outputs:
            return n
    names = [n.name for n in graph.nodes]
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    layers = [n.name for n in graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
    raise RefquantError(f"explain: no node named {name!r} in the model"
                        + (f"; near: {', '.join(map(repr, near))}" if near else "")
                        + (f"; its Conv/Gemm/MatMul nodes: {', '.join(map(repr, layers[:8]))}"
                           + (" ..." if len(layers) > 8 else "") if layers else ""))


def _index(index, shape, node) -> tuple:
    size = int(np.prod(shape))
    if index is None:
        index = 0
    if isinstance(index, str):
        parts = [p for p in index.replace(" ", "").split(",") if p]
        try:
            index = int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts)
        except ValueError:
            raise RefquantError(f"explain: index {index!r} is not an integer or a comma-separated list") from None
    if isinstance(index, (int, np.integer)):
        if not 0 <= int(index) < size:
            raise RefquantError(f"explain: flat index {index} is outside the {size} elements of {node!r}'s output "
                                f"{list(shape)}")
        return tuple(int(i) for i in np.unravel_index(int(index), shape))
    index = tuple(int(i) for i in index)
    if len(index) != len(shape) or any(not 0 <= i < d for i, d in zip(index, shape)):
        raise RefquantError(f"explain: index {list(index)} does not address an element of {node!r}'s output "
                            f"{list(shape)}")
    return index


def _chain(graph, codes_name: str) -> dict:
    """The program nodes that produce a layer's codes: clamp (Clip, optional), requantize (QLinear* or
    Requantize), bias (Add, optional), accumulate (ConvInteger / MatMulInteger, or the QLinear op)."""
    producers = graph.producers()
    node = producers[codes_name]
    chain = {"clamp": None, "bias": None}
    if node.op_type == "Clip":
        chain["clamp"] = node
        node = producers[node.inputs[0]]
    chain["requant"] = node
    if node.op_type == "Requantize":
        acc = producers[node.inputs[0]]
        if acc.op_type == "Add":
            chain["bias"] = acc
            acc = producers[acc.inputs[0]]
            if acc.op_type == "Cast":  # the int32 accumulator widened to int64 before the bias is added
                acc = producers[acc.inputs[0]]
        chain["accumulate"] = acc
    else:
        chain["accumulate"] = node
    return chain


# ---------------------------------------------------------------------------------------------- layers
def _explain_layer(isim, src_node, entry, chain, get, shape, index) -> Explanation:
    acc_node, req = chain["accumulate"], chain["requant"]
    fused = req.op_type != "Requantize"  # QLinearConv / QGemm / QLinearMatMul: one node does everything
    op = acc_node.op_type
    if op in ("QLinearConv", "QLinearMatMul"):
        x, xs, xz, w, ws, wz, ys, yz = (get(n) for n in acc_node.inputs[:8])
        bias = get(acc_node.inputs[8]) if op == "QLinearConv" and len(acc_node.inputs) > 8 else None
    elif op == "QGemm":
        x, xs, xz, w, ws, wz = (get(n) for n in acc_node.inputs[:6])
        bias = get(acc_node.inputs[6]) if len(acc_node.inputs) > 6 else None
        ys, yz = get(acc_node.inputs[7]), get(acc_node.inputs[8])
    else:  # ConvInteger / MatMulInteger + Add + Requantize
        x, w, xz, wz = (get(n) for n in acc_node.inputs[:4])
        _, xs, ws, ys, yz = (get(n) for n in req.inputs[:5])
        bias = get(chain["bias"].inputs[1]) if chain["bias"] is not None else None
    x_name = next((n for n, q in isim.program.tensors.items() if q.name == acc_node.inputs[0]), acc_node.inputs[0])
    w_name = src_node.inputs[1]
    scheme = as_scheme(isim.program.scheme)
    is_conv = op in ("QLinearConv", "ConvInteger")
    if is_conv:
        channel = index[1]
        terms, where = _conv_terms(x, int(np.asarray(xz).reshape(-1)[0]), w, _per(wz, channel), acc_node.attrs,
                                   index)
    else:
        if op == "QGemm":
            if acc_node.attrs.get("transA", 0):
                x = x.T
            if acc_node.attrs.get("transB", 0):
                w = w.T
        channel = index[-1]
        terms, where = _matmul_terms(x, int(np.asarray(xz).reshape(-1)[0]), w, _per(wz, channel), index)
    x_zp = int(np.asarray(xz).reshape(-1)[0])
    w_zp = _per(wz, channel)
    sum_products = int(sum(t.product for t in terms))
    bias_value = None
    if bias is not None:
        b = np.asarray(bias).reshape(-1)
        bias_value = int(b[channel] if b.size > 1 else b[0])
    acc = sum_products + (bias_value or 0)
    x_scale = F32(np.asarray(xs).reshape(-1)[0])
    w_scale = F32(_per(np.asarray(ws, dtype=F32), channel, cast=float))
    y_scale = F32(np.asarray(ys).reshape(-1)[0])
    y_zp = int(np.asarray(yz).reshape(()))
    y_dtype = np.asarray(yz).dtype
    steps, requantized = _requantize_steps(acc, x_scale, w_scale, y_scale, y_zp, y_dtype, scheme)
    clamp = None
    code = requantized
    if chain["clamp"] is not None:
        lo, hi = (int(np.asarray(get(n)).reshape(())) for n in chain["clamp"].inputs[1:3])
        clamp = (lo, hi)
        code = min(max(requantized, lo), hi)
    value = float(F32(F32(code - y_zp) * y_scale))
    real = float(exact_multiplier(x_scale, w_scale, y_scale))
    fixed = quantize_multiplier(real, single_rounding=scheme.name == "tflite_single")
    return Explanation(src_node.name, src_node.op_type, list(entry.ops), str(scheme), "", index, tuple(shape),
                       x_name, w_name, float(x_scale), x_zp, float(w_scale), w_zp, channel, terms, sum_products,
                       bias_value, acc, float(y_scale), y_zp, np.dtype(y_dtype), real, fixed, steps, requantized,
                       clamp, code, value, where=where)


def _per(values, channel: int, cast=int):
    arr = np.asarray(values).reshape(-1)
    return cast(arr[channel] if arr.size > 1 else arr[0])


def _conv_terms(x, x_zp, w, w_zp, attrs, index):
    """The receptive field of output element ``index`` = (n, m, *spatial): every (channel, kernel offset) term,
    padding as zero terms (the zero-point-subtracted input is padded with zeros)."""
    n, m, out_pos = index[0], index[1], index[2:]
    spatial = list(x.shape[2:])
    kernel = list(w.shape[2:])
    strides = attrs.get("strides") or [1] * len(spatial)
    dilations = attrs.get("dilations") or [1] * len(spatial)
    begin, _, _ = _nn.conv_geometry(spatial, kernel, strides, dilations, attrs.get("pads"),
                                    attrs.get("auto_pad", "NOTSET"))
    group = int(attrs.get("group", 1))
    cg = w.shape[1]
    g = m // (w.shape[0] // group)
    terms = []
    for c in range(cg):
        for k in np.ndindex(*kernel):
            pos = [o * s - b + kk * d for o, s, b, kk, d in zip(out_pos, strides, begin, k, dilations)]
            w_code = int(w[(m, c) + k])
            w_at = "w[" + ",".join(map(str, (m, c) + k)) + "]"
            if all(0 <= p < size for p, size in zip(pos, spatial)):
                xc = int(x[(n, g * cg + c) + tuple(pos)])
                terms.append(Term("x[" + ",".join(map(str, (n, g * cg + c) + tuple(pos))) + "]", xc, w_at, w_code,
                                  (xc - x_zp) * (w_code - w_zp)))
            else:
                terms.append(Term("x[" + ",".join(map(str, (n, g * cg + c) + tuple(pos))) + "]", None, w_at, w_code, 0))
    lo = [o * s - b for o, s, b in zip(out_pos, strides, begin)]
    hi = [p + (k - 1) * d for p, k, d in zip(lo, kernel, dilations)]
    window = " x ".join(f"{a}..{b}" for a, b in zip(lo, hi))
    where = (f"receptive field: input channels {g * cg}..{g * cg + cg - 1}, window {window} "
             f"(kernel {'x'.join(map(str, kernel))}, strides {list(strides)}, begin pads {list(begin)})")
    return terms, where


def _matmul_terms(a, a_zp, b, b_zp, index):
    """Row ``i`` of A times column ``j`` of B for output ``index`` = (*batch, i, j) (batch dims broadcast)."""
    if a.ndim < 2 or b.ndim < 2:
        raise RefquantError("explain: MatMul with a 1-D operand has no row/column form here")
    batch, i, j = index[:-2], index[-2], index[-1]

    def pick(arr):
        dims = arr.shape[:-2]
        sel = batch[len(batch) - len(dims):] if dims else ()
        return tuple(s if d > 1 else 0 for s, d in zip(sel, dims))

    ab, bb = pick(a), pick(b)
    row = a[ab + (i,)]
    col = b[bb + (slice(None), j)]
    terms = []
    for k in range(row.shape[0]):
        xc, wc = int(row[k]), int(col[k])
        terms.append(Term("A[" + ",".join(map(str, ab + (i, k))) + "]", xc,
                          "B[" + ",".join(map(str, bb + (k, j))) + "]", wc, (xc - a_zp) * (wc - b_zp)))
    return terms, f"row {i} of A times column {j} of B (K = {row.shape[0]})"


# ---------------------------------------------------------------------------------------------- requantization
def _requantize_steps(acc, x_scale, w_scale, y_scale, y_zp, y_dtype, scheme):
    """The scheme's arithmetic on one accumulator, one line per step; returns (lines, code). The code is
    also computed by :func:`refquant.intsim.requant.requantize` and the two must agree."""
    info = np.iinfo(y_dtype)
    qmin, qmax = int(info.min), int(info.max)
    lines = []
    name = scheme.name
    if name in ("ort", "onnx_reference"):
        m32 = F32(ort_multiplier(x_scale, w_scale, y_scale))
        mant, exp = math.frexp(float(m32))
        lines.append(f"{name}: float32 multiplier m = f32(f32(x_scale * w_scale) / y_scale) = {float(m32):.9g} "
                     f"= {int(mant * 2 ** 24)} * 2^{exp - 24} (24-bit mantissa)")
        mult_arg = m32
        if name == "ort":
            f = F32(F32(acc) * m32)
            lines.append(f"float32 product  f32(acc) * m = {float(F32(acc)):.9g} * {float(m32):.9g} = {float(f):.9g}")
            lo, hi = F32(qmin - y_zp), F32(qmax - y_zp)
            fc = min(max(f, lo), hi)
            y = int(np.rint(fc))
            lines.append(f"clamp to [qmin - y_zp, qmax - y_zp] = [{float(lo):g}, {float(hi):g}] -> {float(fc):.9g}")
            lines.append(f"rounding  round half to even ({_tie_note(float(fc))}) -> y = {y}")
            stepwise = y + y_zp
        else:
            r = float(np.float64(np.int32(acc)) * np.float64(m32)) + y_zp
            rc = min(max(r, qmin), qmax)
            stepwise = int(np.round(rc))
            lines.append(f"float64  acc * m + y_zp = {r:.12g} (zero point added before rounding), clamp -> {rc:.12g}")
            lines.append(f"rounding  round half to even ({_tie_note(rc)}) -> {stepwise}")
    elif name in ("tflite_double", "tflite_single"):
        single = name == "tflite_single"
        real = float(tflite_multiplier(x_scale, w_scale, y_scale))
        m0, shift = quantize_multiplier(real, single_rounding=single)
        mult_arg = np.float64(real)
        lines.append(f"{name}: float64 M = {real:.12g}; QuantizeMultiplier -> M0 = {m0}, shift = {shift}")
        if single:
            total = 31 - shift
            y = (acc * m0 + (1 << (total - 1))) >> total
            lines.append(f"single rounding  (acc * M0 + 2^{total - 1}) >> {total} = ({acc * m0} + {1 << (total - 1)}) "
                         f">> {total} = {y}  (round half up)")
        else:
            left, right = max(shift, 0), max(-shift, 0)
            shifted = (((acc << left) - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN
            high = int(saturating_rounding_doubling_high_mul(shifted, m0))
            y = int(rounding_divide_by_pot(high, right))
            lines.append(f"SaturatingRoundingDoublingHighMul(acc * 2^{left}, M0) = trunc((acc * 2^{left} * M0 + nudge)"
                         f" / 2^31) = {high}  (first rounding: nudge 2^30, or 1 - 2^30 when negative; ties toward "
                         f"+infinity; exact value {Fraction(shifted * m0, 1 << 31)})")
            lines.append(f"RoundingDivideByPOT(., {right}) = round({high} / 2^{right}) = {y}  "
                         "(second rounding, half away from zero)")
        stepwise = min(max(int(y) + y_zp, qmin), qmax)
    else:
        exact = exact_multiplier(x_scale, w_scale, y_scale)
        mult_arg = exact
        product = Fraction(acc) * exact
        lines.append(f"exact: M = {exact.numerator}/{exact.denominator}; acc * M = {product.numerator}/"
                     f"{product.denominator} = {float(product):.12g}")
        y = int(requantize(np.array([acc], dtype=np.int64), exact, 0, INT32_MIN, INT32_MAX, scheme=scheme)[0])
        lines.append(f"rounding  {scheme.rounding.replace('_', ' ')} ({_tie_note(float(product))}) -> y = {y}")
        stepwise = min(max(y + y_zp, qmin), qmax)
    code = int(requantize(np.array([acc], dtype=np.int64), mult_arg, y_zp, qmin, qmax, scheme=scheme)[0])
    if code != stepwise:
        raise RefquantError(f"explain: internal mismatch in the {scheme} steps ({stepwise}) and requantize ({code})")
    return lines, code


def _tie_note(t: float) -> str:
    frac = t - math.floor(t)
    return "an exact .5 tie" if frac == 0.5 else f"fraction {frac:.6g}, not a tie"
