"""Quantizer groups ("layers") of a QuantSim: the unit that sensitivity analysis toggles and mixed
precision assigns one precision to.

A group is a node with quantized weights plus the quantizer of its output; when that output is not
quantized because the node heads a supergroup (Conv+Relu, Gemm+Relu...), the chain of single consumers
is followed to the first quantized output (Conv -> Relu: the Relu's output quantizer). An elementwise
activation function that is the layer's only consumer joins it even when both outputs are quantized
(depthwise Conv -> Clip, which AIMET keeps out of supergroups; Conv -> PRelu with its slope). Nodes whose
only quantizers are their outputs (Add, GlobalAveragePool, Softmax...) and graph inputs form groups of
their own. Quantizers that share one encoding (``tied_to``: Relu/Concat/AveragePool ties) always end up in the
same group, since one encoding cannot have two precisions or be both on and off.

Only *active* quantizers take part: enabled, with an encoding (or a fixed quantized value). Positions
are indices into ``graph.nodes`` (the order the runtime executes): a weight is at its first consumer,
an activation at its producer, a graph input at -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir import Graph
from ..model_info import node_macs
from ..quant.placement import is_depthwise

_FOLLOW_HOPS = 3  # supergroup chains are at most Conv -> BN -> Relu long
# elementwise activation functions: the one following a layer belongs to the layer, even when both the
# layer's output and its own are quantized (a depthwise Conv -> Clip, Conv -> PRelu)
ACTIVATIONS = {"Relu", "Clip", "PRelu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
               "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu"}


@dataclass
class QuantGroup:
    """One group: ``weights`` are the static tensors (parameters and quantized constants), ``activations``
    the run-time tensors, both quantizer (tensor) names in graph order."""

    name: str
    nodes: list[str]
    op_types: list[str]
    weights: list[str]
    activations: list[str]
    position: int  # first node index any of its quantizers acts at; -1: a graph input
    macs: int = 0  # per run at the inferred shapes (symbolic dims as 1), as model_info counts them
    parameters: int = 0  # elements of its weights
    output_elements: int = 0  # elements of its activation tensors per run
    depthwise: bool = False
    roles: dict[str, str] = field(default_factory=dict)  # weight tensor -> role ("weight", "bias", ...)

    @property
    def quantizers(self) -> list[str]:
        return self.weights + self.activations

    @property
    def kind(self) -> str:
        """"weighted" (has a quantized weight) or "activation" (only run-time tensors)."""
        return "weighted" if any(r == "weight" for r in self.roles.values()) else "activation"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "nodes": self.nodes, "op_types": self.op_types,
                "weights": self.weights, "activations": self.activations, "position": self.position,
                "macs": self.macs, "parameters": self.parameters, "output_elements": self.output_elements,
                "depthwise": self.depthwise}


def is_active(sim, name: str) -> bool:
    """Whether the simulation quantizes tensor ``name`` at all."""
    q = sim.quantizers[name]
    if not q.enabled:
        return False
    if q.kind != "activation" and q.fixed_value is not None:
        return True
    return sim.encoding_of(name) is not None


def _elements(graph: Graph, name: str) -> int:
    if name in graph.initializers:
        return int(np.asarray(graph.initializers[name]).size)
    value = graph.values.get(name)
    if value is None or value.shape is None:
        return 0
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in value.shape]))


def layer_groups(sim, names=None) -> list[QuantGroup]:
    """The groups of ``sim``'s quantizers, in graph order. ``names``: the quantizers to group (default:
    the active ones, see :func:`is_active`)."""
    graph = sim.graph
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}
    producers = graph.producers()
    consumers = graph.consumers()
    names = [n for n in sim.quantizers if is_active(sim, n)] if names is None else list(names)

    # each quantizer belongs to a key: a node index, or "input:<name>" for a graph input
    key_of: dict[str, object] = {}
    for name in names:
        q = sim.quantizers[name]
        if q.kind != "activation" or name in graph.initializers:
            users = [index[id(u)] for u in consumers.get(name, []) if id(u) in index]
            if users:
                key_of[name] = min(users)
        elif name in producers:
            key_of[name] = index[id(producers[name])]
        else:
            key_of[name] = "input:" + name

    parent: dict[object, object] = {}

    def find(k):
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            # the earlier key (graph order; inputs first) becomes the root
            order = sorted((ra, rb), key=_order_key)
            parent[order[1]] = order[0]

    for key in key_of.values():
        find(key)
    outputs = set(graph.output_names)
    quantized_outputs = {key_of[n] for n in names if sim.quantizers[n].kind == "activation" and n in key_of}
    weighted_nodes = sorted({key_of[n] for n in names if sim.quantizers[n].kind == "param"
                             and sim.quantizers[n].role == "weight" and isinstance(key_of.get(n), int)})
    for i in weighted_nodes:  # follow the chain of single consumers to the layer's activation function
        j, absorbed = i, False
        for _ in range(_FOLLOW_HOPS):
            out = nodes[j].outputs[0] if nodes[j].outputs else ""
            users = consumers.get(out, [])
            if not out or out in outputs or len(users) != 1 or id(users[0]) not in index:
                break
            nxt = index[id(users[0])]
            is_activation = nodes[nxt].op_type in ACTIVATIONS and not nodes[nxt].domain
            if nxt in weighted_nodes or (j in quantized_outputs and (absorbed or not is_activation)):
                break  # past the layer's quantized output, only its activation function joins
            absorbed = absorbed or is_activation
            union(i, nxt)
            j = nxt
    for name in names:  # tied quantizers share a group
        root = sim.quantizers[name].tied_to
        if root is not None and root in key_of and name in key_of:
            union(key_of[name], key_of[root])

    members: dict[object, list[object]] = {}
    for key in list(parent):
        members.setdefault(find(key), []).append(key)
    groups = []
    for root, keys in sorted(members.items(), key=lambda kv: _order_key(kv[0])):
        keyset = set(keys)
        qnames = [n for n in sim.quantizers if n in key_of and find(key_of[n]) == root]
        if not qnames:
            continue
        node_ids = sorted(k for k in keyset if isinstance(k, int))
        weights = [n for n in qnames if sim.quantizers[n].kind != "activation" or n in graph.initializers]
        activations = [n for n in qnames if n not in weights]
        roles = {n: (sim.quantizers[n].role or "constant") for n in weights}
        positions = [key_of[n] if isinstance(key_of[n], int) else -1 for n in qnames]
        main = next((i for i in node_ids if any(key_of.get(w) == i and roles[w] == "weight" for w in weights)),
                    node_ids[0] if node_ids else None)
        if main is None:
            name = activations[0] if activations else qnames[0]
        else:
            name = nodes[main].name or f"{nodes[main].op_type}_{main}"
        macs = 0
        for i in node_ids:
            count = node_macs(graph, nodes[i])
            macs += count or 0
        groups.append(QuantGroup(
            name=name, nodes=[nodes[i].name or f"{nodes[i].op_type}_{i}" for i in node_ids],
            op_types=[nodes[i].op_type for i in node_ids], weights=weights, activations=activations,
            position=min(positions), macs=int(macs),
            parameters=sum(_elements(graph, w) for w in weights if roles[w] != "bias"),
            output_elements=sum(_elements(graph, a) for a in activations),
            depthwise=any(is_depthwise(nodes[i], graph) for i in node_ids), roles=roles))
    _unique_names(groups)
    return groups


def _order_key(key):
    return (-1, str(key)) if isinstance(key, str) else (key, "")


def _unique_names(groups: list[QuantGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        if g.name in seen:
            seen[g.name] += 1
            g.name = f"{g.name}#{seen[g.name]}"
        else:
            seen[g.name] = 0
