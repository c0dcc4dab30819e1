"""Facts about a graph for `refquant info`: op histogram, parameters, MACs, unsupported ops."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .ir import Graph, Node
from .ops import lookup


@dataclass
class ModelInfo:
    ops: Counter
    parameters: int
    parameter_bytes: int
    macs: int  # per run at the shapes inferred (symbolic dims counted as 1)
    macs_unknown: list[str] = field(default_factory=list)  # nodes whose MACs could not be counted
    unsupported: list[tuple[str, str]] = field(default_factory=list)


def describe(graph: Graph) -> ModelInfo:
    ops = Counter((n.domain + "::" if n.domain else "") + n.op_type for n in graph.walk())
    floats = [a for a in graph.initializers.values() if a.dtype.kind == "f"]
    unsupported = sorted({(n.domain, n.op_type) for n in graph.walk()
                          if lookup(n.op_type, n.domain, n.version) is None})
    macs, unknown = 0, []
    for node in graph.nodes:
        count = node_macs(graph, node)
        if count is None:
            unknown.append(node.name)
        else:
            macs += count
    return ModelInfo(ops, sum(a.size for a in floats), sum(a.nbytes for a in graph.initializers.values()),
                     macs, unknown, unsupported)


def _dims(graph: Graph, name: str):
    v = graph.values.get(name)
    if v is None or v.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in v.shape]


def node_macs(graph: Graph, node: Node) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul; 0 for other ops, None if unknown."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain:
        return 0
    x, w, y = _dims(graph, node.inputs[0]), _dims(graph, node.inputs[1]), _dims(graph, node.outputs[0])
    if x is None or w is None or y is None:
        return None
    if node.op_type == "Conv":  # each output element: C_in/group * kernel taps
        return int(np.prod(y)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":  # each input element scatters into C_out/group * taps
        return int(np.prod(x)) * int(np.prod(w[1:]))
    if node.op_type == "Gemm":
        k = x[0] if node.attrs.get("transA", 0) else x[-1]
        return int(np.prod(y)) * k
    return int(np.prod(y)) * x[-1]  # MatMul
