"""Reverse-mode gradients over the IR: a recording forward pass, then the chain rule node by node.

The forward pass runs the graph with the registered float kernels (the same ones the runtime uses),
and records, for every node that reads a tensor requiring a gradient, the arrays its backward needs:
its inputs (as the node read them) and its outputs (as the kernel produced them). The backward pass
walks those records in reverse topological order. For a node with outputs ``y_j`` and inputs ``x_i``
it calls the op's registered backward (:mod:`refquant.train.backward_registry`)

    dL/dx_i = sum_j (dL/dy_j) (dy_j/dx_i)

and adds the result into the gradient of each ``x_i`` (a tensor read by several nodes receives the sum
of their contributions). A tensor's gradient is complete once every reader's backward has run, which
reverse topological order guarantees when its producer is reached; the gradient is then handed on
and dropped, and the producer's record is freed, so memory falls as the backward pass proceeds.

**Transforms** stand between a tensor and its readers: a quantizer's quantize-dequantize ``t' = T(t)``
on a graph input, a node output or a parameter (see :mod:`refquant.train.quantizers`). Readers see
``t'``; the backward pass maps ``dL/dt'`` through ``T.backward`` to ``dL/dt`` and collects the
gradients of T's own parameters (a learned range). One transform object may serve several tensors
(tied quantizers); its parameter gradients are summed over them.

Tensors require a gradient when they are a trainable parameter, a tensor named in ``wrt``, the output
of a transform with parameters, or a float output of a node reading one of those. Everything else
(shape arithmetic, constant subgraphs) runs as in the runtime and is freed after its last reader;
nodes whose inputs are all non-trainable constants are computed once at construction (folded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np

from ..errors import OpError, RefquantError
from ..ir import Graph, Node, node_reads
from ..runtime import _NEVER_FOLD, _compile, _thread_limit
from . import grads as _grads  # noqa: F401  (registers every op family's backward)
from .backward_registry import lookup_backward


class Transform(Protocol):
    """What the engine needs from a quantizer (or any elementwise map applied to a tensor)."""

    key: str  # transforms with the same key share parameters; their gradients are summed
    learnable: bool  # True: has parameters, so its output requires a gradient

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, object]:
        """``(T(x), saved)``; ``saved`` is whatever backward needs."""

    def backward(self, grad: np.ndarray, saved) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(dL/dx, {parameter name: dL/dparameter})`` from ``dL/dT(x)``."""


class GradientError(RefquantError):
    """A gradient that cannot be computed: an op without a backward on the path, a shape mismatch."""


@dataclass
class _Record:
    node: Node
    kernel_kwargs: dict
    inputs: list
    outputs: list
    needs: list  # per input: does it require a gradient


@dataclass
class Tape:
    """What one recorded forward pass leaves for :meth:`GradientEngine.backward` (used once)."""

    outputs: dict[str, np.ndarray]
    records: list = field(default_factory=list)
    saved: dict = field(default_factory=dict)  # tensor name -> (transform, saved state)
    requires: set = field(default_factory=set)  # tensor names whose (raw) value requires a gradient


@dataclass
class Gradients:
    """Result of a backward pass: ``params``/``tensors`` map names to dL/d(name) (None-free: a name
    the loss does not reach gets zeros), ``transforms`` maps a transform key to its parameter grads."""

    params: dict[str, np.ndarray]
    tensors: dict[str, np.ndarray]
    transforms: dict[str, dict[str, np.ndarray]]


class GradientEngine:
    """Forward and reverse-mode gradients of ``graph``.

    ``GradientEngine(graph, params=(), transforms=None)``: ``params`` names the initializers that
    are trained (their values are passed to :meth:`forward` each time; the others are constants);
    ``transforms`` maps tensor names (inputs, node outputs, initializers) to :class:`Transform`;
    ``threads`` caps the kernels' threads during forward and backward as ``Session(threads=...)`` does.
    """

    def __init__(self, graph: Graph, params: Iterable[str] = (), transforms: Mapping[str, Transform] | None = None,
                 threads: int | None = None):
        self.graph = graph
        self.threads = threads
        self.params = list(params)
        unknown = [name for name in self.params if name not in graph.initializers]
        if unknown:
            raise GradientError(f"graph {graph.name!r}: trainable {unknown[:5]} are not initializers")
        self.transforms = dict(transforms or {})
        self._compiled = {id(n): _compile(n) for n in graph.nodes}
        self._constants, self._folded = self._fold()
        self._steps = [n for n in graph.nodes if id(n) not in self._folded]
        last_reader: dict[str, int] = {}
        for index, node in enumerate(self._steps):
            for name in node_reads(node):
                last_reader[name] = index
        self._frees: list[list[str]] = [[] for _ in self._steps]
        for name, index in last_reader.items():
            self._frees[index].append(name)

    # ------------------------------------------------------------------ setup
    def _fold(self) -> tuple[dict[str, np.ndarray], set[int]]:
        """Nodes whose inputs are all non-trainable, untransformed constants: computed once."""
        trainable = set(self.params)
        constants = {name: a for name, a in self.graph.initializers.items() if name not in trainable}
        fixed = {name for name in constants if name not in self.transforms}
        folded: set[int] = set()
        with np.errstate(all="ignore"):
            for node in self.graph.nodes:
                if node.op_type in _NEVER_FOLD or any(True for _ in node.subgraphs()):
                    continue
                if not all(name in fixed for name in node.present_inputs()):
                    continue
                kernel, kwargs = self._compiled[id(node)]
                try:
                    result = kernel(*[constants[n] if n else None for n in node.inputs], **kwargs)
                except Exception:
                    continue  # left in the plan: it fails at run time with the node named
                result = result if isinstance(result, tuple) else (result,)
                for name, array in zip(node.outputs, result):
                    if name and name not in self.transforms:
                        constants[name] = array
                        fixed.add(name)
                folded.add(id(node))
        return constants, folded

    def missing_backwards(self, outputs: Iterable[str] | None = None, wrt: Iterable[str] = ()) -> list[Node]:
        """Nodes on a path from a trainable tensor to ``outputs`` whose op has no registered backward."""
        graph = self.graph
        wanted = set(outputs if outputs is not None else graph.output_names)
        requires = set(self.params) | set(wrt) | {n for n, t in self.transforms.items() if t.learnable}
        on_path: list[Node] = []
        for node in self._steps:
            if any(name in requires for name in node.inputs if name):
                floats = [o for o in node.outputs if o and _is_float(graph, o)]
                requires.update(floats)
                if floats:
                    on_path.append(node)
        reaches = set(wanted)
        missing = []
        for node in reversed(on_path):
            if any(o in reaches for o in node.outputs):
                reaches.update(n for n in node.inputs if n)
                if lookup_backward(node.op_type) is None:
                    missing.append(node)
        return missing[::-1]

    # ------------------------------------------------------------------ forward
    def forward(self, feeds: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray] | None = None,
                outputs: Iterable[str] | None = None, wrt: Iterable[str] = (), record: bool = True) -> Tape:
        with _thread_limit(self.threads):
            return self._forward(feeds, params, outputs, wrt, record)

    def _forward(self, feeds, params, outputs, wrt, record) -> Tape:
        """Run the graph; ``params`` gives the current value of every trainable initializer.

        Returns a :class:`Tape` whose ``outputs`` are the requested tensors (default: graph outputs)
        after their transforms; with ``record=False`` nothing is kept for a backward pass.
        """
        params = dict(params or {})
        absent = [name for name in self.graph.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self.graph.input_names]
        if absent or unknown:
            raise GradientError(f"graph {self.graph.name!r}: missing feed(s) {absent}, unknown feed(s) {unknown}; "
                                f"the inputs are {self.graph.input_names}")
        missing = [name for name in self.params if name not in params]
        if missing:
            raise GradientError(f"forward: no value given for trainable parameter(s) {missing[:5]}")
        wanted = tuple(outputs if outputs is not None else self.graph.output_names)
        wrt = set(wrt)
        tape = Tape({})
        requires = tape.requires
        env: dict[str, np.ndarray] = {}

        def bind(name: str, array: np.ndarray, needs: bool) -> None:
            """Store a tensor as its readers will see it (after its transform, if any)."""
            transform = self.transforms.get(name)
            if transform is not None and array.dtype.kind != "f":
                transform = None
            seen_requires = needs or name in wrt or (transform is not None and transform.learnable)
            if transform is not None:
                array, saved = transform.forward(array)
                if record and seen_requires:
                    tape.saved[name] = (transform, saved)
            if seen_requires:
                requires.add(name)
            env[name] = array

        for name, array in feeds.items():
            bind(name, np.asarray(array), False)
        for name in self.params:
            bind(name, params[name], True)
        for name, transform in self.transforms.items():  # transformed non-trainable constants
            if name in self._constants and name not in env:
                bind(name, self._constants[name], False)
        scope_constants = self._constants
        for index, node in enumerate(self._steps):
            kernel, kwargs = self._compiled[id(node)]
            args = [(env[n] if n in env else scope_constants[n]) if n else None for n in node.inputs]
            try:
                result = kernel(*args, **kwargs)
            except RefquantError:
                raise
            except Exception as exc:
                raise OpError(f"node {node.name!r} ({node.op_type}) failed: {exc.__class__.__name__}: {exc}") from exc
            result = result if isinstance(result, tuple) else (result,)
            needs = [bool(n) and n in requires for n in node.inputs]
            grad_path = record and any(needs)
            for name, array in zip(node.outputs, result):
                if name:
                    bind(name, array, grad_path and array.dtype.kind == "f")
            if grad_path:
                tape.records.append(_Record(node, kwargs, args, list(result), needs))
            for name in self._frees[index]:
                if name not in wanted:
                    env.pop(name, None)
        missing = [name for name in wanted if name not in env and name not in scope_constants]
        if missing:
            raise GradientError(f"graph {self.graph.name!r}: requested tensor(s) {missing} are not produced")
        tape.outputs = {name: env[name] if name in env else scope_constants[name] for name in wanted}
        return tape

    # ------------------------------------------------------------------ backward
    def backward(self, tape: Tape, output_grads: Mapping[str, np.ndarray], wrt: Iterable[str] = ()) -> Gradients:
        """Gradients of the loss whose gradient w.r.t. each output is ``output_grads[name]``.

        Returns dL/dparam for every trainable parameter, dL/dt for every tensor t in ``wrt`` (the
        value before its transform), and the parameter gradients of every learnable transform."""
        with _thread_limit(self.threads):
            return self._backward(tape, output_grads, wrt)

    def _backward(self, tape: Tape, output_grads, wrt) -> Gradients:
        grads: dict[str, np.ndarray] = {}  # gradient w.r.t. the transformed value
        for name, g in output_grads.items():
            if g is None:
                continue
            if name not in tape.outputs:
                raise GradientError(f"backward: {name!r} is not an output of the recorded forward pass")
            if np.shape(g) != tape.outputs[name].shape:
                raise GradientError(f"backward: gradient of {name!r} has shape {list(np.shape(g))}, "
                                    f"the output {list(tape.outputs[name].shape)}")
            _accumulate(grads, name, np.asarray(g))
        wrt = set(wrt)
        transform_grads: dict[str, dict[str, np.ndarray]] = {}
        tensors: dict[str, np.ndarray] = {}

        def untransform(name: str) -> np.ndarray | None:
            """dL/d(raw tensor) from dL/d(transformed tensor); collects the transform's own grads."""
            g = grads.pop(name, None)
            entry = tape.saved.pop(name, None)
            if entry is not None and g is not None:
                transform, saved = entry
                g, own = transform.backward(g, saved)
                bucket = transform_grads.setdefault(transform.key, {})
                for pname, pg in own.items():
                    _accumulate(bucket, pname, pg)
            if name in wrt and g is not None:
                tensors[name] = g
            return g

        while tape.records:
            record = tape.records.pop()
            node = record.node
            grads_out = [untransform(name) if name else None for name in node.outputs]
            if all(g is None for g in grads_out) or not any(record.needs):
                continue
            backward = lookup_backward(node.op_type)
            if backward is None:
                raise GradientError(f"node {node.name!r} ({node.op_type}) is on the gradient path but "
                                    f"{node.op_type} has no registered backward")
            attrs = {k: v for k, v in record.kernel_kwargs.items() if k != "ctx"}
            try:
                grads_in = backward(grads_out, record.inputs, record.outputs, **attrs)
            except RefquantError:
                raise
            except Exception as exc:
                raise GradientError(f"backward of node {node.name!r} ({node.op_type}) failed: "
                                    f"{exc.__class__.__name__}: {exc}") from exc
            for name, needed, g, x in zip(node.inputs, record.needs, grads_in, record.inputs):
                if not needed or g is None:
                    continue
                if np.shape(g) != np.shape(x):
                    raise GradientError(f"backward of node {node.name!r} ({node.op_type}): gradient of input "
                                        f"{name!r} has shape {list(np.shape(g))}, the input {list(np.shape(x))}")
                _accumulate(grads, name, g)
            record.inputs = record.outputs = None  # free the saved arrays now
        params = {}
        for name in self.params:
            g = untransform(name)
            params[name] = np.zeros_like(self.graph.initializers[name]) if g is None else g
        for name in list(tape.saved):  # graph inputs and transformed constants
            untransform(name)
        for name in wrt:
            if name not in tensors:
                g = untransform(name) if name in grads else None
                if g is not None:
                    tensors[name] = g
        return Gradients(params, tensors, transform_grads)

    def gradients(self, feeds, params, loss: Callable, wrt: Iterable[str] = ()) -> tuple[float, Gradients, dict]:
        """Forward, ``loss(outputs) -> (value, {output: dL/doutput})``, backward. Returns
        ``(value, gradients, outputs)``."""
        tape = self.forward(feeds, params, wrt=wrt)
        value, output_grads = loss(tape.outputs)
        outputs = dict(tape.outputs)
        return value, self.backward(tape, output_grads, wrt=wrt), outputs


def _accumulate(store: dict, name: str, g) -> None:
    if name in store:
        store[name] = store[name] + g
    else:
        store[name] = g


def _is_float(graph: Graph, name: str) -> bool:
    value = graph.values.get(name) if hasattr(graph, "values") else None
    dtype = getattr(value, "dtype", None)
    return dtype is None or np.dtype(dtype).kind == "f"


__all__ = ["GradientEngine", "GradientError", "Gradients", "Tape", "Transform"]
