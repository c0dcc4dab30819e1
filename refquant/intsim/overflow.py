"""int32 accumulator overflow, reported per layer.

A target accumulates ``acc = sum_k (x_k - x_zp)(w_k - w_zp) + bias`` in int32. The integer program computes
that sum exactly (float64 BLAS below 2^53, int64 above) and never wraps it: when it leaves int32 the layer's
kernel raises (onnxruntime's and a C target's int32 would wrap around, so no bit-exact result exists) and
:meth:`IntSim.run` names the layer (:class:`AccumulatorOverflowError`). This module says, for every layer that
accumulates (Conv, ConvTranspose, Gemm, MatMul):

* ``bound``: the worst case over all inputs, ``max_c (A_x * sum_k |w_ck - w_zp[c]| + |bias[c]|)`` with
  ``A_x = max(qmax - x_zp, x_zp - qmin)`` of the input's codes type (``K * A_a * A_b`` for activation x
  activation); at most ``INT32_MAX`` proves the layer can never overflow;
* ``low``, ``high``, ``overflow``: the exact accumulator range on given feeds and how many elements leave
  int32 (computed in int64 from the layer's input codes; layers after the first overflowing one are not
  reached, since their inputs do not exist).

    report = overflow_report(isim, feeds)     # or isim.overflow_report(feeds); feeds=None: the bounds only
    print(report); report.overflowing         # the layers whose accumulator left int32 on this data
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OpError, RefquantError
from ..ops import qoperators as Q
from .requant import INT32_MAX, INT32_MIN

_ACCUMULATE = {"QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger"}


class AccumulatorOverflowError(RefquantError):
    """A layer's exact int32 accumulator left the int32 range on the given input (names the layer)."""


@dataclass
class LayerAccumulator:
    node: str  # the layer in the simulated graph
    op_type: str
    program_node: str  # the program node that accumulates (QLinearConv, ConvInteger, ...)
    reduction: int  # K: terms summed per output element
    bound: int | None  # worst case |acc| over every possible input, bias included (None: unknown)
    low: int | None = None  # exact accumulator range on the feeds (None: not reached)
    high: int | None = None
    overflow: int = 0  # elements outside int32 on the feeds
    size: int = 0
    checked: bool = False  # the report ran feeds (else: the static bound only)

    @property
    def can_overflow(self) -> bool:
        return self.bound is None or self.bound > INT32_MAX

    @property
    def reached(self) -> bool:
        return self.low is not None

    @property
    def status(self) -> str:
        if not self.reached:
            if not self.can_overflow:
                return "cannot overflow"
            return "not reached (an earlier layer overflowed)" if self.checked else "can overflow: checked on every run"
        if self.overflow:
            return f"OVERFLOW: {self.overflow} of {self.size} elements outside int32"
        return "fits int32" + ("" if self.can_overflow else " (for every input)")


@dataclass
class OverflowReport:
    layers: list

    @property
    def overflowing(self) -> list:
        return [layer for layer in self.layers if layer.overflow]

    def __str__(self) -> str:
        lines = [f"int32 accumulators ({len(self.layers)} layers; range [{INT32_MIN}, {INT32_MAX}])",
                 f"{'layer':<36} {'op':<14} {'K':>7} {'worst case |acc|':>17} {'range on data':>27}  status"]
        for layer in self.layers:
            seen = f"[{layer.low}, {layer.high}]" if layer.reached else "-"
            bound = "?" if layer.bound is None else layer.bound
            lines.append(f"{layer.node[-36:]:<36} {layer.op_type:<14} {layer.reduction:>7} {bound:>17} "
                         f"{seen:>27}  {layer.status}")
        bad = self.overflowing
        if any(layer.checked for layer in self.layers):
            lines.append("overflow: " + (", ".join(f"{layer.node!r} ({layer.overflow} elements)" for layer in bad)
                                         if bad else "none on this data"))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the report
def overflow_report(isim, feeds=None) -> OverflowReport:
    """Every accumulating layer's worst-case bound and (given ``feeds``) its exact accumulator range on them."""
    graph = isim.graph
    by_name = {n.name: n for n in graph.nodes}
    captured: dict[str, np.ndarray] = {}

    def hook(name, array, node):
        captured[name] = array
        return None

    layers = []
    for entry in isim.program.lowered:
        nodes = [by_name[n] for n in entry.program_nodes if n in by_name]
        acc_node = next((n for n in nodes if n.op_type in _ACCUMULATE), None)
        if acc_node is not None:
            widened = {n.outputs[0] for n in nodes if n.op_type == "Cast"}  # lowering.add_bias: Cast, then Add
            bias_add = next((n for n in nodes if n.op_type == "Add" and n.inputs[0] in widened), None)
            layers.append((entry, acc_node, bias_add))
    constants = isim.session.constants
    if feeds is not None:
        wanted = sorted({i for _, n, b in layers for i in n.inputs + (b.inputs if b else []) if i} - set(constants))
        try:
            isim.session.run(feeds, outputs=wanted, hooks=[hook])
        except OpError as exc:  # the overflowing layer itself: its inputs were captured before it raised
            if not isinstance(exc.__cause__, OverflowError):
                raise

    def get(name):
        if not name:
            return None
        return captured[name] if name in captured else constants.get(name)

    report = []
    for entry, node, bias_add in layers:
        args = [get(n) for n in node.inputs]
        bias = _bias(node, args, get(bias_add.inputs[1]) if bias_add is not None else None)
        layer = LayerAccumulator(entry.node, entry.op_type, node.name, 0, None, checked=feeds is not None)
        x, w, x_zp, w_zp = _operands(node, args)
        if w is not None:
            conv = node.op_type in ("QLinearConv", "ConvInteger")
            layer.reduction = int(np.prod(w.shape[1:])) if conv else int(w.shape[-2] if w.ndim > 1 else w.shape[0])
        layer.bound = _bound(node, x, w, x_zp, w_zp, bias, constants)
        if x is not None and w is not None:
            acc = _exact(node, args, bias)
            layer.low, layer.high, layer.size = int(acc.min()), int(acc.max()), int(acc.size)
            layer.overflow = int(np.count_nonzero((acc < INT32_MIN) | (acc > INT32_MAX)))
        report.append(layer)
    return OverflowReport(report)


def _operands(node, args):
    """(x, w, x_zp, w_zp) in the op's accumulate form (QGemm transposes applied)."""
    op = node.op_type
    if op in ("QLinearConv", "QLinearMatMul"):
        x, _, xz, w, _, wz = args[:6]
    elif op == "QGemm":
        x, _, xz, w, _, wz = args[:6]
        if x is not None and node.attrs.get("transA", 0):
            x = x.T
        if w is not None and node.attrs.get("transB", 0):
            w = w.T
    else:  # ConvInteger, MatMulInteger
        x, w = args[:2]
        xz = args[2] if len(args) > 2 else None
        wz = args[3] if len(args) > 3 else None
    return x, w, xz, wz


def _bias(node, args, added):
    if added is not None:
        return np.asarray(added, dtype=np.int64).reshape(-1)
    if node.op_type == "QLinearConv" and len(args) > 8 and args[8] is not None:
        return np.asarray(args[8], dtype=np.int64).reshape(-1)
    if node.op_type == "QGemm" and len(args) > 6 and args[6] is not None:
        return np.asarray(args[6], dtype=np.int64).reshape(-1)
    return np.zeros(1, dtype=np.int64)


def _absmax(dtype, zp) -> int:
    info = np.iinfo(dtype)
    z = np.asarray(0 if zp is None else zp, dtype=np.int64).reshape(-1)
    return int(max(info.max - z.min(), z.max() - info.min))


def _bound(node, x, w, x_zp, w_zp, bias, constants) -> int | None:
    """max_c (A_x * sum_k |w_ck - w_zp[c]| + |bias[c]|) for a constant weight, else K * A_x * A_w + max|bias|
    (None when an activation operand was not reached, so K is unknown)."""
    x_dtype = np.asarray(x_zp).dtype if x_zp is not None else (x.dtype if x is not None else None)
    if x_dtype is None or w is None:
        return None
    a_x = _absmax(x_dtype, x_zp)
    bias_abs = np.abs(bias)
    if node.op_type in ("QLinearConv", "ConvInteger"):
        m = w.shape[0]
        wz = np.asarray(0 if w_zp is None else w_zp, dtype=np.int64).reshape(-1, 1)
        col = np.abs(w.reshape(m, -1).astype(np.int64) - wz).sum(axis=1)  # per output channel
    elif w.ndim == 2 and node.inputs[3 if node.op_type in ("QLinearMatMul", "QGemm") else 1] in constants:
        wz = np.asarray(0 if w_zp is None else w_zp, dtype=np.int64).reshape(1, -1)
        col = np.abs(w.astype(np.int64) - wz).sum(axis=0)  # per output column
    else:  # activation x activation: every code of both operands may occur
        return int(w.shape[-2] if w.ndim > 1 else w.shape[0]) * a_x * _absmax(w.dtype, w_zp) + int(bias_abs.max())
    per_channel = a_x * col + (bias_abs if bias_abs.size == col.size else bias_abs.max())
    return int(per_channel.max(initial=0))


def _exact(node, args, bias) -> np.ndarray:
    """The layer's accumulator in int64 (exact: float64 BLAS below 2^53, int64 above)."""
    op = node.op_type
    if op in ("QLinearConv", "ConvInteger"):
        x, w = args[0], (args[3] if op == "QLinearConv" else args[1])
        xz = args[2] if op == "QLinearConv" else (args[2] if len(args) > 2 else None)
        wz = args[5] if op == "QLinearConv" else (args[3] if len(args) > 3 else None)
        attrs = {k: node.attrs.get(k, d) for k, d in (("auto_pad", "NOTSET"), ("dilations", None), ("group", 1),
                                                       ("kernel_shape", None), ("pads", None), ("strides", None))}
        acc, _ = Q._conv_accumulate(x, Q._zp_int(xz, "x_zero_point"), w,
                                    Q._channel_zp(wz, w.shape[0], "w_zero_point"), attrs)
        acc = np.asarray(acc).astype(np.int64)
        return acc + bias.reshape((-1,) + (1,) * (acc.ndim - 2)) if bias.size > 1 else acc + bias[0]
    x, w, xz, wz = _operands(node, args)
    a_zp = Q._row_param(0 if xz is None else xz, x, "a_zero_point").astype(np.int64)
    b_zp = Q._col_param(0 if wz is None else wz, w, "b_zero_point").astype(np.int64)
    acc, _ = Q._matmul_accumulate(x, a_zp, w, b_zp)
    return np.asarray(acc).astype(np.int64) + (bias if bias.size > 1 else bias[0])


def raise_for_layer(isim, exc: OpError):
    """Re-raise a kernel's int32 accumulator overflow as an :class:`AccumulatorOverflowError` naming the model's
    layer (other errors are re-raised as they are)."""
    if not isinstance(exc.__cause__, OverflowError) or "accumulator" not in str(exc.__cause__):
        raise exc
    text = str(exc)
    entry = next((e for e in isim.program.lowered if any(f"node {n!r} " in text for n in e.program_nodes)), None)
    layer = f"layer {entry.node!r} ({entry.op_type})" if entry is not None else "a layer"
    # a clipped bias sits at the int32 limit already: the usual cause is a weight channel whose scale is tiny
    hint = ("; its bias was clipped to int32 at lowering (see the warning): a weight channel's scale is too small "
            "for its bias, so widen that channel's weight encoding") if entry is not None and \
        "bias clipped" in entry.note else ""
    raise AccumulatorOverflowError(f"IntSim: {layer}: {exc.__cause__}{hint}; isim.overflow_report(feeds) lists "
                                   "every layer's accumulator range") from exc
