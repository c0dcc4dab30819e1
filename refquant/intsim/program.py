"""IntSim: a calibrated QuantSim run as an integer program, bit-exact with onnxruntime's integer operators.

    isim = IntSim(sim, requant="ort")          # lower once (refquant.intsim.lowering)
    isim.run(feeds)                            # outputs dequantized to float
    isim.run(feeds, codes=True)                # the integer codes of the quantized outputs
    isim.export("model_int.onnx")              # the same program as a QOperator ONNX model
    print(isim.summary())                      # what every node became, and the float fallbacks
    print(qdq_gap(sim, isim, feeds))           # how far the QDQ simulation is from the integer program

``run`` executes the program's Graph with refquant's Session, whose QLinear* kernels reproduce onnxruntime's
(:mod:`refquant.ops.qoperators`); ``export`` writes that very Graph, so what onnxruntime runs is what ran here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..errors import OpError, RefquantError
from ..onnx_io import save, to_onnx
from ..runtime import Session
from .lowering import Program, QTensor, lower
from .overflow import OverflowReport, overflow_report, raise_for_layer
from .requant import int32_wraparound


class IntSim:
    """The integer program of a calibrated :class:`refquant.quant.QuantSim`.

    ``IntSim(sim, requant="ort", float_fallback=False, threads=None)``: ``requant`` is a scheme of
    :mod:`refquant.intsim.requant` for Conv / Gemm / MatMul ("ort": onnxruntime's QLinearConv, QGemm,
    QLinearMatMul; other schemes run in refquant only); ``float_fallback`` runs the nodes the integer program
    cannot express in float between DequantizeLinear and QuantizeLinear instead of raising
    :class:`refquant.intsim.lowering.LoweringError`; ``overflow``: an int32 accumulator that leaves int32 is an
    :class:`~refquant.intsim.overflow.AccumulatorOverflowError` naming the layer ("error"), or wraps around modulo
    2^32 with a RuntimeWarning ("wrap": the profile of a target whose int32 adds wrap, as onnxruntime's do).
    Encodings are read once: lower again (a new IntSim) after changing the simulation.
    """

    def __init__(self, sim, requant="ort", float_fallback: bool = False, threads: int | None = None,
                 kernels: str = "fast", overflow: str = "error"):
        if kernels not in ("fast", "reference"):
            raise RefquantError(f"IntSim: kernels={kernels!r}: choose 'fast' or 'reference'")
        if overflow not in ("error", "wrap"):
            raise RefquantError(f"IntSim: overflow={overflow!r}: choose 'error' (an int32 accumulator that "
                                "overflows is an AccumulatorOverflowError) or 'wrap' (the target wraps around)")
        self.overflow = overflow
        sim._require_encodings("IntSim")
        self.sim = sim
        self.requant = requant
        self.float_fallback = float_fallback
        self.kernels = kernels
        self.program: Program = lower(sim, requant=requant, float_fallback=float_fallback)
        self.graph = self.program.graph
        self.session = Session(_run_graph(self.graph, kernels), threads=threads)

    # ------------------------------------------------------------------------------------------ running
    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    @property
    def fallbacks(self) -> list[str]:
        """Names of the nodes that run in float."""
        return [entry.node for entry in self.program.fallbacks]

    def run(self, feeds: Mapping[str, np.ndarray], codes: bool = False,
            outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Run the integer program. ``codes=False``: the outputs dequantized to float (as the exported model's
        outputs); ``codes=True``: the integer codes (uint8/uint16) of every quantized output (an output the
        simulation leaves unquantized is returned as it is, in float)."""
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise RefquantError(f"IntSim.run: {unknown} are not outputs of the model ({self.output_names}); "
                                "use tensor_codes() for intermediate tensors")
        if not codes:
            return self._session_run(feeds, names)
        wanted = [self.program.codes.get(n, n) for n in names]
        result = self._session_run(feeds, wanted)
        return {n: result[w] for n, w in zip(names, wanted)}

    def _session_run(self, feeds, outputs):
        """Session.run; an int32 accumulator overflow becomes an AccumulatorOverflowError naming the layer, or
        with overflow="wrap" wraps around modulo 2^32 (as onnxruntime's int32 adds do) and is warned about."""
        try:
            if self.overflow == "error":
                return self.session.run(feeds, outputs=outputs)
            with int32_wraparound() as wrapped:
                result = self.session.run(feeds, outputs=outputs)
        except OpError as exc:
            raise_for_layer(self, exc)  # re-raises any other error as it is
        if wrapped.events:
            where = sorted({w for w, _, _ in wrapped.events})
            warnings.warn(f"IntSim: int32 accumulators wrapped around (overflow='wrap') in {len(wrapped.events)} "
                          f"op run(s) ({', '.join(where)}); isim.overflow_report(feeds) names the layers",
                          RuntimeWarning, stacklevel=3)
        return result

    def overflow_report(self, feeds=None) -> OverflowReport:
        """Per accumulating layer: the worst-case int32 accumulator bound and (given ``feeds``) the exact range
        on them (:mod:`refquant.intsim.overflow`)."""
        return overflow_report(self, feeds)

    def tensor_codes(self, feeds: Mapping[str, np.ndarray], names: Iterable[str] | None = None
                     ) -> dict[str, np.ndarray]:
        """Codes of original tensors (default: every tensor the program holds as codes), keyed by the
        simulated graph's tensor names."""
        names = list(names) if names is not None else list(self.program.tensors)
        missing = [n for n in names if n not in self.program.tensors]
        if missing:
            raise RefquantError(f"IntSim: {missing[:5]} are not held as integer codes by the program")
        wanted = [self.program.tensors[n].name for n in names]
        result = self._session_run(feeds, list(dict.fromkeys(wanted)))
        return {n: result[w] for n, w in zip(names, wanted)}

    def grid(self, name: str) -> QTensor:
        """(codes tensor, scale, zero point, dtype) of an original tensor held as codes."""
        return self.program.tensors[name]

    # ------------------------------------------------------------------------------------------ export
    def to_onnx(self):
        """The program as an ONNX ModelProto (QuantizeLinear, QLinearConv, com.microsoft QGemm..., DequantizeLinear)."""
        return to_onnx(self.graph, self.graph.opset)

    def export(self, path, overwrite: bool = False, unsigned_weights: bool = False) -> Path:
        """Write the program as a QOperator ONNX model (atomically). With a requant scheme other than "ort" the
        model holds com.refquant Requantize nodes, which only refquant runs. ``unsigned_weights``: int8 weights
        stored as uint8, ``w + 128`` with zero point ``z + 128`` (the same program), which onnxruntime runs
        exactly on x86 CPUs without VNNI too (:mod:`refquant.intsim.unsigned_weights`)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise RefquantError(f"{path} exists; pass overwrite=True to replace it")
        try:
            from .unsigned_weights import unsigned_weights as to_unsigned

            rewrite = (lambda model: to_unsigned(model)[0]) if unsigned_weights else None
            return save(self.graph, path, opset=self.graph.opset, overwrite=True, rewrite=rewrite)
        except OSError as exc:
            raise RefquantError(f"cannot write {path}: {exc.strerror or exc}") from None

    # ------------------------------------------------------------------------------------------ report
    def summary(self) -> str:
        prog = self.program
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            key = f"{node.domain + '.' if node.domain else ''}{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
        lines = [f"IntSim of {self.sim.graph.name!r}: requant={prog.scheme}, "
                 f"{len(self.graph.nodes)} program nodes from {len(prog.lowered)} simulated nodes"
                 + ("" if prog.runs_in_onnxruntime else " (com.refquant ops: runs in refquant only)"),
                 "program ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
                 f"{'node':<52} {'op':<18} {'mode':<8} integer ops"]
        for entry in prog.lowered:
            note = f"  ({entry.note})" if entry.note else ""
            lines.append(f"{entry.node[-52:]:<52} {entry.op_type:<18} {entry.mode:<8} "
                         f"{' + '.join(entry.ops) or '-'}{note}")
        risky = [layer.node for layer in overflow_report(self).layers if layer.can_overflow]
        lines.append("int32 accumulators: " + (f"{len(risky)} layers can exceed int32 for some inputs (each run checks "
                                                f"them; isim.overflow_report(feeds)): {', '.join(risky[:8])}"
                                                + (" ..." if len(risky) > 8 else "") if risky
                                                else "no layer can exceed int32 for any input"))
        if prog.fallbacks:
            lines.append(f"float fallback ({len(prog.fallbacks)} nodes run in float between DequantizeLinear "
                         "and QuantizeLinear):")
            for entry in prog.fallbacks:
                lines.append(f"  {entry.node} ({entry.op_type}): {entry.note}")
        else:
            lines.append("float fallback: none")
        lines.append("outputs: " + ", ".join(
            f"{name} <- codes {prog.codes[name]!r}" if name in prog.codes else f"{name} (float)"
            for name in self.output_names))
        return "\n".join(lines)


def _run_graph(graph, kernels: str):
    """The graph Session runs: the program itself, or (kernels="fast") the same nodes with QLinearConv bound to
    the fused kernel of :mod:`refquant.intsim.fastops` (bit-identical to the reference QLinearConv)."""
    if kernels == "reference":
        return graph
    from ..ir import Graph, Node
    from .fastops import FAST_DOMAIN

    nodes = [Node(n.op_type, n.inputs, n.outputs, n.attrs, n.name, FAST_DOMAIN, 1)
             if n.op_type == "QLinearConv" and n.domain == "" else n for n in graph.nodes]
    return Graph(nodes=nodes, inputs=graph.inputs, outputs=graph.outputs, initializers=graph.initializers,
                 values=graph.values, opset=dict(graph.opset, **{FAST_DOMAIN: 1}), name=graph.name)


# ---------------------------------------------------------------------------------------------- QDQ gap
def sqnr(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class LayerGap:
    tensor: str
    size: int = 0
    differ: int = 0
    max_steps: int = 0
    steps: dict = field(default_factory=dict)  # |difference in codes| -> count (1, 2, 3+)

    @property
    def fraction_identical(self) -> float:
        return 1.0 - self.differ / self.size if self.size else 1.0


@dataclass
class OutputGap:
    name: str
    identical: float  # fraction of values where the integer program equals the QDQ simulation
    sqnr_int_vs_sim: float
    sqnr_int_vs_fp32: float
    sqnr_sim_vs_fp32: float


@dataclass
class GapReport:
    layers: list[LayerGap]
    outputs: list[OutputGap]

    def __str__(self) -> str:
        lines = [f"{'output':<32} {'identical':>9} {'int~sim dB':>10} {'int~fp32 dB':>11} {'sim~fp32 dB':>11}"]
        for o in self.outputs:
            lines.append(f"{o.name[-32:]:<32} {o.identical:>9.4f} {o.sqnr_int_vs_sim:>10.2f} "
                         f"{o.sqnr_int_vs_fp32:>11.2f} {o.sqnr_sim_vs_fp32:>11.2f}")
        lines.append(f"{'tensor (codes, integer program vs QDQ simulation)':<60} {'size':>9} {'differ':>8} "
                     f"{'%':>7} {'1 step':>8} {'2':>7} {'3+':>7} {'max':>4}")
        for g in self.layers:
            pct = 100.0 * g.differ / g.size if g.size else 0.0
            lines.append(f"{g.tensor[-60:]:<60} {g.size:>9} {g.differ:>8} {pct:>7.3f} {g.steps.get(1, 0):>8} "
                         f"{g.steps.get(2, 0):>7} {g.steps.get(3, 0):>7} {g.max_steps:>4}")
        return "\n".join(lines)


def qdq_gap(sim, isim: IntSim, feeds) -> GapReport:
    """Compare the integer program with the QDQ simulation (``sim.run``) on ``feeds`` (a feed dict or an
    iterable of them): per tensor held as codes, how many codes differ and by how many steps (end to end: each
    side runs on its own inputs, so differences accumulate along the network); per output, the fraction of
    identical values and the SQNR of each against the other and against FP32."""
    batches = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    names = [n for n in isim.program.tensors]
    layers = {n: LayerGap(n) for n in names}
    out_names = [n for n in isim.output_names]
    acc = {n: {"same": 0, "size": 0, "int": [], "sim": [], "fp": []} for n in out_names}
    for batch in batches:
        codes = isim.tensor_codes(batch, names)
        simulated = sim.run(batch, outputs=list(dict.fromkeys(names + out_names)))
        for name in names:
            q = isim.grid(name)
            value = np.asarray(simulated[name], dtype=np.float64)
            sim_codes = np.rint(value / np.float64(q.scale)) + q.zero_point
            diff = np.abs(codes[name].astype(np.int64) - sim_codes.astype(np.int64))
            gap = layers[name]
            gap.size += diff.size
            gap.differ += int(np.count_nonzero(diff))
            gap.max_steps = max(gap.max_steps, int(diff.max(initial=0)))
            for k in (1, 2):
                gap.steps[k] = gap.steps.get(k, 0) + int(np.count_nonzero(diff == k))
            gap.steps[3] = gap.steps.get(3, 0) + int(np.count_nonzero(diff >= 3))
        result = isim.run(batch)
        fp32 = sim.run_float(batch, outputs=out_names)
        for name in out_names:
            a, b = np.asarray(result[name]), np.asarray(simulated[name])
            entry = acc[name]
            entry["same"] += int(np.count_nonzero(a == b))
            entry["size"] += a.size
            entry["int"].append(a.reshape(-1))
            entry["sim"].append(b.reshape(-1))
            entry["fp"].append(np.asarray(fp32[name]).reshape(-1))
    outputs = []
    for name in out_names:
        e = acc[name]
        i, s, f = (np.concatenate(e[k]) for k in ("int", "sim", "fp"))
        outputs.append(OutputGap(name, e["same"] / e["size"] if e["size"] else 1.0, sqnr(s, i), sqnr(f, i),
                                 sqnr(f, s)))
    return GapReport(list(layers.values()), outputs)
