"""fold_weight_chains: a parameter computed from constants (``Transpose``, ``Cast``, ``Reshape``,
``DequantizeLinear`` of a constant...) becomes one initializer.

Why: QuantSim recognises a weight or bias only when the layer reads an initializer. A weight behind a
``Transpose`` or ``Reshape`` gets no quantizer at all (those ops keep their input's grid, and their
constant input is not a parameter of theirs), one behind a ``Cast`` gets a per-tensor activation
quantizer instead of a per-channel weight quantizer. Folding the chain fixes both. The folded weight is
named after the chain's last tensor (the name the layer already reads), so encodings stay keyed the same.

This is :mod:`.fold_constants` restricted to the chains that end in a parameter input (the roles of
``refquant.quant.placement.PARAM_ROLES``), for a pipeline that wants nothing else folded.
"""

from __future__ import annotations

from ..ir import Graph
from ..quant.placement import PARAM_ROLES
from .common import PassResult
from .fold_constants import folded_nodes, materialize


def run(graph: Graph) -> PassResult:
    result = PassResult()
    nodes, constants = folded_nodes(graph)
    producer = {o: n for n in nodes for o in n.outputs if o}
    outputs = set(graph.output_names)
    chain: dict = {}  # id(node) -> node, for every node upstream of a folded parameter
    for node in graph.nodes:
        if node.domain:
            continue
        for index, role in PARAM_ROLES.get(node.op_type, {}).items():
            if index >= len(node.inputs) or node.inputs[index] not in producer:
                continue
            # everything upstream of the parameter that folds goes with it
            stack = [node.inputs[index]]
            while stack:
                name = stack.pop()
                source = producer.get(name)
                if source is None or id(source) in chain:
                    continue
                if any(o in outputs for o in source.outputs):
                    result.notes.append(f"kept {source.op_type} {source.name!r}: it produces a graph output")
                    continue
                chain[id(source)] = source
                stack.extend(source.present_inputs())
    if chain:
        ordered = [n for n in graph.nodes if id(n) in chain]
        materialize(graph, ordered, constants, result, "folded weight chain")
    return result
