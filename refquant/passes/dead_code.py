"""remove_dead_code: nodes that no graph output depends on, and initializers nothing reads.

Why: a dead branch still gets quantizers and still runs during calibration (time, and observers on
tensors that never matter); unused initializers bloat the exported model and the encodings file. Graph
inputs are never removed, even unused ones: they are the model's interface.
"""

from __future__ import annotations

from ..ir import Graph, node_reads
from .common import PassResult, drop_unused_initializers, remove_nodes

# ops with effects beyond their outputs would be kept here; ONNX's default domain has none
_KEEP_OPS: set[str] = set()


def live_nodes(graph: Graph) -> set[int]:
    """ids of the nodes some graph output depends on."""
    producer = graph.producers()
    live: set[int] = set()
    stack = [producer[name] for name in graph.output_names if name in producer]
    stack += [n for n in graph.nodes if n.op_type in _KEEP_OPS or n.domain]  # unknown ops may have effects
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        stack.extend(producer[name] for name in node_reads(node) if name in producer)
    return live


def run(graph: Graph) -> PassResult:
    result = PassResult()
    live = live_nodes(graph)
    dead = [n for n in graph.nodes if id(n) not in live]
    for node in dead:
        result.changes.append(f"removed dead {node.op_type} {node.name!r} (outputs {[o for o in node.outputs if o]})")
    remove_nodes(graph, dead)
    for name in drop_unused_initializers(graph):
        result.changes.append(f"removed unused initializer {name!r}")
    counts = graph.use_counts()
    for value in graph.inputs:
        if counts[value.name] == 0:
            result.notes.append(f"graph input {value.name!r} is unused; kept (inputs are the model's interface)")
    return result
