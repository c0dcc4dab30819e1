"""QuantSim: float execution with quantize-dequantize on the tensors AIMET would quantize.

The graph is not rewritten. Quantizers live beside it, keyed by tensor name; a runtime hook replaces
each quantized activation by ``qdq(x)`` as it is produced, and parameters are quantized once into the
session's constants. Calibration (:meth:`QuantSim.compute_encodings`) follows AIMET: parameter
encodings come in one shot from the weights, then the calibration data runs with quantized
parameters and float activations while observers collect activation statistics.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..errors import RefquantError
from ..ir import Graph
from ..progress import bar as progress_bar
from ..runtime import Session
from .config import QuantsimConfig, load_config
from .encoding import Encoding, EncodingError, bias_encoding, check_bitwidth, fp16_encoding, from_min_max
from .observers import check_finite, make_observer
from .placement import apply_exception_rules, place_quantizers
from .subgraphs import prepare_subgraphs
from .qdq import ROUNDING, quantize_dequantize
from .scale_guard import adjust_weight_scales


class CalibrationError(RefquantError):
    """Calibration data that cannot be used: empty, NaN/Inf, wrong shapes."""


@dataclass
class Quantizer:
    """One quantizer of a tensor. ``kind`` is "activation" (computed at run time), "param" (a weight
    or bias with a role) or "constant" (a constant input without a role, quantized like an activation,
    e.g. a PRelu slope: AIMET does not recognise those as parameters)."""

    tensor: str
    kind: str
    enabled: bool
    bitwidth: int
    symmetric: bool
    strict_symmetric: bool = False
    unsigned_symmetric: bool = False
    data_type: str = "int"  # "int" or "float" (FP16 cast)
    axis: int | None = None
    block_size: int | None = None
    role: str | None = None
    op_type: str | None = None
    tied_to: str | None = None
    constraints: tuple[float, float] | None = None
    encoding: Encoding | None = None
    frozen: bool = field(default=False, repr=False)  # encoding set by hand/loaded: calibration keeps it
    # a parameter's quantized value chosen by a technique (AdaRound's up/down decisions) instead of
    # nearest rounding: on the encoding's grid, used as is by the simulation and the exports
    fixed_value: np.ndarray | None = field(default=None, repr=False)

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    @property
    def active(self) -> bool:
        return self.enabled and self.encoding is not None

    def set_encoding(self, encoding: Encoding, freeze: bool = True) -> None:
        self.encoding = encoding
        self.frozen = freeze


def parse_precision(precision: str) -> tuple[int | str, int | str]:
    """``"w8a16"`` -> (8, 16); ``"fp16"`` -> ("fp16", "fp16"); ``"w8afp16"`` -> (8, "fp16")."""
    text = precision.strip().lower()
    if text == "fp16":
        return "fp16", "fp16"
    match = re.fullmatch(r"w(\d+|fp16)a(\d+|fp16)", text)
    if not match:
        raise RefquantError(f"precision {precision!r}: expected the form 'w8a8', 'w8a16', 'w4a8', 'fp16'")
    w, a = (x if x == "fp16" else int(x) for x in match.groups())
    return w, a


class QuantSim:
    """Quantization simulation of ``graph``.

    ``QuantSim(graph, param_bw=8, output_bw=8, quant_scheme="min_max", config="default",
    rounding="half_even", precision=None)``: ``precision`` ("w8a16", "fp16"...) overrides the two
    bitwidths; ``config`` is a built-in name, an AIMET config file, or a dict; ``rounding`` is
    "half_even" (onnxruntime's QuantizeLinear) or "half_up" (AIMET's simulation).
    Scheme options (``percentile=99.99``...) go in ``scheme_options``. ``param_scheme`` is the weights'
    scheme (default: ``quant_scheme`` for min_max/tf_enhanced as AIMET, else min_max as onnxruntime).

    ``prepare``: the graph is first rewritten by :func:`refquant.prepare` with its default passes
    (``True``), the given passes (a name list or comma-separated string), or not at all (``False``);
    each pass is verified on one batch of ``prepare_data`` (random feeds when None) to keep the FP32
    outputs. ``sim.graph`` is the prepared graph (``graph`` itself when no pass changed it) and
    ``sim.prepare_report`` says what changed. Graph inputs and outputs keep their names; tensors a pass
    removed (a folded BatchNormalization's output...) have no quantizer. Use ``prepare=False`` to
    simulate the graph exactly as given: to compare quantizer placement with AIMET's (whose QuantSim
    does not prepare), or to load encodings written for the unprepared graph. (BN re-estimation, which needs the
    BatchNormalization nodes, brings them back itself: :func:`refquant.ptq.bn_reestimation.reestimate_batchnorm`.)

    Two rules give some activations ``outlier_bw`` bits (16) instead of ``output_bw``, both part of the
    preparation (none with ``prepare=False``, AIMET's behaviour). ``sim.widened`` lists every widened tensor
    with the rule's reason; ``outlier_bw=None`` turns both off. The export writes their 16-bit encodings like
    any other. Neither rewrites the graph: FP32 outputs are those of the prepared graph.

    **If/Loop subgraphs** get quantizers by the same rules as the main graph, keyed by their tensor names
    (unique across a model): a tensor of the main graph read inside a branch is one quantized tensor. Float
    initializers of subgraphs (Constant nodes included) move to the main graph's table, where branches read
    them as outer-scope names (:mod:`refquant.quant.subgraphs`), so they are quantized and exported like any
    weight. An untaken branch: see :meth:`compute_encodings`.

    ``constant_inputs="aimet"`` also quantizes the float constants refquant treats as settings or as data-movement
    data (Clip bounds, Pow exponents, Gather's embedding tables), as aimet-onnx does
    (:func:`refquant.quant.placement.place_quantizers`); the default ``"data"`` leaves them float.

    **The residual-stream rule** (default, ``residual_rule=True``; no data needed): every tensor from a
    residual branch's last linear layer (MatMul/Gemm/Conv output, bias Add, layer scale) to the residual
    sum a normalization reads (LayerNormalization, or Sub(x, ReduceMean(x))), found from the graph's
    structure (:func:`refquant.prepare.residual_activations`). Transformer residual streams carry a few
    channels 100-1000x the median one, which the normalization divides out per token; a per-tensor grid of
    2^b codes sized for a channel r times the median leaves the median channel ~2^b / r codes: one code at
    8 bits for paraphrase-MiniLM's first FFN output (r = 200), 327 at 16 bits. Graphs without a
    normalization over a residual sum (conv nets, MLPs, the AIMET samples) are unaffected.

    **The outlier rule** (with ``prepare_data``): the validator looks at every activation on that data,
    and those it flags as set by outliers (an outlier channel > 32x the median channel's range, most
    values within two 8-bit steps of zero, or beyond the float16 range: ``prepare.WIDEN_CODES``) are
    widened too, as AIMET's and Qualcomm's transformer recipes keep such tensors at 16 bits.
    """

    def __init__(self, graph: Graph, param_bw: int | str = 8, output_bw: int | str = 8,
                 quant_scheme: str = "min_max", config="default", rounding: str = "half_even",
                 precision: str | None = None, threads: int | None = None, scheme_options: dict | None = None,
                 param_scheme: str | None = None, prepare: bool | str | list = True, prepare_data=None,
                 outlier_bw: int | None = 16, residual_rule: bool = True, constant_inputs: str = "data"):
        if precision is not None:
            param_bw, output_bw = parse_precision(precision)
        if rounding not in ROUNDING:
            raise RefquantError(f"rounding {rounding!r} is not one of {', '.join(ROUNDING)}")
        self.prepare_report = None  # step 1 of the workflow: refquant.prepare (see the class docstring)
        given = graph
        self.source_graph = given  # the model as given (analytical bias correction reads its BatchNorm statistics)
        if prepare:
            from ..prepare import prepare_for_quantsim

            graph, self.prepare_report = prepare_for_quantsim(graph, "default" if prepare is True else prepare,
                                                              prepare_data)
        # weights: AIMET applies min_max and tf_enhanced to them too (measured on aimet_samples); the
        # distribution schemes (percentile, mse, entropy) are for activations, and onnxruntime's
        # quantize_static takes weight ranges by min-max, so weights default to min_max there
        if param_scheme is None:
            param_scheme = quant_scheme if quant_scheme in ("min_max", "tf", "tf_enhanced") else "min_max"
        make_observer(quant_scheme)  # fail now on an unknown scheme, not after placing quantizers
        make_observer(param_scheme)
        self.param_scheme = param_scheme
        if graph is given:  # nothing rewritten: own the parameter table, so that set_parameter (bias
            graph = _own_parameters(graph)  # correction, BN re-estimation, QAT) never writes into the caller's model
        # If/Loop subgraphs: their initializers join the main table (read as outer-scope names), so that their
        # weights are quantized, replaced and exported like any other (refquant.quant.subgraphs)
        graph = prepare_subgraphs(graph)
        self.graph = graph
        self.config: QuantsimConfig = load_config(config)
        self.quant_scheme = quant_scheme
        self.scheme_options = dict(scheme_options or {})
        self.rounding = rounding
        self.param_bw, self.output_bw = param_bw, output_bw
        # what rebuild() needs to simulate a rewritten graph the same way (preparation is not repeated)
        self._settings = dict(param_bw=param_bw, output_bw=output_bw, quant_scheme=quant_scheme, config=self.config,
                              rounding=rounding, threads=threads, scheme_options=scheme_options,
                              param_scheme=param_scheme, constant_inputs=constant_inputs)
        self.quantizers: dict[str, Quantizer] = {}
        for name, spec in place_quantizers(graph, self.config, constant_inputs).items():
            kind = spec.kind
            if kind == "activation" and name in graph.initializers:
                kind = "constant"
            bw = param_bw if kind == "param" else output_bw
            self.quantizers[name] = Quantizer(
                tensor=name, kind=kind, enabled=spec.enabled,
                bitwidth=16 if bw == "fp16" else check_bitwidth(bw, where=f"quantizer of {name!r}"),
                symmetric=spec.symmetric, strict_symmetric=self.config.strict_symmetric,
                unsigned_symmetric=self.config.unsigned_symmetric, data_type="float" if bw == "fp16" else "int",
                axis=spec.axis, role=spec.role, op_type=spec.op_type, tied_to=spec.tied_to,
                constraints=_constraints(spec.constraints))
        apply_exception_rules(self.quantizers, graph, self.config)  # AIMET's rules after the config
        self.session = Session(graph, threads=threads, hooks=[self._qdq_hook])
        self._float_session = Session(graph, threads=threads)
        self._hooked: dict[str, Quantizer] = {}
        self._calibrated: set[str] = set()
        # activation quantizers the last calibration never saw a value for (an If branch not taken, a Loop
        # that ran zero times, a tensor no output needs): disabled, with a warning (see compute_encodings)
        self.unused_quantizers: list[str] = []
        self.widened: dict[str, str] = {}  # the two rules (class docstring): tensor -> the reason
        # layers whose weight scale the last calibration raised so their int32 bias and requantization scale
        # stay representable (refquant.quant.scale_guard, as AIMET)
        self.adjusted_weight_scales: list[str] = []
        if prepare and outlier_bw:
            from ..prepare import outlier_activations, residual_activations

            bitwidth = check_bitwidth(outlier_bw, where="outlier_bw")
            if residual_rule:
                self._widen(residual_activations(self.graph), bitwidth)
            if prepare_data is not None:
                self._widen(outlier_activations(self.graph, prepare_data), bitwidth)

    @property
    def graph_was_prepared(self) -> bool:
        """Whether a preparation pass rewrote the graph given to the constructor."""
        report = self.prepare_report
        return report is not None and any(p.status == "applied" for p in report.passes)

    def _widen(self, flagged: dict[str, str], bitwidth: int) -> None:
        """The widening rules: integer activation quantizers (with their tied group) of the ``flagged``
        tensors (name -> reason) get ``bitwidth``; tensors without such a quantizer are left alone."""
        for name, why in flagged.items():
            quantizer = self.quantizers.get(name)
            if quantizer is None or quantizer.kind == "param" or not quantizer.enabled:
                continue
            root = quantizer.tied_to or name
            group = [q for q in self.quantizers.values() if (q.tied_to or q.tensor) == root]
            if any(q.data_type != "int" or q.bitwidth >= bitwidth for q in group):
                continue
            for q in group:
                q.bitwidth = bitwidth
                self.widened[q.tensor] = why

    # ------------------------------------------------------------------ quantizer views
    def param_quantizers(self) -> dict[str, Quantizer]:
        return {n: q for n, q in self.quantizers.items() if q.kind == "param"}

    def activation_quantizers(self) -> dict[str, Quantizer]:
        return {n: q for n, q in self.quantizers.items() if q.kind != "param"}

    def encoding_of(self, name: str) -> Encoding | None:
        """The encoding a tensor is quantized with (a tied quantizer's is its group's)."""
        quantizer = self.quantizers[name]
        if quantizer.tied_to is not None:
            return self.quantizers[quantizer.tied_to].encoding
        return quantizer.encoding

    # ------------------------------------------------------------------ calibration
    def compute_encodings(self, data, batch_size: int = 16, progress: bool = True, preprocess=None,
                          executor=None, shards: int | None = None) -> None:
        """Parameter encodings from the weights, then activation encodings from ``data``: anything
        :func:`refquant.data.iter_feeds` accepts (feed dicts, arrays, .npz/.npy, folders of .npy or
        images, with ``preprocess`` for images).

        If/Loop subgraphs are calibrated like the main graph (the runtime's hooks see the tensors their nodes
        produce). A quantizer that sees no value (an If branch the data never takes, a Loop that runs no
        iteration) is disabled with a warning naming it, as AIMET disables unused quantizers: its tensor is
        simulated in float and left out of the exports. ``sim.unused_quantizers`` lists them; the next
        compute_encodings re-enables them first, so calibrating with data that takes the branch quantizes it.

        ``executor`` (any ``concurrent.futures.Executor``): the data is cut into ``shards`` (default: one
        per worker) calibrated in parallel, and their observers are merged here
        (:mod:`refquant.scale.calibration`); workers read their shard themselves. Default: serially here."""
        self._reenable_unused()
        if executor is not None:
            from ..scale.calibration import calibrate

            return calibrate(self, executor, data, batch_size, progress, preprocess, shards)
        from ..data import count_samples, iter_feeds

        self._compute_param_encodings()
        self._apply_constants()
        observed = self._activation_groups()
        observers = {root: make_observer(self.quant_scheme, **self.scheme_options) for root in observed}
        members = {name: root for root, names in observed.items() for name in names}
        batch_index = [0]
        first_sample = [0]  # index of the current batch's first sample in the whole calibration set

        observe = calibration_hook(members, observers, lambda: (first_sample[0], f"batch {batch_index[0]}"))

        for name, quantizer in self.quantizers.items():  # constants: observed once
            if quantizer.kind == "constant" and name in members:
                observers[members[name]].update(np.asarray(self.graph.initializers[name], dtype=np.float32))
        session = Session(self.graph, threads=self.session.threads, hooks=[observe])
        session.set_constants(self._calibration_constants())
        total = count_samples(data, self.graph)
        seen = 0
        bar = progress_bar(total, progress, "calibrating", unit="sample")
        for feeds in iter_feeds(data, self.graph, batch_size=batch_size, preprocess=preprocess):
            session.run(feeds, outputs=self._calibration_outputs(observed))
            n = len(next(iter(feeds.values()))) if feeds else 0
            seen += n
            first_sample[0] = seen
            batch_index[0] += 1
            bar.update(n)
        bar.close()
        if batch_index[0] == 0:
            raise CalibrationError("the calibration data set is empty: no batch was produced")
        self._set_activation_encodings(observers, members)

    def _set_activation_encodings(self, observers: dict, members: dict) -> None:
        """Activation encodings from the calibration observers (one per group root), then the fixed
        ranges and bias encodings, and the quantized constants."""
        unused = []
        for root, observer in observers.items():
            quantizer = self.quantizers[root]
            if quantizer.frozen:
                continue
            if observer.empty:
                quantizer.encoding = None  # never produced (an untaken If branch): left unquantized
                unused.append(root)
                continue
            quantizer.encoding = self._encoding_from_observer(quantizer, observer)
        self._disable_unused(unused, members)
        self._calibrated = set(members)
        self._derived_encodings()

    def _derived_encodings(self) -> None:
        """What follows from the activation and weight encodings: fixed ranges, AIMET's weight-scale guard, the
        int32 bias grids, and the quantized constants."""
        self._apply_fixed_ranges()
        self.adjusted_weight_scales = adjust_weight_scales(self)
        self._compute_bias_encodings()
        self._apply_constants()

    def _disable_unused(self, roots: list[str], members: dict) -> None:
        """Quantizer groups whose observer saw no value are disabled, as AIMET disables unused quantizers: the
        simulation passes those tensors through in float, the exports leave them out. A branch the calibration
        data never takes is therefore simulated in float; ``sim.unused_quantizers`` names them, and the next
        compute_encodings re-enables and calibrates them again (give data that takes every branch)."""
        roots = set(roots)
        names = [name for name, root in members.items() if root in roots]
        for name in names:
            self.quantizers[name].enabled = False
        self.unused_quantizers = names
        if names:
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            shown = ", ".join(repr(n) for n in names[:10]) + more
            warnings.warn(f"QuantSim: {len(names)} activation quantizer(s) saw no value during calibration (an If "
                          f"branch not taken, a Loop that ran no iteration, or a tensor no output needs) and are "
                          f"disabled, so those tensors are simulated in float: {shown}", stacklevel=3)

    def _reenable_unused(self) -> None:
        for name in self.unused_quantizers:
            if name in self.quantizers:
                self.quantizers[name].enabled = True
        self.unused_quantizers = []

    def _activation_groups(self) -> dict[str, list[str]]:
        """Enabled, non-frozen activation quantizer groups: root -> member tensor names."""
        groups: dict[str, list[str]] = {}
        for name, q in self.quantizers.items():
            if q.kind == "param" or not q.enabled:
                continue
            root = q.tied_to or name
            groups.setdefault(root, []).append(name)
        return {root: names for root, names in groups.items()
                if not self.quantizers[root].frozen and not _fixed_range(self.quantizers[root])}

    def _calibration_outputs(self, observed) -> list[str]:
        return list(self.graph.output_names)

    def _encoding_from_observer(self, q: Quantizer, observer) -> Encoding:
        if q.data_type == "float":
            return fp16_encoding()
        lo, hi = observer.range(q.bitwidth, q.symmetric, q.strict_symmetric, q.unsigned_symmetric)
        if q.constraints is not None:
            # one end fixed by encoding_constraints (htp configs' Relu: min 0); as AIMET, the free end is the calibrated
            # encoding's (on its grid, after the offset rounding), not the raw observed value
            calibrated = from_min_max(lo, hi, q.bitwidth, q.symmetric, q.strict_symmetric, q.unsigned_symmetric)
            lo = np.min(calibrated.min) if q.constraints[0] is None else q.constraints[0]
            hi = np.max(calibrated.max) if q.constraints[1] is None else q.constraints[1]
        return from_min_max(lo, hi, q.bitwidth, q.symmetric, q.strict_symmetric, q.unsigned_symmetric,
                            axis=q.axis, block_size=q.block_size)

    def _compute_param_encodings(self) -> None:
        """One shot from each weight: the scheme's observer over the weight, per channel on its axis."""
        for name, q in self.quantizers.items():
            if q.kind != "param" or not q.enabled or q.frozen or q.role == "bias":
                continue
            weight = np.asarray(self.graph.initializers[name], dtype=np.float32)
            if q.data_type == "float":
                q.encoding = fp16_encoding()
                continue
            axis = None if q.axis is None else q.axis % weight.ndim
            q.axis = axis
            options = self.scheme_options if self.param_scheme == self.quant_scheme else {}
            observer = make_observer(self.param_scheme, axis=axis, **options)
            observer.update(weight)
            q.encoding = self._encoding_from_observer(q, observer)

    def _apply_fixed_ranges(self) -> None:
        """encoding_constraints from the config fix a quantizer's range (e.g. Sigmoid [0, 1])."""
        for q in self.quantizers.values():
            if q.kind != "param" and q.enabled and _fixed_range(q) and not q.frozen:
                if q.data_type == "float":
                    q.encoding = fp16_encoding()
                else:
                    q.encoding = from_min_max(q.constraints[0], q.constraints[1], q.bitwidth, q.symmetric,
                                              q.strict_symmetric, q.unsigned_symmetric)

    def _compute_bias_encodings(self) -> None:
        """An enabled bias quantizer is the int32 grid of input scale x weight scale."""
        for name, q in self.quantizers.items():
            if q.role != "bias" or not q.enabled or q.frozen:
                continue
            node = next(n for n in self.graph.walk() if len(n.inputs) > 2 and n.inputs[2] == name)
            x_enc = self.encoding_of(node.inputs[0]) if node.inputs[0] in self.quantizers else None
            w_enc = self.encoding_of(node.inputs[1]) if node.inputs[1] in self.quantizers else None
            if x_enc is None or w_enc is None or x_enc.kind != "int" or w_enc.kind != "int":
                q.encoding = None
                continue
            q.encoding = bias_encoding(x_enc.scale, w_enc.scale, axis=0)
            q.bitwidth = 32

    # ------------------------------------------------------------------ simulation
    def _quantized_constants(self, kinds=("param", "constant")) -> dict[str, np.ndarray]:
        """The quantized value of every enabled quantizer of ``kinds`` with a fixed value or an encoding."""
        constants = {}
        for name, q in self.quantizers.items():
            if q.kind in kinds and q.enabled and q.fixed_value is not None:
                constants[name] = q.fixed_value
            elif q.kind in kinds and q.enabled:
                encoding = self.encoding_of(name)
                if encoding is not None:
                    constants[name] = quantize_dequantize(
                        np.asarray(self.graph.initializers[name], dtype=np.float32), encoding, self.rounding
                    ).astype(self.graph.initializers[name].dtype, copy=False)
        return constants

    def _calibration_constants(self) -> dict[str, np.ndarray]:
        """The constants as calibration runs them: parameters quantized (AIMET's ``oneShotQuantizeDequantize``),
        constant inputs such as a PRelu slope in float, as the activations are (AIMET's ``updateStats``, which those
        quantizers run), so that calibrating again on the same data gives the same encodings."""
        return self._quantized_constants(kinds=("param",))

    def _apply_constants(self) -> None:
        """Quantize parameters into the simulation session (once per encoding change)."""
        constants = dict(self.graph.initializers)
        constants.update(self._quantized_constants())
        self.session.set_constants(constants)
        self._hooked = {name: q for name, q in self.quantizers.items() if q.kind == "activation"}

    def _qdq_hook(self, name, array, node):
        quantizer = self._hooked.get(name)
        if quantizer is None or not quantizer.enabled or array.dtype.kind != "f":
            return None
        encoding = self.encoding_of(name)
        if encoding is None:
            return None
        return quantize_dequantize(array, encoding, self.rounding).astype(array.dtype, copy=False)

    def run(self, feeds: dict, outputs: Iterable[str] | None = None, hooks=()) -> dict[str, np.ndarray]:
        """Simulated (quantize-dequantize) inference."""
        self._require_encodings("run")
        self.refresh()
        return self.session.run(feeds, outputs=outputs, hooks=hooks)

    def run_float(self, feeds: dict, outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The FP32 reference on the same graph."""
        return self._float_session.run(feeds, outputs=outputs)

    def invalidate(self) -> None:
        """Forget the quantized parameters: the next run re-quantizes them (after encodings were swapped
        in place, which :meth:`refresh` cannot see)."""
        self._state = None

    def refresh(self) -> None:
        """Re-quantize the parameters after quantizers or encodings were changed by hand."""
        state = tuple((n, q.enabled, id(q.encoding), id(self.encoding_of(n)), id(q.fixed_value))
                      for n, q in self.quantizers.items())
        if state != getattr(self, "_state", None):
            self._apply_constants()
            self._state = state

    def set_parameter(self, name: str, array: np.ndarray) -> None:
        """Replace a float parameter (an initializer) of the simulated graph, e.g. a corrected bias; both
        the FP32 reference and the simulation use the new value (re-quantized with the current encoding)."""
        if name not in self.graph.initializers:
            raise RefquantError(f"{name!r} is not a parameter (initializer) of the graph")
        old = self.graph.initializers[name]
        array = np.asarray(array, dtype=old.dtype)
        if array.shape != old.shape:
            raise RefquantError(f"parameter {name!r}: new shape {array.shape} differs from {old.shape}")
        self.graph.initializers[name] = array
        self._float_session.set_constant(name, array)
        self._state = None  # the simulation session re-quantizes its constants on the next run

    def rebuild(self, graph: Graph) -> None:
        """Simulate ``graph`` instead of ``self.graph``, in place, with the same settings: ``graph`` is a rewrite
        of it with the same inputs and outputs (BatchNormalizations folded, say). A quantizer whose tensor is in
        both and is placed alike (enabled or not, axis, symmetry, tied group) keeps its state (encoding, bitwidth,
        frozen, a technique's fixed values) unless it is a parameter or constant whose value changed; the others
        are as the new graph's placement makes them, and parameter encodings are computed
        at once when the simulation had encodings, so ``run`` works; activations keep theirs until the next
        ``compute_encodings``."""
        old = self.quantizers
        had_encodings = bool(self._calibrated) or any(q.encoding is not None for q in old.values())
        new = QuantSim(graph, prepare=False, outlier_bw=None, **self._settings)
        for name, quantizer in new.quantizers.items():
            previous = old.get(name)
            if previous is None or (previous.kind, previous.tied_to, previous.axis, previous.symmetric) != (
                    quantizer.kind, quantizer.tied_to, quantizer.axis, quantizer.symmetric):
                continue
            if previous.enabled != quantizer.enabled:  # placed otherwise in the new graph (a Conv + Relu now)
                continue
            if quantizer.kind != "activation" and not _same_array(self.graph.initializers.get(name),
                                                                  new.graph.initializers.get(name)):
                continue
            new.quantizers[name] = previous
        new.source_graph, new.prepare_report = self.source_graph, self.prepare_report
        new.widened = {n: why for n, why in self.widened.items() if new.quantizers.get(n) is old.get(n)}  # carried
        new.unused_quantizers = [n for n in self.unused_quantizers if n in new.quantizers]
        new._calibrated = {n for n in self._calibrated if n in new.quantizers}
        if had_encodings:
            new._compute_param_encodings()
            new._derived_encodings()
        self.__dict__.clear()
        self.__dict__.update(new.__dict__)

    def copy(self) -> "QuantSim":
        """An independent simulation of the same model: a copy of every quantizer (encoding, frozen flag, fixed
        value) and of the calibration bookkeeping. Calibrating, AdaRounding or running either leaves the other as
        it was (trial runs: :mod:`refquant.ptq.input_choice`)."""
        new = QuantSim(self.graph, prepare=False, outlier_bw=None, **self._settings)
        new.quantizers = copy.deepcopy(self.quantizers)
        new.source_graph, new.prepare_report = self.source_graph, self.prepare_report
        new.widened = dict(self.widened)
        new.unused_quantizers = list(self.unused_quantizers)
        new._calibrated = set(self._calibrated)
        new.adjusted_weight_scales = list(self.adjusted_weight_scales)
        return new

    def graph_for_export(self):
        """A copy of the graph whose parameters with a fixed quantized value (AdaRound) carry that value,
        so that quantizing them again in any runtime gives exactly the simulated weights."""
        graph = self.graph.copy()
        for name, q in self.quantizers.items():
            if q.fixed_value is not None and q.enabled:
                graph.initializers[name] = q.fixed_value.copy()
        return graph

    def set_quantized_parameter(self, name: str, array: np.ndarray) -> None:
        """Fix the quantized value of a parameter (e.g. AdaRound's rounding): every element must lie on
        the quantizer's grid, ``scale * (q + offset)`` with integer ``q`` in ``[0, steps]``. The FP32
        reference keeps the float weight; the encoding is frozen."""
        quantizer = self.quantizers.get(name)
        if quantizer is None or quantizer.kind == "activation":
            raise RefquantError(f"{name!r} has no parameter quantizer")
        encoding = self.encoding_of(name)
        if encoding is None or encoding.kind != "int":
            raise RefquantError(f"parameter {name!r}: set an integer encoding before fixing its quantized value")
        array = np.asarray(array, dtype=self.graph.initializers[name].dtype)
        if array.shape != self.graph.initializers[name].shape:
            raise RefquantError(f"parameter {name!r}: shape {array.shape} differs from {self.graph.initializers[name].shape}")
        if not np.array_equal(quantize_dequantize(array, encoding, "half_even"), array):
            raise RefquantError(f"parameter {name!r}: the given values are not on the encoding's grid")
        quantizer.fixed_value = array
        quantizer.frozen = True
        self._state = None

    def set_encoding(self, name: str, encoding: Encoding) -> None:
        """Fix a quantizer's encoding by hand (calibration will not overwrite it); a fixed quantized
        value set earlier is dropped, since it belonged to the old grid."""
        if name not in self.quantizers:
            raise RefquantError(f"no quantizer on tensor {name!r}")
        self.quantizers[name].set_encoding(encoding)
        self.quantizers[name].fixed_value = None

    def export(self, directory, prefix: str = "model", encoding_version: str = "1.0.0",
               unsigned_weights: bool = False) -> dict[str, str]:
        """Write ``prefix.onnx``, ``prefix.encodings`` (AIMET JSON) and ``prefix_qdq.onnx`` into ``directory``.
        ``unsigned_weights``: the QDQ model's int8 weights as uint8 with zero point + 128, the same values, which
        onnxruntime runs exactly also on x86 CPUs without VNNI (:mod:`refquant.intsim.unsigned_weights`)."""
        from .export import export

        self._require_encodings("export")
        return export(self, directory, prefix, encoding_version, unsigned_weights)

    def to_onnx_qdq(self, derived: bool = False):
        """The simulated model as an ONNX QuantizeLinear/DequantizeLinear ModelProto; ``derived=True`` adds AIMET's
        derived pairs (data-movement outputs...: :func:`refquant.quant.export.to_qdq_onnx`)."""
        from .export import to_qdq_onnx

        self._require_encodings("to_onnx_qdq")
        return to_qdq_onnx(self, derived=derived)

    def load_encodings(self, path, strict: bool = True) -> None:
        """Set encodings from an AIMET encodings file (0.6.1, 1.0.0, 2.0.0): listed quantizers are
        enabled and frozen with the file's encoding; with ``strict`` a name that has no quantizer is an
        error, and quantizers the file does not list are disabled (as AIMET's load_encodings_to_sim)."""
        from .encodings_io import read_encodings

        data = read_encodings(path)
        missing = [name for name in data.encodings if name not in self.quantizers and name not in self.graph.values
                   and name not in self.graph.initializers]
        if strict and missing:
            hint = ("; this QuantSim prepared the graph (sim.prepare_report): build it with prepare=False to load "
                    "encodings written for the model as given") if self.graph_was_prepared else ""
            raise RefquantError(f"{path}: encodings for tensors the model does not have: {missing[:5]}{hint}")
        for name, encoding in data.encodings.items():
            quantizer = self.quantizers.get(name)
            if quantizer is None:
                continue  # a data-movement output derived in 2.0.0 files
            if quantizer.role == "bias" and encoding.bitwidth == 32 and not quantizer.enabled:
                continue  # AIMET's 2.0.0 export derives int32 biases even when biases are not simulated
            if encoding.axis is not None and quantizer.axis is not None and encoding.block_size is None:
                encoding = _with_axis(encoding, quantizer.axis)
            quantizer.bitwidth = encoding.bitwidth
            quantizer.symmetric = encoding.symmetric
            quantizer.enabled = True
            quantizer.tied_to = None
            quantizer.set_encoding(encoding)
        if strict:
            for name, quantizer in self.quantizers.items():
                if name not in data.encodings:
                    quantizer.enabled = False
        self._state = None

    def _require_encodings(self, what: str) -> None:
        if not self._calibrated and not any(q.encoding is not None for q in self.quantizers.values()):
            raise RefquantError(f"QuantSim.{what}: call compute_encodings (or load_encodings) first")

    def summary(self) -> str:
        lines = [f"{'tensor':<48} {'kind':<10} {'on':<3} {'bw':>3} {'sym':<4} {'axis':>4}  range"]
        for name, q in self.quantizers.items():
            enc = self.encoding_of(name)
            span = "" if enc is None or enc.kind != "int" else f"[{np.min(enc.min):.5g}, {np.max(enc.max):.5g}]"
            lines.append(f"{name[:48]:<48} {q.kind:<10} {'y' if q.enabled else 'n':<3} {q.bitwidth:>3} "
                         f"{'y' if q.symmetric else 'n':<4} {'' if q.axis is None else q.axis:>4}  {span}"
                         + (f"  tied to {q.tied_to}" if q.tied_to else ""))
        if self.adjusted_weight_scales:
            lines.append(f"weight scales raised so that int32 biases and requantization scales stay representable "
                         f"(AIMET's guard): {', '.join(self.adjusted_weight_scales)}")
        return "\n".join(lines)


def _same_array(a, b) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _with_axis(encoding: Encoding, axis: int) -> Encoding:
    """A per-channel encoding read from a file (which has no axis) placed on the quantizer's axis."""
    return Encoding(encoding.scale, encoding.offset, encoding.bitwidth, encoding.symmetric, encoding.steps, axis,
                    encoding.block_size, encoding.kind)


def _constraints(value) -> tuple[float | None, float | None] | None:
    """(min, max) from a config's encoding_constraints (a dict, or config.py's parsed tuple); either end may be
    None: that end comes from calibration."""
    if not value:
        return None
    try:
        lo, hi = (value.get("min"), value.get("max")) if isinstance(value, dict) else value
        return None if lo is None else float(lo), None if hi is None else float(hi)
    except (TypeError, ValueError):
        raise EncodingError(f"encoding_constraints {value!r}: expected {{'min': float, 'max': float}}") from None


def _fixed_range(q: Quantizer) -> bool:
    """Both ends fixed by encoding_constraints: no calibration needed."""
    return q.constraints is not None and None not in q.constraints


def calibration_hook(members: dict, observers: dict, locate):
    """The calibration hook: every float tensor of an observed group (``members``: tensor -> group root) is
    checked to be finite and fed to its group's observer. ``locate()`` -> (index of the current batch's first
    sample, words naming the batch) for the error that names a non-finite value's sample."""

    def observe(name, array, node):
        root = members.get(name)
        if root is None:
            return None
        if array.dtype.kind == "f":
            bad = check_finite(array)
            if bad is not None:
                first, batch = locate()
                sample = first + bad // max(1, array[0].size if array.ndim else 1)
                raise CalibrationError(f"tensor {name!r} has a non-finite value ({array.flat[bad]}) "
                                       f"in calibration sample {sample} ({batch})")
            observers[root].update(array)
        return None

    return observe


def _own_parameters(graph: Graph) -> Graph:
    """A Graph sharing ``graph``'s nodes and arrays but with its own containers (initializers, values,
    inputs, outputs, node list): replacing a parameter in it leaves ``graph`` as it was. Arrays are never
    written in place (set_parameter replaces them), so sharing them is safe and costs no memory."""
    return dataclasses.replace(graph, nodes=list(graph.nodes), inputs=list(graph.inputs),
                               outputs=list(graph.outputs), initializers=dict(graph.initializers),
                               values=dict(graph.values), opset=dict(graph.opset), metadata=dict(graph.metadata),
                               model_info=dict(graph.model_info))
