"""What every pass shares: its result record and small graph-editing helpers.

A pass is ``run(graph, **options) -> PassResult``: it rewrites ``graph`` in place (the caller gives it
a copy) and says what it changed (``changes``) and what it left alone on purpose (``notes``). Two
rules hold for every pass, because QuantSim encodings are keyed by tensor name:

* a tensor that survives a rewrite keeps its name (a rewrite that removes a tensor removes the name);
* graph outputs never change name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir import Graph, Node, node_reads
from ..quant.placement import PARAM_ROLES


@dataclass
class PassResult:
    """What one pass did: ``changes`` (one line per rewrite) and ``notes`` (what it left, and why)."""

    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes)


# ------------------------------------------------------------------------------ reading the graph
def is_constant(graph: Graph, name: str) -> bool:
    return bool(name) and name in graph.initializers


def is_float_constant(graph: Graph, name: str) -> bool:
    return is_constant(graph, name) and graph.initializers[name].dtype.kind == "f"


def readers(graph: Graph, name: str) -> int:
    """How many node-reads ``name`` has (subgraph reads included) plus one per graph-output use."""
    return graph.use_counts()[name]


def only_reader(graph: Graph, name: str) -> Node | None:
    """The single node that reads ``name`` once, if ``name`` is not a graph output; else None."""
    if readers(graph, name) != 1:
        return None
    users = graph.consumers().get(name, [])
    return users[0] if users and name in users[0].inputs else None


def param_uses(graph: Graph) -> dict[str, list[tuple[Node, int, str | None]]]:
    """Every use of every initializer: (node, input index, parameter role or None), in graph order."""
    uses: dict[str, list[tuple[Node, int, str | None]]] = {}
    for node in graph.nodes:
        roles = PARAM_ROLES.get(node.op_type, {}) if not node.domain else {}
        for index, name in enumerate(node.inputs):
            if name in graph.initializers:
                uses.setdefault(name, []).append((node, index, roles.get(index)))
    return uses


def subgraph_reads(graph: Graph) -> set[str]:
    """Names read from inside subgraphs (If/Loop bodies): passes do not rewire those."""
    names: set[str] = set()
    for node in graph.nodes:
        names.update(set(node_reads(node)) - set(node.present_inputs()))
    return names


# ------------------------------------------------------------------------------ editing the graph
def fresh_name(graph: Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``...: the first name no tensor of ``graph`` uses."""
    taken = set(graph.initializers) | set(graph.values) | set(graph.input_names) | set(graph.output_names)
    for node in graph.nodes:
        taken.update(node.inputs)
        taken.update(node.outputs)
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def fresh_node_name(graph: Graph, base: str) -> str:
    taken = {n.name for n in graph.nodes}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def rename_reads(graph: Graph, old: str, new: str) -> None:
    """Every node that read ``old`` reads ``new`` instead (subgraph bodies too, unless they define ``old``).
    Graph outputs are not touched: callers never rename a graph output."""
    for node in graph.nodes:
        node.inputs = [new if name == old else name for name in node.inputs]
        for sub in node.subgraphs():
            if old in sub.outer_references():
                rename_reads(sub, old, new)


def remove_nodes(graph: Graph, nodes) -> None:
    gone = {id(n) for n in nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]


def drop_unused_initializers(graph: Graph) -> list[str]:
    """Remove initializers nothing reads (nodes, subgraphs, graph outputs); returns their names."""
    counts = graph.use_counts()
    unused = [name for name in graph.initializers if counts[name] == 0]
    for name in unused:
        del graph.initializers[name]
        graph.values.pop(name, None)
    return unused


def set_constant(graph: Graph, name: str, array: np.ndarray) -> None:
    from ..ir import Value

    graph.initializers[name] = array
    graph.values[name] = Value(name, array.dtype, tuple(array.shape))


def refresh(graph: Graph) -> Graph:
    """After a rewrite: forget metadata of tensors that are gone and infer dtypes and shapes again."""
    from ..shape_inference import infer_shapes

    alive = set(graph.initializers) | set(graph.input_names) | set(graph.output_names)
    for node in graph.nodes:
        alive.update(node.inputs)
        alive.update(node.outputs)
    graph.values = {name: v for name, v in graph.values.items() if name in alive}
    return infer_shapes(graph)


def describe_array(array: np.ndarray) -> str:
    """``float32[3, 4]`` or ``float32 scalar 1.5`` for change lines."""
    if array.size == 1:
        return f"{array.dtype} {list(array.shape)} = {array.ravel()[0]:.6g}"
    return f"{array.dtype}{list(array.shape)}"
