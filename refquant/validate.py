"""Model validator: what in a model will go wrong when it is quantized, and what fixes it.

``validate(model, data=None) -> Report`` looks at a model (a :class:`refquant.Graph`, or a path /
bytes / ModelProto, which also lets it look at the ONNX file itself) and returns one
:class:`Finding` per problem: its severity, the nodes and tensors it concerns, what it is, why it
matters for quantization, the fix, and which ``refquant.prepare`` pass applies that fix (``fixed_by``).

The checks (codes in ``CATALOG``):

* ops: outside the registry, in a custom domain or a subgraph (no quantizers there), QDQ already present;
* weights: shared by several nodes, computed at run time from constants (QuantSim misses them or
  quantizes them per tensor), fed as a graph input, stored as ONNX Constant nodes, a bias kept as a
  separate Add, constants QuantSim leaves in float or quantizes like an activation, dead or very uneven
  output channels;
* encodings: a tensor tied by several Concats, a tensor used both as a weight and as data;
* BatchNormalization: foldable (prepare folds it) or not (and why);
* ranges: huge or infinite constants (attention masks), and with calibration data (``data``, read with
  ``refquant.data.iter_feeds``) activations that are huge, whose grid is set by a few outliers, with
  outlier channels, or with dead channels;
* residual streams: the tensors between a residual branch's last linear layer and the normalization that
  reads the sum (:func:`residual_streams`), where transformers keep their outlier channels; QuantSim gives
  them 16 bits by default;
* structure: unknown shapes and dtypes, dead nodes, unused initializers and inputs, missing or duplicate
  names, tensors read but never produced.

A Report holds findings (and, from ``prepare``, one :class:`PassRecord` per pass); it prints as a table
(``format()``) and serializes to JSON (``to_dict()``, ``write_json()``).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .ir import Graph, Node

SEVERITIES = ("error", "warning", "info")
HUGE = 65504.0  # float16's maximum: beyond it no 8/16-bit grid or FP16 target holds the value next to normal data
OUTLIER_CHANNEL_RATIO = 32.0  # a channel range this many times the median channel's: others get < 8 codes
CRUSHED_FRACTION = 0.5  # share of nonzero values within two grid steps of zero that flags a tensor
WEIGHT_SPREAD_RATIO = 100.0


# ------------------------------------------------------------------------------ report types
@dataclass
class Finding:
    """One problem: ``code`` (see CATALOG), ``severity`` (error/warning/info), ``message`` (what, with
    names and numbers), ``why`` (what it does to quantization), ``fix``, the ``nodes`` and ``tensors``
    it concerns, and ``fixed_by``: the prepare pass that fixes it ("save" for a problem of the ONNX file
    itself that refquant.save does not reproduce), or None."""

    code: str
    severity: str
    message: str
    why: str
    fix: str
    nodes: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    fixed_by: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _plain(asdict(self))


@dataclass
class PassRecord:
    """One prepare pass: ``status`` is "applied", "unchanged" (nothing to do) or "skipped" (it failed or
    changed the outputs: then a "pass-skipped" finding says why)."""

    name: str
    status: str
    changes: list[str]
    notes: list[str]
    max_rel_error: float | None
    seconds: float

    def to_dict(self) -> dict:
        return _plain(asdict(self))


@dataclass
class Report:
    """Findings (validate) and pass records (prepare) for one model."""

    model: str
    kind: str = "validate"
    findings: list[Finding] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def pass_record(self, name: str) -> PassRecord | None:
        return next((p for p in self.passes if p.name == name), None)

    def to_dict(self) -> dict:
        return {"model": self.model, "kind": self.kind, "stats": _plain(self.stats),
                "summary": {s: self.count(s) for s in SEVERITIES},
                "findings": [f.to_dict() for f in self.findings],
                "passes": [p.to_dict() for p in self.passes]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path) -> Path:
        from .fileio import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json() + "\n")
        return Path(path)

    def format(self, max_rows: int | None = 12, width: int = 60) -> str:
        """The report as text tables: passes (prepare), then findings grouped by code (at most
        ``max_rows`` rows per code, None for all), then why and fix once per code."""
        lines = [f"model: {self.model}"]
        if self.stats:
            lines.append("  " + "; ".join(f"{k}: {v}" for k, v in self.stats.items()))
        if self.passes:
            lines += ["", _table(["pass", "status", "changes", "max rel err", "time"],
                                 [[p.name, p.status, str(len(p.changes)),
                                   "-" if p.max_rel_error is None else f"{p.max_rel_error:.2e}", f"{p.seconds:.1f}s"]
                                  for p in self.passes])]
            for p in self.passes:
                shown = p.changes if max_rows is None else p.changes[:max_rows]
                if p.changes or p.notes:
                    lines.append(f"\n{p.name} ({p.status}):")
                lines += [f"  {line}" for line in shown]
                if len(p.changes) > len(shown):
                    lines.append(f"  ... and {len(p.changes) - len(shown)} more changes (--json for all)")
                notes = p.notes if max_rows is None else p.notes[:max_rows]
                lines += [f"  note: {line}" for line in notes]
                if len(p.notes) > len(notes):
                    lines.append(f"  ... and {len(p.notes) - len(notes)} more notes")
        counts = ", ".join(f"{self.count(s)} {s}{'s' if self.count(s) != 1 else ''}" for s in SEVERITIES)
        lines += ["", f"findings: {counts}"]
        if not self.findings:
            return "\n".join(lines)
        rows, order = [], sorted({f.code for f in self.findings},
                                 key=lambda c: (min(SEVERITIES.index(f.severity) for f in self.by_code(c)), c))
        for code in order:
            group = self.by_code(code)
            shown = group if max_rows is None else group[:max_rows]
            for f in shown:
                where = ", ".join(f.nodes[:2] + f.tensors[:2]) or "-"
                rows.append([f.severity, code, _cut(where, 40), f.fixed_by or "-", _cut(f.message, width * 3)])
            if len(group) > len(shown):
                rows.append(["", code, f"... {len(group) - len(shown)} more", "", "(--json lists all)"])
        lines.append(_table(["severity", "code", "where", "prepare", "problem"], rows))
        lines += ["", "why it matters / fix:"]
        for code in order:
            first = self.by_code(code)[0]
            lines.append(f"  {code}: {first.why}")
            lines.append(f"  {' ' * len(code)}  fix: {first.fix}")
        return "\n".join(lines)

    __str__ = format


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    widths[-1] = 0  # the last column is not padded
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * max(w, len(h)) for h, w in zip(header, widths)))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _plain(value):
    """JSON-safe copy: NumPy scalars and arrays to Python numbers and lists, inf/nan to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------------------ the catalogue
@dataclass(frozen=True)
class Check:
    severity: str
    why: str
    fix: str
    fixed_by: str | None = None


CATALOG: dict[str, Check] = {
    "unsupported-op": Check(
        "error", "refquant has no kernel for this op: the model cannot run, so it can be neither calibrated nor "
        "simulated", "replace the op in the exporter, or register a kernel in refquant/ops (one module entry)"),
    "custom-domain-op": Check(
        "warning", "QuantSim places no quantizer on the inputs, outputs or weights of ops outside the default "
        "ONNX domain: the op runs in float in the simulation but not on an integer target",
        "export the op with standard ONNX ops, or quantize around it knowingly"),
    "subgraph-op": Check(
        "warning", "QuantSim does not look into If/Loop bodies: what they compute stays float",
        "unroll or remove the control flow at export (fixed shapes, constant conditions)"),
    "qdq-weight": Check(
        "warning", "the weight is an int tensor behind DequantizeLinear: QuantSim sees a computed tensor, not a "
        "parameter, and quantizes it per tensor like an activation", "fold the DequantizeLinear into a float "
        "initializer (prepare: fold_weight_chains), or start from the float model", "fold_weight_chains"),
    "qdq-activation": Check(
        "warning", "the model is already quantized here: QuantSim would add its own grid on top of this one",
        "start from the float model (remove the QuantizeLinear/DequantizeLinear pairs)"),
    "computed-weight": Check(
        "warning", "the layer's parameter is computed at run time from constants: QuantSim recognises parameters "
        "only as initializers, so it leaves this one unquantized (behind Transpose/Reshape, which keep their "
        "input's grid) or gives it a per-tensor activation quantizer (behind Cast)",
        "fold the chain into one initializer (prepare: fold_weight_chains)", "fold_weight_chains"),
    "weight-is-input": Check(
        "warning", "a parameter that is a graph input is quantized like an activation (per tensor, from "
        "calibration data) and is not in the encodings as a parameter",
        "store it as an initializer in the model (it cannot be done without its values)"),
    "constant-node-weight": Check(
        "info", "the ONNX file stores this parameter as a Constant node: refquant turns it into an initializer at "
        "load, but tools that look for initializers (onnxruntime's quantizer, AIMET) do not see a parameter",
        "save the prepared model: refquant.save writes it as an initializer", "save"),
    "shared-weight": Check(
        "warning", "quantizers are keyed by tensor name, so a parameter read by several nodes gets one encoding for "
        "all of them (set by the first reader's role and axis), and per-layer rewrites (BN folding, CLE, "
        "AdaRound) would change it for every reader", "one copy per reader (prepare: split_shared_weights)",
        "split_shared_weights"),
    "mixed-use-tensor": Check(
        "warning", "the tensor is a layer's weight input and ordinary data elsewhere: a weight wants a per-channel "
        "symmetric grid, data a per-tensor asymmetric one, and QuantSim gives the tensor one",
        "compute the two uses from separate tensors in the model"),
    "tied-concat": Check(
        "warning", "Concat ties its inputs and output to one encoding; a tensor read by several Concats merges "
        "their groups, so all of these tensors share one range", "make sure their ranges are similar, or "
        "give one Concat a copy of the tensor through a requantizing op"),
    "bias-as-add": Check(
        "info", "the bias is a separate Add: QuantSim quantizes it as an 8-bit constant instead of a bias and puts "
        "an extra 8-bit activation quantizer between the product and the bias",
        "MatMul + Add -> Gemm for rank-2 inputs (prepare: fuse_matmul_add); for higher ranks it stays (a target "
        "usually fuses it)", "fuse_matmul_add"),
    "bn-foldable": Check(
        "info", "an unfolded BatchNormalization is quantized as its own op (an extra activation quantizer and "
        "quantized statistics); folded, its scale lives in the layer's weight encodings",
        "fold it (prepare: fold_batchnorm)", "fold_batchnorm"),
    "bn-not-foldable": Check(
        "warning", "this BatchNormalization has no layer to fold into: it stays a separate per-channel affine op "
        "with its own 8-bit output quantizer and quantized parameters", "move it next to a Conv/Gemm in the "
        "model, or accept one more quantization step (it can also be expressed as a depthwise 1x1 Conv)"),
    "huge-constant": Check(
        "warning", "an 8-bit grid spans min..max of a tensor: with a value like -3.4e38 beside normal data the "
        "step is ~1e36 and every normal value quantizes to 0 (onnxruntime picks a scale of 1.3e36 for "
        "paraphrase-MiniLM's mask)", "clamp it to a finite value that keeps the outputs (a mask before a "
        "Softmax: -1e4; prepare: clamp_mask_constants)", "clamp_mask_constants"),
    "foldable-constants": Check(
        "info", "the node computes a constant at every run; the runtime folds it, but QuantSim's placement "
        "and other tools see a computed tensor", "fold it into an initializer (prepare: fold_constants)",
        "fold_constants"),
    "duplicate-constants": Check(
        "info", "equal float constants stored several times: one quantizer each, all with the same encoding",
        "merge them (prepare: merge_duplicate_constants)", "merge_duplicate_constants"),
    "constant-chain": Check(
        "info", "two consecutive multiplications (or additions) by constants are two 8-bit roundings of the "
        "whole tensor where one would do", "fuse them (prepare: fuse_constant_chains)", "fuse_constant_chains"),
    "identity": Check(
        "info", "an Identity hides patterns (Conv -> Identity -> Relu is not a Conv+Relu supergroup) and adds a "
        "name between a layer and its readers", "remove it (prepare: remove_identity)", "remove_identity"),
    "unquantized-constant": Check(
        "info", "QuantSim places no quantizer on this float constant (it is read by a grid-preserving op such as "
        "Gather): it stays float in the simulation, an integer target must store it some other way",
        "nothing to do for the simulation; on a target, quantize the table separately"),
    "constant-as-activation": Check(
        "info", "this float tensor has no parameter role for its op, so QuantSim quantizes it per tensor like an "
        "activation rather than per channel like a weight", "express the op as Conv/Gemm/MatMul where it is a "
        "weight, or check its per-tensor error"),
    "dead-weight-channel": Check(
        "info", "output channels whose weights are all zero produce only the bias: harmless for the grid, but a "
        "sign of pruning or a broken export", "prune the channels (and the matching inputs of the next layer)"),
    "weight-channel-spread": Check(
        "info", "the output channels' ranges differ a lot: per-channel weight encodings (the default config) "
        "handle it, per-tensor ones (per_tensor config, many targets) crush the small channels",
        "keep per-channel weights, or equalize (refquant.ptq.cle)"),
    "huge-activation": Check(
        "warning", "the tensor reaches values no 8/16-bit grid can hold next to its normal values (or infinities): "
        "its quantizer's step is so large that the normal values all quantize to a few codes",
        "find the constant that causes it (often an attention mask; prepare: clamp_mask_constants), or keep "
        "this tensor in higher precision"),
    "outlier-dominated": Check(
        "warning", "a few large values set this tensor's min-max grid: most values fall within two steps of zero",
        "a range-search scheme (tf_enhanced, percentile, mse) for this tensor, or 16-bit activations here "
        "(QuantSim(..., prepare_data=D) does this: its outlier rule)"),
    "outlier-channel": Check(
        "warning", "one channel's range is far beyond the others': a per-tensor activation grid sized for it "
        "leaves the other channels a handful of codes", "cross-layer equalization (refquant.ptq.cle) for "
        "Conv/Gemm chains, 16-bit activations for this tensor (QuantSim(..., prepare_data=D) does this: its "
        "outlier rule), or a range-search scheme"),
    "residual-stream": Check(
        "info", "a transformer's residual stream carries a few channels 100-1000x the median one (at a few tokens, "
        "e.g. BERT's [CLS]/[SEP]; Bondarenko et al. 2021, Dettmers et al. 2022, Sun et al. 2024), which the "
        "normalization divides out per token: only the tensors from the branches' last linear layers to the "
        "normalization hold them. A per-tensor 8-bit grid sized for a channel r times the median one leaves the "
        "median channel about 256 / r codes (r = 200 in paraphrase-MiniLM's first FFN output: one code); a "
        "16-bit grid leaves it 65536 / r, 8 bits or more for r <= 256",
        "16-bit activations on these tensors: QuantSim does this by default, its residual-stream rule "
        "(sim.widened lists them; residual_rule=False or outlier_bw=None turns it off); prepare does not "
        "rewrite the graph for it. With calibration data, outlier-channel findings show which of them carry "
        "the outliers on that data"),
    "dead-channel": Check(
        "info", "channels that are zero on all calibration data: harmless for the grid, but their weights are "
        "wasted and per-channel encodings computed on them are degenerate", "prune them, or check the data"),
    "unknown-dtype": Check(
        "warning", "QuantSim places quantizers only on tensors it knows are float: this one gets none",
        "give the model's inputs types, or fix the op that stops type inference"),
    "unknown-shape": Check(
        "info", "shape inference stops here (a run-time shape): passes that need a rank (MatMul -> Gemm) and "
        "per-channel checks cannot see past it", "export with static input shapes where the model allows it"),
    "dead-node": Check(
        "info", "no graph output depends on this node: it gets quantizers and runs during calibration for nothing",
        "remove it (prepare: remove_dead_code)", "remove_dead_code"),
    "unused-initializer": Check(
        "info", "nothing reads this initializer: it bloats the model and the encodings",
        "remove it (prepare: remove_dead_code)", "remove_dead_code"),
    "unused-input": Check(
        "info", "nothing reads this graph input; calibration data must still provide it",
        "remove it from the model's interface at export"),
    "missing-name": Check(
        "info", "nodes without names: refquant names them <op>_<index> at load, but encodings and reports "
        "need stable names", "save the prepared model: it keeps refquant's names", "save"),
    "duplicate-name": Check(
        "warning", "several nodes share a name: refquant renames all but the first at load (appending '_'), "
        "so names in reports may differ from other tools'", "save the prepared model: names are unique there",
        "save"),
    "multiply-produced": Check(
        "error", "a tensor produced by several nodes is not valid ONNX: which value QuantSim sees is undefined",
        "fix the exporter"),
    "undefined-tensor": Check(
        "error", "a node reads (or the graph outputs) a tensor nothing produces: the model cannot run",
        "fix the exporter"),
    "runtime-skipped": Check(
        "info", "checks that run the model (constant folding, calibration statistics) were skipped",
        "make the model runnable (see the errors above)"),
    "pass-skipped": Check(
        "warning", "prepare applies a pass only when the FP32 outputs stay equal on the verification feeds",
        "run the pass alone (refquant.passes.apply) to see what it changes, or verify with other data"),
}


def make_finding(code: str, message: str, nodes=(), tensors=(), severity: str | None = None,
                 fixed_by: str | None = "default", **details) -> Finding:
    """A Finding with the catalogue's severity, why, fix and fixing pass for ``code``."""
    check = CATALOG[code]
    return Finding(code, severity or check.severity, message, check.why, check.fix, list(nodes), list(tensors),
                   check.fixed_by if fixed_by == "default" else fixed_by, details)


# ------------------------------------------------------------------------------ validate
def validate(model, data=None, *, batch_size: int = 8, max_batches: int = 8) -> Report:
    """Check ``model`` for problems that affect quantization (module docstring); returns a Report.

    ``model``: a Graph, or a path / bytes / onnx.ModelProto (loaded with unsupported ops allowed, so
    they can be reported; a model that cannot be loaded raises its load error). ``data``: calibration
    data for the range checks, read with ``refquant.data.iter_feeds(data, graph, batch_size)``, at most
    ``max_batches`` batches.
    """
    graph, proto, source = _open(model)
    ctx = _Context(graph, proto)
    report = Report(model=source)
    for check in (_check_proto, _check_ops, _check_names, _check_structure, _check_shapes, _check_weights,
                  _check_encodings, _check_batchnorm, _check_constants, _check_residual_streams):
        report.findings += check(ctx)
    if ctx.session is None:
        report.findings.append(make_finding("runtime-skipped", f"the model cannot run: {ctx.session_error}"))
    elif data is not None:
        findings, stats = _check_data(ctx, data, batch_size, max_batches)
        report.findings += findings
        report.stats.update(stats)
    report.findings.sort(key=lambda f: SEVERITIES.index(f.severity))  # stable: errors first, check order kept
    report.stats = {"nodes": len(graph.nodes), "initializers": len(graph.initializers), **report.stats}
    return report


def _open(model) -> tuple[Graph, Any, str]:
    """(graph, ONNX proto or None, name for the report); a model that cannot be loaded raises its load error."""
    import onnx

    from .onnx_io import load

    if isinstance(model, Graph):
        return model, None, model.name
    graph = load(model, allow_unsupported=True)
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = onnx.ModelProto.FromString(bytes(model))
    else:
        proto = onnx.load(str(model), load_external_data=False)
    return graph, proto, graph.model_info.get("source", graph.name)


class _Context:
    """What the checks share: the graph, its ONNX proto (if any), structure maps, the quantizer placement
    under the default config, and a Session for folded constants (None if the model cannot run)."""

    def __init__(self, graph: Graph, proto):
        from .quant.config import load_config
        from .quant.placement import place_quantizers

        self.graph, self.proto = graph, proto
        self.producers = graph.producers()
        self.consumers = graph.consumers()
        self.counts = graph.use_counts()
        self.specs = place_quantizers(graph, load_config("default"))
        self.session, self.session_error = None, ""
        try:
            from .runtime import Session

            self.session = Session(graph)
        except Exception as exc:
            self.session_error = f"{exc.__class__.__name__}: {' '.join(str(exc).split())}"
        self.constants = self.session.constants if self.session is not None else dict(graph.initializers)

    def is_folded(self, name: str) -> bool:
        return name in self.constants and name not in self.graph.initializers


# ------------------------------------------------------------------------------ the ONNX file
_CHAIN_OPS = {"Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "DequantizeLinear", "Flatten"}


def _check_proto(ctx: _Context) -> list[Finding]:
    """Constant-node parameters, unnamed and duplicate node names: visible only in the ONNX file."""
    from .quant.placement import PARAM_ROLES

    if ctx.proto is None:
        return []
    findings = []
    nodes = list(ctx.proto.graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    reported = set()
    for n in nodes:
        for index in PARAM_ROLES.get(n.op_type, {}) if n.domain in ("", "ai.onnx") else {}:
            name = n.input[index] if index < len(n.input) else ""
            source, hops = producer.get(name), 0
            while source is not None and source.op_type in _CHAIN_OPS and hops < 8:
                source, hops = producer.get(source.input[0]) if source.input else None, hops + 1
            if source is not None and source.op_type == "Constant" and name not in reported:
                reported.add(name)
                findings.append(make_finding(
                    "constant-node-weight", f"{n.op_type} {n.name or n.op_type!r} reads parameter {name!r} from "
                    f"a Constant node{' through ' + str(hops) + ' op(s)' if hops else ''}", [n.name], [name]))
    unnamed = [i for i, n in enumerate(nodes) if not n.name]
    if unnamed:
        names = [f"{nodes[i].op_type}_{i}" for i in unnamed]
        findings.append(make_finding("missing-name", f"{len(unnamed)} node(s) have no name; refquant calls them "
                                     f"{', '.join(names[:5])}{'...' if len(names) > 5 else ''}", names))
    for name, count in Counter(n.name for n in nodes if n.name).items():
        if count > 1:
            findings.append(make_finding("duplicate-name", f"{count} nodes are named {name!r}", [name]))
    return findings


# ------------------------------------------------------------------------------ ops
def _check_ops(ctx: _Context) -> list[Finding]:
    from .ops import lookup

    graph, findings = ctx.graph, []
    unsupported: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node in graph.walk():
        if lookup(node.op_type, node.domain, node.version) is None:
            unsupported[(node.domain, node.op_type)].append(node.name)
    for (domain, op), names in sorted(unsupported.items()):
        label = f"{domain}::{op}" if domain else op
        findings.append(make_finding("unsupported-op", f"op {label} ({len(names)} node(s)) is not in refquant's "
                                     f"registry at opset {graph.opset.get(domain, '?')}", names))
    for node in graph.nodes:
        if node.domain and (node.domain, node.op_type) not in unsupported:
            findings.append(make_finding("custom-domain-op", f"{node.domain}::{node.op_type} {node.name!r} is "
                                         "outside the default domain", [node.name], node.outputs))
        if any(True for _ in node.subgraphs()):
            inner = sum(len(g.nodes) for g in node.subgraphs())
            findings.append(make_finding("subgraph-op", f"{node.op_type} {node.name!r} has subgraphs with {inner} "
                                         "node(s)", [node.name], node.outputs))
        if node.op_type == "QuantizeLinear" and not node.domain and node.inputs[0] not in ctx.constants:
            findings.append(make_finding("qdq-activation", f"QuantizeLinear {node.name!r} quantizes activation "
                                         f"{node.inputs[0]!r}", [node.name], [node.inputs[0]]))
    return findings


# ------------------------------------------------------------------------------ names
def _check_names(ctx: _Context) -> list[Finding]:
    graph, findings = ctx.graph, []
    made: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        for out in node.outputs:
            if out:
                made[out].append(node.name)
    for name, nodes in made.items():
        if len(nodes) > 1 or name in graph.initializers or name in graph.input_names:
            findings.append(make_finding("multiply-produced", f"tensor {name!r} is produced by {len(nodes)} node(s)"
                                         f"{' and is also an initializer or input' if len(nodes) == 1 else ''}",
                                         nodes, [name]))
    defined = set(made) | set(graph.initializers) | set(graph.input_names)
    for node in graph.nodes:
        for name in node.present_inputs():
            if name not in defined:
                findings.append(make_finding("undefined-tensor", f"{node.op_type} {node.name!r} reads {name!r}, "
                                             "which nothing produces", [node.name], [name]))
    for name in graph.output_names:
        if name not in defined:
            findings.append(make_finding("undefined-tensor", f"graph output {name!r} is not produced", [], [name]))
    if ctx.proto is None:
        for name, count in Counter(n.name for n in graph.nodes).items():
            if not name:
                findings.append(make_finding("missing-name", f"{count} node(s) have no name", [], []))
            elif count > 1:
                findings.append(make_finding("duplicate-name", f"{count} nodes are named {name!r}", [name],
                                             fixed_by=None))
    return findings


def _check_structure(ctx: _Context) -> list[Finding]:
    """Dead nodes, unused initializers and inputs, Identity nodes."""
    from .passes.dead_code import live_nodes

    graph, findings = ctx.graph, []
    live = live_nodes(graph)
    for node in graph.nodes:
        if id(node) not in live:
            findings.append(make_finding("dead-node", f"{node.op_type} {node.name!r} does not reach any graph output",
                                         [node.name], [o for o in node.outputs if o]))
    for name, array in graph.initializers.items():
        if ctx.counts[name] == 0:
            findings.append(make_finding("unused-initializer", f"initializer {name!r} ({array.dtype}"
                                         f"{list(array.shape)}) is never read", [], [name]))
    for value in graph.inputs:
        if ctx.counts[value.name] == 0:
            findings.append(make_finding("unused-input", f"graph input {value.name!r} is never read", [], [value.name]))
    outputs = set(graph.output_names)
    for node in graph.nodes:
        if node.op_type == "Identity" and not node.domain and node.outputs[0] not in outputs:
            findings.append(make_finding("identity", f"Identity {node.name!r} copies {node.inputs[0]!r} to "
                                         f"{node.outputs[0]!r}", [node.name], node.outputs))
    return findings


def _check_shapes(ctx: _Context) -> list[Finding]:
    """Tensors of unknown dtype; nodes where shape inference stops (their inputs' shapes known, an output's not)."""
    graph, findings = ctx.graph, []
    known = lambda name: name in graph.values and graph.values[name].shape is not None  # noqa: E731
    lost = {o for n in graph.nodes for o in n.outputs if o and not known(o)}
    for node in graph.nodes:
        for out in node.outputs:
            value = graph.values.get(out)
            if out and (value is None or value.dtype is None):
                findings.append(make_finding("unknown-dtype", f"{node.op_type} {node.name!r}: output {out!r} has "
                                             "no known element type", [node.name], [out]))
        outs = [o for o in node.outputs if o and not known(o)]
        if outs and all(known(i) for i in node.present_inputs()):
            downstream = _downstream(ctx, outs[0]) & lost
            findings.append(make_finding("unknown-shape", f"{node.op_type} {node.name!r}: the shape of {outs[0]!r} "
                                         f"depends on run-time values; {len(downstream)} tensor(s) downstream have "
                                         "unknown shapes", [node.name], outs, downstream=len(downstream)))
    return findings


def _downstream(ctx: _Context, name: str) -> set[str]:
    seen, stack = {name}, [name]
    while stack:
        for node in ctx.consumers.get(stack.pop(), []):
            for out in node.outputs:
                if out and out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


# ------------------------------------------------------------------------------ weights
def _check_weights(ctx: _Context) -> list[Finding]:
    from .passes.common import param_uses
    from .quant.placement import PARAM_ROLES

    graph, findings = ctx.graph, []
    inputs = set(graph.input_names)
    for node in graph.nodes:
        if node.domain:
            continue
        for index, role in PARAM_ROLES.get(node.op_type, {}).items():
            name = node.inputs[index] if index < len(node.inputs) else ""
            if not name or name in graph.initializers:
                continue
            if name in inputs:
                findings.append(make_finding("weight-is-input", f"{node.op_type} {node.name!r}: {role} {name!r} "
                                             "is a graph input", [node.name], [name]))
            elif ctx.is_folded(name):
                chain = _folded_chain(ctx, name)
                code = "qdq-weight" if any(n.op_type == "DequantizeLinear" for n in chain) else "computed-weight"
                ops = " <- ".join(n.op_type for n in chain)
                findings.append(make_finding(code, f"{node.op_type} {node.name!r}: {role} {name!r} is computed at "
                                             f"run time ({ops} <- constants)", [node.name] + [n.name for n in chain],
                                             [name]))
    for name, uses in param_uses(graph).items():
        roles = {(n.op_type, role) for n, _, role in uses}
        if len(uses) > 1 and graph.initializers[name].dtype.kind == "f" and any(role for _, _, role in uses):
            readers = ", ".join(f"{n.op_type} {n.name!r}" + (f" ({role})" if role else "") for n, _, role in uses[:4])
            findings.append(make_finding("shared-weight", f"{name!r} is read by {len(uses)} nodes: {readers}"
                                         f"{'...' if len(uses) > 4 else ''}", [n.name for n, _, _ in uses], [name],
                                         roles=sorted(f"{a}:{b}" for a, b in roles)))
    findings += _check_weight_values(ctx)
    findings += _check_bias_adds(ctx)
    return findings


def _folded_chain(ctx: _Context, name: str) -> list[Node]:
    """The folded nodes that compute ``name`` from initializers, nearest first."""
    chain, stack, seen = [], [name], set()
    while stack:
        node = ctx.producers.get(stack.pop())
        if node is None or id(node) in seen or not ctx.is_folded(node.outputs[0]):
            continue
        seen.add(id(node))
        chain.append(node)
        stack.extend(node.present_inputs())
    return chain


def _check_weight_values(ctx: _Context) -> list[Finding]:
    """Dead and very uneven output channels of Conv/ConvTranspose/Gemm/MatMul weights."""
    from .quant.placement import weight_axis

    graph, findings, seen = ctx.graph, [], set()
    for node in graph.nodes:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain:
            continue
        name = node.inputs[1] if len(node.inputs) > 1 else ""
        weight = graph.initializers.get(name)
        if weight is None or weight.dtype.kind != "f" or weight.ndim < 2 or name in seen or weight.size == 0:
            continue
        seen.add(name)
        axis = weight_axis(node, weight.ndim)
        ranges = np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)).max(axis=1).astype(np.float64)
        dead = np.flatnonzero(ranges == 0)
        if dead.size:
            findings.append(make_finding("dead-weight-channel", f"{node.op_type} {node.name!r}: {dead.size} of "
                                         f"{ranges.size} output channels of {name!r} are all zero "
                                         f"(channels {dead[:8].tolist()}{'...' if dead.size > 8 else ''})",
                                         [node.name], [name], channels=dead.tolist()))
        alive = ranges[ranges > 0]
        if alive.size >= 4 and np.isfinite(alive).all():
            ratio = float(alive.max() / np.median(alive))
            if ratio > WEIGHT_SPREAD_RATIO:
                findings.append(make_finding("weight-channel-spread", f"{node.op_type} {node.name!r}: the widest "
                                             f"output channel of {name!r} spans {ratio:.0f}x the median channel",
                                             [node.name], [name], ratio=ratio))
    return findings


def _check_bias_adds(ctx: _Context) -> list[Finding]:
    graph, findings = ctx.graph, []
    for node in graph.nodes:
        if node.op_type not in ("MatMul", "Conv") or node.domain or len(node.inputs) < 2:
            continue
        if node.inputs[1] not in graph.initializers or len([i for i in node.inputs if i]) > 2:
            continue
        out = node.outputs[0]
        users = ctx.consumers.get(out, [])
        if ctx.counts[out] != 1 or len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = [i for i in add.inputs if i != out]
        if len(bias) != 1 or bias[0] not in graph.initializers or graph.initializers[bias[0]].dtype.kind != "f":
            continue
        rank = graph.values[node.inputs[0]].rank if node.inputs[0] in graph.values else None
        fixable = node.op_type == "MatMul" and rank == 2 and graph.initializers[node.inputs[1]].ndim == 2
        note = "" if fixable else (" (kept by prepare: Gemm needs a rank-2 input, this one has "
                                   f"{'unknown rank' if rank is None else f'rank {rank}'})"
                                   if node.op_type == "MatMul" else " (a Conv bias in an Add: no pass folds it yet)")
        findings.append(make_finding("bias-as-add", f"{node.op_type} {node.name!r} + Add {add.name!r}: bias "
                                     f"{bias[0]!r} is added separately{note}", [node.name, add.name],
                                     [bias[0], out], fixed_by="fuse_matmul_add" if fixable else None))
    return findings


# ------------------------------------------------------------------------------ encodings
def _check_encodings(ctx: _Context) -> list[Finding]:
    """Tensors tied by several Concats; tensors that are a layer's weight and data elsewhere."""
    from .quant.placement import GRID_PRESERVING

    graph, findings = ctx.graph, []
    concat_readers: dict[str, set[str]] = defaultdict(set)
    for node in graph.nodes:
        if node.op_type != "Concat" or node.domain:
            continue
        for name in node.present_inputs():
            source = name
            while source in ctx.producers and ctx.producers[source].op_type in GRID_PRESERVING:
                source = ctx.producers[source].inputs[0]
            if source not in graph.initializers:
                concat_readers[source].add(node.name)
    for name, concats in concat_readers.items():
        if len(concats) > 1 and name in ctx.specs:
            findings.append(make_finding("tied-concat", f"{name!r} feeds {len(concats)} Concats "
                                         f"({', '.join(sorted(concats)[:3])}): their inputs and outputs share one "
                                         "encoding", sorted(concats), [name]))
    for name, users in ctx.consumers.items():
        if name in ctx.constants:
            continue
        as_weight = [n for n in users if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.inputs) > 1
                     and n.inputs[1] == name]
        as_data = [n for n in users if n not in as_weight]
        if as_weight and as_data:
            findings.append(make_finding("mixed-use-tensor", f"{name!r} is the weight of {as_weight[0].op_type} "
                                         f"{as_weight[0].name!r} and data of {as_data[0].op_type} {as_data[0].name!r}",
                                         [n.name for n in as_weight + as_data], [name]))
    return findings


# ------------------------------------------------------------------------------ BatchNormalization
def _check_batchnorm(ctx: _Context) -> list[Finding]:
    graph = ctx.graph
    bns = [n for n in graph.nodes if n.op_type == "BatchNormalization" and not n.domain]
    if not bns:
        return []
    try:
        from .ptq.bn_fold import fold_batchnorms_info

        _, records = fold_batchnorms_info(graph, warn=False)
        folded = {r.bn: r for r in records}
    except Exception as exc:  # the fold itself is another module's: report, do not crash the validator
        return [make_finding("bn-not-foldable", f"BN folding cannot be evaluated: {exc}", [n.name for n in bns])]
    findings = []
    for bn in bns:
        if bn.name in folded:
            record = folded[bn.name]
            findings.append(make_finding("bn-foldable", f"BatchNormalization {bn.name!r} folds into "
                                         f"{record.layer!r} ({record.position} it)", [bn.name, record.layer],
                                         [bn.outputs[0]]))
        else:
            findings.append(make_finding("bn-not-foldable", f"BatchNormalization {bn.name!r}: {_bn_reason(ctx, bn)}",
                                         [bn.name], [bn.inputs[0]]))
    return findings


def _bn_reason(ctx: _Context, bn: Node) -> str:
    graph = ctx.graph
    if bn.attrs.get("training_mode") or any(bn.outputs[1:]):
        return "it runs in training mode"
    if not all(n in graph.initializers for n in bn.inputs[1:5]):
        return "its statistics are not constant"
    source = ctx.producers.get(bn.inputs[0])
    layers = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    if source is None:
        after = "it reads a graph input"
    elif source.op_type not in layers:
        after = f"it follows a {source.op_type} ({source.name!r}), not a Conv/ConvTranspose/Gemm/MatMul"
    elif ctx.counts[bn.inputs[0]] > 1:
        after = f"{source.op_type} {source.name!r}'s output has other readers or is a graph output"
    elif source.inputs[1] not in graph.initializers:
        after = f"{source.op_type} {source.name!r} has no constant weight"
    else:
        after = f"{source.op_type} {source.name!r} does not fold (a MatMul needs rank 2, channels must match)"
    readers = ctx.consumers.get(bn.outputs[0], [])
    if len(readers) == 1 and readers[0].op_type in layers:
        before = (f"and the following {readers[0].op_type} {readers[0].name!r} cannot take it either "
                  "(a padded Conv, a ConvTranspose, or not its only reader)")
    else:
        before = "and it does not feed a single layer it could fold into"
    return f"{after}, {before}"


# ------------------------------------------------------------------------------ constants
def _check_constants(ctx: _Context) -> list[Finding]:
    from .passes.clamp_mask import huge_constants, reaches_softmax
    from .passes.constant_chains import _FAMILY, _split
    from .quant.placement import CONSTANT_INPUTS_IGNORED, GRID_PRESERVING, PARAM_ROLES

    graph, findings = ctx.graph, []
    for name, node in huge_constants(graph, HUGE):
        array = graph.initializers[name] if node is None else node.attrs["value"]
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        low = min(float(values.min()), 0.0) if not np.isnan(values).all() else 0.0
        high = max(float(values.max()), 0.0) if not np.isnan(values).all() else 0.0
        scale = (high - low) / 255
        softmax = reaches_softmax(graph, name)
        where = f"{'ConstantOfShape ' + repr(node.name) + ' value' if node is not None else 'constant ' + repr(name)}"
        extreme = "inf" if finite.size < values.size else f"{float(np.abs(finite).max()):.3g}"
        target = f"; it reaches Softmax {softmax!r}" if softmax else "; it does not reach a Softmax"
        readers = [n.name for n in ctx.consumers.get(name, [])]
        findings.append(make_finding("huge-constant", f"{where} holds |x| up to {extreme}{target}; a min-max "
                                     f"8-bit grid over it has a step of {scale:.3g}", readers, [name],
                                     fixed_by="clamp_mask_constants" if softmax else None, scale=scale))
    outputs = set(graph.output_names)
    for node in graph.nodes:
        if not node.outputs or not all(ctx.is_folded(o) for o in node.outputs if o):
            continue
        if any(o in outputs for o in node.outputs):
            continue
        readers = {r.op_type for o in node.outputs for r in ctx.consumers.get(o, [])}
        if readers and all(r in PARAM_ROLES for r in readers):
            continue  # reported as computed-weight
        findings.append(make_finding("foldable-constants", f"{node.op_type} {node.name!r} computes a constant "
                                     f"({', '.join(repr(o) for o in node.outputs if o)})", [node.name],
                                     [o for o in node.outputs if o]))
    groups: dict[tuple, list[str]] = defaultdict(list)
    from .passes.common import param_uses

    uses = param_uses(graph)
    for name, array in graph.initializers.items():
        if array.dtype.kind == "f" and name in uses and not any(role for _, _, role in uses[name]) \
                and name not in outputs:
            groups[(array.dtype.str, array.shape, array.tobytes())].append(name)
    for names in groups.values():
        if len(names) > 1:
            findings.append(make_finding("duplicate-constants", f"{len(names)} equal constants: "
                                         f"{', '.join(repr(n) for n in names[:4])}{'...' if len(names) > 4 else ''}",
                                         [], names))
    for first in graph.nodes:
        split = _split(graph, first)
        out = first.outputs[0] if first.outputs else ""
        users = ctx.consumers.get(out, [])
        if split is None or ctx.counts[out] != 1 or len(users) != 1:
            continue
        second = users[0]
        if _FAMILY.get(second.op_type) == _FAMILY[first.op_type] and _split(graph, second, var=out) is not None:
            findings.append(make_finding("constant-chain", f"{first.op_type} {first.name!r} -> {second.op_type} "
                                         f"{second.name!r}: two {_FAMILY[first.op_type]}s by constants",
                                         [first.name, second.name], [out]))
    for name, array in graph.initializers.items():
        if array.dtype.kind != "f" or array.size < 16 or name in ctx.specs:
            continue
        readers = ctx.consumers.get(name, [])
        if readers and all(r.op_type in GRID_PRESERVING and not ctx.is_folded(r.outputs[0]) for r in readers):
            findings.append(make_finding("unquantized-constant", f"{name!r} ({array.dtype}{list(array.shape)}) is "
                                         f"read only by {', '.join(sorted({r.op_type for r in readers}))}: "
                                         "no quantizer", [r.name for r in readers], [name]))
    for name, spec in ctx.specs.items():
        array = graph.initializers.get(name)
        if (array is not None and spec.kind == "activation" and array.ndim >= 2 and array.size >= 16
                and spec.op_type not in CONSTANT_INPUTS_IGNORED):
            readers = [r for r in ctx.consumers.get(name, [])]
            findings.append(make_finding("constant-as-activation", f"{name!r} ({array.dtype}{list(array.shape)}) "
                                         f"is an input of {spec.op_type} without a parameter role",
                                         [r.name for r in readers], [name]))
    return findings


# ------------------------------------------------------------------------------ residual streams
NORMALIZATIONS = {"LayerNormalization"}  # and the decomposed form: Sub(x, ReduceMean(x)), see residual_streams
_BRANCH_LAYERS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}  # where a residual branch's output is computed
_CONSTANT_AFFINE = {"Add", "Sub", "Mul", "Div"}  # with one constant operand: a bias or a layer scale
_MOVES = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"}  # no quantizer


@dataclass
class ResidualStream:
    """A normalization that reads a residual sum: ``norm`` (node name(s), for the report), ``input`` (the
    sum it normalizes) and ``tensors``: every tensor from the branches' last linear layers to ``input``."""

    norm: str
    input: str
    tensors: list[str]


def residual_streams(graph: Graph) -> list[ResidualStream]:
    """The residual streams of ``graph`` that end in a normalization, in graph order.

    A normalization is a LayerNormalization node, or the decomposed form an opset < 17 export writes: a
    tensor ``x`` read by ``m = ReduceMean(x)`` and by ``Sub(x, m)``. It reads a residual stream when its input
    is an ``Add`` of two computed (non-constant) tensors. From that sum the walk goes up through
    * further sums of two computed tensors (the residual stream of a pre-LN transformer, embedding sums),
    * Add/Sub/Mul/Div with one constant operand (a bias kept as an Add, a layer scale),
    * data movement (Reshape, Transpose... which have no quantizer of their own),
    and stops at a MatMul/Gemm/Conv output (the branch's last linear layer, included) or at anything else
    (a normalization's output, an activation, a graph input: not included). The tensors returned are the
    sums, the affine outputs with their constant operands (bias, layer scale) and the linear outputs met on
    the way, in graph order; data-movement outputs are not listed.
    Conv nets without a normalization over a residual sum have none.
    """
    producers = graph.producers()
    consumers = graph.consumers()
    order = {n.outputs[0]: i for i, n in enumerate(graph.nodes) if n.outputs}
    found: list[tuple[str, str]] = []  # (normalization description, its input)
    for node in graph.nodes:
        if node.domain:
            continue
        if node.op_type in NORMALIZATIONS and node.inputs:
            found.append((f"{node.op_type} {node.name!r}", node.inputs[0]))
        elif node.op_type == "ReduceMean" and node.inputs:
            x, mean = node.inputs[0], node.outputs[0]
            subs = [s for s in consumers.get(mean, []) if s.op_type == "Sub" and s.inputs[:2] == [x, mean]]
            if subs:
                found.append((f"mean-centering ReduceMean {node.name!r} -> Sub {subs[0].name!r}", x))

    inputs = set(graph.input_names)

    def computed(name: str) -> bool:
        return bool(name) and name not in graph.initializers and (name in producers or name in inputs)

    def is_sum(node) -> bool:
        return (node is not None and node.op_type == "Add" and not node.domain and len(node.inputs) == 2
                and all(computed(i) for i in node.inputs))

    first_read: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.inputs:
            first_read.setdefault(name, index)

    def position(name: str) -> tuple[int, int]:  # graph order; a constant just before the node reading it
        return (order[name], 1) if name in order else (first_read.get(name, -1), 0)

    streams, done = [], set()
    for norm, x in found:
        if x in done or not is_sum(producers.get(x)):
            continue
        done.add(x)
        tensors, seen, stack = [], set(), [x]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = producers.get(name)
            if node is None or node.domain:
                continue
            if is_sum(node):
                tensors.append(name)
                stack += node.inputs
            elif node.op_type in _CONSTANT_AFFINE and len(node.inputs) == 2 and \
                    sum(i in graph.initializers for i in node.inputs) == 1:
                # the constant too: a bias or layer scale holds the outlier channel's offset or gain as
                # often as the product does, and its 8-bit per-tensor grid would crush the other entries
                tensors += [name] + [i for i in node.inputs if i in graph.initializers]
                stack += [i for i in node.inputs if computed(i)]
            elif node.op_type in _MOVES and node.inputs and computed(node.inputs[0]):
                stack.append(node.inputs[0])
            elif node.op_type in _BRANCH_LAYERS:
                tensors.append(name)
        streams.append(ResidualStream(norm, x, sorted(dict.fromkeys(tensors), key=position)))
    return streams


def _check_residual_streams(ctx: _Context) -> list[Finding]:
    findings = []
    for stream in residual_streams(ctx.graph):
        shown = ", ".join(repr(t) for t in stream.tensors[:4]) + ("..." if len(stream.tensors) > 4 else "")
        node = ctx.producers.get(stream.input)
        findings.append(make_finding("residual-stream", f"{stream.norm} normalizes the residual sum "
                                     f"{stream.input!r}: {len(stream.tensors)} tensor(s) from the branches' "
                                     f"last linear layers to it ({shown})", [node.name] if node else [],
                                     stream.tensors))
    return findings


# ------------------------------------------------------------------------------ calibration data
class _Stats:
    """Running statistics of one tensor over the calibration batches (per tensor and per channel)."""

    SAMPLE = 1024

    def __init__(self):
        self.low, self.high, self.nonfinite, self.count = np.inf, -np.inf, 0, 0
        self.channel_low = self.channel_high = None
        self.channel_ok = True
        self.samples: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> None:
        a = np.asarray(array)
        self.count += a.size
        if a.size == 0:
            return
        finite = np.isfinite(a)
        if not finite.all():
            self.nonfinite += int(a.size - finite.sum())
            self.channel_ok = False
        values = a[finite] if not finite.all() else a
        if values.size:
            self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        flat = a.reshape(-1)
        step = max(1, flat.size // self.SAMPLE)
        self.samples.append(np.asarray(flat[::step][: self.SAMPLE], np.float64))
        if self.channel_ok and a.ndim >= 2:
            axis = 1 if a.ndim >= 4 else a.ndim - 1
            per = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
            low, high = per.min(axis=1).astype(np.float64), per.max(axis=1).astype(np.float64)
            if self.channel_low is None:
                self.channel_low, self.channel_high = low, high
            elif self.channel_low.shape == low.shape:
                self.channel_low = np.minimum(self.channel_low, low)
                self.channel_high = np.maximum(self.channel_high, high)
            else:
                self.channel_ok = False

    def sample(self) -> np.ndarray:
        values = np.concatenate(self.samples) if self.samples else np.zeros(0)
        return values[np.isfinite(values)]


def _check_data(ctx: _Context, data, batch_size: int, max_batches: int) -> tuple[list[Finding], dict]:
    """Run the model on calibration batches and look at the range of every tensor QuantSim quantizes."""
    from .data import iter_feeds
    from .passes.clamp_mask import huge_constants, reaches_softmax

    graph = ctx.graph
    watched = {name for name, spec in ctx.specs.items()
               if spec.kind == "activation" and spec.enabled and name not in graph.initializers}
    stats: dict[str, _Stats] = {}

    def observe(name, array, node):
        if name in watched and getattr(array, "dtype", None) is not None and array.dtype.kind == "f":
            stats.setdefault(name, _Stats()).add(array)

    batches = 0
    for feeds in islice(iter_feeds(data, graph, batch_size=batch_size), max_batches):
        ctx.session.run(feeds, hooks=[observe])  # hooks see every tensor computed for the outputs
        batches += 1
    masked = set()  # tensors downstream of a huge constant that prepare clamps
    for name, node in huge_constants(graph, HUGE):
        if reaches_softmax(graph, name):
            masked |= _downstream(ctx, name)
    findings = []
    for name, s in stats.items():
        node = ctx.producers.get(name)
        nodes = [node.name] if node is not None else []
        if s.low > s.high:  # no finite value at all
            s.low = s.high = 0.0
        low, high = min(s.low, 0.0), max(s.high, 0.0)
        if s.nonfinite or max(abs(low), abs(high)) > HUGE:
            what = f"{s.nonfinite} non-finite value(s)" if s.nonfinite else f"range [{s.low:.3g}, {s.high:.3g}]"
            findings.append(make_finding("huge-activation", f"{name!r}: {what} on the calibration data; an 8-bit "
                                         f"grid step of {(high - low) / 255:.3g}", nodes, [name],
                                         fixed_by="clamp_mask_constants" if name in masked else None,
                                         low=s.low, high=s.high, nonfinite=s.nonfinite))
            continue
        step = (high - low) / 255
        sample = s.sample()
        nonzero = sample[sample != 0]
        if step > 0 and nonzero.size >= 64:
            crushed = float(np.mean(np.abs(nonzero) < 2 * step))
            if crushed > CRUSHED_FRACTION:
                findings.append(make_finding("outlier-dominated", f"{name!r}: range [{s.low:.3g}, {s.high:.3g}], "
                                             f"step {step:.3g}; {crushed:.0%} of the nonzero values are within two "
                                             "steps of zero", nodes, [name], crushed=crushed, step=step))
        # a Softmax's last axis holds classes or positions, not channels
        if s.channel_ok and s.channel_low is not None and s.channel_low.size >= 8 and \
                (node is None or node.op_type not in ("Softmax", "LogSoftmax")):
            ranges = np.maximum(np.abs(s.channel_low), np.abs(s.channel_high))
            dead = np.flatnonzero(ranges == 0)
            alive = ranges[ranges > 0]
            if dead.size:
                findings.append(make_finding("dead-channel", f"{name!r}: {dead.size} of {ranges.size} channels are "
                                             f"zero on all calibration data (channels {dead[:8].tolist()}"
                                             f"{'...' if dead.size > 8 else ''})", nodes, [name],
                                             channels=dead.tolist()))
            if alive.size >= 8:
                median = float(np.median(alive))
                ratio = float(alive.max() / median) if median > 0 else float("inf")
                if ratio > OUTLIER_CHANNEL_RATIO:
                    top = np.argsort(ranges)[::-1][:3].tolist()
                    findings.append(make_finding("outlier-channel", f"{name!r}: channel(s) {top} span up to "
                                                 f"{ratio:.0f}x the median channel's range ({median:.3g})", nodes,
                                                 [name], channels=top, ratio=ratio))
    return findings, {"calibration_batches": batches, "tensors_observed": len(stats)}

