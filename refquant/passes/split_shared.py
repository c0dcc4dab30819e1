"""split_shared_weights: a float parameter read by several nodes gets one copy per reader.

Why: QuantSim keys quantizers by tensor name, so a shared weight gets one encoding for every use,
decided by whichever reader placement meets first: a tied embedding used by a ``Gather`` and a
``MatMul``, or a weight read by two layers with different per-channel axes, is quantized for only
one of them. And PTQ techniques that rewrite weights per layer (BN folding, CLE, AdaRound, bias
correction) must not change a tensor another layer also reads.

The first reader keeps the original name; the others read ``<name>_1``, ``<name>_2``... Only float
initializers with at least one parameter use (a role in ``PARAM_ROLES``) are split: a shared scalar
constant gets one identical encoding anyway, and an integer constant is never quantized.
"""

from __future__ import annotations

from ..ir import Graph
from .common import PassResult, fresh_name, param_uses, set_constant, subgraph_reads


def run(graph: Graph) -> PassResult:
    result = PassResult()
    outputs = set(graph.output_names)
    from_subgraphs = subgraph_reads(graph)
    for name, uses in param_uses(graph).items():
        array = graph.initializers[name]
        if len(uses) < 2 or array.dtype.kind != "f" or not any(role for _, _, role in uses):
            continue
        if name in outputs or name in from_subgraphs:
            result.notes.append(f"kept shared {name!r}: it is also a graph output or read inside a subgraph")
            continue
        copies = []
        for node, index, _ in uses[1:]:
            copy = fresh_name(graph, f"{name}_{len(copies) + 1}")
            set_constant(graph, copy, array.copy())
            node.inputs[index] = copy
            copies.append(f"{copy!r} ({node.op_type} {node.name!r})")
        first = uses[0][0]
        result.changes.append(f"split {name!r} ({len(uses)} readers): {first.op_type} {first.name!r} keeps it, "
                              + ", ".join(copies))
    return result
