"""The analysis report: numbers (``report.json``) and one self-contained HTML page (``report.html``).

The HTML page has no external resource: its plots are PNGs drawn with matplotlib's Agg canvas (the
object API, so no global backend is switched) and embedded as ``data:image/png;base64`` URIs, its style
is inline. Sections: summary (whole-model sensitivity), the top culprits with a suggested fix each,
the per-layer sensitivity chart, SQNR along the graph, every flag, then one plot per activation and per
weight (histogram with the encoding's range, per-channel ranges).

``report.json`` carries every number of the report (non-finite values as the strings "inf", "-inf",
"nan", so that the file is standard JSON).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_path


@dataclass
class TensorStats:
    """Statistics of one quantized tensor. ``sqnr_db``: the simulation against FP32 at this tensor
    (weights: the quantized weight against the float one); ``qdq_sqnr_db``: quantizing the FP32 tensor
    alone; ``p_low``/``p_high``: 0.01th/99.99th percentiles (weights: +-a robust top quantile of |w|);
    ``outlier_ratio``: max |x| over that bulk (per-channel grids: the worst channel's ratio);
    ``channel_spread``: widest over median channel range; histogram: ``hist_counts`` over
    ``[hist_lo, hist_hi]`` in equal bins."""

    name: str
    kind: str  # "activation", "weight" (a parameter) or "constant"
    group: str
    shape: list
    bitwidth: int
    symmetric: bool
    encoding_kind: str | None
    axis: int | None  # the encoding's per-channel axis (None: per tensor)
    enc_min: float | list | None
    enc_max: float | list | None
    sqnr_db: float
    qdq_sqnr_db: float
    min: float
    max: float
    p_low: float
    p_high: float
    outlier_ratio: float | None
    channel_axis: int | None
    channel_min: list | None
    channel_max: list | None
    dead_channels: int
    channel_spread: float | None
    hist_lo: float
    hist_hi: float
    hist_counts: list
    role: str | None = None
    tied_to: str | None = None
    bias_ratio: float | None = None  # max |b / (s_x s_w)| of the layer this weight belongs to
    channel_hist: list | None = None  # weights: per output channel, counts over [hist_lo, hist_hi] (64 bins)


@dataclass
class LayerSensitivity:
    """One quantizer group: the metric with only it quantized and with all but it quantized."""

    name: str
    kind: str
    index: int
    nodes: list
    op_types: list
    weights: list
    activations: list
    position: int
    macs: int
    parameters: int
    depthwise: bool
    only: float
    all_but: float
    only_outputs: dict | None = None
    all_but_outputs: dict | None = None
    flags: list = field(default_factory=list)
    rank: int = 0
    weights_alone_db: float | None = None  # SQNR at its weighted node's output, FP32 inputs, only its weights quantized
    output_alone_db: float | None = None  # SQNR of its output quantizer(s) alone on the FP32 tensor (worst one)


@dataclass
class Finding:
    code: str  # outlier, dead_channels, per_tensor_spread, activation_spread, bias_overflow
    severity: str
    tensor: str
    group: str
    value: float
    message: str


@dataclass
class Culprit:
    rank: int
    group: str
    only: float
    all_but: float
    flags: list
    fix: str  # exclude, per-channel, cle, scheme, bitwidth, bias
    advice: str


@dataclass
class AnalysisReport:
    """What :func:`refquant.analysis.analyze` found. Metrics are higher-is-better: ``quantized`` (all
    quantizers), ``weights_only``, ``activations_only``, ``fp32`` (inf for the default SQNR metric);
    ``layers`` in graph order, each with its ``rank`` (1 = most sensitive); ``culprits``: the top
    layers with a suggested fix."""

    model: str
    metric: str
    settings: dict
    fp32: float
    quantized: float
    weights_only: float
    activations_only: float
    outputs: dict | None
    layers: list[LayerSensitivity]
    tensors: dict[str, TensorStats]
    findings: list[Finding]
    culprits: list[Culprit]
    timings: dict

    def __post_init__(self):
        self._data = None

    # ------------------------------------------------------------------ views
    def ranked(self) -> list[LayerSensitivity]:
        """Layers, most sensitive first."""
        return sorted(self.layers, key=lambda layer: layer.rank)

    def sensitivity(self) -> dict[str, float]:
        """{group: metric with only that group quantized} (AIMET's per-layer sensitivity dict)."""
        return {layer.name: layer.only for layer in self.layers}

    def to_dict(self) -> dict:
        return _plain({
            "model": self.model, "metric": self.metric, "higher_is_better": True, "settings": self.settings,
            "whole_model": {"fp32": self.fp32, "quantized": self.quantized, "weights_only": self.weights_only,
                            "activations_only": self.activations_only, "outputs": self.outputs},
            "culprits": [asdict(c) for c in self.culprits],
            "layers": [asdict(layer) for layer in self.layers],
            "findings": [asdict(f) for f in self.findings],
            "tensors": {n: asdict(t) for n, t in self.tensors.items()},
            "timings": self.timings,
        })

    def format(self, top: int = 10) -> str:
        lines = [f"model {self.model}: metric {self.metric} (higher is better)",
                 f"  quantized {_num(self.quantized)}   weights only {_num(self.weights_only)}   "
                 f"activations only {_num(self.activations_only)}   fp32 {_num(self.fp32)}",
                 f"  {self.settings.get('evaluations')} evaluations on {self.settings.get('samples')} samples in "
                 f"{self.timings.get('total_s', 0):.1f} s",
                 f"{'#':>3}  {'layer':<40} {'only':>9} {'all but':>9}  fix"]
        for c in self.culprits[:top]:
            lines.append(f"{c.rank:>3}  {c.group[:40]:<40} {_num(c.only):>9} {_num(c.all_but):>9}  {c.fix}: "
                         f"{c.advice}")
        if self.findings:
            counts: dict[str, int] = {}
            for f in self.findings:
                counts[f.code] = counts.get(f.code, 0) + 1
            lines.append("flags: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def save(self, directory, plots: bool = True) -> dict[str, str]:
        """Write ``report.html`` (self-contained) and ``report.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / "report.json", "html": directory / "report.html"}
        with atomic_path(paths["json"]) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False))
            readable(tmp)
        with atomic_path(paths["html"]) as tmp:
            tmp.write_text(self.html(plots=plots), encoding="utf-8")
            readable(tmp)
        return {k: str(v) for k, v in paths.items()}

    def html(self, plots: bool = True) -> str:
        return _Html(self, plots).render()


# ------------------------------------------------------------------------------ helpers
def readable(path) -> None:
    """The permissions a plainly created file gets (atomic temp files are created 0600)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _plain(value):
    """JSON-ready: numpy scalars/arrays to Python, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return value


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def png_base64(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(values, cap: float | None = None) -> np.ndarray:
    a = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if cap is None:
        finite = a[np.isfinite(a)]
        cap = (finite.max() + 5.0) if finite.size else 100.0
    return np.where(np.isposinf(a), cap, np.where(np.isneginf(a), np.nan, a))


class _Html:
    def __init__(self, report: AnalysisReport, plots: bool):
        self.r = report
        self.plots = plots

    def img(self, fig, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_base64(fig)}">'

    def render(self) -> str:
        r = self.r
        esc = html.escape
        parts = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>refquant analysis: {esc(r.model)}</title>", f"<style>{_CSS}</style></head><body>",
            f"<h1>Quantization analysis: {esc(r.model)}</h1>",
            "<p>" + esc(", ".join(f"{k} = {v}" for k, v in r.settings.items() if k != "thresholds"))
            + f". Metric: <b>{esc(r.metric)}</b> (higher is better).</p>",
            "<h2>Summary</h2>", self.summary(),
            "<h2>Top culprits and suggested fixes</h2>", self.culprits(),
            "<h2>Per-layer sensitivity</h2>",
            "<p>For each quantizer group (a layer's weights and output, or an activation-only group) in graph "
            "order: the metric with <i>only</i> that group quantized (low = the group alone hurts) and with "
            "<i>all but</i> that group quantized (high = leaving it in float recovers much).</p>",
            self.layer_chart(), self.layer_table(),
            "<h2>SQNR along the graph</h2>", self.graph_chart(),
            "<h2>Flags</h2>", self.findings(),
            "<h2>Activations</h2>", self.tensor_sections("activation"),
            "<h2>Weights</h2>", self.tensor_sections("weight"),
            f"<p class=small>timings: {esc(', '.join(f'{k} {v:.1f}' for k, v in r.timings.items()))}</p>",
            "</body></html>",
        ]
        return "\n".join(parts)

    def summary(self) -> str:
        r = self.r
        rows = [("FP32", r.fp32), ("weights and activations quantized", r.quantized),
                ("weights only", r.weights_only), ("activations only", r.activations_only)]
        table = "<table><tr><th>configuration</th><th>metric</th></tr>" + "".join(
            f"<tr><td>{html.escape(name)}</td><td class=num>{_num(v)}</td></tr>" for name, v in rows) + "</table>"
        if r.outputs:
            table += "<p>per output (quantized): " + html.escape(
                ", ".join(f"{k} {_num(v)} dB" for k, v in r.outputs.items())) + "</p>"
        worse = "weights" if r.weights_only < r.activations_only else "activations"
        table += (f"<p>Quantizing the {worse} costs more ({_num(min(r.weights_only, r.activations_only))} vs "
                  f"{_num(max(r.weights_only, r.activations_only))}).</p>")
        if not self.plots:
            return table
        fig = figure(6.4, 2.2)
        ax = fig.add_subplot()
        labels = [name for name, _ in rows[1:]]
        values = _finite([v for _, v in rows[1:]])
        ax.barh(labels[::-1], values[::-1], color=["#4c72b0", "#dd8452", "#55a868"][::-1])
        ax.set_xlabel(r.metric)
        fig.tight_layout()
        return table + self.img(fig, "whole-model sensitivity")

    def culprits(self) -> str:
        rows = "".join(
            f"<tr><td class=num>{c.rank}</td><td>{html.escape(c.group)}</td><td class=num>{_num(c.only)}</td>"
            f"<td class=num>{_num(c.all_but)}</td><td>{html.escape(', '.join(c.flags))}</td>"
            f"<td><b>{html.escape(c.fix)}</b>: {html.escape(c.advice)}</td></tr>" for c in self.r.culprits)
        return ("<table><tr><th>rank</th><th>layer</th><th>only this quantized</th><th>all but this</th>"
                f"<th>flags</th><th>suggested fix</th></tr>{rows}</table>")

    def layer_chart(self) -> str:
        if not self.plots or not self.r.layers:
            return ""
        layers = self.r.layers
        n = len(layers)
        fig = figure(min(24.0, max(7.0, 0.22 * n)), 4.2)
        ax = fig.add_subplot()
        x = np.arange(n)
        ax.plot(x, _finite([layer.only for layer in layers]), "o-", label="only this layer quantized")
        ax.plot(x, _finite([layer.all_but for layer in layers]), "s-", label="all but this layer quantized")
        if math.isfinite(self.r.quantized):
            ax.axhline(self.r.quantized, color="gray", linestyle="--", label="all quantized")
        step = max(1, n // 60)
        ax.set_xticks(x[::step])
        ax.set_xticklabels([layers[i].name[-28:] for i in range(0, n, step)], rotation=90, fontsize=7)
        ax.set_ylabel(self.r.metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return self.img(fig, "per-layer sensitivity")

    def layer_table(self) -> str:
        rows = "".join(
            f"<tr><td class=num>{layer.rank}</td><td>{html.escape(layer.name)}</td>"
            f"<td>{html.escape('/'.join(dict.fromkeys(layer.op_types)))}</td><td class=num>{layer.macs:,}</td>"
            f"<td class=num>{_num(layer.only)}</td><td class=num>{_num(layer.all_but)}</td>"
            f"<td class=num>{_num(layer.weights_alone_db)}</td><td class=num>{_num(layer.output_alone_db)}</td>"
            f"<td>{html.escape(', '.join(layer.flags))}</td></tr>" for layer in self.r.layers)
        return ("<details><summary>table of all layers</summary><table><tr><th>rank</th><th>layer</th>"
                "<th>ops</th><th>MACs</th><th>only</th><th>all but</th><th>its weights alone (dB)</th>"
                "<th>its output grid alone (dB)</th><th>flags</th></tr>"
                f"{rows}</table></details>")

    def graph_chart(self) -> str:
        acts = [t for t in self.r.tensors.values() if t.kind == "activation"]
        if not self.plots or not acts:
            return ""
        fig = figure(min(24.0, max(7.0, 0.2 * len(acts))), 3.8)
        ax = fig.add_subplot()
        x = np.arange(len(acts))
        ax.plot(x, _finite([t.sqnr_db for t in acts], 120.0), "o-", label="simulation vs FP32 at this tensor")
        ax.plot(x, _finite([t.qdq_sqnr_db for t in acts], 120.0), "x:", label="this quantizer alone")
        step = max(1, len(acts) // 60)
        ax.set_xticks(x[::step])
        ax.set_xticklabels([acts[i].name[-28:] for i in range(0, len(acts), step)], rotation=90, fontsize=7)
        ax.set_ylabel("SQNR (dB)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return self.img(fig, "SQNR along the graph")

    def findings(self) -> str:
        if not self.r.findings:
            return "<p>none</p>"
        order = {"error": 0, "warning": 1, "info": 2}
        rows = "".join(
            f"<tr><td>{f.severity}</td><td>{html.escape(f.code)}</td><td>{html.escape(f.group)}</td>"
            f"<td>{html.escape(f.message)}</td></tr>"
            for f in sorted(self.r.findings, key=lambda f: (order.get(f.severity, 3), f.code)))
        return f"<table><tr><th>severity</th><th>flag</th><th>layer</th><th>what</th></tr>{rows}</table>"

    def tensor_sections(self, kind: str) -> str:
        chosen = [t for t in self.r.tensors.values()
                  if (t.kind == "activation") == (kind == "activation") and t.role != "bias"]
        parts = []
        flagged = {f.tensor for f in self.r.findings}
        serious = {f.tensor for f in self.r.findings if f.severity != "info"}
        for t in chosen:
            head = (f"{html.escape(t.name)} &mdash; {t.bitwidth}-bit{' per-channel' if t.axis is not None else ''}, "
                    f"range [{t.min:.4g}, {t.max:.4g}], SQNR {_num(t.sqnr_db)} dB"
                    + (f" <b>[{', '.join(sorted({f.code for f in self.r.findings if f.tensor == t.name}))}]</b>"
                       if t.name in flagged else ""))
            body = self.tensor_plot(t) if self.plots else ""
            parts.append(f"<details{' open' if t.name in serious else ''}><summary>{head}</summary>{body}</details>")
        return "\n".join(parts) or "<p>none</p>"

    def tensor_plot(self, t: TensorStats) -> str:
        panels = 3 if t.channel_hist is not None else 2
        fig = figure(4.8 * panels, 2.6)
        ax = fig.add_subplot(1, panels, 1)
        counts = np.asarray(t.hist_counts, dtype=np.float64)
        edges = np.linspace(t.hist_lo, t.hist_hi, len(counts) + 1)
        ax.stairs(np.where(counts > 0, counts, np.nan), edges, fill=True, color="#4c72b0")
        ax.set_yscale("log")
        if t.enc_min is not None:
            lo, hi = np.min(t.enc_min), np.max(t.enc_max)
            label = "encoding range" if t.axis is None else "envelope of channel encodings"
            ax.axvline(lo, color="red", linestyle="--", label=label)
            ax.axvline(hi, color="red", linestyle="--")
        ax.axvline(t.p_low, color="orange", linestyle=":", label="99.99th pct" if t.kind == "activation" else "bulk")
        ax.axvline(t.p_high, color="orange", linestyle=":")
        ax.set_title("histogram", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
        ax2 = fig.add_subplot(1, panels, 2)
        if t.channel_min is not None:
            c = np.arange(len(t.channel_min))
            ax2.vlines(c, t.channel_min, t.channel_max, color="#55a868", linewidth=1, label="channel min..max")
            if t.enc_min is not None and t.axis is not None:
                ax2.plot(c, t.enc_min, "r_", markersize=4, label="channel encoding")
                ax2.plot(c, t.enc_max, "r_", markersize=4)
            elif t.enc_min is not None:
                ax2.axhline(t.enc_min, color="red", linestyle="--", label="encoding range")
                ax2.axhline(t.enc_max, color="red", linestyle="--")
            ax2.set_xlabel(f"channel (axis {t.channel_axis})", fontsize=7)
            ax2.legend(fontsize=6)
        else:
            ax2.text(0.5, 0.5, "no channel axis", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title("per-channel ranges", fontsize=8)
        ax2.tick_params(labelsize=7)
        if t.channel_hist is not None:
            ax3 = fig.add_subplot(1, panels, 3)
            counts = np.log10(1.0 + np.asarray(t.channel_hist, dtype=np.float64))
            ax3.imshow(counts.T, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(-0.5, counts.shape[0] - 0.5, t.hist_lo, t.hist_hi))
            if t.enc_min is not None:
                c = np.arange(counts.shape[0])
                lo = np.broadcast_to(np.asarray(t.enc_min, dtype=np.float64), c.shape)
                hi = np.broadcast_to(np.asarray(t.enc_max, dtype=np.float64), c.shape)
                ax3.plot(c, lo, "r-", linewidth=0.8)
                ax3.plot(c, hi, "r-", linewidth=0.8)
            ax3.set_title("per-channel histograms (log counts), encoding in red", fontsize=8)
            ax3.set_xlabel(f"channel (axis {t.channel_axis})", fontsize=7)
            ax3.tick_params(labelsize=7)
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.17, top=0.9, wspace=0.22)  # tight_layout: 2x slower
        return self.img(fig, f"{t.name} statistics")


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; text-align: left; }
th { background: #eef; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
details { margin: 0.2em 0; }
summary { cursor: pointer; font-family: monospace; font-size: 0.9em; }
img { display: block; max-width: 100%; margin: 0.3em 0; }
.small { font-size: 0.8em; color: #666; }
"""
