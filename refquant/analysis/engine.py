"""The evaluation engine behind sensitivity analysis and mixed precision.

A sweep is a set of independent evaluations of the same model under different quantization
*configurations* (:class:`Config`: which activation tensors are quantize-dequantized with which
encoding, which constants are replaced by their quantized values; everything else runs in FP32).
The engine simulates a configuration exactly as :class:`~refquant.quant.QuantSim` does (same QDQ hook
semantics, same quantized constants), without touching the sim, so evaluations can run anywhere.

Two metrics:

* the default: SQNR of the graph outputs against FP32 over the data. Per output, signal and noise
  powers are summed over all samples (so batches add up exactly); the scalar is
  ``-10 log10(mean over outputs of noise/signal)``, the SQNR of the output-averaged relative noise
  (it stays finite when one output is untouched by a layer, unlike a mean of dB values).
  This path is fast: a trial that differs from a reference state only from node ``k`` on (``Trial.cut``)
  starts from that state's tensors cached at ``k`` (FP32 for "only this layer quantized", the full
  simulation for "all but this layer"), so it runs only the nodes downstream of ``k``. The work is
  split by data batch: a batch's task runs every trial on that batch and returns sums, which merge by
  addition, so a ``concurrent.futures.Executor`` (processes, threads, a Dask cluster) can run batches
  anywhere (tasks and results pickle).
* a user's ``eval_fn(run) -> float`` (higher is better), where ``run(feeds) -> {output: array}`` runs
  the model under the configuration; one task per configuration.

With ``trace=True`` the batch tasks also trace every quantized activation along the graph: SQNR of the
simulation against FP32 at that tensor, the error of quantizing the FP32 tensor alone, histogram,
percentiles and per-channel ranges (streaming observers, merged across batches).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..ir import Graph, Value, node_reads
from ..progress import bar as progress_bar
from ..quant.observers import MinMaxObserver, PercentileObserver
from ..quant.qdq import quantize_dequantize
from ..runtime import Session

BASE = "__base__"  # key of the reference configuration's own score when the engine computes it
TRACE_PERCENTILE = 99.99
OUTPUT_BUDGET = 256 << 20  # bytes of trial outputs a batch task may hold back until FP32 is known


# ------------------------------------------------------------------------------ configurations
@dataclass(eq=False)
class Config:
    """A quantization state: ``acts`` maps activation tensors to their encoding (tied ones resolved),
    ``consts`` maps parameters/constants to their simulated (quantized) value."""

    acts: dict = field(default_factory=dict)
    consts: dict = field(default_factory=dict)

    def only(self, names) -> "Config":
        names = set(names)
        return Config({n: e for n, e in self.acts.items() if n in names},
                      {n: v for n, v in self.consts.items() if n in names})

    def without(self, names) -> "Config":
        names = set(names)
        return Config({n: e for n, e in self.acts.items() if n not in names},
                      {n: v for n, v in self.consts.items() if n not in names})

    def replaced(self, names, other: "Config") -> "Config":
        """This configuration with tensors ``names`` taken from ``other`` (absent there: FP32)."""
        names = set(names)
        acts = {n: e for n, e in self.acts.items() if n not in names}
        consts = {n: v for n, v in self.consts.items() if n not in names}
        acts.update({n: e for n, e in other.acts.items() if n in names})
        consts.update({n: v for n, v in other.consts.items() if n in names})
        return Config(acts, consts)


def sim_config(sim, names=None) -> Config:
    """What ``sim`` simulates now (restricted to quantizers ``names`` if given), as QuantSim.run does."""
    acts, consts = {}, {}
    for name, q in sim.quantizers.items():
        if not q.enabled or (names is not None and name not in names):
            continue
        if q.kind == "activation":
            encoding = sim.encoding_of(name)
            if encoding is not None:
                acts[name] = encoding
        elif q.fixed_value is not None:
            consts[name] = q.fixed_value
        else:
            encoding = sim.encoding_of(name)
            if encoding is not None:
                weight = sim.graph.initializers[name]
                consts[name] = quantize_dequantize(np.asarray(weight, dtype=np.float32), encoding,
                                                   sim.rounding).astype(weight.dtype, copy=False)
    return Config(acts, consts)


@dataclass(eq=False)
class Trial:
    """One evaluation: ``config`` run from node index ``cut`` on (-1: from the graph inputs), fed by
    the tensors of ``upstream`` ("float": FP32, "base": the reference configuration) at the cut. Correct
    only when ``config`` equals that upstream state on every quantizer acting before ``cut``."""

    key: str
    config: Config
    cut: int = -1
    upstream: str = "float"


@dataclass(eq=False)
class Probe:
    """One node run twice on the FP32 tensors at its input: with float constants and with ``config``'s
    (its quantized weights). The score compares the node's outputs: the error its weights alone cause."""

    key: str
    node: int
    config: Config


class SimState:
    """What the engine needs of a QuantSim, picklable: the graph, rounding, threads, and the names of
    the constants configurations may replace."""

    def __init__(self, graph: Graph, rounding: str, threads: int | None, static: list[str]):
        self.graph = graph
        self.rounding = rounding
        self.threads = threads
        self.static = list(static)
        self._frontiers: dict[int, list[str]] = {}

    @classmethod
    def of(cls, sim) -> "SimState":
        static = [n for n, q in sim.quantizers.items() if q.kind != "activation" and n in sim.graph.initializers]
        return cls(sim.graph, sim.rounding, sim.session.threads, static)

    @property
    def outputs(self) -> list[str]:
        return self.graph.output_names

    def constants(self, config: Config) -> dict[str, np.ndarray]:
        inits = self.graph.initializers
        return {n: config.consts.get(n, inits[n]) for n in self.static}

    def frontier(self, k: int) -> list[str]:
        """Tensors alive between node k-1 and node k: produced before k (or fed), read from k on."""
        if k not in self._frontiers:
            graph = self.graph
            if k < 0:
                names = list(graph.input_names)
            elif k >= len(graph.nodes):
                names = list(graph.output_names)
            else:
                needed = set(graph.output_names)
                for node in graph.nodes[k:]:
                    needed.update(node_reads(node))
                produced = list(graph.input_names) + [o for n in graph.nodes[:k] for o in n.outputs if o]
                names = [n for n in dict.fromkeys(produced) if n in needed and n not in graph.initializers]
            self._frontiers[k] = names
        return self._frontiers[k]


# ------------------------------------------------------------------------------ running pieces
def qdq_hook(acts: Mapping, rounding: str, feeds: bool):
    """QuantSim's hook: quantize-dequantize a float tensor that has an encoding in ``acts`` (graph
    inputs too when ``feeds``; fed frontier tensors are already in their final state)."""

    def hook(name, array, node):
        if node is None and not feeds:
            return None
        encoding = acts.get(name)
        if encoding is None or array.dtype.kind != "f":
            return None
        return quantize_dequantize(array, encoding, rounding).astype(array.dtype, copy=False)

    return hook


class _Piece:
    """Nodes ``[a, b)`` of the graph as a Session: fed the frontier at ``a`` (the graph inputs for
    a = -1, where the input quantizers also act), returning the frontier at ``b``."""

    def __init__(self, state: SimState, a: int, b: int, single: bool = False):
        graph = state.graph
        if single:  # one node: its own inputs and outputs
            node = graph.nodes[a]
            inputs = [Value(n) for n in dict.fromkeys(node_reads(node)) if n not in graph.initializers]
            outputs = [Value(n) for n in node.outputs if n]
        else:
            inputs = list(graph.inputs) if a < 0 else [Value(n) for n in state.frontier(a)]
            outputs = list(graph.outputs) if b >= len(graph.nodes) else [Value(n) for n in state.frontier(b)]
        sub = Graph(nodes=graph.nodes[max(a, 0):b], inputs=inputs, outputs=outputs,
                    initializers=graph.initializers, values=graph.values, opset=graph.opset,
                    name=f"{graph.name}[{a}:{b}]")
        self.state = state
        self.session = Session(sub, threads=state.threads)
        self.feeds_hooked = a < 0
        self.inputs = [v.name for v in inputs]
        self.outputs = [v.name for v in outputs]
        self.config = None

    def run(self, env: Mapping, config: Config, extra=()) -> dict[str, np.ndarray]:
        if self.config is not config:
            self.session.set_constants(self.state.constants(config))
            self.config = config
        hooks = [qdq_hook(config.acts, self.state.rounding, self.feeds_hooked), *extra]
        return self.session.run({n: env[n] for n in self.inputs}, outputs=self.outputs, hooks=hooks)


class Runner:
    """Sessions for pieces of one graph, reused across trials (one per thread/process)."""

    def __init__(self, state: SimState):
        self.state = state
        self._pieces: dict[tuple, _Piece] = {}

    def piece(self, a: int, b: int, slot: str) -> _Piece:
        key = (a, b, slot)
        if key not in self._pieces:
            self._pieces[key] = _Piece(self.state, a, b)
        return self._pieces[key]

    def node(self, index: int) -> _Piece:
        """Node ``index`` alone: fed its non-constant inputs, returning its outputs."""
        key = (index, "node")
        if key not in self._pieces:
            self._pieces[key] = _Piece(self.state, index, index + 1, single=True)
        return self._pieces[key]

    def full(self, feeds, config: Config, slot: str = "trial") -> dict[str, np.ndarray]:
        return self.piece(-1, len(self.state.graph.nodes), slot).run(feeds, config)

    def run_fn(self, config: Config) -> Callable:
        """``run(feeds) -> {output: array}`` under ``config``, for a user's eval_fn."""
        def run(feeds):
            return self.full(feeds, config)
        return run


# ------------------------------------------------------------------------------ scores and traces
@dataclass
class Score:
    """Signal and noise power (sums over samples) of each float graph output against FP32."""

    signal: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)

    def add(self, reference: Mapping, outputs: Mapping) -> None:
        for name, ref in reference.items():
            if ref.dtype.kind != "f":
                continue
            r = ref.astype(np.float64).ravel()
            d = r - np.asarray(outputs[name], dtype=np.float64).ravel()
            self.signal[name] = self.signal.get(name, 0.0) + float(r @ r)
            self.noise[name] = self.noise.get(name, 0.0) + float(d @ d)

    def merge(self, other: "Score") -> None:
        for name in other.signal:
            self.signal[name] = self.signal.get(name, 0.0) + other.signal[name]
            self.noise[name] = self.noise.get(name, 0.0) + other.noise[name]

    @property
    def per_output(self) -> dict[str, float]:
        return {n: sqnr_from(self.signal[n], self.noise[n]) for n in self.signal}

    @property
    def value(self) -> float:
        return mean_sqnr(self.signal, self.noise)


def sqnr_from(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mean_sqnr(signal: Mapping[str, float], noise: Mapping[str, float]) -> float:
    """-10 log10(mean over outputs of noise/signal): the default metric (outputs of zero signal skipped)."""
    ratios = [noise[n] / signal[n] for n in signal if signal[n] > 0]
    if not ratios:
        return math.inf
    mean = sum(ratios) / len(ratios)
    return math.inf if mean == 0 else -10.0 * math.log10(mean)


@dataclass
class TensorTrace:
    """Streaming statistics of one quantized activation over the data."""

    signal: float = 0.0  # sum x^2 of the FP32 tensor
    noise: float = 0.0  # sum (x_fp32 - x_sim)^2: the simulation against FP32 at this tensor
    local_noise: float = 0.0  # sum (x - qdq(x))^2 on the FP32 tensor: this quantizer's own error
    elements: int = 0
    shape: tuple = ()
    hist: PercentileObserver | None = None
    channels: MinMaxObserver | None = None

    def observe(self, x: np.ndarray, local: np.ndarray) -> None:
        x64 = x.astype(np.float64).ravel()
        d = x64 - local.astype(np.float64).ravel()
        self.signal += float(x64 @ x64)
        self.local_noise += float(d @ d)
        self.elements += x.size
        self.shape = tuple(x.shape)
        if self.hist is None:
            self.hist = PercentileObserver(percentile=TRACE_PERCENTILE)
        self.hist.update(x)
        if x.ndim >= 2:
            if self.channels is None:
                self.channels = MinMaxObserver(axis=1)
            self.channels.update(x)

    def compare(self, reference: np.ndarray, x: np.ndarray) -> None:
        d = reference.astype(np.float64).ravel() - x.astype(np.float64).ravel()
        self.noise += float(d @ d)

    def merge(self, other: "TensorTrace") -> None:
        self.signal += other.signal
        self.noise += other.noise
        self.local_noise += other.local_noise
        self.elements += other.elements
        self.shape = self.shape or other.shape
        for attr in ("hist", "channels"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if theirs is None:
                continue
            if mine is None:
                setattr(self, attr, theirs)
            else:
                mine.merge(theirs)


# ------------------------------------------------------------------------------ batch tasks
@dataclass
class BatchResult:
    index: int
    fp32: dict
    scores: dict[str, Score]
    trace: dict[str, TensorTrace] | None


@dataclass(eq=False)
class BatchTask:
    """Every trial on one batch of data (picklable: an Executor may run it anywhere)."""

    state: SimState
    index: int
    feeds: dict
    fp32: dict | None
    base: Config | None
    trials: list
    trace: bool = False
    probes: list = field(default_factory=list)

    def __call__(self, runner: Runner | None = None, tick: Callable | None = None) -> BatchResult:
        runner = runner or Runner(self.state)
        tick = tick or (lambda n: None)
        n_nodes = len(self.state.graph.nodes)
        cut_trials: dict[int, list[Trial]] = {}
        for t in self.trials:
            if t.cut >= 0:
                cut_trials.setdefault(min(t.cut, n_nodes), []).append(t)
        probes_at: dict[int, list[Probe]] = {}
        for p in self.probes:
            probes_at.setdefault(p.node, []).append(p)
        need_float = (self.trace or bool(self.probes)
                      or any(t.upstream == "float" for ts in cut_trials.values() for t in ts))
        need_base = self.base is not None and (self.trace or any(t.upstream == "base" for ts in cut_trials.values()
                                                                  for t in ts))
        fp32 = self.fp32
        pending: list[tuple[str, dict]] = []  # outputs kept until the FP32 advance reaches the outputs
        if fp32 is None and not (need_float and self._outputs_fit(len(self.trials) + 1)):
            fp32 = runner.full(self.feeds, EMPTY, "float")
        scores: dict[str, Score] = {}

        def score(key, outputs):
            if fp32 is None:
                pending.append((key, outputs))
            else:
                scores.setdefault(key, Score()).add(fp32, outputs)
        traces: dict[str, TensorTrace] | None = {} if self.trace else None
        base_done = False
        if need_float or need_base:
            points = [-1] + sorted(set(cut_trials) | set(probes_at)) + [n_nodes]
            points = list(dict.fromkeys(points))
            float_env = dict(self.feeds)
            base_env = dict(self.feeds)
            probed: dict[str, tuple[str, np.ndarray]] = {}  # node output -> (probe key, its value)
            for a, b in zip(points, points[1:]):
                stored: dict[str, np.ndarray] = {}
                if need_float:
                    extra = [self._capture(stored, traces, a < 0)] if self.trace else []
                    if probed:
                        extra.append(self._watch(probed, scores))
                    float_env = runner.piece(a, b, "float").run(float_env, EMPTY, extra)
                if need_base:
                    extra = [self._compare(stored, traces, a < 0)] if self.trace else []
                    base_env = runner.piece(a, b, "base").run(base_env, self.base, extra)
                for p in probes_at.get(b, []) if b < n_nodes else []:
                    # the node's quantized-weight outputs, compared with the FP32 ones when the FP32
                    # advance produces them (next piece)
                    for name, value in runner.node(b).run(float_env, p.config).items():
                        probed[name] = (p.key, value)
                for t in cut_trials.get(b, []) if b < n_nodes else []:
                    env = float_env if t.upstream == "float" else base_env
                    score(t.key, runner.piece(b, n_nodes, "trial").run(env, t.config))
                    tick(1)
            if fp32 is None:
                fp32 = float_env
                for key, outputs in pending:
                    score(key, outputs)
                pending.clear()
            if need_base:
                score(BASE, base_env)
                base_done = True
        if self.base is not None and not base_done:
            score(BASE, runner.full(self.feeds, self.base, "base"))
            base_done = True
        for t in self.trials:
            if t.cut < 0 or t.cut >= n_nodes:
                if base_done and t.config is self.base:
                    scores[t.key] = scores[BASE]
                else:
                    score(t.key, runner.full(self.feeds, t.config))
                tick(1)
        return BatchResult(self.index, fp32, scores, traces)

    def _outputs_fit(self, count: int) -> bool:
        """Whether ``count`` sets of graph outputs for this batch fit in OUTPUT_BUDGET bytes (then the
        FP32 outputs come from the FP32 advance instead of a run of their own)."""
        graph = self.state.graph
        n = len(next(iter(self.feeds.values()))) if self.feeds else 1
        size = 0
        for value in graph.outputs:
            shape = value.shape or ()
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
            if shape and not isinstance(shape[0], int):
                dims[0] = n
            size += int(np.prod(dims)) * 8
        return size * count <= OUTPUT_BUDGET

    @staticmethod
    def _watch(probed, scores):
        def hook(name, array, node):
            if node is not None and name in probed:
                key, value = probed.pop(name)
                scores.setdefault(key, Score()).add({name: array}, {name: value})
            return None

        return hook

    def _capture(self, stored, traces, feeds):
        acts = self.base.acts
        rounding = self.state.rounding

        def hook(name, array, node):
            if (node is None and not feeds) or name not in acts or array.dtype.kind != "f":
                return None
            stored[name] = array
            trace = traces.setdefault(name, TensorTrace())
            trace.observe(array, quantize_dequantize(array, acts[name], rounding))
            return None

        return hook

    def _compare(self, stored, traces, feeds):
        def hook(name, array, node):
            if node is None and not feeds:
                return None
            reference = stored.pop(name, None)
            if reference is not None:
                traces[name].compare(reference, array)
            return None

        return hook


EMPTY = Config()


@dataclass(eq=False)
class FnTask:
    """A user's ``eval_fn`` under one configuration (picklable if eval_fn is)."""

    state: SimState
    eval_fn: Callable
    key: str
    config: Config

    def __call__(self, runner: Runner | None = None) -> tuple[str, float]:
        runner = runner or Runner(self.state)
        return self.key, float(self.eval_fn(runner.run_fn(self.config)))


# ------------------------------------------------------------------------------ the engine
class Engine:
    """Runs sweeps over ``batches`` serially (``executor=None``) or on an Executor, caching the FP32
    outputs of every batch after the first sweep."""

    def __init__(self, state: SimState, batches: list[dict], executor: Executor | None = None,
                 progress: bool = False):
        self.state = state
        self.batches = batches
        self.executor = executor
        self.progress = progress
        self.fp32: list[dict | None] = [None] * len(batches)
        self.runner = Runner(state) if executor is None else None

    def scores(self, trials: list[Trial], base: Config | None = None, trace: bool = False,
               desc: str = "sweep", probes: list[Probe] = ()) -> tuple[dict[str, Score], dict[str, TensorTrace] | None]:
        tasks = [BatchTask(self.state, i, feeds, self.fp32[i], base, trials, trace, list(probes))
                 for i, feeds in enumerate(self.batches)]
        bar = progress_bar(len(tasks) * max(1, len(trials)), self.progress, desc, "eval")
        results = []
        try:
            if self.executor is None:
                for task in tasks:
                    results.append(task(self.runner, bar.update))
            else:
                futures = [self.executor.submit(task) for task in tasks]
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update(max(1, len(trials)))
        finally:
            bar.close()
        scores: dict[str, Score] = {}
        traces: dict[str, TensorTrace] | None = {} if trace else None
        for result in sorted(results, key=lambda r: r.index):
            self.fp32[result.index] = result.fp32
            for key, s in result.scores.items():
                scores.setdefault(key, Score()).merge(s)
            if trace:
                for name, t in result.trace.items():
                    if name in traces:
                        traces[name].merge(t)
                    else:
                        traces[name] = t
        return scores, traces

    def fn_scores(self, eval_fn: Callable, configs: Mapping[str, Config], desc: str = "sweep") -> dict[str, float]:
        tasks = [FnTask(self.state, eval_fn, key, config) for key, config in configs.items()]
        bar = progress_bar(len(tasks), self.progress, desc, "eval")
        values: dict[str, float] = {}
        try:
            if self.executor is None:
                for task in tasks:
                    key, value = task(self.runner)
                    values[key] = value
                    bar.update(1)
            else:
                for future in as_completed([self.executor.submit(task) for task in tasks]):
                    key, value = future.result()
                    values[key] = value
                    bar.update(1)
        finally:
            bar.close()
        return {key: values[key] for key in configs}

    def evaluate(self, configs: Mapping[str, Config], eval_fn: Callable | None = None,
                 desc: str = "sweep") -> dict[str, float]:
        """The metric of each configuration, run in full (no cut)."""
        if eval_fn is not None:
            return self.fn_scores(eval_fn, configs, desc)
        scores, _ = self.scores([Trial(k, c) for k, c in configs.items()], desc=desc)
        return {k: scores[k].value for k in configs}


