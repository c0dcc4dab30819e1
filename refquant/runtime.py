"""Session: runs a Graph with the registered kernels.

The loop is the whole runtime: bind the feeds, then for each node in topological order fetch its
inputs, call its kernel, store its outputs, pass each new tensor through the hooks, and free every
tensor whose last reader has run.

A hook is a callable ``hook(name, array, node) -> array | None`` called on every graph input
(``node`` is None) and every node output as it is produced. Returning an array replaces the
tensor for everything downstream (QDQ simulation, teacher forcing); returning None keeps it
(calibration observers, tracing). Constants are read from ``Session.constants``, which a caller
may replace (quantized weights) without touching the graph.
"""

from __future__ import annotations

import sys
from collections import ChainMap
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from . import parallel
from .errors import FeedError, OpError, RefquantError
from .ir import Graph, Node, node_reads
from .ops import lookup

# ops whose result must not be computed once for all runs
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
               "Multinomial", "Dropout"}

Hook = Callable[[str, np.ndarray, "Node | None"], "np.ndarray | None"]


@dataclass
class _Step:
    node: Node
    kernel: Callable
    kwargs: dict
    frees: tuple[str, ...]  # tensors whose last reader is this node
    inplace: Callable | None = None  # the kernel's in-place form, when inputs[0] dies here


class Context:
    """What a kernel declaring ``ctx`` receives: a way to run its subgraphs in the current scope."""

    def __init__(self, session: "Session", scope: Mapping[str, np.ndarray], hooks):
        self.session, self.scope, self.hooks = session, scope, hooks

    def run_subgraph(self, graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run a subgraph whose free names resolve in the enclosing scope; returns its outputs in order."""
        sub = self.session._subsession(graph)
        result = sub._execute(dict(feeds), None, self.hooks, outer=self.scope)
        return [result[name] for name in graph.output_names]


class Session:
    """Runs a :class:`Graph` in float mode.

    ``Session(graph, threads=None)``: threads its kernels share (None: every core this process may use).
    ``run(feeds, outputs=None, hooks=())`` returns ``{name: array}`` for the graph outputs, or for the
    named tensors (any intermediate tensor may be named).
    """

    def __init__(self, graph: Graph, threads: int | None = None, hooks: Iterable[Hook] = ()):
        self.graph = graph
        self.threads = threads
        self.hooks = list(hooks)
        self._plans: dict[tuple[str, ...], list[_Step]] = {}
        self._subsessions: dict[int, Session] = {}
        self._compiled = {id(n): _compile(n) for n in graph.nodes}
        self._folded: set[int] = set()
        self.constants: dict[str, np.ndarray] = {}
        self._fold_constants(dict(graph.initializers))

    def set_constant(self, name: str, array: np.ndarray) -> None:
        """Replace a constant (an initializer, e.g. a quantized weight) and recompute what folds from it."""
        if name not in self.graph.initializers:
            raise FeedError(f"graph {self.graph.name!r}: {name!r} is not an initializer")
        base = {k: self.constants[k] for k in self.graph.initializers}
        base[name] = np.asarray(array)
        self._fold_constants(base)

    def set_constants(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace many constants at once (all quantized weights), folding once."""
        unknown = [name for name in arrays if name not in self.graph.initializers]
        if unknown:
            raise FeedError(f"graph {self.graph.name!r}: {unknown[:5]} are not initializers")
        base = {k: self.constants[k] for k in self.graph.initializers}
        base.update({name: np.asarray(a) for name, a in arrays.items()})
        self._fold_constants(base)

    def _fold_constants(self, base: dict[str, np.ndarray]) -> None:
        """Run, once, every node whose inputs are all constant (ConstantOfShape weights, Shape arithmetic
        on fixed shapes...); their outputs become constants and the nodes leave the plan."""
        self.constants = base
        folded = set()
        with np.errstate(all="ignore"):
            for node in self.graph.nodes:
                if node.op_type in _NEVER_FOLD or any(True for _ in node.subgraphs()):
                    continue
                if not all(name in self.constants for name in node.present_inputs()):
                    continue
                kernel, kwargs = self._compiled[id(node)]
                try:
                    result = kernel(*[self.constants[n] if n else None for n in node.inputs], **kwargs)
                except Exception:
                    continue  # left in the plan: it will fail at run time with the node named
                result = result if isinstance(result, tuple) else (result,)
                for name, array in zip(node.outputs, result):
                    if name:
                        self.constants[name] = array
                folded.add(id(node))
        self._folded = folded
        self._plans.clear()

    # -------------------------------------------------------------------------- public
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None,
            hooks: Iterable[Hook] = ()) -> dict[str, np.ndarray]:
        feeds = self._check_feeds(feeds)
        wanted = tuple(outputs) if outputs is not None else tuple(self.graph.output_names)
        with _thread_limit(self.threads):
            return self._execute(feeds, wanted, self.hooks + list(hooks))

    @property
    def input_names(self) -> list[str]:
        return self.graph.input_names

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    # -------------------------------------------------------------------------- internals
    def _execute(self, feeds, wanted, hooks, outer: Mapping | None = None) -> dict[str, np.ndarray]:
        graph = self.graph
        wanted = tuple(wanted if wanted is not None else graph.output_names)
        env: dict[str, np.ndarray] = {}
        scope = ChainMap(env, self.constants, outer) if outer is not None else ChainMap(env, self.constants)
        for name, array in feeds.items():
            env[name] = _apply_hooks(hooks, name, array, None)
        for step in self._plan(wanted, fuse=not hooks):
            node = step.node
            args = [scope[name] if name else None for name in node.inputs]
            kwargs = step.kwargs
            if "ctx" in kwargs:
                kwargs = dict(kwargs, ctx=Context(self, scope, hooks))
            try:
                result = None
                if step.inplace is not None and _is_private(args[0]):
                    result = step.inplace(*args, **kwargs)
                if result is None:
                    result = step.kernel(*args, **kwargs)
            except RefquantError:
                raise
            except Exception as exc:
                shapes = ", ".join(f"{n}:{_describe(a)}" for n, a in zip(node.inputs, args) if n)
                raise OpError(f"node {node.name!r} ({node.op_type}) failed: {exc.__class__.__name__}: {exc} "
                              f"[inputs {shapes}]") from exc
            if not isinstance(result, tuple):
                result = (result,)
            for name, array in zip(node.outputs, result):
                if name:
                    env[name] = _apply_hooks(hooks, name, array, node)
            for name in step.frees:
                env.pop(name, None)
            result = array = args = None  # hold no stale references: _is_private counts them
        missing = [name for name in wanted if name not in scope]
        if missing:
            raise FeedError(f"graph {graph.name!r}: requested tensor(s) {missing} are not produced by the graph")
        return {name: scope[name] for name in wanted}

    def _plan(self, wanted: tuple[str, ...], fuse: bool = False) -> list[_Step]:
        """The nodes needed for ``wanted``, in order, each with the tensors it is last to read; with ``fuse``
        (no hooks to show intermediate tensors to), a Conv and the per-channel ops after it become one step."""
        key = (wanted, fuse)
        if key in self._plans:
            return self._plans[key]
        producer = self.graph.producers()
        needed: set[int] = set()
        stack = [producer[name] for name in wanted if name in producer]
        while stack:
            node = stack.pop()
            if id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(producer[name] for name in node_reads(node) if name in producer)
        nodes = [n for n in self.graph.nodes if id(n) in needed and id(n) not in self._folded]
        last_reader: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for name in node_reads(node):
                last_reader[name] = index
        keep = set(wanted) | set(self.constants)
        frees: list[list[str]] = [[] for _ in nodes]
        for name, index in last_reader.items():
            if name not in keep:
                frees[index].append(name)
        for index, node in enumerate(nodes):  # outputs nobody reads are dropped at once
            frees[index].extend(o for o in node.outputs if o and o not in last_reader and o not in keep)
        plan = []
        graph_inputs = set(self.graph.input_names)
        for node, free in zip(nodes, frees):
            kernel, kwargs = self._compiled[id(node)]
            opdef = lookup(node.op_type, node.domain, node.version)
            donor = node.inputs[0] if node.inputs else ""
            inplace = None
            if (opdef.inplace is not None and donor and donor in free and donor not in graph_inputs
                    and node.inputs.count(donor) == 1 and donor not in self.constants and donor in producer):
                inplace = opdef.inplace
            plan.append(_Step(node, kernel, kwargs, tuple(free), inplace))
        if fuse:
            plan = self._fuse_conv_epilogues(plan, keep)
        self._plans[key] = plan
        return plan

    def _fuse_conv_epilogues(self, plan: list[_Step], keep: set[str]) -> list[_Step]:
        """A Conv followed by a chain of BatchNormalization / per-channel Mul, Add / Relu / Clip (each the only
        reader of the tensor before it) runs as one step that applies the chain to each output block in
        cache (refquant.ops.nn.conv_epilogue); a chain that starts with a BatchNormalization elsewhere (a
        pre-activation block after a Concat or a pool) runs as one pass too (refquant.ops.nn.channel_chain).
        The values are the same as the ops one after the other."""
        from .ops.nn import channel_chain, channel_chain_inplace, conv, conv_epilogue
        from .ops.norm import batch_normalization

        readers: dict[str, list[int]] = {}
        for index, step in enumerate(plan):
            for name in node_reads(step.node):
                readers.setdefault(name, []).append(index)
        fused: dict[int, _Step] = {}
        dropped: set[int] = set()

        def follow(tensor, weight, chain, frees):
            """Extend ``chain`` along single readers that are epilogue steps; the last node and tensor."""
            last = None
            while tensor not in keep and len(readers.get(tensor, [])) == 1:
                follower = plan[readers[tensor][0]]
                epilogue_step = self._epilogue_step(follower.node, tensor, weight)
                if epilogue_step is None:
                    break
                chain.append(epilogue_step)
                dropped.add(readers[tensor][0])
                frees.extend(follower.frees)
                tensor, last = follower.node.outputs[0], follower.node
            return tensor, last

        for index, step in enumerate(plan):
            node = step.node
            if index in dropped or len(node.outputs) != 1:
                continue
            if step.kernel is conv:
                weight = self.constants.get(node.inputs[1])
                if weight is None or weight.dtype.kind != "f":
                    continue
                chain, frees = [], list(step.frees)
                tensor, last = follow(node.outputs[0], weight, chain, frees)
                if not chain:
                    continue
                merged = Node("Conv", list(node.inputs), [tensor], {}, f"{node.name}+{last.name}", node.domain,
                              node.version)
                frees = tuple(dict.fromkeys(f for f in frees if f != tensor))
                fused[index] = _Step(merged, conv_epilogue, dict(step.kwargs, epilogue=tuple(chain)), frees)
            elif step.kernel is batch_normalization and node.inputs[1] in self.constants:
                scale = self.constants[node.inputs[1]]
                first = self._epilogue_step(node, node.inputs[0], scale.reshape(-1, 1))
                if first is None or scale.dtype.kind != "f":
                    continue
                chain, frees = [first], list(step.frees)
                tensor, last = follow(node.outputs[0], scale.reshape(-1, 1), chain, frees)
                if last is None:  # a lone BatchNormalization: its own (in-place) kernel is as good
                    continue
                merged = Node("BatchNormalization", [node.inputs[0]], [tensor], {}, f"{node.name}+{last.name}",
                              node.domain, node.version)
                frees = tuple(dict.fromkeys(f for f in frees if f != tensor))
                fused[index] = _Step(merged, channel_chain, {"epilogue": tuple(chain)}, frees,
                                     channel_chain_inplace if step.inplace is not None else None)
        if not fused:
            return plan
        return [fused.get(i, step) for i, step in enumerate(plan) if i not in dropped]

    def _epilogue_step(self, node: Node, tensor: str, weight: np.ndarray):
        """The conv_epilogue step computing ``node`` from ``tensor`` (the output of a conv with this weight)
        and constants of the weight's dtype, or None when node is not such an op."""
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.inputs[0] != tensor:
            return None
        others = [name for name in node.inputs[1:] if name]
        if not all(name in self.constants and self.constants[name].dtype == weight.dtype for name in others):
            return None
        channels = weight.shape[0]
        const = [self.constants[name] if name else None for name in node.inputs[1:]]
        if node.op_type == "Relu":
            return ("relu",)
        if node.op_type == "Clip":
            const += [None] * (2 - len(const))
            if all(v is None or np.size(v) == 1 for v in const[:2]):
                return ("clip", *[None if v is None else np.asarray(v).reshape(()) for v in const[:2]])
            return None
        if node.op_type in ("Mul", "Add") and len(const) == 1:
            vector = self._channel_vector(const[0], channels)
            return None if vector is None else (node.op_type.lower(), vector)
        if node.op_type == "BatchNormalization" and len(const) == 4 and len(node.outputs) == 1:
            scale, bias, mean, var = const
            if node.attrs.get("training_mode", 0) or any(v.ndim != 1 or v.shape[0] != channels for v in const):
                return None
            # exactly the BatchNormalization kernel's inference arithmetic (refquant.ops.norm)
            a = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + node.attrs.get("epsilon", 1e-5))
            b = bias.astype(np.float64) - mean.astype(np.float64) * a
            return ("bn", a, b)
        return None

    @staticmethod
    def _channel_vector(value, channels: int):
        """``value`` as a per-channel vector (or a 1-vector) when it broadcasts over a conv output only along
        the channel axis: shape [], [1...], [C, 1, ...] or [1, C, 1, ...]; else None."""
        value = np.asarray(value)
        if value.size == 1:
            return value.reshape(1)
        dims = [d for d in value.shape]
        while dims and dims[0] == 1:
            dims.pop(0)
        if dims and dims[0] == channels and all(d == 1 for d in dims[1:]) and value.ndim >= len(dims):
            return value.reshape(channels)
        return None

    def _subsession(self, graph: Graph) -> "Session":
        if id(graph) not in self._subsessions:
            self._subsessions[id(graph)] = Session(graph)
        return self._subsessions[id(graph)]

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph = self.graph
        known = set(graph.input_names)
        unknown = [name for name in feeds if name not in known]
        if unknown:
            raise FeedError(f"graph {graph.name!r}: unknown feed(s) {unknown}; the inputs are {graph.input_names}")
        missing = [name for name in graph.input_names if name not in feeds]
        if missing:
            raise FeedError(f"graph {graph.name!r}: missing feed(s) {missing}")
        checked = {}
        for value in graph.inputs:
            array = np.asarray(feeds[value.name])
            if value.dtype is not None and array.dtype != value.dtype:
                raise FeedError(f"input {value.name!r}: expected dtype {value.dtype}, got {array.dtype}")
            if value.shape is not None:
                if array.ndim != len(value.shape):
                    raise FeedError(f"input {value.name!r}: expected rank {len(value.shape)} "
                                    f"(shape {list(value.shape)}), got shape {list(array.shape)}")
                for axis, (want, got) in enumerate(zip(value.shape, array.shape)):
                    if isinstance(want, int) and want > 0 and want != got:
                        raise FeedError(f"input {value.name!r}: dimension {axis} must be {want} "
                                        f"(shape {list(value.shape)}), got shape {list(array.shape)}")
            checked[value.name] = array
        return checked


def _compile(node: Node) -> tuple[Callable, dict]:
    opdef = lookup(node.op_type, node.domain, node.version)
    if opdef is None:
        from .errors import UnsupportedOpError

        raise UnsupportedOpError([(node.domain, node.op_type)], f"node {node.name!r}")
    kwargs = dict(node.attrs)
    if opdef.attr_names is not None:
        unknown = set(kwargs) - opdef.attr_names
        if unknown:
            raise OpError(f"node {node.name!r} ({node.op_type}): attribute(s) {sorted(unknown)} are not "
                          f"supported (kernel {opdef.kernel.__module__}.{opdef.kernel.__name__})")
    if "noutputs" in opdef.special:
        kwargs["noutputs"] = len(node.outputs)
    if "present_outputs" in opdef.special:
        kwargs["present_outputs"] = tuple(bool(name) for name in node.outputs)
    if "ctx" in opdef.special:
        kwargs["ctx"] = None
    return opdef.kernel, kwargs


# references to a tensor while _execute calls its consumer: env, the args list, _is_private's parameter and
# getrefcount's argument. One more means someone else holds it: a view's base, a hook that kept it, a
# caller-visible output.
_PRIVATE_REFCOUNT = 4


def _is_private(array) -> bool:
    """True when nothing but the running plan can see ``array``'s memory, so a kernel may overwrite it in
    place (the tensor dies at this node): it owns its memory, or it is a contiguous reshape of a whole
    buffer that only it refers to (kernels return such views), and no other reference to it exists."""
    if type(array) is not np.ndarray or not (array.flags.writeable and array.flags.c_contiguous):
        return False
    if sys.getrefcount(array) > _PRIVATE_REFCOUNT:
        return False
    if array.flags.owndata:
        return True
    base = array.base
    # references to base: array.base and getrefcount's argument (this frame's ``base`` makes three)
    return (type(base) is np.ndarray and base.flags.owndata and base.size == array.size
            and base.dtype == array.dtype and sys.getrefcount(base) <= 3)


def _apply_hooks(hooks, name, array, node):
    for hook in hooks:
        replaced = hook(name, array, node)
        if replaced is not None:
            array = replaced
    return array


def _describe(a) -> str:
    return "None" if a is None else f"{getattr(a, 'dtype', type(a).__name__)}{list(getattr(a, 'shape', []))}"


class _thread_limit:
    """For the duration of a run: refquant's kernels share ``threads`` threads (None: every core) through
    :mod:`refquant.parallel`, and BLAS runs single-threaded inside them (see that module for why)."""

    def __init__(self, threads: int | None):
        self._budget = parallel.thread_budget(threads)
        self._blas = parallel.single_threaded_blas()

    def __enter__(self):
        self._budget.__enter__()
        self._blas.__enter__()
        return self

    def __exit__(self, *exc):
        self._blas.__exit__(*exc)
        self._budget.__exit__(*exc)
        return False
