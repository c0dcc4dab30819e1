"""remove_identity: ``Identity`` nodes (and inference-mode ``Dropout``) disappear; their readers read the
input instead.

Why: an Identity is grid-preserving for QuantSim (no quantizer of its own), but it hides patterns from
the other passes and from supergroup matching (Conv -> Identity -> Relu is not Conv -> Relu), and it
adds a name between a layer and its readers. Removing it deletes only the Identity's output name.

Kept: an Identity whose output is a graph output (the output name must not change; for one reading
a graph input, as in MiniLM's ``input_ids -> output``, there is no other node to produce it), and
a Dropout that produces its mask or runs in training mode.
"""

from __future__ import annotations

from ..ir import Graph
from .common import PassResult, is_constant, remove_nodes, rename_reads


def _is_identity(graph: Graph, node) -> bool:
    if node.domain:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        training = node.inputs[2] if len(node.inputs) > 2 else ""
        mask_used = len(node.outputs) > 1 and node.outputs[1]
        if mask_used or node.attrs.get("training_mode"):
            return False
        # a training_mode input must be a constant False for the node to be an identity
        return not training or (is_constant(graph, training) and not graph.initializers[training].any())
    return False


def run(graph: Graph) -> PassResult:
    result = PassResult()
    outputs = set(graph.output_names)
    removed = []
    for node in graph.nodes:
        if not _is_identity(graph, node) or not node.inputs or not node.inputs[0]:
            continue
        source, target = node.inputs[0], node.outputs[0]
        if target in outputs:
            result.notes.append(f"kept {node.op_type} {node.name!r}: its output {target!r} is a graph output")
            continue
        rename_reads(graph, target, source)
        removed.append(node)
        result.changes.append(f"removed {node.op_type} {node.name!r}: readers of {target!r} read {source!r}")
    remove_nodes(graph, removed)
    return result
