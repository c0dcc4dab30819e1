"""refquant's graph IR: plain dataclasses that hold an ONNX model's computation.

A :class:`Graph` is a list of :class:`Node` in topological order, the graph's inputs and
outputs as :class:`Value`, constant tensors (``initializers``, NumPy arrays) and the
inferred dtype/shape of every tensor (``values``). Tensors are referred to by name, as in
ONNX; an empty name stands for an omitted optional input or output.

Subgraphs (the bodies of If and Loop) are Graphs stored as node attributes; they may
read tensors of the enclosing graph by name (``Graph.outer_references``).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

Dim = int | str | None  # a fixed size, a symbolic size ("batch"), or unknown


@dataclass
class Value:
    """A tensor's name, element type and shape (either may be None when unknown)."""

    name: str
    dtype: np.dtype | None = None
    shape: tuple[Dim, ...] | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


@dataclass
class Node:
    """One op application. ``version`` is the opset version whose definition the node follows."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""
    version: int = 0

    def subgraphs(self) -> Iterator[Graph]:
        for value in self.attrs.values():
            if isinstance(value, Graph):
                yield value
            elif isinstance(value, list):
                yield from (v for v in value if isinstance(v, Graph))

    def attrs_with_subgraphs(self, fn) -> dict:
        """A copy of the attributes with every subgraph ``g`` (If branches, Loop/Scan bodies) replaced by
        ``fn(g)``; other values are shared."""
        attrs = {}
        for key, value in self.attrs.items():
            if isinstance(value, Graph):
                value = fn(value)
            elif isinstance(value, list) and any(isinstance(v, Graph) for v in value):
                value = [fn(v) if isinstance(v, Graph) else v for v in value]
            attrs[key] = value
        return attrs

    def present_inputs(self) -> list[str]:
        return [name for name in self.inputs if name]

    def __repr__(self) -> str:
        return f"Node({self.op_type} {self.name!r}: {self.inputs} -> {self.outputs})"


@dataclass
class Graph:
    """A computation graph: nodes in topological order plus its tensors' metadata."""

    nodes: list[Node] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    opset: dict[str, int] = field(default_factory=dict)
    name: str = "graph"
    metadata: dict[str, str] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)  # ir_version, producer, ...

    # -- names -----------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]

    def value(self, name: str) -> Value:
        """The Value of a tensor (graph input, initializer or node output)."""
        if name not in self.values:
            self.values[name] = Value(name)
        return self.values[name]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in graph {self.name!r}")

    # -- structure -------------------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        """Map tensor name -> the node that produces it."""
        return {out: n for n in self.nodes for out in n.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        """Map tensor name -> the nodes that read it (subgraph reads count for their node)."""
        result: dict[str, list[Node]] = {}
        for n in self.nodes:
            for name in dict.fromkeys(node_reads(n)):
                result.setdefault(name, []).append(n)
        return result

    def use_counts(self) -> Counter:
        """How many node-reads each tensor has, plus one for each appearance as a graph output."""
        counts: Counter = Counter()
        for n in self.nodes:
            counts.update(node_reads(n))
        counts.update(self.output_names)
        return counts

    def outer_references(self) -> set[str]:
        """Tensor names this graph reads but does not define (for a subgraph: the outer scope)."""
        defined = set(self.input_names) | set(self.initializers)
        used: set[str] = set()
        for n in self.nodes:
            used.update(name for name in node_reads(n) if name not in defined)
            defined.update(o for o in n.outputs if o)
        used.update(name for name in self.output_names if name not in defined)
        return used

    def topological_sort(self) -> None:
        """Reorder ``nodes`` so that every node comes after the producers of what it reads.

        Stable: nodes already in order keep their relative order (Kahn's algorithm, FIFO).
        """
        available = set(self.input_names) | set(self.initializers) | self.outer_references()
        producer = self.producers()
        pending = {id(n): sum(1 for i in set(node_reads(n)) if i in producer and i not in available)
                   for n in self.nodes}
        waiting: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in set(node_reads(n)):
                if i in producer and i not in available:
                    waiting.setdefault(i, []).append(n)
        ready = [n for n in self.nodes if pending[id(n)] == 0]
        order: list[Node] = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for out in n.outputs:
                for m in waiting.pop(out, []):
                    pending[id(m)] -= 1
                    if pending[id(m)] == 0:
                        ready.append(m)
        if len(order) != len(self.nodes):
            stuck = [n.name or n.op_type for n in self.nodes if pending[id(n)] > 0][:5]
            raise ValueError(f"graph {self.name!r} has a cycle or unproduced inputs at nodes {stuck}")
        self.nodes = order

    def copy(self) -> Graph:
        """A deep copy (arrays included), safe to rewrite without touching the original."""
        return copy.deepcopy(self)

    def walk(self) -> Iterator[Node]:
        """Every node, including those inside subgraphs, depth first."""
        for n in self.nodes:
            yield n
            for g in n.subgraphs():
                yield from g.walk()


def node_reads(node: Node) -> list[str]:
    """Names a node reads: its inputs plus outer-scope names its subgraphs read."""
    names = node.present_inputs()
    for g in node.subgraphs():
        names.extend(sorted(g.outer_references()))
    return names
