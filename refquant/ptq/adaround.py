"""AdaRound: adaptive rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"), layer by layer on a calibrated or uncalibrated QuantSim.

Nearest rounding is not what minimizes a layer's output error. For a weight ``W`` on a grid with scale ``s`` (per
channel) and integer codes ``[lo, hi] = [offset, offset + steps]``, AdaRound learns for every weight whether to
round down or up, by minimizing over ``V``

    L(V) = sum over output channels, mean over output positions of (f(y_fp32) - f(y_soft))^2 + reg(V)

with ``W_soft(V) = s * clip(floor(W/s) + h(V), lo, hi)``, ``h`` a rectified sigmoid and ``reg`` the annealed
regularizer that drives each ``h`` to 0 or 1 (:mod:`refquant.ptq.adaround_optimize`). ``y = W_mat @ cols`` is the
layer as a matrix product (:mod:`refquant.ptq.layers`); ``y_fp32`` the FP32 model's layer output
(``sim.run_float``); ``y_soft`` the layer with ``W_soft`` on its input in the quantized model so far (the layers
before already AdaRounded); ``f`` the activation that alone reads the layer output when it is a Relu, Clip, PRelu,
Softmax over the channels, Sigmoid, Tanh or SiLU (with ``include_activation="all"`` any elementwise subgraph,
:mod:`refquant.ptq.pointwise`; False: none). The loss is computed exactly, as a quadratic form or on sampled
positions (:mod:`refquant.ptq.adaround_loss`). The result is the hard rounding ``W_q = s * clip(floor(W/s) +
[V >= 0], lo, hi)``: every code is ``floor(W/s)`` or ``floor(W/s) + 1`` (clipped to the grid); a weight with
``W/s`` an integer keeps its code. If ``W_q`` is worse than nearest rounding on the layer's own loss, nearest
rounding is kept.

Where the result goes: ``sim.set_quantized_parameter(weight, W_q)`` makes the weight's quantizer produce ``W_q``
(the simulation and both exports use it) while the graph keeps the FP32 weight, so ``sim.run_float`` stays the
original model. The weight encoding is frozen; encodings are never changed. The inputs are carried from layer to
layer (:class:`~refquant.ptq.layer_inputs.LayerInputs`), so the data goes through the graph once. Call
``sim.compute_encodings`` afterwards: activation ranges are then calibrated with the AdaRounded weights.

Beyond the paper and AIMET, each measured against aimet-onnx 2.42.0 on the same models and data
(docs/adaround.md; bench/results_ptq_vs_aimet_models.txt):

* the step size scales with the iteration count (``learning_rate="scaled"``), so that 1,000 iterations travel as
  far as AIMET's 10,000 steps of 1e-3;
* each channel's loss is shrunk toward uncorrelated inputs by an estimated intensity (``shrinkage="auto"``),
  against fitting the rounding to sampling noise on few positions;
* small layers are fitted full batch on every position; large ones on 8,192 sampled positions, 512 a step;
* the layer inputs come from the simulation with its activation quantizers off (what AIMET intends; aimet-onnx
  2.42.0 runs them on, ``quantize_activations=True``), but for the output layers: a layer with no other layer after
  it is fitted to the inputs it reads in deployment, the quantized ones, when the data has at least
  :data:`OUTPUT_LAYER_SAMPLES` samples per input of a weight row (``quantize_activations="outputs"``, the default).
  Its rounding error reaches the model's outputs with no later layer fitted around it; with few samples per input
  the fit follows each calibration sample's activation noise instead (PP-OCR rec's CTC head, 64 samples for 120
  inputs: -1 to -2.6 dB). Output layers change no other layer's input, so they are fitted last. The inputs can
  also be chosen on held-out data per model or per layer (``"choose"`` / ``"per_layer"``,
  :mod:`refquant.ptq.input_choice`), or mixed per element (``qdrop``, QDrop, Wei et al. 2022).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..data import count_samples, iter_feeds, reusable
from ..errors import RefquantError
from ..progress import iterate
from .adaround_loss import (MixedSampledLoss, QuadraticLoss, SampledLoss, _Moments, _Reservoir,
                            masked_shrinkage_intensity, qdrop_threshold, shrinkage_intensity)
from .adaround_optimize import (ADAM_LR, Objective, SoftRounding, adam_learning_rate, annealed_beta, lbfgs_stages,
                                optimize_adam, optimize_lbfgs, rounding_regularizer, settle)
from .layer_inputs import LayerInputs, SimState, disable_activation_quantizers, ensure_weight_encodings
from .layers import LAYER_OPS, SOFTMAX, LinearLayer, _PairedColumns, find_layers, grid_arrays, included_layers, \
    position_chunks

MOMENTS_BUDGET = 1 << 27  # float64 values of H = sum cols cols^T (1 GB): a layer with a bigger H takes the sampled loss
SAMPLED_COLUMNS, MINIBATCH = 8192, 512  # the sampled loss's cache and Adam's minibatch when the data is large
FULL_BATCH_MACS = 1 << 27  # a layer whose positions x weights stay below this is fitted on all of them, full batch
THREADED_MACS = 1 << 22  # an optimizer step's GEMM work from which all BLAS threads pay (step_threads)
OUTPUT_LAYER_SAMPLES = 2  # "outputs": calibration samples per weight input from which an output layer is quantized
FULL_BATCH_FLOATS = 1 << 24  # ... and whose cached columns and outputs take at most this many floats (64 MB)


@dataclass
class AdaroundLayerReport:
    """What AdaRound did to one layer. Losses: the reconstruction loss of the form used (``form``),
    with nearest rounding (``V`` at its start) and with the final hard rounding."""

    layer: str
    weight: str
    form: str
    loss_nearest: float
    loss_adaround: float
    flipped: float  # fraction of weights whose code differs from nearest rounding
    seconds: float
    columns: int = 0  # positions the loss was computed on
    kept_nearest: bool = False  # AdaRound did not beat nearest rounding: nearest was kept
    shrinkage: float = 0.0  # the loss's shrinkage intensity toward uncorrelated inputs (mean over channels)
    learning_rate: float = 0.0  # Adam's step size of the rounding kept (0: no Adam steps)
    quantized_inputs: bool = False  # fitted to the layer's inputs with the activation quantizers on
    held_out_sqnr: tuple[float, float] | None = None  # quantize_activations="per_layer": off, on (input_choice)


def adaround(sim, data, num_iterations: int = 10000, reg_param: float = 0.01, beta_range=(20, 2),
             warm_start: float = 0.2, batch_size: int = 16, use_fp32_inputs: bool = False, progress: bool = True,
             optimizer: str = "adam", *, include_activation: bool | str = True,
             quantize_activations: bool | str = "outputs", num_columns: int | None = None,
             columns_per_iteration: int | None = None, finish: str = "threshold",
             cache_activations: bool = True, threads: int | str | None = "auto", seed: int = 0,
             qdrop: float = 0.0, shrinkage: float | str = "auto", learning_rate: float | str = "scaled",
             nodes_to_include=None, report: list | None = None):
    """AdaRound every Conv, ConvTranspose, Gemm and MatMul of ``sim`` with a constant weight and an
    enabled integer weight quantizer, in graph order (see the module docstring for the formulas).

    ``data``: anything :func:`refquant.data.iter_feeds` accepts (read once and carried through the
    graph, or once per layer with ``cache_activations=False``). Weight
    encodings: the current ones; if a layer's weight has none, the parameter encodings are computed
    first (``sim`` need not be calibrated; calibrate activations after AdaRound). Each layer's
    rounding is set with ``sim.set_quantized_parameter`` (encoding frozen; FP32 weights untouched).

    ``optimizer``: "adam" (default) or "lbfgs" (SciPy's L-BFGS-B, one run per annealing stage). Adam reached the
    lower hard-rounding loss in less time on every MobileNetV2 layer measured (docs/adaround.md).
    ``num_iterations`` counts Adam steps or L-BFGS iterations.
    ``include_activation``: put the following activation in the loss (AIMET, the paper's f_a): True: a
    Relu, Clip, PRelu, Softmax, Sigmoid, Tanh or SiLU (``pointwise.IN_LOSS_BY_DEFAULT``); "all": also any
    other elementwise subgraph (:mod:`refquant.ptq.pointwise`: HardSwish, GELU...); False: none.
    ``quantize_activations``: "outputs" (default): the activation quantizers off while fitting (as AIMET intends),
    on for the output layers with enough data (:func:`output_layers_with_data`), which are fitted last; False: off
    for every layer; True: on for every layer (what aimet-onnx 2.42.0 runs); "choose": whichever of False and True
    scores better on a held-out quarter of ``data`` after fitting on the rest
    (:func:`~refquant.ptq.input_choice.choose_inputs`; about 2.5x the time, ``data`` read into memory; ``report``
    receives the :class:`~refquant.ptq.input_choice.InputChoice` first);
    "per_layer": the same choice layer by layer, the quantized fit kept where it lowers the model's output noise on
    the held-out quarter by two standard errors (:class:`~refquant.ptq.input_choice.PerLayerInputs`; 3-4x the time;
    each report's ``quantized_inputs`` and ``held_out_sqnr`` say what was chosen). Which suits a model, measured:
    docs/adaround.md. With quantized inputs anywhere, a simulation whose activations are not calibrated is
    calibrated on ``data`` first. ``qdrop`` or ``use_fp32_inputs`` make "outputs" the same as False.
    ``qdrop``: the probability (in [0, 1), a
    multiple of 1/256) that an element of a layer's input is the FP32 model's instead of the simulation's, drawn
    anew at each step (QDrop, with ``quantize_activations=True``; 0: off, the default).
    ``num_columns``: cached positions per layer for the sampled loss; ``columns_per_iteration``:
    Adam's minibatch of them. Default (None): a layer whose positions x weights < 2^27 (and cache < 64 MB) is fitted
    on all its positions with full-batch Adam, so its result does not depend on ``seed``; a larger layer on 8,192
    sampled positions, 512 per iteration (docs/adaround.md). ``finish``: "threshold" (``V >= 0``, the paper and
    AIMET) or "greedy" (each weight the annealing left strictly between 0 and 1 decided by the exact hard loss,
    channel by channel; not with a Softmax, which couples the channels). ``cache_activations``: see
    :class:`~refquant.ptq.layer_inputs.LayerInputs` (False: a
    forward prefix per layer, memory one batch; True falls back to that when the activations would not fit in
    memory). ``threads``: BLAS threads while optimizing (None: unchanged; "auto":
    unchanged for a layer whose optimizer step multiplies at least 2^22 weight x position pairs, else 1; see
    :func:`step_threads`).
    ``shrinkage``: "auto" (default) shrinks each output channel's loss toward uncorrelated inputs by Schaefer &
    Strimmer's intensity estimated from its data (near 0 where the data holds the correlations, near 1 where they are
    noise); 0 is AdaRound's loss as written; a number in [0, 1] uses that intensity everywhere
    (:mod:`refquant.ptq.adaround_loss`).
    ``learning_rate``: Adam's step size: "scaled" (default), ``1e-3 * max(1, 10000 / max(200, num_iterations))``,
    the path length of AIMET's 10,000 steps of 1e-3 from 200 iterations on; or a positive number (1e-3: AIMET's at
    every count; docs/adaround.md).
    ``nodes_to_include``: names of the layer nodes to optimize (AIMET's ``nodes_to_include``; None: every layer);
    the others keep their quantized weights as they are, and a later call can AdaRound them with other options
    (each layer fitted to the simulation as the calls before left it). A name that is not a layer AdaRound can
    optimize is an error.
    ``report``: a list that receives one :class:`AdaroundLayerReport` per layer.
    On any error or Ctrl-C the sim is left exactly as it was. Returns ``sim``.
    """
    if optimizer not in ("adam", "lbfgs"):
        raise RefquantError(f"adaround: optimizer {optimizer!r} is not 'adam' or 'lbfgs'")
    if finish not in ("threshold", "greedy"):
        raise RefquantError(f"adaround: finish {finish!r} is not 'threshold' or 'greedy'")
    if not (threads in ("auto", None) or (isinstance(threads, int) and threads >= 1)):
        raise RefquantError(f"adaround: threads must be 'auto', None or a positive int, got {threads!r}")
    if include_activation not in (True, False, "all"):
        raise RefquantError(f"adaround: include_activation must be True, False or 'all', got {include_activation!r}")
    if num_iterations < 0 or not 0 <= warm_start <= 1:
        raise RefquantError("adaround: num_iterations must be >= 0 and warm_start in [0, 1]")
    if not 0 <= qdrop < 1:
        raise RefquantError(f"adaround: qdrop must be in [0, 1), got {qdrop!r}")
    numeric = isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
    if not (learning_rate == "scaled" or (numeric and 0 < learning_rate < math.inf)):
        raise RefquantError(f"adaround: learning_rate must be 'scaled' or a positive number, got {learning_rate!r}")
    if not (shrinkage == "auto" or (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1)):
        raise RefquantError(f"adaround: shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    if quantize_activations not in (True, False, "outputs", "choose", "per_layer"):
        raise RefquantError("adaround: quantize_activations must be True, False, 'outputs', 'choose' or "
                            f"'per_layer', got {quantize_activations!r}")
    if quantize_activations in ("choose", "per_layer") and (qdrop or use_fp32_inputs):
        raise RefquantError(f"adaround: quantize_activations={quantize_activations!r} chooses between the "
                            "simulation's inputs with and without activation quantizers; it does not combine with "
                            "qdrop or use_fp32_inputs")
    if qdrop and optimizer == "lbfgs":  # its line searches compare values: a new mask per evaluation breaks them
        raise RefquantError("adaround: qdrop draws a new input mask per step, which L-BFGS cannot take; "
                            "use optimizer='adam'")
    layers, skipped = find_layers(sim, LAYER_OPS)
    every_layer = layers  # which are output layers does not depend on nodes_to_include
    if nodes_to_include is not None:
        layers, skipped = included_layers(sim, layers, skipped, nodes_to_include)
    if skipped:
        warnings.warn(f"adaround: layers not optimized: {', '.join(skipped)}", stacklevel=2)
    if not layers:
        warnings.warn(f"adaround: graph {sim.graph.name!r} has no layer to AdaRound", stacklevel=2)
        return sim
    if quantize_activations == "choose":
        quantize_activations = False
        if any(q.enabled and q.kind != "param" for q in sim.quantizers.values()):  # else both kinds are the same
            from .input_choice import choose_inputs

            options = dict(num_iterations=num_iterations, reg_param=reg_param, beta_range=beta_range,
                           warm_start=warm_start, optimizer=optimizer, include_activation=include_activation,
                           num_columns=num_columns, columns_per_iteration=columns_per_iteration, finish=finish,
                           cache_activations=cache_activations, threads=threads, shrinkage=shrinkage,
                           learning_rate=learning_rate, nodes_to_include=nodes_to_include)
            data, choice = choose_inputs(sim, data, batch_size, seed, progress, options)
            quantize_activations = choice.quantize_activations
            if report is not None:
                report.append(choice)
    if quantize_activations in ("per_layer", "outputs") and not any(q.enabled and q.kind != "param"
                                                                    for q in sim.quantizers.values()):
        quantize_activations = False  # no activation quantizer: both kinds of input are the same
    late = set()  # "outputs": the output layers fitted to their quantized inputs, after every other layer
    if quantize_activations == "outputs":
        if not (qdrop or use_fp32_inputs):
            data = reusable(data, sim.graph, batch_size)
            included = {layer.name for layer in layers}
            late = {layer.name for layer in output_layers_with_data(sim, every_layer, data, batch_size)} & included
        quantize_activations = "outputs" if late else False
    rng = np.random.default_rng(seed)
    with SimState(sim) as state:
        if quantize_activations and any(q.enabled and q.kind == "activation" and sim.encoding_of(n) is None
                                        for n, q in sim.quantizers.items()):
            data = reusable(data, sim.graph, batch_size)  # an uncalibrated quantizer would pass its input as it is
            sim.compute_encodings(data, batch_size=batch_size, progress=progress)
            state.keep_enabled()
        ensure_weight_encodings(sim, layers)
        if quantize_activations == "per_layer":
            from .input_choice import PerLayerInputs

            feeds = list(iter_feeds(data, sim.graph, batch_size=batch_size))
            inputs = PerLayerInputs(sim, feeds, batch_size, seed, cache_activations)
            fit = inputs.adaround_layer
        else:
            if quantize_activations is not True:
                disable_activation_quantizers(sim)
            inputs = {quantize_activations is True: LayerInputs(sim, data, batch_size, use_fp32_inputs,
                                                                carry=cache_activations)}

            def fit(layer, **options):
                quantized = quantize_activations is True or layer.name in late
                if quantized and quantized not in inputs:  # the first output layer: every other layer is fitted
                    inputs.clear()  # the first pass's carried activations are no longer needed
                    state.restore_enabled()
                    inputs[True] = LayerInputs(sim, data, batch_size, carry=cache_activations)
                result = adaround_layer(sim, layer, inputs[quantized], **options)
                result.quantized_inputs = quantized and not use_fp32_inputs
                return result
            # an output layer's rounding changes no other layer's input, so the output layers can go last
            layers = [layer for layer in layers if layer.name not in late] + \
                [layer for layer in layers if layer.name in late]
        for layer in iterate(layers, progress, "adaround", unit="layer"):
            result = fit(layer, num_iterations=num_iterations, reg_param=reg_param, beta_range=beta_range,
                         warm_start=warm_start, optimizer=optimizer, include_activation=include_activation,
                         num_columns=num_columns, columns_per_iteration=columns_per_iteration, finish=finish,
                         threads=threads, rng=rng, qdrop=qdrop, shrinkage=shrinkage,
                         learning_rate=adam_learning_rate(learning_rate, num_iterations))
            if report is not None:
                report.append(result)
    return sim


def output_layers(sim, layers: list[LinearLayer]) -> list[LinearLayer]:
    """The layers of ``layers`` that no other layer of them runs after: nothing that reads their output, directly or
    through other nodes, is one of ``layers``."""
    layer_nodes = {id(layer.node) for layer in layers}
    consumers = sim.graph.consumers()
    found = []
    for layer in layers:
        seen, stack, later = set(layer.node.outputs), list(layer.node.outputs), False
        while stack and not later:
            for node in consumers.get(stack.pop(), []):
                later = later or id(node) in layer_nodes
                stack += [name for name in node.outputs if name not in seen]
                seen.update(node.outputs)
        if not later:
            found.append(layer)
    return found


def output_layers_with_data(sim, layers: list[LinearLayer], data, batch_size: int) -> list[LinearLayer]:
    """The :func:`output_layers` whose data has at least :data:`OUTPUT_LAYER_SAMPLES` samples per input of a weight
    row, ``N >= OUTPUT_LAYER_SAMPLES * K/G``. With few samples per input the rounding can fit each calibration
    sample's activation noise; the positions within a sample do not count, being alike. (Measured, samples per input:
    NudeNet's DFL conv 4, +1.6 dB; the convnet sample's and MTCNN P-Net's output layers 1.75, level; the mlp
    sample's 0.875, -0.12 dB; PP-OCR rec's 0.53, -1.8 dB: docs/adaround.md.)"""
    candidates = output_layers(sim, layers)
    if not candidates:
        return []
    samples = count_samples(data, sim.graph)
    if samples is None:
        samples = sum(len(next(iter(feed.values()))) for feed in iter_feeds(data, sim.graph, batch_size=batch_size))
    return [layer for layer in candidates if samples >= OUTPUT_LAYER_SAMPLES * layer.index.shape[2]]


def adaround_layer(sim, layer: LinearLayer, inputs: LayerInputs, *, num_iterations=10000, reg_param=0.01,
                   beta_range=(20, 2), warm_start=0.2, optimizer="adam", include_activation=True, num_columns=None,
                   columns_per_iteration=None, finish="threshold", threads: int | str | None = "auto",
                   rng=None, qdrop: float = 0.0, shrinkage: float | str = "auto",
                   learning_rate: float = ADAM_LR) -> AdaroundLayerReport:
    """AdaRound one layer of ``sim`` (its weight encoding must exist) and fix its rounding in ``sim``."""
    start = time.perf_counter()
    rng = rng if rng is not None else np.random.default_rng(0)
    objective, form, columns = build_objective(sim, layer, inputs, reg_param, include_activation, num_columns, rng,
                                               None if threads == "auto" else threads, qdrop, shrinkage)
    rounding = objective.rounding
    nearest = rounding.up(rounding.v0)
    loss_nearest = objective.recon_hard(nearest)
    up, loss, used_rate = nearest, loss_nearest, 0.0
    if num_iterations:
        if columns_per_iteration is None:  # full batch when all positions were kept (build_objective)
            columns_per_iteration = columns if num_columns is None and full_batch(objective) else MINIBATCH
        per_step = min(columns_per_iteration, columns) if optimizer == "adam" else columns
        # a step above AIMET's that ends worse than nearest rounding: fitted again at AIMET's (docs/adaround.md)
        rates = [learning_rate] + ([ADAM_LR] if optimizer == "adam" and learning_rate > ADAM_LR else [])
        with _blas_threads(step_threads(threads, rounding.base.shape, form, per_step)):
            for used_rate in rates:
                if optimizer == "adam":
                    v = optimize_adam(objective, rounding.v0, num_iterations, beta_range, warm_start,
                                      columns_per_iteration if form == "sampled" else None, rng, used_rate)
                else:
                    v = optimize_lbfgs(objective, rounding.v0, num_iterations, beta_range, warm_start)
                # settle decides each channel alone: not with a softmax, which couples the channels
                coupled = include_activation and layer.activation == SOFTMAX
                up = settle(objective, v) if finish == "greedy" and not coupled else rounding.up(v)
                loss = objective.recon_hard(up)
                if loss <= loss_nearest:
                    break
    kept_nearest = loss > loss_nearest  # never worse than nearest rounding on the data it was fitted to
    if kept_nearest:
        up, loss = nearest, loss_nearest
    sim.set_quantized_parameter(layer.weight, layer.from_matrix(rounding.hard(up)))
    return AdaroundLayerReport(layer.name, layer.weight, form, loss_nearest, loss, float(np.mean(up != nearest)),
                               time.perf_counter() - start, columns, kept_nearest,
                               float(np.mean(objective.loss.alpha)) if objective.loss.alpha is not None else 0.0,
                               used_rate if optimizer == "adam" else 0.0)


def build_objective(sim, layer: LinearLayer, inputs: LayerInputs, reg_param=0.01, include_activation=True,
                    num_columns=None, rng=None, threads: int | None = None, qdrop: float = 0.0,
                    shrinkage: float | str = "auto"):
    """Go through the layer's data once: ``(Objective, "quadratic" | "sampled", positions used)``.
    ``num_columns`` None: every position when they fit the full-batch budget, else a sample of 8,192.
    ``qdrop`` > 0 (and the inputs from the simulation): each input element is the FP32 model's with that
    probability (:class:`MixedSampledLoss`; the quadratic form takes the expectation, :class:`QuadraticLoss`)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    w = np.asarray(sim.graph.initializers[layer.weight], dtype=np.float32)
    scale, offset = grid_arrays(sim.encoding_of(layer.weight), w.shape)
    steps = sim.encoding_of(layer.weight).steps
    w_mat = layer.to_matrix(w).astype(np.float64)
    rounding = SoftRounding(w_mat, layer.to_matrix(scale), layer.to_matrix(offset), layer.to_matrix(offset) + steps)
    activation = (layer.activation_all if include_activation == "all" else layer.activation) \
        if include_activation else None
    mixed = qdrop > 0 and not inputs.use_fp32_inputs
    qdrop = qdrop_threshold(qdrop) / 256  # the probability the sampled loss's byte masks have
    reservoir = _Reservoir(num_columns or max(SAMPLED_COLUMNS, _full_batch_positions(w_mat, mixed)), rng)
    groups, _, per_in = w_mat.shape
    moments = None if activation is not None or groups * per_in * per_in > MOMENTS_BUDGET else \
        _Moments(fourth=shrinkage == "auto")
    for batch in inputs.batches(layer, fp32_inputs=mixed):
        x, z, t = batch[:3]
        with _blas_threads(threads):  # the simulation's forward passes above keep their own threads
            columns = layer.columns(x)
            fp32_columns = layer.columns(batch[3]) if mixed else None
            reservoir.offer(layer, _PairedColumns(columns, fp32_columns) if mixed else columns, z, t)
            if moments is None:
                continue
            for positions in position_chunks(columns):
                cols = columns.take(positions)
                residual = None if z is t else layer.output_matrix(t, positions) - layer.output_matrix(z, positions)
                if mixed:  # the mean input m = (1 - q) a + q b, its residual t - z_m = (1 - q) (t - z)
                    fp32_cols = fp32_columns.take(positions)
                    moments.add_variance(qdrop * (1 - qdrop) * np.square(cols - fp32_cols, dtype=np.float64).sum(2))
                    cols = (1 - qdrop) * cols + qdrop * fp32_cols
                    residual = (1 - qdrop) * residual
                moments.add(cols, residual)
    if reservoir.rows is None:
        raise RefquantError("adaround: the data set is empty: no batch was produced")
    if num_columns is None and not reservoir.complete:
        reservoir.shrink(SAMPLED_COLUMNS)  # too many positions for a full batch: the usual sample
    # the quadratic form costs M K^2 per evaluation, the sampled loss ~4 M K B: use the exact cheaper one
    kg = rounding.base.shape[2]
    if moments is None or (reservoir.complete and 2 * reservoir.seen < kg):
        cols, z, t = reservoir.arrays()
        if mixed:
            loss = MixedSampledLoss(cols[:, :kg], cols[:, kg:], z, t, w_mat, activation, qdrop, rng)
        else:
            loss = SampledLoss(cols, z, t, w_mat, activation)
        if shrinkage and not (shrinkage == "auto" and loss.softmax):  # a softmax couples its channels' losses
            weights = None if loss.softmax else loss.curvature_weights(t)
            loss.shrink(_cached_intensity(cols[:, :kg], weights, shrinkage, rng), weights)
        # every position kept, and an iteration over all of them within budget: Adam takes them all at each step
        loss.full_batch = reservoir.complete and reservoir.filled <= _full_batch_positions(w_mat, mixed)
        return Objective(rounding, loss, reg_param), "sampled", reservoir.filled
    alpha = None
    if shrinkage:
        alpha = np.full(groups, float(shrinkage)) if shrinkage != "auto" else \
            shrinkage_intensity(moments.h / max(1, moments.count), moments.fourth, moments.count)
    return Objective(rounding, QuadraticLoss(moments, w_mat, alpha), reg_param), "quadratic", moments.count


def _cached_intensity(cols: np.ndarray, weights: np.ndarray | None, shrinkage: float | str,
                      rng: np.random.Generator) -> np.ndarray:
    """The shrinkage intensity of the cached columns ``[G, K, P]``: ``shrinkage`` itself, or "auto"
    (:func:`masked_shrinkage_intensity`: per channel, or per group without curvature weights, ``u = 1``)."""
    if shrinkage != "auto":
        return np.full(cols.shape[0], float(shrinkage))
    if weights is None:
        return masked_shrinkage_intensity(cols, np.ones((cols.shape[0], 1, cols.shape[2]), np.float32), rng)[:, 0]
    return masked_shrinkage_intensity(cols, weights, rng)


def _full_batch_positions(w_mat: np.ndarray, mixed: bool = False) -> int:
    """Positions a layer may keep for a full-batch fit: positions x weights <= FULL_BATCH_MACS (an iteration's
    cost) and positions x (inputs + 2 outputs per position) <= FULL_BATCH_FLOATS (the cache; QDrop inputs: two
    sets of inputs and a mask)."""
    groups, out_per_group, in_per_group = w_mat.shape
    per_position = groups * ((2.25 if mixed else 1) * in_per_group + 2 * out_per_group)
    return max(1, min(FULL_BATCH_MACS // w_mat.size, int(FULL_BATCH_FLOATS // per_position)))


def full_batch(objective: "Objective") -> bool:
    """Whether a sampled objective holds every position of the data (then Adam takes them all at each step)."""
    return getattr(objective.loss, "full_batch", False)


def step_threads(threads, matrix_shape, form: str, positions_per_step: int):
    """BLAS threads for a layer's optimizer steps: ``threads`` itself unless it is "auto"; then all (None) when a
    step's GEMM work (weights x positions for the sampled loss, weights x K/G for the quadratic one) reaches
    :data:`THREADED_MACS`, else one. Measured on the 2-core machine, AIMET's convnet and MTCNN R/O-Net, 500 its:
    all threads 10-25 % faster on their big layers (O-Net conv1, 135,424 positions: 6.5 -> 5.5 s) and no slower on
    the small ones (mlp, P-Net); a 1,024-position minibatch step of a small layer is 2-8x slower with two."""
    if threads != "auto":
        return threads
    groups, rows, inner = matrix_shape
    work = groups * rows * inner * (positions_per_step if form == "sampled" else inner)
    return None if work >= THREADED_MACS else 1


class _blas_threads:
    """Cap BLAS threads (None: leave them); :func:`step_threads` decides for an optimizer's steps."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.limit = None

    def __enter__(self):
        if self.threads is not None:
            from threadpoolctl import threadpool_limits

            self.limit = threadpool_limits(self.threads)
        return self

    def __exit__(self, *exc):
        if self.limit is not None:
            self.limit.unregister()
        return False


__all__ = ["AdaroundLayerReport", "LayerInputs", "LinearLayer", "SoftRounding", "adaround", "adaround_layer",
           "annealed_beta", "build_objective", "find_layers", "grid_arrays", "lbfgs_stages", "rounding_regularizer",
           "settle"]
