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


# integer ops (QOperator and dynamically quantized models): input index of the weight, of the activation
# (None: the op's own layout, see node_macs), and the float op whose MAC count they share
INTEGER_LAYERS = {"QLinearConv": (3, 0, "Conv"), "ConvInteger": (1, 0, "Conv"), "QLinearMatMul": (3, 0, "MatMul"),
                  "MatMulInteger": (1, 0, "MatMul"), "QGemm": (3, 0, "Gemm"), "DynamicQuantizeLSTM": (1, None, None)}


def _integer_weights(graph: Graph) -> set[str]:
    """Integer initializers that are the weights of integer layers (their codes are parameters too)."""
    names = set()
    for node in graph.walk():
        index = INTEGER_LAYERS.get(node.op_type, (None,))[0]
        if index is not None and len(node.inputs) > index:
            names.add(node.inputs[index])
            if node.op_type == "DynamicQuantizeLSTM" and len(node.inputs) > 2:
                names.add(node.inputs[2])  # the recurrence weights R
    return {name for name in names if name in graph.initializers}


def describe(graph: Graph) -> ModelInfo:
    ops = Counter((n.domain + "::" if n.domain else "") + n.op_type for n in graph.walk())
    coded = _integer_weights(graph)
    floats = [a for name, a in graph.initializers.items() if a.dtype.kind == "f" or name in coded]
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
    """Multiply-accumulates of Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU/RNN (T * B * directions * gates*H *
    (I + H)) and of the integer forms (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, QGemm,
    DynamicQuantizeLSTM); 0 for other ops, None if unknown."""
    op, w_index = node.op_type, 1
    if op in ("LSTM", "GRU", "RNN") and not node.domain:  # W [directions, gates * H, I]: per step and row
        x, w = _dims(graph, node.inputs[0]), _dims(graph, node.inputs[1])
        if x is None or w is None or len(x) != 3 or len(w) != 3:
            return None
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        steps, batch = (x[1], x[0]) if node.attrs.get("layout", 0) else (x[0], x[1])
        return steps * batch * w[0] * w[1] * (w[2] + w[1] // gates)
    if op in INTEGER_LAYERS:
        if op == "DynamicQuantizeLSTM":
            x, w = _dims(graph, node.inputs[0]), _dims(graph, node.inputs[1])
            if x is None or w is None or len(x) != 3 or len(w) != 3:
                return None
            steps, batch, inputs = x  # W [directions, I, 4H]
            return steps * batch * w[0] * w[2] * (inputs + w[2] // 4)
        w_index, _, op = INTEGER_LAYERS[op]
    elif op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain:
        return 0
    x, w, y = _dims(graph, node.inputs[0]), _dims(graph, node.inputs[w_index]), _dims(graph, node.outputs[0])
    if x is None or w is None or y is None:
        return None
    if op == "Conv":  # each output element: C_in/group * kernel taps
        return int(np.prod(y)) * int(np.prod(w[1:]))
    if op == "ConvTranspose":  # each input element scatters into C_out/group * taps
        return int(np.prod(x)) * int(np.prod(w[1:]))
    if op == "Gemm":
        k = x[0] if node.attrs.get("transA", 0) else x[-1]
        return int(np.prod(y)) * k
    return int(np.prod(y)) * x[-1]  # MatMul
