"""fold_constants: nodes whose inputs are all constant become initializers.

A :class:`refquant.Session` already computes these nodes once, at init (``Session.constants``); this
pass writes what it computed into the graph, so that QuantSim, the validator and other tools see a
constant where the model computes one (a ``Cast`` of a constant weight, a ``DequantizeLinear`` of int8
weights, shape arithmetic on fixed shapes). The folded values are taken from a Session, so the pass
folds exactly what the runtime folds, with the same kernels.

Kept as nodes: nodes whose output is a graph output (an output must stay produced by a node), and
nodes whose result is much larger than their inputs (``Expand``/``ConstantOfShape``/``Tile`` to a big
shape: storing the result would bloat the model for nothing).
"""

from __future__ import annotations

from ..ir import Graph, Node, node_reads
from .common import PassResult, describe_array, remove_nodes, set_constant

GROWTH_LIMIT_BYTES = 1 << 20  # a folded value above this and 4x its inputs' size stays a node


def folded_nodes(graph: Graph) -> tuple[list[Node], dict]:
    """The nodes a Session folds at init, in graph order, and the Session's constants."""
    from ..runtime import Session

    constants = Session(graph).constants
    nodes = [n for n in graph.nodes
             if n.outputs and any(n.outputs) and all(o in constants for o in n.outputs if o)
             and not any(True for _ in n.subgraphs())]
    return nodes, constants


def materialize(graph: Graph, nodes: list[Node], constants: dict, result: PassResult, what: str) -> None:
    """Replace ``nodes`` (all folded) by initializers holding their outputs, where something still reads them."""
    used_before = {name for name in graph.initializers if graph.use_counts()[name]}
    remove = {id(n) for n in nodes}
    kept_reads: set[str] = set(graph.output_names)
    for node in graph.nodes:
        if id(node) not in remove:
            kept_reads.update(node_reads(node))
    for node in nodes:
        for name in node.outputs:
            if name and name in kept_reads:
                set_constant(graph, name, constants[name])
                result.changes.append(f"{what} {node.op_type} {node.name!r} -> initializer {name!r} "
                                      f"({describe_array(constants[name])})")
    remove_nodes(graph, nodes)
    counts = graph.use_counts()
    for name in sorted(used_before):
        if counts[name] == 0:  # only read by the folded nodes
            del graph.initializers[name]
            graph.values.pop(name, None)


def run(graph: Graph, growth_limit: int = GROWTH_LIMIT_BYTES) -> PassResult:
    result = PassResult()
    nodes, constants = folded_nodes(graph)
    outputs = set(graph.output_names)
    chosen = []
    for node in nodes:
        if any(o in outputs for o in node.outputs):
            result.notes.append(f"kept {node.op_type} {node.name!r}: it produces a graph output")
            continue
        out_bytes = sum(constants[o].nbytes for o in node.outputs if o)
        in_bytes = sum(constants[i].nbytes for i in node.present_inputs())
        if out_bytes > max(growth_limit, 4 * in_bytes):
            result.notes.append(f"kept {node.op_type} {node.name!r}: its result ({out_bytes:,} bytes) is much "
                                f"larger than its inputs ({in_bytes:,} bytes)")
            continue
        chosen.append(node)
    if chosen:
        materialize(graph, chosen, constants, result, "folded")
    return result
