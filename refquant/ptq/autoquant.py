"""AutoQuant: the PTQ techniques tried in a fixed order, each kept only if it improves the user's metric,
stopping as soon as the metric reaches the goal (AIMET's AutoQuant, which aimet-onnx no longer has).

**The flow.** ``eval_fn`` scores the FP32 model; the goal is ``target`` if given, else
``fp32_score - allowed_drop``. Then, keeping a *current state* (graph, quantization scheme, quantizer
encodings) whose score is the best so far:

1. ``baseline``: a QuantSim of the model as given, calibrated on ``data`` with ``quant_scheme``.
2. ``prepare``: the graph rewritten by :func:`refquant.prepare` (its default passes, each verified on
   ``data`` to keep the FP32 outputs); AIMET's AutoQuant also prepares the model first.
3. ``bn_fold``: BatchNormalizations folded into their layers (:func:`~refquant.ptq.bn_fold.fold_batchnorms`).
4. ``quant_scheme``: QuantScheme selection: one trial per (weight scheme, activation scheme) candidate
   of ``schemes`` (min-max, TF-enhanced, percentile, MSE, entropy...), the best one wins.
5. ``cle``: cross-layer equalization with high-bias absorption (:func:`~refquant.ptq.cle.equalize`).
6. ``bias_correction`` (not in the default steps): empirical bias correction.
7. ``seq_mse`` (not in the default steps): sequential MSE weight-range search.
8. ``adaround``: adaptive rounding (``adaround_iterations`` per layer), three trials unless
   ``adaround_options`` sets ``quantize_activations`` or ``qdrop``: adaround's default layer inputs (without the
   activation quantizers but for the output layers), the inputs with them for every layer, and QDrop's mix of
   those with the FP32 model's (``qdrop=0.5``). Which suits a model is not known beforehand (docs/adaround.md:
   at Adam's step 1e-3 the quantized inputs cost MTCNN R-Net 7 dB; QDrop is best on the convnet sample and MTCNN
   O-Net/P-Net, worst on MobileNetV2; not with the L-BFGS optimizer); the best score wins.

Each step builds a *candidate* from the current state and scores it; the candidate becomes the current
state only if its score is strictly higher (a tie keeps the simpler model). Steps run in this order
whatever the order of ``steps``; after the goal is met the remaining steps are recorded as skipped. A
step that does not apply to the model (no BatchNormalization to fold, no pair of layers to equalize,
no layer to AdaRound) says so in its record and leaves the state unchanged. Every candidate is
calibrated afresh on ``data`` (frozen encodings and AdaRound's weights are kept, as
``compute_encodings`` keeps them), so every score is the score of the model that would be exported.

**The metric.** ``eval_fn(model) -> float``, higher is better. ``model`` is a
:class:`refquant.Session` on the original FP32 graph for the FP32 score, and a calibrated
:class:`~refquant.quant.QuantSim` for every other one: both have ``model.run(feeds) -> {output: array}``
and ``model.graph``. Built-in metrics (pass the name as ``eval_fn``), computed on ``eval_data``
(default: ``data``) against the *original* model's FP32 outputs (computed once, so a technique that
changes the FP32 graph, like bias correction, is still judged against the model the user gave):

* ``"sqnr"``: ``-10 log10(mean over outputs o of N_o / S_o)`` dB with ``S_o = sum ref_o^2`` and
  ``N_o = sum (ref_o - out_o)^2`` over all samples (one output: its SQNR). The FP32 model scores +inf, so
  this metric takes a ``target`` in dB, not an ``allowed_drop``.
* ``"top1"``: % of samples whose argmax over the last axis of ``primary`` (default: the first output)
  equals the FP32 model's (FP32: 100), or, with ``labels``, top-1 accuracy in % (FP32: its accuracy).

**Trials and executors.** Independent trials (the QuantScheme candidates) are described by
:class:`Trial` objects: the graph, the QuantSim settings, the data and the metric, never a live
session; ``Trial()`` builds, calibrates and scores the sim and returns a :class:`TrialResult` with the
encodings. They run on ``executor`` (any ``concurrent.futures.Executor``: threads, processes, a
cluster) or, with ``executor=None``, one after the other in this process. The computation of a trial does
not depend on where it runs, so the result is the same either way. With a process executor, ``data``,
``eval_data`` and a user's ``eval_fn`` must pickle (a module-level function, arrays or file paths).

With ``output_dir``, the best sim is exported there (``sim.export``: ``PREFIX.onnx``,
``PREFIX.encodings``, ``PREFIX_qdq.onnx``) with ``autoquant.json`` and ``autoquant.html``, a report of
every step and trial with its metric and time.
"""

from __future__ import annotations

import copy
import functools
import html
import json
import math
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import RefquantError
from ..ir import Graph
from ..progress import bar as progress_bar
from .input_choice import InputChoice

STEPS = ("prepare", "bn_fold", "quant_scheme", "cle", "bias_correction", "seq_mse", "adaround")  # in run order
DEFAULT_STEPS = ("prepare", "bn_fold", "quant_scheme", "cle", "adaround")  # AIMET's AutoQuant
GRAPH_STEPS = ("prepare", "bn_fold", "cle")
SIM_TECHNIQUES = ("bias_correction", "seq_mse", "adaround")
ADAROUND_QUANTIZED_INPUTS = "adaround, quantized inputs"  # the key of AutoQuant's second AdaRound trial
ADAROUND_QDROP = "adaround, qdrop"  # ... and of its third: QDrop inputs (refquant.ptq.adaround)
QDROP_PROBABILITY = 0.5  # QDrop's (Wei et al. 2022) default
# (weight scheme, activation scheme): AIMET tries tf/tf_enhanced weights x tf/tf_enhanced/percentile
# activations; refquant's MSE and entropy observers are added (for activations: weights keep min-max)
DEFAULT_SCHEMES = (("min_max", "min_max"), ("min_max", "tf_enhanced"), ("tf_enhanced", "tf_enhanced"),
                   ("min_max", "percentile"), ("min_max", "mse"), ("min_max", "entropy"))
METRICS = ("sqnr", "top1")


class AutoQuantError(RefquantError):
    """AutoQuant asked for something it cannot do (a bad argument, a metric that is not a number)."""


# ======================================================================================= the metric
class BuiltinMetric:
    """A built-in ``eval_fn`` (module docstring): ``"sqnr"`` or ``"top1"`` over ``data`` against the FP32
    outputs of ``graph`` (computed here, once). Picklable: it holds the data source and the reference
    outputs, not a session."""

    def __init__(self, name: str, graph: Graph, data, labels=None, primary: str | None = None,
                 batch_size: int = 16, preprocess=None):
        from ..data import iter_feeds
        from ..runtime import Session

        if name not in METRICS:
            raise AutoQuantError(f"metric {name!r} is not one of {', '.join(METRICS)} (or pass a function)")
        primary = primary or graph.output_names[0]
        if primary not in graph.output_names:
            raise AutoQuantError(f"primary output {primary!r} is not an output of the model "
                                 f"({', '.join(graph.output_names)})")
        self.name, self.primary, self.batch_size, self.preprocess = name, primary, batch_size, preprocess
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        if isinstance(data, Iterator):  # a one-shot stream: kept, since it is read at every evaluation
            data = list(iter_feeds(data, graph, batch_size=batch_size, preprocess=preprocess))
        self.data = data
        wanted = list(graph.output_names) if name == "sqnr" else [primary]
        session = Session(graph)
        self.reference = [session.run(feeds, outputs=wanted) for feeds in self._batches(graph)]
        if not self.reference:
            raise AutoQuantError("the evaluation data set is empty: no batch was produced")
        samples = sum(len(r[wanted[0]]) for r in self.reference)
        if self.labels is not None and len(self.labels) != samples:
            raise AutoQuantError(f"{len(self.labels)} labels for {samples} evaluation samples")

    @property
    def unit(self) -> str:
        return "dB" if self.name == "sqnr" else "%"

    @property
    def description(self) -> str:
        if self.name == "sqnr":
            return "SQNR of the outputs against FP32 (dB)"
        if self.labels is not None:
            return f"top-1 accuracy of {self.primary} (%)"
        return f"top-1 agreement of {self.primary} with FP32 (%)"

    def _batches(self, graph):
        from ..data import iter_feeds

        return iter_feeds(self.data, graph, batch_size=self.batch_size, preprocess=self.preprocess)

    def fp32_score(self) -> float:
        if self.name == "sqnr":
            return math.inf
        if self.labels is None:
            return 100.0
        predicted = np.concatenate([_top1(r[self.primary]) for r in self.reference])
        return float(np.mean(predicted == self.labels) * 100)

    def __call__(self, model) -> float:
        from ..analysis.engine import mean_sqnr

        signal: dict[str, float] = {}
        noise: dict[str, float] = {}
        hits = total = 0
        offset = 0
        for feeds, reference in zip(self._batches(model.graph), self.reference):
            outputs = model.run(feeds, outputs=list(reference))
            for name, ref in reference.items():
                ref64 = ref.astype(np.float64)
                signal[name] = signal.get(name, 0.0) + float(np.sum(ref64 ** 2))
                noise[name] = noise.get(name, 0.0) + float(np.sum((ref64 - outputs[name]) ** 2))
            if self.name == "top1":
                ours = _top1(outputs[self.primary])
                truth = (_top1(reference[self.primary]) if self.labels is None
                         else self.labels[offset:offset + len(ours)])
                hits += int(np.sum(ours == truth))
                total += len(ours)
                offset += len(ours)
        if self.name == "sqnr":
            return float(mean_sqnr(signal, noise))
        return 100.0 * hits / max(total, 1)


def _top1(x: np.ndarray) -> np.ndarray:
    return np.argmax(x.reshape(len(x), -1), axis=1)


# ======================================================================================= trials
@dataclass(frozen=True)
class SimSpec:
    """The QuantSim settings of a state: ``QuantSim(graph, precision=..., quant_scheme=..., ...)``."""

    precision: str = "w8a8"
    config: Any = "default"
    rounding: str = "half_even"
    quant_scheme: str = "min_max"
    param_scheme: str = "min_max"
    scheme_options: tuple = ()  # (key, value) pairs, e.g. (("percentile", 99.99),)

    def build(self, graph: Graph):
        """The QuantSim of ``graph`` exactly as given: preparing the graph is AutoQuant's ``prepare`` step,
        measured like the others, so QuantSim's own preparation is off."""
        from ..quant import QuantSim

        extra = {"prepare": False} if _quantsim_prepares() else {}
        return QuantSim(graph, precision=self.precision, quant_scheme=self.quant_scheme, config=self.config,
                        rounding=self.rounding, param_scheme=self.param_scheme,
                        scheme_options=dict(self.scheme_options), **extra)

    @property
    def scheme(self) -> str:
        options = "".join(f" {k}={v}" for k, v in self.scheme_options)
        return f"w {self.param_scheme} / a {self.quant_scheme}{options}"


def _quantsim_prepares() -> bool:
    """Whether this QuantSim rewrites the graph by refquant.prepare unless told ``prepare=False``."""
    import inspect

    from ..quant import QuantSim

    return "prepare" in inspect.signature(QuantSim.__init__).parameters


@dataclass
class TrialResult:
    """A scored candidate: its score, seconds, the sim's quantizers (encodings, AdaRound's weights) and,
    when the technique changed parameters of the graph (bias correction), that graph."""

    key: str
    score: float
    seconds: float
    quantizers: dict
    graph: Graph | None = None
    note: str = ""  # what the technique decided on its own (AdaRound's chosen inputs)


@dataclass
class Trial:
    """One candidate, self-contained and picklable: ``Trial()`` builds ``spec.build(graph)``, sets
    ``quantizers`` (a calibrated state to start from) or calibrates on ``data``, applies ``technique``
    ("bias_correction", "seq_mse", "adaround" with ``options``) and calibrates again, then scores the
    sim with ``eval_fn``. Nothing given is modified."""

    key: str
    graph: Graph
    spec: SimSpec
    data: Any
    eval_fn: Callable
    technique: str | None = None
    options: dict = field(default_factory=dict)
    quantizers: dict | None = None
    batch_size: int = 16
    preprocess: Any = None
    progress: bool = False

    def __call__(self) -> TrialResult:
        start = time.perf_counter()
        graph = self.graph.copy() if self.technique == "bias_correction" else self.graph
        sim = self.spec.build(graph)
        calibrate = dict(batch_size=self.batch_size, preprocess=self.preprocess, progress=False)
        if self.quantizers is not None:
            restore_quantizers(sim, self.quantizers)
        else:
            sim.compute_encodings(self.data, **calibrate)
        note = ""
        if self.technique is not None:
            report = [] if self.technique == "adaround" else None
            options = dict(self.options, report=report) if report is not None else self.options
            data = bound_data(self.data, graph, self.batch_size, self.preprocess)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not optimized" lists: the step record says what applied
                apply_technique(sim, self.technique, data, options, self.batch_size, self.progress)
            note = describe_choices(report or [])
            sim.compute_encodings(self.data, **calibrate)
        score = _as_score(self.eval_fn(sim), self.key)
        return TrialResult(self.key, score, time.perf_counter() - start, sim.quantizers,
                           sim.graph if self.technique == "bias_correction" else None, note)


def bound_data(data, graph: Graph, batch_size: int = 16, preprocess=None):
    """``data`` for a function that takes no ``preprocess`` (the techniques, :func:`refquant.prepare`): ``data``
    itself without one, else a factory that reads it through ``iter_feeds`` with ``preprocess`` at every pass."""
    if preprocess is None:
        return data
    from ..data import iter_feeds

    return functools.partial(iter_feeds, data, graph, batch_size=batch_size, preprocess=preprocess)


def describe_choice(choice) -> str:
    """AdaRound's :class:`~refquant.ptq.input_choice.InputChoice` in a step note."""
    picked = "quantized" if choice.quantize_activations else "FP32"
    return (f"inputs chosen: {picked} activations (held-out SQNR {choice.sqnr_quantized_activations:.2f} dB "
            f"quantized, {choice.sqnr_fp32_activations:.2f} dB FP32)")


def describe_choices(report: list) -> str:
    """AdaRound's input choices in a step note: the per-model :class:`~refquant.ptq.input_choice.InputChoice`, or
    how many layers chose the quantized inputs (``quantize_activations="per_layer"``)."""
    notes = [describe_choice(r) for r in report if isinstance(r, InputChoice)]
    per_layer = [r for r in report if getattr(r, "held_out_sqnr", None) is not None]
    if per_layer:
        notes.append(f"quantized inputs chosen on {sum(r.quantized_inputs for r in per_layer)} of {len(per_layer)} "
                     "layers (held-out SQNR)")
    return "; ".join(notes)


def apply_technique(sim, technique: str, data, options: dict, batch_size: int = 16, progress: bool = False):
    """Apply one QuantSim technique in place: ``bias_correction``, ``seq_mse`` or ``adaround``."""
    if technique == "bias_correction":
        from .bias_correction import bias_correction

        return bias_correction(sim, data, batch_size=batch_size, progress=progress, **options)
    if technique == "seq_mse":
        from .seq_mse import seq_mse

        return seq_mse(sim, data, batch_size=batch_size, progress=progress, **options)
    if technique == "adaround":
        from .adaround import adaround

        return adaround(sim, data, batch_size=batch_size, progress=progress, **options)
    raise AutoQuantError(f"unknown QuantSim technique {technique!r}; choose one of {', '.join(SIM_TECHNIQUES)}")


def restore_quantizers(sim, quantizers: dict) -> None:
    """Give ``sim`` (built on the same graph and settings) a copy of another sim's quantizers."""
    sim.quantizers = copy.deepcopy(quantizers)
    sim.invalidate()


def run_trials(trials: list[Trial], executor: Executor | None = None, bar=None) -> list[TrialResult]:
    """Run ``trials`` serially in this process (``executor=None``) or on ``executor``; results in order."""
    if executor is None:
        results = []
        for trial in trials:
            results.append(trial())
            if bar is not None:
                bar.update(1)
        return results
    futures = [executor.submit(trial) for trial in trials]
    results = []
    for future in futures:
        results.append(future.result())
        if bar is not None:
            bar.update(1)
    return results


def _as_score(value, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise AutoQuantError(f"eval_fn returned {value!r} for {where}: expected a number (higher is better)") from None
    if math.isnan(score):
        raise AutoQuantError(f"eval_fn returned NaN for {where}")
    return score


# ======================================================================================= records
@dataclass
class StepRecord:
    """One step: ``status`` is "reference" (FP32), "baseline", "kept", "dropped", "not applicable" or
    "skipped"; ``score`` the candidate's metric (None when nothing was evaluated); ``best`` the best
    metric after the step; ``trials`` (key, score, seconds) of a step with several candidates."""

    step: str
    status: str
    score: float | None
    best: float | None
    seconds: float
    note: str = ""
    trials: list = field(default_factory=list)


@dataclass
class AutoQuantResult:
    """What :func:`autoquant` did: the best sim (``sim``, on graph ``graph``), the FP32 score, the goal,
    one :class:`StepRecord` per step, and the files written (``paths``)."""

    sim: Any
    graph: Graph
    fp32_score: float
    goal: float
    steps: list
    metric: str
    spec: SimSpec
    paths: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return [s.best for s in self.steps if s.best is not None][-1]

    @property
    def target_met(self) -> bool:
        return self.score >= self.goal

    @property
    def applied(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "kept"]

    def to_dict(self) -> dict:
        return {"metric": self.metric, "fp32_score": _num(self.fp32_score), "goal": _num(self.goal),
                "score": _num(self.score), "target_met": self.target_met, "applied": self.applied,
                "scheme": self.spec.scheme, "precision": self.spec.precision,
                "steps": [{"step": s.step, "status": s.status, "score": _num(s.score), "best": _num(s.best),
                           "seconds": round(s.seconds, 4), "note": s.note,
                           "trials": [{"key": k, "score": _num(v), "seconds": round(t, 4)} for k, v, t in s.trials]}
                          for s in self.steps],
                "files": dict(self.paths)}

    def format(self) -> str:
        lines = [f"AutoQuant, metric: {self.metric}; FP32 {_fmt(self.fp32_score)}, goal {_fmt(self.goal)}",
                 f"{'step':<16} {'status':<15} {'metric':>9} {'best':>9} {'seconds':>8}  note"]
        for s in self.steps:
            lines.append(f"{s.step:<16} {s.status:<15} {_fmt(s.score):>9} {_fmt(s.best):>9} {s.seconds:>8.2f}  "
                         f"{s.note}")
            for key, score, seconds in s.trials:
                lines.append(f"  {key:<30} {_fmt(score):>9} {'':>9} {seconds:>8.2f}")
        met = "met" if self.target_met else "NOT met"
        lines.append(f"result: {_fmt(self.score)} (goal {_fmt(self.goal)} {met}); applied: "
                     f"{', '.join(self.applied) or 'nothing'}; {self.spec.scheme}")
        return "\n".join(lines)

    def save(self, directory) -> dict[str, str]:
        """Write ``autoquant.json`` and ``autoquant.html`` into ``directory``."""
        from ..analysis.report import readable
        from ..fileio import atomic_path

        directory = Path(directory)
        paths = {"json": directory / "autoquant.json", "html": directory / "autoquant.html"}
        with atomic_path(paths["json"]) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
            readable(tmp)
        with atomic_path(paths["html"]) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
            readable(tmp)
        return {k: str(v) for k, v in paths.items()}

    def html(self) -> str:
        e = html.escape
        rows = []
        for s in self.steps:
            rows.append(f"<tr class='{e(s.status.replace(' ', '-'))}'><td>{e(s.step)}</td><td>{e(s.status)}</td>"
                        f"<td>{_fmt(s.score)}</td><td>{_fmt(s.best)}</td><td>{s.seconds:.2f}</td>"
                        f"<td>{e(s.note)}</td></tr>")
            for key, score, seconds in s.trials:
                rows.append(f"<tr class='trial'><td></td><td>{e(key)}</td><td>{_fmt(score)}</td><td></td>"
                            f"<td>{seconds:.2f}</td><td></td></tr>")
        met = "met" if self.target_met else "not met"
        return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>AutoQuant report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}tr.kept td{{background:#e6f4e6}}
tr.dropped td{{background:#fbeaea}}tr.trial td{{color:#555;font-size:90%}}</style></head><body>
<h1>AutoQuant report</h1>
<p>Metric: {e(self.metric)}. FP32: {_fmt(self.fp32_score)}; goal: {_fmt(self.goal)}; result: {_fmt(self.score)}
(goal {met}). Applied: {e(', '.join(self.applied) or 'nothing')}. Precision {e(self.spec.precision)},
{e(self.spec.scheme)}.</p>
<table><tr><th>step</th><th>status</th><th>metric</th><th>best so far</th><th>seconds</th><th>note</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""


def _num(x):
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if math.isfinite(x) else str(x)


# ======================================================================================= the flow
@dataclass
class _State:
    graph: Graph
    spec: SimSpec
    quantizers: dict
    score: float


def autoquant(graph, data, eval_fn="sqnr", allowed_drop: float | None = None, *, target: float | None = None,
              eval_data=None, labels=None, primary: str | None = None, precision: str = "w8a8",
              config="default", rounding: str = "half_even", quant_scheme: str = "min_max",
              steps=DEFAULT_STEPS, schemes=DEFAULT_SCHEMES, adaround_iterations: int = 1000,
              adaround_options: dict | None = None, seq_mse_candidates: int = 20, replace_relu6: bool = False,
              batch_size: int = 16, preprocess=None, executor: Executor | None = None, output_dir=None,
              prefix: str = "model", progress: bool = True, unsigned_weights: bool = False) -> AutoQuantResult:
    """Find the best PTQ recipe for ``graph`` (a Graph or a model path) by the flow of the module docstring.

    ``data``: calibration data (anything :func:`refquant.data.iter_feeds` accepts), also used by the
    techniques. ``eval_fn``: a function ``model -> float`` (higher is better; see the module docstring
    for what ``model`` is) or a built-in metric name, "sqnr" or "top1", computed on ``eval_data``
    (default: ``data``) with ``labels``/``primary``. Goal: ``target``, else FP32 score - ``allowed_drop``.
    ``precision``/``config``/``rounding``/``quant_scheme``: the baseline QuantSim. ``steps``: which steps
    to try (names in :data:`STEPS`). ``schemes``: QuantScheme candidates as (weight scheme, activation
    scheme) or (weight, activation, {options}). ``adaround_iterations`` (and ``adaround_options``, e.g.
    ``{"optimizer": "lbfgs"}``), ``seq_mse_candidates``, ``replace_relu6`` (CLE): the techniques' settings.
    ``executor``: where independent trials run (None: serially here). ``output_dir``: export the best sim
    and write the reports there (``prefix`` names the model files; ``unsigned_weights``: the QDQ model's int8
    weights as uint8, see :meth:`QuantSim.export`). Returns an :class:`AutoQuantResult`.
    """
    from ..onnx_io import load
    from ..runtime import Session

    if not isinstance(graph, Graph):
        graph = load(graph)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise AutoQuantError(f"unknown AutoQuant step(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(STEPS)}")
    if allowed_drop is None and target is None:
        raise AutoQuantError("autoquant: give allowed_drop (below the FP32 metric) or target (an absolute metric)")
    if allowed_drop is not None and (not math.isfinite(allowed_drop) or allowed_drop < 0):
        raise AutoQuantError(f"autoquant: allowed_drop must be a number >= 0, got {allowed_drop!r}")
    candidates = [_scheme_spec(s) for s in schemes]
    if isinstance(eval_fn, BuiltinMetric):
        metric, name = eval_fn, eval_fn.description
    elif isinstance(eval_fn, str):
        metric = BuiltinMetric(eval_fn, graph, data if eval_data is None else eval_data, labels, primary,
                               batch_size, preprocess)
        name = metric.description
    elif callable(eval_fn):
        metric, name = eval_fn, getattr(eval_fn, "__name__", type(eval_fn).__name__)
    else:
        raise AutoQuantError(f"eval_fn must be a function or one of {', '.join(METRICS)}, got {eval_fn!r}")
    if isinstance(data, Iterator):  # read by every trial: keep the batches
        from ..data import iter_feeds

        data = list(iter_feeds(data, graph, batch_size=batch_size, preprocess=preprocess))
    spec = SimSpec(precision, config, rounding, quant_scheme, _param_scheme(quant_scheme))
    spec.build(graph)  # a bad precision, config or scheme fails here, before any work
    common = dict(data=data, eval_fn=metric, batch_size=batch_size, preprocess=preprocess)
    records: list[StepRecord] = []
    chosen = [s for s in STEPS if s in steps]
    bar = progress_bar(len(chosen) + 2, progress, "autoquant", unit="step")

    # FP32 reference and goal
    start = time.perf_counter()
    bar.set_description("autoquant: FP32")
    if isinstance(metric, BuiltinMetric):
        fp32 = metric.fp32_score()
    else:
        fp32 = _as_score(metric(Session(graph)), "the FP32 model")
    if target is not None:
        goal = float(target)
    elif math.isinf(fp32):
        raise AutoQuantError(f"the FP32 model's {name} is {fp32}: an allowed drop below it means nothing; "
                             "give a target instead (e.g. target=30 dB for sqnr)")
    else:
        goal = fp32 - allowed_drop
    records.append(StepRecord("fp32", "reference", fp32, None, time.perf_counter() - start,
                              f"goal {_fmt(goal)}" + (f" = FP32 - {allowed_drop:g}" if target is None else "")))
    bar.update(1)

    # baseline
    bar.set_description("autoquant: baseline")
    result = Trial("baseline", graph, spec, **common)()
    state = _State(graph, spec, result.quantizers, result.score)
    records.append(StepRecord("baseline", "baseline", result.score, result.score, result.seconds,
                              f"precision {precision}, {spec.scheme}"))
    bar.update(1)

    for step in chosen:
        bar.set_description(f"autoquant: {step}")
        if state.score >= goal:
            records.append(StepRecord(step, "skipped", None, state.score, 0.0, "the goal is already met"))
            bar.update(1)
            continue
        start = time.perf_counter()
        note, results, candidate_graph, candidate_spec, records_trials = "", [], None, state.spec, []
        if step == "prepare":
            candidate_graph, note = prepare_graph(state.graph, data, batch_size, preprocess)
            if candidate_graph is not None:
                results = [Trial(step, candidate_graph, state.spec, **common)()]
        elif step == "bn_fold":
            from .bn_fold import fold_batchnorms_info

            folded, folds = fold_batchnorms_info(state.graph, warn=False)
            if not folds:
                note = "not applicable: no BatchNormalization to fold; model unchanged"
            else:
                note = f"folded {len(folds)} BatchNormalization(s)"
                candidate_graph = folded
                results = [Trial(step, folded, state.spec, **common)()]
        elif step == "cle":
            from .cle import equalize_pass

            from .bn_fold import fold_batchnorms_info

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the statistics of BNs that prepare / bn_fold folded earlier still feed high-bias absorption
                earlier = fold_batchnorms_info(graph, warn=False)[1]
                equalized, report = equalize_pass(state.graph, replace_relu6=replace_relu6, batchnorms=earlier)
            if not report.sets:
                note = "not applicable: no pair of consecutive layers to equalize; model unchanged"
            else:
                note = (f"equalized {len(report.sets)} set(s), folded {len(report.folded_batchnorms)} BN(s), "
                        f"absorbed {len(report.absorbed)} high bias(es)")
                candidate_graph = equalized
                results = [Trial(step, equalized, state.spec, **common)()]
        elif step == "quant_scheme":
            specs = [replace(state.spec, param_scheme=c.param_scheme, quant_scheme=c.quant_scheme,
                             scheme_options=c.scheme_options) for c in candidates]
            unique = [s for i, s in enumerate(specs) if s != state.spec and s not in specs[:i]]  # config may be a dict
            trials = [Trial(s.scheme, state.graph, s, **common) for s in unique]
            inner = progress_bar(len(trials), progress, "quant schemes", unit="trial")
            results = run_trials(trials, executor, inner)
            inner.close()
            if results:
                best = max(range(len(results)), key=lambda i: results[i].score)  # first of equals
                candidate_spec = trials[best].spec
                note = f"best candidate: {candidate_spec.scheme}"
                records_trials = [(state.spec.scheme + " (current)", state.score, 0.0)]
                records_trials += [(r.key, r.score, r.seconds) for r in results]
                results = [results[best]]
            else:
                note = "not applicable: no candidate other than the current scheme"
        else:  # a QuantSim technique on the current state
            applicable, why = _technique_applies(step, state)
            if not applicable:
                note = f"not applicable: {why}; model unchanged"
            else:
                options = _technique_options(step, adaround_iterations, adaround_options, seq_mse_candidates)
                variants = {step: options}
                if step == "adaround" and not {"quantize_activations", "qdrop"} & set(options):
                    # which layer inputs suit AdaRound depends on the model (refquant.ptq.adaround): try all three
                    variants[ADAROUND_QUANTIZED_INPUTS] = {**options, "quantize_activations": True}
                    if options.get("optimizer", "adam") == "adam":  # L-BFGS cannot take QDrop's random masks
                        variants[ADAROUND_QDROP] = {**options, "quantize_activations": True,
                                                    "qdrop": QDROP_PROBABILITY}
                trials = [Trial(key, state.graph, state.spec, technique=step, options=o, quantizers=state.quantizers,
                                progress=progress and executor is None, **common) for key, o in variants.items()]
                results = run_trials(trials, executor)
                best = max(range(len(results)), key=lambda i: results[i].score) if results else 0  # first of equals
                note = ", ".join(f"{k}={v}" for k, v in trials[best].options.items())
                if results and results[best].note:
                    note += f"; {results[best].note}"
                if len(results) > 1:
                    records_trials = [(r.key, r.score, r.seconds) for r in results]
                    results = [results[best]]
        seconds = time.perf_counter() - start
        if not results:
            records.append(StepRecord(step, "not applicable", None, state.score, seconds, note))
        else:
            candidate = results[0]
            kept = candidate.score > state.score
            if kept:
                graph_now = next(g for g in (candidate.graph, candidate_graph, state.graph) if g is not None)
                state = _State(graph_now, candidate_spec, candidate.quantizers, candidate.score)
            status = "kept" if kept else "dropped"
            if not kept:
                note += (";" if note else "") + " no improvement"
            record = StepRecord(step, status, candidate.score, state.score, seconds, note.strip())
            if step == "quant_scheme" or records_trials:
                record.trials = records_trials
            records.append(record)
        bar.update(1)
        bar.set_postfix(best=_fmt(state.score))
    bar.close()

    sim = state.spec.build(state.graph)
    restore_quantizers(sim, state.quantizers)
    outcome = AutoQuantResult(sim, state.graph, fp32, goal, records, name, state.spec)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        outcome.paths.update(sim.export(out, prefix, unsigned_weights=unsigned_weights))
        outcome.paths.update(outcome.save(out))
    return outcome


def prepare_graph(graph: Graph, data, batch_size: int = 16, preprocess=None) -> tuple[Graph | None, str]:
    """(the graph rewritten by :func:`refquant.prepare`'s default passes, what changed), or (None, why not)
    when no pass applies. Each pass is verified on ``data`` (read with ``preprocess``) to keep the FP32 outputs."""
    from ..prepare import prepare

    prepared, report = prepare(graph, "default", bound_data(data, graph, batch_size, preprocess))
    applied = [p.name for p in report.passes if p.status == "applied"]
    if not applied:
        return None, "not applicable: no preparation pass changes the model; model unchanged"
    return prepared, "passes applied: " + ", ".join(applied)


def _param_scheme(activation_scheme: str) -> str:
    # QuantSim's default: weights take min_max/tf_enhanced as given, else min_max
    return activation_scheme if activation_scheme in ("min_max", "tf", "tf_enhanced") else "min_max"


def _scheme_spec(candidate) -> SimSpec:
    """A QuantScheme candidate as the SimSpec fields it sets (the rest come from the current state)."""
    try:
        weights, activations, *rest = candidate
    except (TypeError, ValueError):
        raise AutoQuantError(f"QuantScheme candidate {candidate!r}: expected (weight scheme, activation scheme"
                             "[, options])") from None
    from ..quant.observers import make_observer

    options = tuple(sorted(dict(rest[0]).items())) if rest else ()
    make_observer(weights)  # an unknown scheme fails now, naming itself
    make_observer(activations, **dict(options))
    return _SchemeOnly(weights, activations, options)


@dataclass(frozen=True)
class _SchemeOnly:
    param_scheme: str
    quant_scheme: str
    scheme_options: tuple


def _technique_applies(step: str, state: _State) -> tuple[bool, str]:
    sim = state.spec.build(state.graph)
    restore_quantizers(sim, state.quantizers)
    if step == "bias_correction":
        from .bias_correction import find_layers

        layers, _ = find_layers(sim)
        return bool(layers), "no layer with quantized weights and a bias"
    from .layers import LAYER_OPS, find_layers
    from .seq_mse import SEQ_MSE_OPS

    layers, _ = find_layers(sim, SEQ_MSE_OPS if step == "seq_mse" else LAYER_OPS)
    what = "search" if step == "seq_mse" else "AdaRound"
    return bool(layers), f"no layer with a constant, quantized weight to {what}"


def _technique_options(step, adaround_iterations, adaround_options, seq_mse_candidates) -> dict:
    if step == "adaround":
        return {"num_iterations": int(adaround_iterations), **dict(adaround_options or {})}
    if step == "seq_mse":
        return {"num_candidates": int(seq_mse_candidates)}
    return {}


__all__ = ["AutoQuantError", "AutoQuantResult", "BuiltinMetric", "DEFAULT_SCHEMES", "DEFAULT_STEPS", "STEPS",
           "SimSpec", "StepRecord", "Trial", "TrialResult", "apply_technique", "autoquant", "restore_quantizers",
           "run_trials"]
