"""Elementwise activations after a layer, as one scalar function ``f(y)`` with its derivative.

AdaRound measures a layer's error after the activation that follows it (the paper's ``f_a``). Models
write activations as one op (Sigmoid, Tanh, HardSigmoid, HardSwish, Elu, Gelu...) or as a small
subgraph of elementwise ops on the layer output ``y`` and scalar constants: SiLU as ``Mul(y, Sigmoid(y))``
(YOLOv8), HardSwish as ``Div(Mul(y, Clip(Add(y, 3), 0, 6)), 6)`` (PaddlePaddle, torch), GELU as
``Mul(Mul(y, Add(Erf(Div(y, sqrt 2)), 1)), 0.5)`` (BERT). :func:`trace` finds the largest such subgraph
that nothing else reads into, and :class:`Pointwise` evaluates it on an array with forward-mode
differentiation: each op maps ``(value, dvalue/dy)`` pairs by the chain rule, e.g.
``Mul: (a b, a' b + a b')``, ``Sigmoid: (s, a' s (1 - s))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ..ir import Graph, Node

MAX_NODES = 12  # an activation subgraph is small: stop looking beyond this many ops
# The subgraphs AdaRound puts in its loss unless asked for all (adaround(include_activation="all")): AIMET's
# Sigmoid and Tanh, and SiLU. Measured (bench/results_ptq_vs_aimet_models.txt): every subgraph in the loss cost
# the PP-OCR direction classifier 1.3 dB at W4A8 200 its (12.10/12.67/13.71 dB over three seeds against 14.13 on
# each; its HardSwish written out and its HardSigmoid gates), and 0.13 dB at 1000, in 5-20x the time: such a layer
# leaves the exact quadratic form over every position for a sample, and the activation quantizers inside a
# written-out HardSwish see the pre-activation error the loss no longer measures.
IN_LOSS_BY_DEFAULT = frozenset({"Sigmoid", "Tanh", "Sigmoid > Mul"})


def _sigmoid(a):
    with np.errstate(over="ignore"):  # exp(-a) = inf: sigmoid 0
        return 1 / (1 + np.exp(-a))


def _clip(a, lo, hi):
    """``(clip(a, lo, hi), 1 inside the open interval else 0)``; NaN bounds as ONNX: absent."""
    return np.clip(a, lo, hi), ((a > lo) & (a < hi)).astype(a.dtype)


def _unary(op: str, attrs: dict, a: np.ndarray):
    """``(f(a), f'(a))`` of a one-input elementwise op."""
    if op == "Relu":
        return np.maximum(a, 0), (a > 0).astype(a.dtype)
    if op == "Sigmoid":
        s = _sigmoid(a)
        return s, s * (1 - s)
    if op == "Tanh":
        t = np.tanh(a)
        return t, 1 - t * t
    if op == "HardSigmoid":  # clip(alpha a + beta, 0, 1)
        alpha, beta = np.float32(attrs.get("alpha", 0.2)), np.float32(attrs.get("beta", 0.5))
        value, inside = _clip(alpha * a + beta, 0, 1)
        return value, alpha * inside
    if op == "HardSwish":  # a hardsigmoid(a), alpha 1/6, beta 1/2
        value, inside = _clip(a / np.float32(6) + np.float32(0.5), 0, 1)
        return a * value, value + a * inside / np.float32(6)
    if op == "LeakyRelu":
        alpha = np.float32(attrs.get("alpha", 0.01))
        return np.where(a >= 0, a, alpha * a), np.where(a >= 0, np.float32(1), alpha)
    if op == "Elu":  # a for a > 0, alpha (e^a - 1) below
        alpha = np.float32(attrs.get("alpha", 1.0))
        e = np.exp(np.minimum(a, 0))
        return np.where(a > 0, a, alpha * (e - 1)), np.where(a > 0, np.float32(1), alpha * e)
    if op == "Softplus":  # log(1 + e^a), derivative sigmoid(a)
        return np.logaddexp(a, np.float32(0)).astype(a.dtype), _sigmoid(a)
    if op == "Erf":  # derivative 2/sqrt(pi) e^(-a^2)
        return erf(a).astype(a.dtype), (2 / math.sqrt(math.pi) * np.exp(-a * a)).astype(a.dtype)
    if op == "Gelu":
        if attrs.get("approximate", "none") == "tanh":  # a/2 (1 + tanh(u)), u = sqrt(2/pi) (a + 0.044715 a^3)
            c = np.float32(math.sqrt(2 / math.pi))
            t = np.tanh(c * (a + np.float32(0.044715) * a ** 3))
            du = c * (1 + np.float32(3 * 0.044715) * a * a)
            return a / 2 * (1 + t), (1 + t) / 2 + a / 2 * (1 - t * t) * du
        cdf = (1 + erf(a / np.float32(math.sqrt(2)))).astype(a.dtype) / 2  # a Phi(a); derivative Phi + a phi
        return a * cdf, cdf + a * np.exp(-a * a / 2) / np.float32(math.sqrt(2 * math.pi))
    if op == "Neg":
        return -a, np.full_like(a, -1)
    raise KeyError(op)


UNARY = {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Softplus", "Erf", "Gelu", "Neg"}
BINARY = {"Add", "Sub", "Mul", "Div"}
LINEAR = {"Add", "Sub", "Mul", "Div", "Neg"}  # linear in y when one operand is a constant


@dataclass(frozen=True, eq=False)
class Pointwise:
    """``f(y)``: the ops ``nodes`` (graph order) from the layer output ``source`` to ``result``; an input is
    ``source``, a tensor an earlier op made, or a scalar constant (``constants``)."""

    source: str
    result: str
    nodes: tuple[Node, ...]
    constants: dict

    def __call__(self, y: np.ndarray, derivative: bool = True):
        """``(f(y), f'(y))`` elementwise, in ``y``'s dtype (``f'`` None unless ``derivative``)."""
        values = {self.source: (y, np.ones_like(y) if derivative else None)}
        for node in self.nodes:
            args = []
            for name in node.inputs:
                if name in values:
                    args.append(values[name])
                elif name:
                    args.append((self.constants[name], None))  # None: derivative 0
                else:
                    args.append(None)
            values[node.outputs[0]] = _apply(node, args)
        value, slope = values[self.result]
        return value, slope

    def value(self, y: np.ndarray) -> np.ndarray:
        """``f(y)``."""
        return self(y, derivative=False)[0]

    def describe(self) -> str:
        """The ops as text, e.g. ``Sigmoid > Mul``."""
        return " > ".join(node.op_type for node in self.nodes)


def _apply(node: Node, args):
    """One op on ``(value, derivative)`` pairs (a derivative of None: a constant)."""
    op = node.op_type
    if op in BINARY:
        (a, da), (b, db) = args
        if op == "Add":
            return a + b, _sum(da, db)
        if op == "Sub":
            return a - b, _sum(da, None if db is None else -db)
        if op == "Mul":
            return a * b, _sum(None if da is None else da * b, None if db is None else a * db)
        # Div: (a' b - a b') / b^2
        return a / b, _sum(None if da is None else da / b, None if db is None else -a * db / (b * b))
    if op == "Clip":
        (a, da), lo, hi = (list(args) + [None, None])[:3]
        lo_value = -np.inf if lo is None else lo[0]
        hi_value = np.inf if hi is None else hi[0]
        if "min" in node.attrs or "max" in node.attrs:  # opset < 11
            lo_value, hi_value = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
        value, inside = _clip(a, lo_value, hi_value)
        return value, None if da is None else inside * da
    (a, da), = args
    value, slope = _unary(op, node.attrs, a)
    return value, None if da is None else slope * da


def _sum(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def trace(graph: Graph, tensor: str, consumers, outputs, allowed=None) -> Pointwise | None:
    """The activation subgraph after ``tensor``: the largest set of elementwise ops, grown from it, whose
    tensors nothing outside reads except one result; None when it is empty or linear in ``tensor``
    (a scale or shift is no activation: the layer keeps its exact quadratic loss). ``allowed``: a set of
    :meth:`Pointwise.describe` texts; then the largest such subgraph that is one of them (e.g. the SiLU
    of a SiLU followed by a scale)."""
    if tensor in outputs:
        return None
    made = {tensor: None}  # tensor -> the op that makes it (None: the source)
    order: list[Node] = []
    taken: set[int] = set()  # ids: Node is an unhashable dataclass
    grown = True
    while grown and len(order) < MAX_NODES:
        grown = False
        for name in list(made):
            for user in consumers.get(name, []):
                if id(user) in taken or not _admissible(graph, user, made):
                    continue
                order.append(user)
                taken.add(id(user))
                made[user.outputs[0]] = user
                grown = True
    best = None
    for end, node in enumerate(order):  # the furthest result that is the only way out of its ops
        chosen = _ancestors(order[:end + 1], node)
        if _closed(chosen, node.outputs[0], tensor, consumers, outputs) and \
                (allowed is None or " > ".join(n.op_type for n in chosen) in allowed):
            best = chosen, node.outputs[0]
    if best is None or all(n.op_type in LINEAR for n in best[0]):
        return None
    chosen, result = best
    constants = {name: np.asarray(graph.initializers[name], dtype=np.float32).reshape(())
                 for n in chosen for name in n.inputs if name in graph.initializers}
    return Pointwise(tensor, result, tuple(chosen), constants)


def _admissible(graph: Graph, node: Node, made: dict) -> bool:
    """An op this module differentiates, on made tensors and scalar constants, with one output and
    at least one made input."""
    if node.domain or len(node.outputs) != 1 or node.op_type not in UNARY | BINARY | {"Clip"}:
        return False
    if node.op_type in UNARY and len(node.inputs) != 1:
        return False
    dynamic = 0
    for i, name in enumerate(node.inputs):
        if name in made:
            dynamic += 1
            if node.op_type == "Clip" and i > 0:
                return False
        elif name and (name not in graph.initializers or np.size(graph.initializers[name]) != 1 or
                       not np.issubdtype(np.asarray(graph.initializers[name]).dtype, np.floating)):
            return False
    return dynamic > 0 and (node.op_type != "Clip" or node.inputs[0] in made)


def _ancestors(order: list[Node], last: Node) -> list[Node]:
    """The ops of ``order`` that ``last`` depends on, in order."""
    maker = {n.outputs[0]: n for n in order}
    needed, stack = set(), [last]
    while stack:
        node = stack.pop()
        if node.outputs[0] in needed:
            continue
        needed.add(node.outputs[0])
        stack.extend(maker[name] for name in node.inputs if name in maker)
    return [n for n in order if n.outputs[0] in needed]


def _closed(chosen: list[Node], result: str, source: str, consumers, outputs) -> bool:
    """Every reader of the source and of each tensor before ``result`` is one of ``chosen``, and none
    of them is a graph output: then ``result`` is a function of the layer output alone, and the only
    one anything else sees."""
    inside = {id(n) for n in chosen}
    for name in [source] + [n.outputs[0] for n in chosen if n.outputs[0] != result]:
        if name in outputs or any(id(user) not in inside for user in consumers.get(name, [])):
            return False
    return True
