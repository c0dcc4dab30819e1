"""Each layer's input in the simulation and its FP32 output, for the techniques that go through a QuantSim layer by
layer (AdaRound, SeqMSE, bias correction): carried from layer to layer so that the data goes through the graph once
(:class:`LayerInputs`), and the simulation's quantizer state kept and restored around them (:class:`SimState`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node, Value
from ..runtime import Session
from .layers import LinearLayer


class LayerInputs:
    """Per-batch inputs and outputs of the layers, in graph order, for the techniques that go layer by
    layer through a QuantSim. ``batches(layer)`` yields ``(x, z, t)``: ``x`` the layer input in the
    simulation as it is now (or the FP32 model's with ``use_fp32_inputs``), ``z`` the layer applied
    with its FP32 weight to ``x``, ``t`` the FP32 model's layer output (``z`` when not ``fp32_target``).

    ``carry=True``: every batch's live tensors (simulation and FP32 side) are kept in memory and
    advanced from layer to layer, so each node runs once per batch in total; a layer's new weights
    are used for everything after it because the simulation side is advanced past a layer only when
    the next layer asks. ``carry=False``: ``sim.run``/``sim.run_float`` from the graph inputs for every
    layer (memory: one batch; time: one forward prefix per layer). ``carry=True`` falls back to that, with a
    warning, when the carried tensors would take more than half the memory available (:func:`carry_fits`:
    MobileNetV2 carries 18 MB a sample, so 2,000 samples would need 36 GB). ``sides``: how many carried sides that
    check counts (0: the caller checked); ``float_side``: another LayerInputs' FP32 side on the same data, shared.
    """

    def __init__(self, sim, data, batch_size: int = 16, use_fp32_inputs: bool = False, carry: bool = True,
                 what: str = "adaround", sides: int = 2, float_side: "_CarriedSide | None" = None):
        from ..data import iter_feeds, reusable

        self.sim, self.data, self.batch_size = sim, data, batch_size
        self.use_fp32_inputs, self.carry = use_fp32_inputs, carry
        if carry and sides and float_side is None and not carry_fits(sim, data, batch_size, sides=sides, what=what):
            self.carry = carry = False
        if not carry:
            self.data = reusable(data, sim.graph, batch_size)  # read once per layer
        else:
            feeds = list(iter_feeds(data, sim.graph, batch_size=batch_size))
            sim.refresh()
            self.sim_side = _CarriedSide(sim, feeds, simulated=True)
            # another simulation's LayerInputs on the same data may lend its FP32 side (the same tensors)
            self.float_side = float_side or _CarriedSide(sim, feeds, simulated=False)

    def batches(self, layer: LinearLayer, fp32_target: bool = True, fp32_inputs: bool = False):
        """``(x, z, t)`` per batch; with ``fp32_inputs`` ``(x, z, t, x_fp32)``, also the FP32 model's layer input."""
        probe = None if self.use_fp32_inputs else _probe(self.sim, layer)
        for x, t, x_fp32 in self._inputs_and_targets(layer, fp32_target or self.use_fp32_inputs, fp32_inputs):
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise RefquantError(f"tensor {layer.input!r} has NaN or Inf in the quantized simulation")
            z = t if probe is None else probe.run({layer.input: x})["y"]
            t = t if fp32_target and t is not None else z
            yield (x, z, t, x_fp32) if fp32_inputs else (x, z, t)

    def output_sqnr(self) -> float:
        """``-10 log10(mean_o sum (y_o - y'_o)^2 / sum y_o^2)`` over the float graph outputs ``o`` and all batches
        (the project's default metric, :func:`refquant.analysis.engine.mean_sqnr`): ``y`` the FP32 model's, ``y'``
        the simulation's as it is now (its quantizers as they are)."""
        from ..analysis.engine import mean_sqnr

        names = [n for n in self.sim.graph.output_names if n not in self.sim.graph.initializers]
        signal, noise = {}, {}
        for sim_out, float_out in self._graph_outputs(names):
            for name in names:
                y = np.asarray(float_out[name])
                if y.dtype.kind != "f":
                    continue
                y = y.astype(np.float64)
                signal[name] = signal.get(name, 0.0) + float(np.sum(y * y))
                noise[name] = noise.get(name, 0.0) + float(np.sum(np.square(y - np.asarray(sim_out[name], np.float64))))
        return float(mean_sqnr(signal, noise))

    def _graph_outputs(self, names):
        if self.carry:
            sims = zip(*(self.sim_side.tensor(n) for n in names))
            floats = zip(*(self.float_side.tensor(n) for n in names))
            for s, f in zip(sims, floats):
                yield dict(zip(names, s)), dict(zip(names, f))
            return
        from ..data import iter_feeds

        for feeds in iter_feeds(self.data, self.sim.graph, batch_size=self.batch_size):
            yield self.sim.run(feeds, outputs=names), self.sim.run_float(feeds, outputs=names)

    def _inputs_and_targets(self, layer, want_target, want_fp32_inputs=False):
        if self.carry:
            side = self.float_side if self.use_fp32_inputs else self.sim_side
            xs = side.tensor(layer.input)
            fps = self.float_side.tensor(layer.input) if want_fp32_inputs else [None] * len(xs)
            ts = self.float_side.tensor(layer.output) if want_target else [None] * len(xs)
            yield from zip(xs, ts, fps)
            return
        from ..data import iter_feeds

        for feeds in iter_feeds(self.data, self.sim.graph, batch_size=self.batch_size):
            if self.use_fp32_inputs:
                out = self.sim.run_float(feeds, outputs=[layer.input, layer.output])
                yield out[layer.input], out[layer.output], out[layer.input]
                continue
            x = self.sim.run(feeds, outputs=[layer.input])[layer.input]
            wanted = ([layer.output] if want_target else []) + ([layer.input] if want_fp32_inputs else [])
            out = self.sim.run_float(feeds, outputs=wanted) if wanted else {}
            yield x, out.get(layer.output), out.get(layer.input)


class _CarriedSide:
    """The live tensors of every batch on one side (simulation or FP32), advanced node range by node
    range with a Session on that range of the graph: the simulation side with the sim's quantized
    constants and its activation quantize-dequantize (as ``sim.run`` computes them)."""

    def __init__(self, sim, feeds: list[dict], simulated: bool):
        self.sim, self.simulated = sim, simulated
        graph = sim.graph
        self.position = 0  # index of the next node to run
        self.last_reader = {}
        for index, node in enumerate(graph.nodes):
            for name in _node_reads(node):  # subgraph reads of the outer scope count
                self.last_reader[name] = index
        for name in graph.output_names:
            self.last_reader[name] = len(graph.nodes)
        self.producer = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs if out}
        # the graph inputs go through their quantizers once, as sim.run does to its feeds
        self.envs = [{name: self._qdq(name, array) for name, array in f.items()} for f in feeds]

    def tensor(self, name: str) -> list[np.ndarray]:
        """``name`` for every batch (running the graph up to its producer if needed)."""
        if name in self.producer and self.producer[name] >= self.position:
            self._advance(self.producer[name] + 1, keep=name)
        return [env[name] for env in self.envs]

    def rest(self, names: list[str]) -> list[dict]:
        """The tensors ``names`` of every batch from running the rest of the graph (the nodes not run yet) with
        the quantizers as they are now; the carried tensors stay where they are."""
        nodes = self.sim.graph.nodes[self.position:]
        produced = {o for node in nodes for o in node.outputs if o}
        outputs = [n for n in names if n in produced]  # the others were produced (and kept) before
        session, inputs = self._segment(nodes, outputs)
        results = []
        for env in self.envs:
            out = session.run({n: env[n] for n in inputs}, outputs=outputs) if outputs else {}
            results.append({n: out[n] if n in out else env[n] for n in names})
        return results

    def _segment(self, nodes, outputs) -> tuple[Session, list[str]]:
        """A Session on ``nodes`` (simulated or FP32 as this side) and the carried tensors it reads."""
        graph = self.sim.graph
        produced = {o for n in nodes for o in n.outputs if o}
        reads = list(dict.fromkeys(name for n in nodes for name in _node_reads(n)))
        inputs = [name for name in reads if name not in produced and name not in graph.initializers]
        sub = Graph(nodes=list(nodes), inputs=[Value(n) for n in inputs], outputs=[Value(n) for n in outputs],
                    initializers={n: graph.initializers[n] for n in reads if n in graph.initializers},
                    opset=dict(graph.opset), name=f"{graph.name}_segment")
        if self.simulated:
            self.sim.refresh()  # the quantized constants as they are now (layers before already optimized)
            constants = self.sim.session.constants
            session = Session(sub, threads=self.sim.session.threads, hooks=[self._hook])
            session.set_constants({n: constants[n] for n in sub.initializers})
        else:
            session = Session(sub, threads=self.sim.session.threads)
        return session, inputs

    def _advance(self, stop: int, keep: str) -> None:
        nodes = self.sim.graph.nodes[self.position:stop]
        produced = {o for n in nodes for o in n.outputs if o}
        outputs = [name for name in produced if self.last_reader.get(name, -1) >= stop or name == keep]
        session, inputs = self._segment(nodes, outputs)
        for env in self.envs:
            env.update(session.run({n: env[n] for n in inputs}, outputs=outputs))
            for name in [n for n in env if self.last_reader.get(n, -1) < stop and n != keep]:
                del env[name]  # no node after this range reads it
        self.position = stop

    def _qdq(self, name, array):
        if not self.simulated:
            return array
        quantizer = self.sim.quantizers.get(name)
        if quantizer is None or quantizer.kind != "activation" or not quantizer.enabled or array.dtype.kind != "f":
            return array
        encoding = self.sim.encoding_of(name)
        if encoding is None:
            return array
        from ..quant.qdq import quantize_dequantize

        return quantize_dequantize(array, encoding, self.sim.rounding).astype(array.dtype, copy=False)

    def _hook(self, name, array, node):
        if node is None:
            return None  # a range's inputs were quantized when they were produced
        out = self._qdq(name, array)
        return None if out is array else out


CARRY_MEMORY_SHARE = 0.5  # carried activations may take at most this share of the memory available


def carried_bytes(sim, first: dict, samples: int, sides: int) -> int:
    """Peak bytes of every batch's live tensors when carried through ``sim.graph`` on ``sides`` sides
    (:class:`_CarriedSide`): ``max_i sum`` of the tensors alive at node ``i`` (produced before it, read at or
    after it), sizes from one FP32 run of the ``first`` batch, times ``samples`` over the first batch's."""
    graph = sim.graph
    sizes = {name: np.asarray(a).nbytes for name, a in first.items()}

    def record(name, array, node):
        sizes[name] = np.asarray(array).nbytes
        return None

    Session(graph, threads=sim.session.threads, hooks=[record]).run(first, outputs=graph.output_names)
    last = {}
    for index, node in enumerate(graph.nodes):
        for name in _node_reads(node):
            last[name] = index
    for name in graph.output_names:
        last[name] = len(graph.nodes)
    born = {name: -1 for name in first}
    born.update({out: i for i, node in enumerate(graph.nodes) for out in node.outputs if out})
    change = np.zeros(len(graph.nodes) + 3, dtype=np.int64)
    for name, start in born.items():
        if name in sizes and name not in graph.initializers:
            change[start + 1] += sizes[name]
            change[last.get(name, start) + 2] -= sizes[name]  # alive through its last reader
    per_batch = int(np.cumsum(change).max(initial=0))
    in_first = len(next(iter(first.values()))) if first else 1
    return int(per_batch * samples / max(1, in_first)) * sides


def available_memory() -> int | None:
    """Bytes the system can still give (Linux ``MemAvailable``), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def carry_fits(sim, data, batch_size: int, sides: int, what: str) -> bool:
    """Whether carrying every batch's activations of ``data`` (:class:`_CarriedSide`, ``sides`` of them) takes at
    most :data:`CARRY_MEMORY_SHARE` of the memory available; if not, warns (the caller streams the data instead).
    Reads the first batch only, when the source says how many samples it holds (``data.count_samples``)."""
    from ..data import count_samples, iter_feeds

    available = available_memory()
    if available is None or isinstance(data, Iterator):  # a one-shot stream is read once into memory anyway
        return True
    first = next(iter(iter_feeds(data, sim.graph, batch_size=batch_size)), None)
    if first is None:
        return True  # empty: the caller reports it
    samples = count_samples(data, sim.graph)
    if samples is None:
        samples = sum(len(next(iter(f.values()))) for f in iter_feeds(data, sim.graph, batch_size=batch_size))
    need = carried_bytes(sim, first, samples, sides)
    if need <= CARRY_MEMORY_SHARE * available:
        return True
    warnings.warn(f"{what}: carrying every batch's activations through the graph would take {need / 2**30:.1f} GB "
                  f"of the {available / 2**30:.1f} GB available; the data is streamed instead (a forward pass "
                  "up to each layer; cache_activations=False says so without measuring)", stacklevel=3)
    return False


def _probe(sim, layer: LinearLayer) -> Session:
    """The layer alone (FP32 weight and bias) as a one-node graph."""
    node = layer.node
    graph = Graph(nodes=[Node(node.op_type, list(node.inputs), ["y"], dict(node.attrs), "probe", node.domain,
                              node.version)],
                  inputs=[Value(layer.input)], outputs=[Value("y")],
                  initializers={n: sim.graph.initializers[n] for n in node.inputs[1:] if n},
                  opset=dict(sim.graph.opset), name="layer_probe")
    return Session(graph, threads=sim.session.threads)


def _node_reads(node: Node) -> list[str]:
    from ..ir import node_reads

    return node_reads(node)


# the simulation's state while a layer-by-layer technique runs
class SimState:
    """Context manager: snapshot every quantizer (enabled, encoding, frozen, fixed value); restore all
    of it on any exception (Ctrl-C included), and the ``enabled`` flags always (techniques disable the
    activation quantizers while they run)."""

    def __init__(self, sim):
        self.sim = sim
        self.saved = {name: (q.enabled, q.encoding, q.frozen, q.fixed_value) for name, q in sim.quantizers.items()}
        self.enabled = {name: q.enabled for name, q in sim.quantizers.items()}

    def __enter__(self):
        return self

    def keep_enabled(self) -> None:
        """The ``enabled`` flags as they are now are the ones restored on success (after a calibration inside,
        which disables the quantizers it never saw a value for)."""
        self.enabled = {name: q.enabled for name, q in self.sim.quantizers.items()}

    def restore_enabled(self) -> None:
        """Every quantizer's ``enabled`` flag as it will be restored on success (the activation quantizers back on)."""
        for name, enabled in self.enabled.items():
            self.sim.quantizers[name].enabled = enabled

    def __exit__(self, kind, exc, tb):
        for name, (enabled, encoding, frozen, fixed) in self.saved.items():
            q = self.sim.quantizers[name]
            if kind is not None:
                q.encoding, q.frozen, q.fixed_value, q.enabled = encoding, frozen, fixed, enabled
            else:
                q.enabled = self.enabled[name]
        return False


def disable_activation_quantizers(sim) -> None:
    """Only parameter quantizers stay on (AIMET's AdaRound and SeqMSE run like this)."""
    for quantizer in sim.quantizers.values():
        if quantizer.kind != "param":
            quantizer.enabled = False


def ensure_weight_encodings(sim, layers) -> None:
    """Compute the parameter encodings (one shot from the weights) if a layer's weight has none."""
    if any(sim.encoding_of(layer.weight) is None for layer in layers):
        compute = getattr(sim, "compute_param_encodings", None) or sim._compute_param_encodings
        compute()


__all__ = ["LayerInputs", "SimState", "available_memory", "carried_bytes", "carry_fits",
           "disable_activation_quantizers", "ensure_weight_encodings"]
