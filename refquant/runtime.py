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

import ctypes
import os
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
    # Concat elision (see Session._elide_concats): a producer writes into slice ``into`` = (concat output,
    # channel offset, channels in all) of a buffer its Concat returns; ``assembles`` names that buffer
    into: tuple | None = None
    assembles: str | None = None


def _reuse_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves blocks above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps
    them on free, so every large activation (MobileNetV2 at batch 8 has 38 MB ones) is page-faulted in
    anew on each run: 2.3 ms of kernel time per 38 MB, about 20 % of that model's run time. With mmap
    off and trimming raised, a freed tensor's pages are handed to the next allocation already mapped,
    as onnxruntime's arena does. The cost is that the process keeps its high-water mark of memory.
    Done once per process, on the first Session; a no-op where glibc is absent. Set the environment
    variable REFQUANT_KEEP_MALLOC=1 to leave malloc's settings alone.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("REFQUANT_KEEP_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        libc.mallopt(m_trim_threshold, ctypes.c_int(1 << 30))
        libc.mallopt(m_mmap_max, ctypes.c_int(0))
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the allocator as it is
        pass


_malloc_tuned = False


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
        _reuse_freed_memory()
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
        buffers: dict[str, np.ndarray] = {}  # elided Concats' outputs, filled by their producers
        for step in self._plan(wanted, fuse=not hooks):
            node = step.node
            args = [scope[name] if name else None for name in node.inputs]
            kwargs = step.kwargs
            if "ctx" in kwargs:
                kwargs = dict(kwargs, ctx=Context(self, scope, hooks))
            if step.into is not None:
                kwargs = dict(kwargs, out=_Placer(buffers, *step.into))
            elif step.assembles is not None:
                kwargs = dict(kwargs, buffer=buffers.pop(step.assembles, None))
            serial = parallel.budget() > 1 and _small_conv(node, args)
            try:
                if serial:
                    budget = parallel.thread_budget(1).__enter__()
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
            finally:
                if serial:
                    budget.__exit__()
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
            plan = self._elide_concats(plan, keep)
        self._plans[key] = plan
        return plan

    def _fuse_conv_epilogues(self, plan: list[_Step], keep: set[str]) -> list[_Step]:
        """A Conv followed by a chain of BatchNormalization / per-channel Mul, Add / Relu / Clip (each the only
        reader of the tensor before it) runs as one step that applies the chain to each output block in
        cache (refquant.ops.nn.conv_epilogue); a chain that starts with a BatchNormalization elsewhere (a
        pre-activation block after a Concat or a pool) runs as one pass too (refquant.ops.nn.channel_chain),
        and so does a residual Add of two tensors with the Relu after it (refquant.ops.nn.add_chain).
        The values are the same as the ops one after the other."""
        from .ops.nn import add_chain, add_chain_inplace, channel_chain, channel_chain_inplace, conv, conv_epilogue
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
            elif (node.op_type in ("Add", "Sum") and node.domain in ("", "ai.onnx") and len(node.inputs) == 2
                  and all(node.inputs) and not any(name in self.constants for name in node.inputs)):
                # a residual Add (or two-input Sum) and the Relu / per-channel ops after it: one pass
                value = self.graph.value(node.outputs[0])
                if value.dtype is None or value.dtype.kind != "f" or value.shape is None or len(value.shape) < 2:
                    continue
                channels = value.shape[1] if isinstance(value.shape[1], int) else 0  # 0: scalar steps only
                chain, frees = [], list(step.frees)
                tensor, last = follow(node.outputs[0], np.empty((channels, 1), value.dtype), chain, frees)
                if last is None:
                    continue
                merged = Node(node.op_type, list(node.inputs), [tensor], {}, f"{node.name}+{last.name}",
                              node.domain, node.version)
                frees = tuple(dict.fromkeys(f for f in frees if f != tensor))
                fused[index] = _Step(merged, add_chain, {"epilogue": tuple(chain), "add": step.kernel}, frees,
                                     add_chain_inplace if step.inplace is not None else None)
        if not fused:
            return plan
        return [fused.get(i, step) for i, step in enumerate(plan) if i not in dropped]

    def _elide_concats(self, plan: list[_Step], keep: set[str]) -> list[_Step]:
        """A Concat along channels (axis 1) whose inputs include convs read by nothing else: each such conv
        writes its result straight into its channel slice of the Concat's output, which the first of them
        allocates, and the Concat only copies in its other inputs (pools, earlier Concats) instead of
        copying everything. Only planned without hooks: the convs' outputs are never separate tensors.
        Every channel count must be known beforehand (a conv's from its weight, another input's from the
        graph's shapes); the Concat falls back to a plain concatenation whenever a shape at run time
        disagrees (see _concat_into), so the values are always those of np.concatenate."""
        from .ops.nn import conv, conv_epilogue
        from .ops.tensor import concat

        readers: dict[str, int] = {}
        producer_step: dict[str, int] = {}
        for index, step in enumerate(plan):
            for name in node_reads(step.node):
                readers[name] = readers.get(name, 0) + 1
            for name in step.node.outputs:
                producer_step[name] = index
        changed: dict[int, _Step] = {}
        for index, step in enumerate(plan):
            node = step.node
            if step.kernel is not concat or len(node.outputs) != 1 or not node.inputs:
                continue
            rank = self.graph.value(node.outputs[0]).rank
            axis = node.attrs.get("axis")
            if rank is None or axis is None or axis % rank != 1 or len(set(node.inputs)) != len(node.inputs):
                continue
            channels, writers = [], {}
            for name in node.inputs:
                source = producer_step.get(name)
                producer = plan[source] if source is not None else None
                weight = self.constants.get(producer.node.inputs[1]) if (
                    producer is not None and producer.kernel in (conv, conv_epilogue)) else None
                if (weight is not None and weight.dtype.kind == "f" and readers.get(name) == 1
                        and name not in keep and len(producer.node.outputs) == 1 and source not in changed):
                    channels.append(int(weight.shape[0]))
                    writers[source] = len(channels) - 1
                else:
                    shape = self.graph.value(name).shape
                    if shape is None or len(shape) != rank or not isinstance(shape[1], int):
                        break
                    channels.append(shape[1])
            else:  # (for-else) every input's channel count is known
                if not writers:
                    continue
                offsets = np.concatenate([[0], np.cumsum(channels)]).tolist()
                total, out_name = offsets[-1], node.outputs[0]
                for source, position in writers.items():
                    producer = plan[source]
                    kernel, kwargs = producer.kernel, dict(producer.kwargs)
                    if kernel is conv:
                        kernel, kwargs = conv_epilogue, dict(kwargs, epilogue=())
                    changed[source] = _Step(producer.node, kernel, kwargs, producer.frees,
                                            into=(out_name, offsets[position], total))
                changed[index] = _Step(node, _concat_into, dict(step.kwargs, offsets=tuple(offsets)), step.frees,
                                       assembles=out_name)
        return [changed.get(i, step) for i, step in enumerate(plan)]

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


class _Placer:
    """``placer(shape, dtype)``: the channel slice [offset, offset + shape[1]) of an elided Concat's output
    buffer (allocated by the first producer to ask, with ``channels`` channels and the other dims of
    ``shape``), or None when the buffer's shape or dtype does not fit (the producer then allocates its own
    array and the Concat copies it)."""

    def __init__(self, buffers: dict, name: str, offset: int, channels: int):
        self.buffers, self.name, self.offset, self.channels = buffers, name, offset, channels

    def __call__(self, shape, dtype):
        buffer = self.buffers.get(self.name)
        if buffer is None:
            buffer = self.buffers[self.name] = np.empty((shape[0], self.channels, *shape[2:]), dtype=dtype)
        if (buffer.dtype != dtype or buffer.shape[0] != shape[0] or buffer.shape[2:] != tuple(shape[2:])
                or self.offset + shape[1] > self.channels):
            return None
        return buffer[:, self.offset:self.offset + shape[1]]


def _concat_into(*xs, axis, offsets, buffer=None):
    """Concat along axis 1 into ``buffer``, whose channel slices [offsets[i], offsets[i+1]) some producers
    already wrote: every input that is not already its own slice is copied into it. Any disagreement of
    shapes or dtypes (or no buffer) gives np.concatenate's result instead."""
    if buffer is not None and len(xs) == len(offsets) - 1 and all(
            x.dtype == buffer.dtype and x.ndim == buffer.ndim and x.shape[0] == buffer.shape[0]
            and x.shape[2:] == buffer.shape[2:] and x.shape[1] == stop - start
            for x, start, stop in zip(xs, offsets[:-1], offsets[1:])) and offsets[-1] == buffer.shape[1]:
        copies = [(x, buffer[:, start:stop]) for x, start, stop in zip(xs, offsets[:-1], offsets[1:])]
        copies = [(x, target) for x, target in copies if not _same_view(x, target)]
        # one item per image and input: the copies (DenseNet's growing features) share the thread budget
        items = [(x[i], target[i]) for x, target in copies for i in range(buffer.shape[0])]
        parallel.parallel_for(len(items), lambda k: np.copyto(items[k][1], items[k][0]))
        return buffer
    return np.concatenate(xs, axis=axis)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b are the same elements of the same memory (same start, shape and strides)."""
    return (a.shape == b.shape and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _apply_hooks(hooks, name, array, node):
    for hook in hooks:
        replaced = hook(name, array, node)
        if replaced is not None:
            array = replaced
    return array


# a Conv below this many multiply-adds (~0.5 ms on one core) runs on one thread: handing half of it to another
# thread costs ~0.15 ms per op when that thread's core has gone idle (measured on a 2-vCPU VM: MobileNetV2 at
# batch 1 ran 20 ms on 2 threads against 15 ms on 1), more than it saves
SMALL_CONV_MACS = 16 << 20


def _small_conv(node: Node, args) -> bool:
    """Whether a Conv's work, N * |W| * input pixels / prod(strides) multiply-adds (8x for a depthwise conv,
    whose direct loop does ~1/8 of a GEMM's multiply-adds per second), is below SMALL_CONV_MACS."""
    if node.op_type != "Conv" or len(args) < 2 or args[0] is None or args[1] is None:
        return False
    x, w = args[0], args[1]
    if x.ndim < 3 or w.ndim < 3:
        return False
    strides = node.attrs.get("strides") or [1]
    macs = x.shape[0] * w.size * x[0, 0].size / max(1, int(np.prod(strides)))
    if w.shape[1] == 1 and x.shape[1] > 1:  # depthwise
        macs *= 8
    return macs < SMALL_CONV_MACS


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
