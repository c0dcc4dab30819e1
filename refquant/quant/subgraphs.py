"""Quantization inside If/Loop subgraphs: scoped views, hoisted constants, ambiguous names.

ONNX names tensors uniquely across a model and its subgraphs, and a subgraph reads tensors of the
enclosing graphs by name. So a quantizer keyed by a tensor name means the same tensor wherever it is
read: a tensor computed in the main graph and read inside a branch is one quantized tensor (the
runtime's outer scope holds its quantize-dequantized value), and a tensor computed inside a branch
gets its quantizer from the branch's node exactly as it would in the main graph.

* :func:`scoped` gives a subgraph a view whose ``initializers`` and ``values`` chain to the enclosing
  graphs', so the placement rules (is this input a constant weight? is this tensor float?) see
  outer-scope names as the main graph would.
* :func:`prepare_subgraphs` moves the initializers of subgraphs (their Constant nodes become
  initializers when loaded) into the main graph, where subgraph nodes read them as outer-scope names.
  The computation is unchanged (ONNX allows subgraphs to read outer initializers); what it buys is
  that parameters live in one table: QuantSim quantizes them into the session's constants, bias
  correction replaces them, export puts their Q/DQ pair next to them, exactly as for main-graph weights.
* A name defined more than once across scopes (sibling branches that reuse a name, which the ONNX
  checker does not always refuse) cannot be keyed by name: :func:`ambiguous_names` lists them and they
  get no quantizer and are not hoisted.
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap, Counter

import numpy as np

from ..ir import Graph, Node, Value


def has_subgraphs(graph: Graph) -> bool:
    return any(True for n in graph.nodes for _ in n.subgraphs())


def scoped(sub: Graph, outer: Graph) -> Graph:
    """A view of ``sub`` (same nodes) whose initializers and values fall back to ``outer``'s."""
    return dataclasses.replace(sub, initializers=ChainMap(sub.initializers, outer.initializers),
                               values=ChainMap(sub.values, outer.values))


def defined_names(graph: Graph) -> Counter:
    """How many times each tensor name is defined (graph input, initializer, node output) in ``graph``
    and all its subgraphs."""
    counts: Counter = Counter()

    def visit(g: Graph) -> None:
        counts.update(g.input_names)
        counts.update(list(g.initializers))
        for node in g.nodes:
            counts.update(o for o in node.outputs if o)
            for sub in node.subgraphs():
                visit(sub)

    visit(graph)
    return counts


def ambiguous_names(graph: Graph) -> set[str]:
    """Names defined more than once across the main graph and its subgraphs (none in a valid model)."""
    if not has_subgraphs(graph):
        return set()
    return {name for name, count in defined_names(graph).items() if count > 1}


def all_producers(graph: Graph) -> dict[str, Node]:
    """Tensor name -> producing node, over the main graph and every subgraph (names are unique)."""
    return {out: n for n in graph.walk() for out in n.outputs if out}


def all_initializers(graph: Graph) -> dict:
    """Every initializer of ``graph`` and its subgraphs, by name (a ChainMap: the main graph's first)."""
    maps = [graph.initializers]
    for node in graph.walk():
        maps.extend(sub.initializers for sub in node.subgraphs())
    return ChainMap(*maps)


def prepare_subgraphs(graph: Graph) -> Graph:
    """``graph`` itself when it has no If/Loop; else a Graph sharing ``graph``'s arrays and plain nodes whose
    subgraph-holding nodes are copies, where

    * every float subgraph initializer that is data (not a setting such as a Clip bound, not an ambiguous
      name) has moved into the main graph's initializers (and values): subgraph nodes read it as an
      outer-scope name;
    * subgraph tensors whose dtype/shape inference left unknown (refquant's shape inference runs a
      subgraph without the enclosing scope, so what an If branch computes from outer tensors is unknown)
      are inferred again with the enclosing scopes' tensors known.

    ``graph`` is not modified."""
    if not has_subgraphs(graph):
        return graph
    from .placement import CONSTANT_INPUTS_IGNORED

    ambiguous = ambiguous_names(graph)
    # settings stay where they are: integer constants (axes, shapes) and float ones no quantizer reads (Clip
    # bounds, Pad values...), which the ONNX writer may have to turn back into attributes of their node
    settings = {name for n in graph.walk() if n.op_type in CONSTANT_INPUTS_IGNORED for name in n.inputs}
    hoisted: dict = {}
    hoisted_values: dict = {}

    def copy_graph(g: Graph) -> Graph:
        keep = {}
        for name, array in g.initializers.items():
            if name in ambiguous or name in settings or np.asarray(array).dtype.kind != "f":
                keep[name] = array
            else:
                hoisted[name] = array
                if name in g.values:
                    hoisted_values[name] = g.values[name]
        return dataclasses.replace(g, nodes=[copy_node(n) for n in g.nodes], initializers=keep,
                                   values=dict(g.values), inputs=list(g.inputs),
                                   outputs=[dataclasses.replace(v) for v in g.outputs])

    def copy_node(node: Node) -> Node:
        if not any(True for _ in node.subgraphs()):
            return node
        return dataclasses.replace(node, attrs=node.attrs_with_subgraphs(copy_graph), inputs=list(node.inputs),
                                   outputs=list(node.outputs))

    nodes = [copy_node(n) for n in graph.nodes]
    initializers = dict(graph.initializers)
    initializers.update(hoisted)
    values = dict(graph.values)
    values.update(hoisted_values)
    result = dataclasses.replace(graph, nodes=nodes, initializers=initializers, values=values,
                                 inputs=list(graph.inputs), outputs=list(graph.outputs))
    _infer_in_scope(result)
    return result


def _infer_in_scope(graph: Graph) -> None:
    """Fill the unknown dtypes/shapes in ``graph``'s subgraphs (recursively) with the enclosing scopes' tensors
    (values and constants) visible, and the outputs of If/Loop nodes from their subgraphs' outputs: each
    subgraph is inferred by a probe graph whose inputs are the subgraph's inputs plus the outer tensors it
    reads. Repeated until nothing new is known (an If output may feed a later subgraph)."""
    for _ in range(16):
        before = _known_count(graph)
        for node in graph.nodes:
            for sub in node.subgraphs():
                _infer_subgraph(sub, graph)
                _infer_in_scope(scoped(sub, graph))
            _fill_control_flow_outputs(node, graph)
            _fill_dtype_from_input(node, graph)
        if _known_count(graph) == before:
            return


def _known_count(graph: Graph) -> int:
    return sum(1 for v in graph.values.values() if v.dtype is not None) + sum(
        1 for v in graph.values.values() if v.shape is not None)


def _infer_subgraph(sub: Graph, outer: Graph) -> None:
    from ..shape_inference import infer_shapes

    view = scoped(sub, outer)
    if not any(v.dtype is None or v.shape is None for v in sub.values.values()) and all(
            o in sub.values for n in sub.nodes for o in n.outputs if o):
        return
    names = sorted(sub.outer_references())
    probe = Graph(nodes=sub.nodes, opset=sub.opset,
                  inputs=list(sub.inputs) + [dataclasses.replace(view.values[n]) for n in names
                                             if n in view.values and n not in view.initializers],
                  initializers={**{n: view.initializers[n] for n in names if n in view.initializers},
                                **sub.initializers},
                  outputs=[dataclasses.replace(v) for v in sub.outputs], values=dict(sub.values))
    infer_shapes(probe)
    produced = {o for n in sub.nodes for o in n.outputs if o}
    for name, value in probe.values.items():
        known = sub.values.get(name)
        if (name in produced or name in sub.values) and (known is None or (known.dtype is None and value.dtype
                                                                            is not None) or
                                                          (known.shape is None and value.shape is not None)):
            sub.values[name] = Value(name, value.dtype if known is None or known.dtype is None else known.dtype,
                                     value.shape if known is None or known.shape is None else known.shape)


def _fill_control_flow_outputs(node: Node, graph: Graph) -> None:
    """If outputs take the dtype (and the shape, where the branches agree) of the branch outputs; Loop outputs
    the dtype/shape of the body's carried outputs, and the dtype of its scan outputs."""
    if node.op_type == "If":
        branches = [scoped(node.attrs[k], graph) for k in ("then_branch", "else_branch") if k in node.attrs]
        pairs = [(i, [b.values.get(b.outputs[i].name) if i < len(b.outputs) else None for b in branches])
                 for i in range(len(node.outputs))]
        for i, found in pairs:
            found = [f for f in found if f is not None and f.dtype is not None]
            if found:
                shapes = {f.shape for f in found}
                _set_value(graph, node.outputs[i], found[0].dtype, shapes.pop() if len(shapes) == 1 else None)
    elif node.op_type == "Loop" and "body" in node.attrs:
        body = scoped(node.attrs["body"], graph)
        carried = len(node.inputs) - 2
        for i, out in enumerate(node.outputs):
            index = 1 + i
            if index >= len(body.outputs):
                break
            value = body.values.get(body.outputs[index].name)
            if value is None or value.dtype is None:
                continue
            if i < carried:
                _set_value(graph, out, value.dtype, value.shape)
            else:
                _set_value(graph, out, value.dtype, None if value.shape is None else (None, *value.shape))


def _set_value(graph: Graph, name: str, dtype, shape) -> None:
    if not name:
        return
    known = graph.values.get(name)
    if known is None or known.dtype is None:
        graph.values[name] = Value(name, dtype, shape if known is None or known.shape is None else known.shape)
    elif known.shape is None and shape is not None:
        graph.values[name] = Value(name, known.dtype, shape)


# ops whose outputs all have their first input's dtype, whatever the shapes: what shape inference could not
# run (an LSTM whose input shape is unknown inside a branch) still has a known dtype, which is all the
# placement rules need
SAME_DTYPE_OPS = {"LSTM", "GRU", "RNN", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Identity", "Flatten",
                  "Relu", "LeakyRelu", "Tanh", "Sigmoid", "HardSigmoid", "Softmax", "Add", "Sub", "Mul", "Div",
                  "MatMul", "Gemm", "Conv", "ConvTranspose", "Concat", "Slice", "Gather", "Split", "Pad", "Clip",
                  "Abs", "Neg", "Sqrt", "Exp", "Log", "Pow", "ReduceMean", "ReduceSum", "BatchNormalization",
                  "LayerNormalization", "AveragePool", "MaxPool", "GlobalAveragePool", "Expand", "Tile"}


def _fill_dtype_from_input(node: Node, graph: Graph) -> None:
    if node.op_type not in SAME_DTYPE_OPS or node.domain or not node.inputs:
        return
    source = graph.values.get(node.inputs[0])
    if source is None or source.dtype is None:
        return
    outputs = node.outputs if node.op_type in ("LSTM", "GRU", "RNN", "Split") else node.outputs[:1]
    for out in outputs:
        if out and (graph.values.get(out) is None or graph.values[out].dtype is None):
            _set_value(graph, out, source.dtype, None)
