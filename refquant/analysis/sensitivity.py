"""QuantAnalyzer: where a calibrated QuantSim loses accuracy, and what to do about it.

``analyze(sim, data, eval_fn=None) -> AnalysisReport`` measures, on ``data``:

* whole-model sensitivity: the metric with everything quantized, with weights only (activation
  quantizers off) and with activations only (weight quantizers off; quantized constants such as PRelu
  slopes count as weights);
* per-layer sensitivity, for every quantizer group (:func:`~refquant.analysis.groups.layer_groups`: a
  node with quantized weights plus its output quantizer; activation-only groups for Add, pooling, the
  graph inputs...): the metric with *only* that group quantized, and with *all but* that group;
* per-tensor SQNR of the simulation against FP32 along the graph, and of each quantizer alone;
* min/max, 99.99th percentiles, histograms and per-channel ranges of every quantized activation and
  weight, with the encoding's range;
* flags: outliers (range far beyond the bulk of the values), dead channels, int32 bias overflow risk
  (``|b / (s_x s_w)|`` near 2^31), per-tensor weight encodings spent on a wide channel spread, and
  activations with a wide channel spread.

The metric is ``eval_fn(run) -> float``, higher is better, where ``run(feeds) -> {output: array}``
runs the model in the configuration being measured (``eval_fn`` brings its own data and labels).
Without ``eval_fn`` it is the SQNR (dB) of the graph outputs against FP32 on ``data``
(see :mod:`.engine`; FP32 outputs are computed once and reused by every evaluation).

The sweep is a set of independent evaluations run on ``executor`` (a ``concurrent.futures.Executor``;
default: serially in this process). ``sim`` is not modified.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import RefquantError
from ..quant.placement import PER_CHANNEL_OPS, feeding_quantizer, weight_axis
from ..quant.qdq import quantize_dequantize
from .engine import BASE, EMPTY, Config, Engine, Probe, SimState, Trial, sim_config, sqnr_from
from .groups import QuantGroup, layer_groups
from .report import AnalysisReport, Culprit, Finding, LayerSensitivity, TensorStats

THRESHOLDS = {
    "outlier_ratio": 10.0,  # max |x| over the 99.99th percentile of |x| (weights: robust top quantile)
    # widest channel range over the median channel range: a per-tensor weight grid above this leaves the
    # median channel under 1/5 of the levels (-2.3 bits; MobileNetV2's depthwise weights are at 6-8x)
    "weight_channel_spread": 5.0,
    "activation_channel_spread": 10.0,  # the same for activations (always per tensor; info only)
    "bias_headroom_bits": 2.0,  # flag when |b/(sx*sw)| > 2^(31 - this)
}
HIST_BINS = 256  # bins kept per histogram in the report (activation histograms are pooled down to it)


def analyze(sim, data, eval_fn=None, batch_size: int = 16, progress: bool = True, executor=None,
            preprocess=None, thresholds: dict | None = None, top: int = 10) -> AnalysisReport:
    """Sensitivity analysis of a calibrated ``sim`` on ``data`` (anything ``refquant.data.iter_feeds``
    accepts). ``eval_fn(run) -> float`` (higher is better) replaces the default SQNR-vs-FP32 metric;
    ``executor`` runs the sweep's evaluations (default: serially)."""
    from ..data import iter_feeds

    start = time.perf_counter()
    limits = dict(THRESHOLDS, **(thresholds or {}))
    if not any(q.enabled and q.encoding is not None for q in sim.quantizers.values()):
        raise RefquantError("analyze: the QuantSim has no encodings; call sim.compute_encodings(data) first")
    groups = layer_groups(sim)
    if not groups:
        raise RefquantError("analyze: the QuantSim quantizes nothing (every quantizer is disabled)")
    state = SimState.of(sim)
    base = sim_config(sim)
    batches = list(iter_feeds(data, sim.graph, batch_size=batch_size, preprocess=preprocess))
    samples = sum(len(next(iter(b.values()))) for b in batches if b)
    engine = Engine(state, batches, executor=executor, progress=progress)
    statics = {n for n, q in sim.quantizers.items() if q.kind != "activation"}
    whole = {"weights_only": base.only(n for n in base.consts if n in statics),
             "activations_only": base.only(n for n in base.acts)}
    per_layer = {}
    for g in groups:
        per_layer[("only", g.name)] = Trial(f"only:{g.name}", base.only(g.quantizers), g.position, "float")
        per_layer[("all_but", g.name)] = Trial(f"all_but:{g.name}", base.without(g.quantizers), g.position, "base")
    probes = weight_probes(sim, groups, base)
    timings = {}
    outputs_sqnr: dict[str, dict] = {}
    from ..scale import shared

    with shared(executor, state, base):  # the quantized weights go to each worker once, if it can
        if eval_fn is None:
            t0 = time.perf_counter()
            trials = [Trial(k, c) for k, c in whole.items()] + list(per_layer.values())
            scores, traces = engine.scores(trials, base=base, trace=True, desc="analyze", probes=probes)
            timings["sweep_s"] = time.perf_counter() - t0
            metric = {k: s.value for k, s in scores.items()}
            outputs_sqnr = {k: s.per_output for k, s in scores.items()}
            fp32_metric = math.inf
            quantized = metric[BASE]
            metric_name = "sqnr_db"
        else:
            t0 = time.perf_counter()
            scores, traces = engine.scores([], base=base, trace=True, desc="trace", probes=probes)
            timings["trace_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            configs = {"fp32": EMPTY, BASE: base, **whole}
            configs.update({t.key: t.config for t in per_layer.values()})
            metric = engine.fn_scores(eval_fn, configs, desc="analyze")
            timings["sweep_s"] = time.perf_counter() - t0
            fp32_metric = metric["fp32"]
            quantized = metric[BASE]
            metric_name = getattr(eval_fn, "__name__", "eval_fn")
    evaluations = len(whole) + len(per_layer) + (2 if eval_fn is not None else 0)

    t0 = time.perf_counter()
    group_of = {n: g.name for g in groups for n in g.quantizers}
    tensors: dict[str, TensorStats] = {}
    for g in groups:
        for name in g.activations:
            if name in traces:
                tensors[name] = activation_stats(sim, name, traces[name], group_of[name], base)
        for name in g.weights:
            tensors[name] = weight_stats(sim, name, group_of[name], base, g.roles.get(name))
    findings = flag_tensors(sim, tensors, limits)
    findings += flag_biases(sim, groups, tensors, limits)
    timings["statistics_s"] = time.perf_counter() - t0

    layers = []
    for i, g in enumerate(groups):
        only, all_but = per_layer[("only", g.name)], per_layer[("all_but", g.name)]
        probe = scores.get(f"weights:{g.name}")
        own = [tensors[n].qdq_sqnr_db for n in g.activations if n in tensors]
        layers.append(LayerSensitivity(
            name=g.name, kind=g.kind, index=i, nodes=g.nodes, op_types=g.op_types, weights=g.weights,
            activations=g.activations, position=g.position, macs=g.macs, parameters=g.parameters,
            depthwise=g.depthwise, only=metric[only.key], all_but=metric[all_but.key],
            only_outputs=outputs_sqnr.get(only.key), all_but_outputs=outputs_sqnr.get(all_but.key),
            flags=sorted({f.code for f in findings if f.group == g.name}),
            weights_alone_db=None if probe is None else probe.value,
            output_alone_db=min(own) if own else None))
    ranked = sorted(layers, key=lambda l: (_finite_key(l.only), -_finite_key(l.all_but)))
    for rank, layer in enumerate(ranked, 1):
        layer.rank = rank
    culprits = []
    by_name = {g.name: g for g in groups}
    for layer in ranked[:top]:
        category, advice = suggest_fix(sim, by_name[layer.name], layer, tensors, findings, limits)
        serious = sorted({f.code for f in findings if f.group == layer.name and f.severity != "info"})
        culprits.append(Culprit(rank=layer.rank, group=layer.name, only=layer.only, all_but=layer.all_but,
                                flags=serious, fix=category, advice=advice))
    timings["total_s"] = time.perf_counter() - start
    report = AnalysisReport(
        model=sim.graph.name, metric=metric_name,
        settings={"quant_scheme": sim.quant_scheme, "rounding": sim.rounding, "param_bw": sim.param_bw,
                  "output_bw": sim.output_bw, "samples": samples, "batches": len(batches),
                  "batch_size": batch_size, "evaluations": evaluations, "thresholds": limits,
                  "executor": type(executor).__name__ if executor is not None else "serial"},
        fp32=fp32_metric, quantized=quantized, weights_only=metric["weights_only"],
        activations_only=metric["activations_only"],
        outputs=scores[BASE].per_output if BASE in scores else None,  # SQNR per output, whatever the metric
        layers=layers, tensors=tensors, findings=findings, culprits=culprits, timings=timings)
    report._data = data
    report._batch_size = batch_size
    report._preprocess = preprocess
    return report


def weight_probes(sim, groups: list[QuantGroup], base: Config) -> list[Probe]:
    """For each group with quantized weights: its weighted node run on FP32 inputs with only those
    weights quantized, so that a layer's weight error and its output quantizer's error are measured on
    the same tensor (relative noise at the layer's output)."""
    probes = []
    for g in groups:
        if g.position < 0:
            continue
        node = sim.graph.nodes[g.position]
        weights = [w for w in g.weights if g.roles.get(w) != "constant" and w in node.inputs and w in base.consts]
        if weights:
            probes.append(Probe(f"weights:{g.name}", g.position, base.only(weights)))
    return probes


def _finite_key(value: float) -> float:
    return 1e300 if value == math.inf else (-1e300 if value == -math.inf or math.isnan(value) else value)


# ------------------------------------------------------------------------------ statistics
def _encoding_range(encoding):
    if encoding is None or encoding.kind != "int":
        return None, None
    lo, hi = np.asarray(encoding.min, dtype=np.float64), np.asarray(encoding.max, dtype=np.float64)
    return (float(lo) if lo.ndim == 0 else lo.tolist()), (float(hi) if hi.ndim == 0 else hi.tolist())


def _pool(counts: np.ndarray, bins: int) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) > bins and len(counts) % bins == 0:
        return counts.reshape(bins, -1).sum(axis=1)
    return counts


def _spread(span: np.ndarray) -> float | None:
    """Widest channel range over the median range of the live (nonzero) channels."""
    live = span[span > 0]
    if len(span) < 2 or len(live) == 0:
        return None
    return float(np.max(live) / np.median(live))


def activation_stats(sim, name: str, trace, group: str, base: Config) -> TensorStats:
    q = sim.quantizers[name]
    encoding = base.acts.get(name)
    enc_min, enc_max = _encoding_range(encoding)
    hist = trace.hist
    lo, hi = float(hist.hist.min[0]), float(hist.hist.max[0])
    p_low, p_high = (float(v) for v in hist.range(8, False))
    bulk = max(abs(p_low), abs(p_high))
    peak = max(abs(lo), abs(hi))
    counts = _pool(hist.hist.counts[0], HIST_BINS)
    ch_min = ch_max = None
    dead = 0
    spread = None
    if trace.channels is not None and not trace.channels.empty:
        cmin = trace.channels.min.astype(np.float64)
        cmax = trace.channels.max.astype(np.float64)
        ch_min, ch_max = cmin.tolist(), cmax.tolist()
        dead = int(np.sum((cmin == 0) & (cmax == 0)))
        spread = _spread(np.maximum(cmax, 0) - np.minimum(cmin, 0))
    return TensorStats(
        name=name, kind="activation", group=group, shape=list(trace.shape), bitwidth=q.bitwidth,
        symmetric=q.symmetric, encoding_kind=None if encoding is None else encoding.kind, axis=None,
        enc_min=enc_min, enc_max=enc_max, sqnr_db=sqnr_from(trace.signal, trace.noise),
        qdq_sqnr_db=sqnr_from(trace.signal, trace.local_noise), min=lo, max=hi, p_low=p_low, p_high=p_high,
        outlier_ratio=(peak / bulk) if bulk > 0 else None, channel_axis=1 if ch_min is not None else None,
        channel_min=ch_min, channel_max=ch_max, dead_channels=dead, channel_spread=spread,
        hist_lo=float(hist.hist.lo[0]), hist_hi=float(hist.hist.hi[0]), hist_counts=counts.tolist(),
        tied_to=q.tied_to)


def _robust_top(values: np.ndarray) -> float:
    """A high quantile of |values| that leaves out at least the 3 largest: the 99.99th percentile for
    big tensors, the 4th largest for small ones (so that one outlier cannot be its own reference)."""
    n = values.size
    q = min(0.9999, 1.0 - 3.0 / n)
    return float(np.quantile(values, q, method="lower"))


def weight_stats(sim, name: str, group: str, base: Config, role: str | None) -> TensorStats:
    q = sim.quantizers[name]
    w = np.asarray(sim.graph.initializers[name], dtype=np.float32)
    encoding = sim.encoding_of(name)
    enc_min, enc_max = _encoding_range(encoding)
    simulated = base.consts.get(name)
    if simulated is None and encoding is not None:
        simulated = quantize_dequantize(w, encoding, sim.rounding)
    w64 = w.astype(np.float64).ravel()
    signal = float(w64 @ w64)
    noise = 0.0
    if simulated is not None:
        d = w64 - np.asarray(simulated, dtype=np.float64).ravel()
        noise = float(d @ d)
    axis = q.axis if q.axis is not None and w.ndim else None
    if axis is None and w.ndim >= 2 and q.op_type in PER_CHANNEL_OPS:
        consumer = next((n for n in sim.graph.nodes if len(n.inputs) > 1 and n.inputs[1] == name), None)
        axis = weight_axis(consumer, w.ndim) if consumer is not None else None
    ch_min = ch_max = None
    dead = 0
    spread = None
    outlier = None
    absw = np.abs(w)
    if axis is not None:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        cmin, cmax = moved.min(axis=1).astype(np.float64), moved.max(axis=1).astype(np.float64)
        ch_min, ch_max = cmin.tolist(), cmax.tolist()
        amax = np.maximum(np.abs(cmin), np.abs(cmax))
        dead = int(np.sum(amax == 0))
        spread = _spread(amax)
        per_channel_grid = encoding is not None and encoding.axis is not None
        if per_channel_grid and moved.shape[1] >= 16 and role == "weight":
            m = moved.shape[1]
            ref = np.quantile(np.abs(moved), min(0.9999, 1.0 - 3.0 / m), axis=1, method="lower")
            ratios = np.where(ref > 0, amax / np.where(ref > 0, ref, 1), 0.0)
            outlier = float(np.max(ratios))
    per_tensor_grid = encoding is None or encoding.axis is None
    if outlier is None and per_tensor_grid and w.size >= 16 and role in ("weight", "constant"):
        ref = _robust_top(absw.ravel())
        outlier = float(absw.max() / ref) if ref > 0 else None
    edges_lo = min(float(w.min()), float(np.min(enc_min)) if enc_min is not None else float(w.min()))
    edges_hi = max(float(w.max()), float(np.max(enc_max)) if enc_max is not None else float(w.max()))
    if edges_hi <= edges_lo:
        edges_hi = edges_lo + 1.0
    counts, _ = np.histogram(w, bins=HIST_BINS, range=(edges_lo, edges_hi))
    channel_hist = None
    if axis is not None:  # one histogram per output channel, on the tensor's bins pooled 4:1
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        bins = HIST_BINS // 4
        index = np.clip(((moved - edges_lo) / (edges_hi - edges_lo) * bins).astype(np.int64), 0, bins - 1)
        offsets = np.arange(moved.shape[0])[:, None] * bins
        channel_hist = np.bincount((index + offsets).ravel(), minlength=moved.shape[0] * bins)
        channel_hist = channel_hist.reshape(moved.shape[0], bins).tolist()
    bulk = _robust_top(absw.ravel()) if w.size else 0.0
    return TensorStats(
        name=name, kind="weight" if q.kind == "param" else "constant", group=group, shape=list(w.shape),
        bitwidth=q.bitwidth, symmetric=q.symmetric, encoding_kind=None if encoding is None else encoding.kind,
        axis=None if encoding is None else encoding.axis, enc_min=enc_min, enc_max=enc_max,
        sqnr_db=sqnr_from(signal, noise), qdq_sqnr_db=sqnr_from(signal, noise), min=float(w.min()),
        max=float(w.max()), p_low=-bulk, p_high=bulk, outlier_ratio=outlier, channel_axis=axis,
        channel_min=ch_min, channel_max=ch_max, dead_channels=dead, channel_spread=spread,
        hist_lo=edges_lo, hist_hi=edges_hi, hist_counts=counts.tolist(), role=role, channel_hist=channel_hist)


# ------------------------------------------------------------------------------ flags
def flag_tensors(sim, tensors: dict[str, TensorStats], limits: dict) -> list[Finding]:
    findings = []
    for t in tensors.values():
        if t.role == "bias":
            continue
        if t.outlier_ratio is not None and t.outlier_ratio > limits["outlier_ratio"]:
            where = "in one channel's grid" if (t.kind == "weight" and t.axis is not None) else "in the grid"
            bits = math.log2(t.outlier_ratio)
            findings.append(Finding(
                "outlier", "warning", t.name, t.group, t.outlier_ratio,
                f"{t.kind} {t.name}: max |x| = {max(abs(t.min), abs(t.max)):.4g} is {t.outlier_ratio:.1f}x the bulk "
                f"of the values (99.99th percentile {max(abs(t.p_low), abs(t.p_high)):.4g}); ~{bits:.1f} bits "
                f"{where} are spent on outliers"))
        if t.dead_channels:
            total = len(t.channel_min or [])
            findings.append(Finding(
                "dead_channels", "info", t.name, t.group, t.dead_channels,
                f"{t.kind} {t.name}: {t.dead_channels} of {total} channels are always zero"))
        if t.channel_spread is not None:
            if (t.kind == "weight" and t.axis is None and t.encoding_kind == "int"
                    and t.channel_spread > limits["weight_channel_spread"]):
                findings.append(Finding(
                    "per_tensor_spread", "warning", t.name, t.group, t.channel_spread,
                    f"weight {t.name}: one per-tensor grid for channels whose ranges differ by "
                    f"{t.channel_spread:.1f}x (widest / median): narrow channels get few levels"))
            elif t.kind == "activation" and t.channel_spread > limits["activation_channel_spread"]:
                findings.append(Finding(
                    "activation_spread", "info", t.name, t.group, t.channel_spread,
                    f"activation {t.name}: channel ranges differ by {t.channel_spread:.1f}x (widest / median) "
                    f"under one per-tensor grid"))
    return findings


def flag_biases(sim, groups: list[QuantGroup], tensors: dict, limits: dict) -> list[Finding]:
    """int32 bias: |b / (s_x * s_w)| must stay below 2^31 (AIMET enlarges the weight scale otherwise)."""
    findings = []
    group_of = {n: g.name for g in groups for n in g.quantizers}
    limit = 2.0 ** (31 - limits["bias_headroom_bits"])
    for node in sim.graph.nodes:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            continue
        weight, bias = node.inputs[1], node.inputs[2]
        if bias not in sim.graph.initializers or weight not in sim.quantizers:
            continue
        w_enc = sim.encoding_of(weight) if sim.quantizers[weight].enabled else None
        source = feeding_quantizer(sim, node.inputs[0])
        x_enc = sim.encoding_of(source) if source is not None else None
        if w_enc is None or x_enc is None or w_enc.kind != "int" or x_enc.kind != "int":
            continue
        b = np.abs(np.asarray(sim.graph.initializers[bias], dtype=np.float64))
        scale = float(np.asarray(x_enc.scale).reshape(-1)[0]) * np.asarray(w_enc.scale, dtype=np.float64)
        ratio = float(np.max(b / np.broadcast_to(scale, b.shape))) if b.size else 0.0
        if weight in tensors:
            tensors[weight].bias_ratio = ratio
        if ratio > limit:
            findings.append(Finding(
                "bias_overflow", "error" if ratio >= 2.0 ** 31 else "warning", bias, group_of.get(weight, ""), ratio,
                f"bias {bias} of {node.name}: |b / (s_x s_w)| reaches {ratio:.3g} = 2^{math.log2(ratio):.1f} "
                f"(int32 holds 2^31); the int32 bias {'overflows' if ratio >= 2**31 else 'is close to overflowing'}"))
    return findings


# ------------------------------------------------------------------------------ advice
def _db(value) -> str:
    return "-" if value is None or value == math.inf else f"{value:.1f} dB"


FIXES = {
    "exclude": "exclude from quantization",
    "per-channel": "per-channel weights",
    "cle": "cross-layer equalization",
    "scheme": "different calibration scheme",
    "bitwidth": "higher bitwidth",
    "bias": "bias precision",
}


def suggest_fix(sim, group: QuantGroup, layer: LayerSensitivity, tensors: dict, findings: list,
                limits: dict) -> tuple[str, str]:
    """(category, advice) for one group: from its flags, and from which part of it costs more when
    measured on the same tensor: its weights (``layer.weights_alone_db``, the weighted node's output
    with only its weights quantized) or its output grid (``layer.output_alone_db``)."""
    own = [f for f in findings if f.group == group.name]
    codes = {(f.code, tensors[f.tensor].kind if f.tensor in tensors else "bias") for f in own}
    weights = [tensors[n] for n in group.weights if n in tensors and tensors[n].role != "bias"]
    acts = [tensors[n] for n in group.activations if n in tensors]
    w_db = layer.weights_alone_db if layer.weights_alone_db is not None else math.inf
    a_db = layer.output_alone_db if layer.output_alone_db is not None else math.inf
    weights_worse = bool(weights) and w_db < a_db
    split = f"{_db(w_db)} at its output from its weights vs {_db(a_db)} from its output grid"
    advice: list[tuple[str, str]] = []
    if ("outlier", "weight") in codes or ("outlier", "constant") in codes:
        t = max((w for w in weights if w.outlier_ratio), key=lambda w: w.outlier_ratio)
        advice.append(("exclude", f"{t.name} has outlier weights ({t.outlier_ratio:.0f}x the bulk): exclude "
                                  f"{group.name} from quantization (disable its quantizers, or give it 16-bit "
                                  f"weights), or clip/repair the outlier weights"))
    if any(code == "bias_overflow" for code, _ in codes):
        advice.append(("bias", "the int32 bias is near overflow: enlarge the weight scale, use 8-bit "
                               "activations at its input, or keep this bias in float"))
    per_tensor = [w for w in weights if w.kind == "weight" and w.axis is None and w.channel_min is not None
                  and w.encoding_kind == "int"]
    if weights_worse or ("per_tensor_spread", "weight") in codes:
        spread_of = max((w.channel_spread or 0.0 for w in per_tensor), default=0.0)
        if per_tensor and spread_of >= 2.0:  # a per-channel grid helps only if the channels differ
            t = max(per_tensor, key=lambda w: w.channel_spread or 0.0)
            cle = "cross-layer equalization (refquant.ptq.equalize) or " if group.depthwise else ""
            advice.append(("cle" if group.depthwise else "per-channel",
                           f"its weights cost most ({split}); {t.name}'s channel ranges differ "
                           f"{t.channel_spread or 1:.1f}x under one grid: {cle}per-channel weights "
                           f"(config='default')"))
        elif weights:
            bw = 8 if min(w.bitwidth for w in weights) < 8 else 16
            advice.append(("bitwidth", f"its weights cost most ({split}): {bw}-bit weights for this layer "
                                       f"(mixed precision)"))
    if acts and not weights_worse:
        t = min(acts, key=lambda a: a.qdq_sqnr_db)
        if ("outlier", "activation") in codes:
            o = max((a for a in acts if a.outlier_ratio), key=lambda a: a.outlier_ratio)
            advice.append(("scheme", f"{o.name}'s range is set by rare outliers ({o.outlier_ratio:.0f}x the "
                                     f"99.99th percentile): calibrate with quant_scheme='tf_enhanced', "
                                     f"'percentile' or 'mse'"))
        bw = 8 if t.bitwidth < 8 else 16
        extra = ""
        if (t.channel_spread or 0) > limits["activation_channel_spread"] / 2 and group.kind == "weighted":
            extra = (f", or cross-layer equalization (refquant.ptq.equalize): its channel ranges differ "
                     f"{t.channel_spread:.0f}x")
        advice.append(("bitwidth", f"its output grid costs most ({split}): {bw}-bit activations on {t.name} "
                                   f"(mixed precision){extra}"))
    if not advice:
        advice.append(("exclude", "keep this layer in higher precision or exclude it from quantization"))
    return advice[0][0], "; ".join(text for _, text in advice)