"""fuse_constant_chains: two consecutive multiplications (or additions) by constants become one.

``x * a * b -> x * (a b)``, ``x * a / b -> x * (a / b)``, ``x / a / b -> x / (a b)``,
``x + a + b -> x + (a + b)``, ``x + a - b -> x + (a - b)``, ``x - a - b -> x - (a + b)``.

Why: every elementwise op output is an 8-bit activation quantizer in QuantSim, so each extra op in a
chain adds one rounding of the whole tensor (PP-OCRv4 divides a hard-swish by 6 and multiplies the
result by a learned scale right after). One op, one rounding.

Conditions: ``a`` and ``b`` float constants of the same dtype, the first op's output read only by the
second (and not a graph output), the variable operand first for Div and Sub. The combined constant is
computed in float64 and gets a new name (``<b>_fused``), since its value is neither ``a`` nor ``b``; the
second op keeps its name and its output name, the first op and its output disappear.
"""

from __future__ import annotations

import numpy as np

from ..ir import Graph, Node
from .common import PassResult, fresh_name, is_float_constant, remove_nodes, set_constant

_FAMILY = {"Mul": "scale", "Div": "scale", "Add": "shift", "Sub": "shift"}


def _split(graph: Graph, node: Node, var: str | None = None) -> tuple[str, str] | None:
    """(variable input, constant input) of a binary Mul/Div/Add/Sub by a float constant."""
    if node.domain or node.op_type not in _FAMILY or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if is_float_constant(graph, b) and not is_float_constant(graph, a) and (var is None or a == var):
        return a, b
    if node.op_type in ("Mul", "Add") and is_float_constant(graph, a) and not is_float_constant(graph, b) \
            and (var is None or b == var):
        return b, a
    return None


def _combine(first: Node, c1: np.ndarray, second: Node, c2: np.ndarray) -> tuple[str, np.ndarray]:
    a, b = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
    ops = (first.op_type, second.op_type)
    if ops == ("Div", "Div"):
        return "Div", a * b
    if _FAMILY[ops[0]] == "scale":
        return "Mul", (a if ops[0] == "Mul" else 1.0 / a) * (b if ops[1] == "Mul" else 1.0 / b)
    if ops == ("Sub", "Sub"):
        return "Sub", a + b
    return "Add", (a if ops[0] == "Add" else -a) + (b if ops[1] == "Add" else -b)


def _fuse_once(graph: Graph, result: PassResult) -> bool:
    counts, consumers = graph.use_counts(), graph.consumers()
    for first in graph.nodes:
        split1 = _split(graph, first)
        if split1 is None:
            continue
        x, k1 = split1
        out = first.outputs[0]
        second = consumers[out][0] if counts[out] == 1 and out in consumers else None
        if second is None or _FAMILY.get(second.op_type) != _FAMILY[first.op_type]:
            continue
        split2 = _split(graph, second, var=first.outputs[0])
        if split2 is None:
            continue
        _, k2 = split2
        c1, c2 = graph.initializers[k1], graph.initializers[k2]
        if c1.dtype != c2.dtype:
            continue
        op, value = _combine(first, c1, second, c2)
        name = fresh_name(graph, f"{k2}_fused")
        with np.errstate(all="ignore"):
            set_constant(graph, name, value.astype(c1.dtype))
        result.changes.append(f"{first.op_type} {first.name!r} -> {second.op_type} {second.name!r}: one {op} by "
                              f"{name!r} (= {k1!r} and {k2!r}); {first.outputs[0]!r} is gone")
        second.op_type = op
        second.inputs = [x, name]
        remove_nodes(graph, [first])
        counts = graph.use_counts()
        for k in (k1, k2):
            if k in graph.initializers and counts[k] == 0:
                del graph.initializers[k]
                graph.values.pop(k, None)
        return True
    return False


def run(graph: Graph) -> PassResult:
    result = PassResult()
    while _fuse_once(graph, result):  # chains of three or more fuse one link at a time
        pass
    return result
