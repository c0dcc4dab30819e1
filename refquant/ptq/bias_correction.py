"""Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2).

Quantizing a layer's weights, ``W_q = W + dW``, shifts the expected value of its output:
for ``y = W x + b`` and ``y_q = W_q x + b`` on the same input ``x``,

    E[y_q] - E[y] = dW E[x]        (per output channel; for a conv, dW is applied to E[x] per input
                                    channel and kernel tap, i.e. to the mean im2col patch)

and ``b <- b - dW E[x]`` removes that shift. Two ways to estimate the shift:

* empirical (default), AIMET's empirical bias correction (``aimet_torch.bias_correction.correct_bias``):
  layer by layer in graph order, the mean over the data, over the batch and spatial axes, of the
  layer's output in the quantized simulation (quantized weight, its input ``x_q`` the simulation's
  with the biases of the layers before already corrected) minus the mean of the same tensor in the
  original FP32 model (on its own input ``x``):

      shift = E[W_q x_q + b] - E[W x + b] = dW E[x_q] + W (E[x_q] - E[x])

  so the correction also removes the mean error that the layers before left in the layer's input
  (``reference="fp32_model"``, the default). ``reference="layer"`` corrects the weight term only,
  ``shift = dW E[x_q]`` (the paper's expression with the simulation's input). The layer is run
  alone on ``x_q`` by the op's own kernel, so padding, strides, dilations and groups are handled
  exactly. ``quantized_activations``: whether the simulation's activation quantizers are on while
  ``x_q`` is computed (default True: the corrected sim is then used with them, so the mean shift they
  cause is corrected too; AIMET turns them off, ``False``). Measured on MobileNetV2, per-tensor W8A8
  after CLE, logits SQNR (bench/ptq.py --w8a8 --recipe resize256 --photo-set all): 9.2 dB uncorrected,
  10.3 dB with ``reference="layer"``, 10.6 dB AIMET's way (activation quantizers off), 12.7 dB with the
  defaults (on the default crops of AIMET's example recipe, 4 seed pairs: 10.3 -> 12.8 dB mean).
  By default (``carry=True``) every batch's live tensors are kept in memory and advanced from layer
  to layer (each node runs once per batch in total, with the biases corrected so far); ``carry=False``
  streams the data instead, one forward prefix per layer (memory: one batch). The FP32 model's means
  are taken in one pass before any bias changes. Only per-channel float64 sums are kept.
* analytical: for a layer whose input is ``Relu(BatchNormalization(.))`` or ``BatchNormalization(.)``
  (or ``Relu(L(.))`` / ``L(.)`` for a layer ``L`` into which the QuantSim's preparation folded that BN: its
  statistics are found in ``sim.source_graph``, the model as given, and used while ``L`` is still as the fold
  left it), the BN output is taken as ``N(beta, gamma^2)`` per channel, so ``E[x] = beta`` without Relu and

      E[relu(N(mu, s^2))] = mu * (1 - Phi(-mu/s)) + s * phi(-mu/s)

  with it. For a conv, ``dW E[x]`` sums ``dW`` over the kernel taps: zero padding at the borders is
  ignored (the approximation of the paper). ConvTranspose layers and layers without such a BN fall
  back to the empirical estimate when data is given and are skipped otherwise.

Layers corrected: Conv, ConvTranspose, Gemm (``C`` per output channel, ``beta != 0``) and MatMul
followed by an Add of a per-channel constant, whose weight has an enabled, calibrated quantizer and
whose bias is an initializer used by that layer only. Layers without a bias are skipped with a
warning (adding a bias would change the graph the simulation was built on).

``sim.set_parameter`` gives the new bias to the simulation *and* to its FP32 reference, so after the
correction ``sim.run_float`` is no longer the original model: compare with a Session on a copy of the
graph made before. A MatMul+Add bias is quantized as a constant with the encoding it was calibrated
with; values the correction moves outside it are clipped until ``compute_encodings`` runs again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node, Value
from ..runtime import Session
from ..progress import iterate
from .bn_fold import describes, fold_batchnorms_info

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    """A layer whose bias can absorb the weight-quantization shift.

    ``channel_axis``: the axis of the layer output holding the output channels;
    ``bias_gain``: how much the output moves per unit of bias (Gemm's ``beta``, else 1).
    """

    node: Node
    weight: str
    bias: str
    channel_axis: int
    bias_gain: float = 1.0

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0]

    @property
    def input(self) -> str:
        return self.node.inputs[0]


# ----------------------------------------------------------------------------------- public API
REFERENCES = ("fp32_model", "layer")


def bias_correction(sim, data=None, analytical: bool = False, batch_size: int = 16, progress: bool = True,
                    *, reference: str = "fp32_model", quantized_activations: bool = True, carry: bool = True):
    """Correct the bias of every layer with quantized weights for the mean shift of its output:
    ``b <- b - (E[y_sim] - E[y_fp32])`` per output channel (``reference="fp32_model"``, AIMET's empirical
    correction), or ``b <- b - (W_q - W) E[x_q]`` (``reference="layer"``, and the analytical mode);
    see the module docstring.

    ``sim``: a calibrated :class:`~refquant.quant.QuantSim`; ``data``: anything
    :func:`refquant.data.iter_feeds` accepts (needed by the empirical mode; the analytical mode
    uses it for the layers it cannot handle and skips them when ``data`` is None).
    Layers are corrected in graph order; each new bias is set with ``sim.set_parameter`` (so it
    reaches both the simulation and the FP32 reference of ``sim`` and is re-quantized if the bias is).
    ``quantized_activations``: the activation quantizers stay on while the layer inputs are computed
    (False: off, as AIMET; restored afterwards). ``carry``: keep the live tensors of every batch and
    advance them layer by layer (one forward pass in total) instead of a forward prefix per layer.
    If anything fails or is interrupted, every bias is restored. Returns ``sim``.
    """
    if not analytical and data is None:
        raise RefquantError("bias_correction: the empirical mode needs data (or pass analytical=True)")
    if data is not None:
        from ..data import reusable

        data = reusable(data, sim.graph, batch_size)  # read twice: the FP32 means, then the simulation
    if reference not in REFERENCES:
        raise RefquantError(f"bias_correction: reference {reference!r} is not one of {', '.join(REFERENCES)}")
    layers, no_bias = find_layers(sim)
    if no_bias:
        warnings.warn("bias_correction: layer(s) with quantized weights but no per-channel bias initializer "
                      f"of their own are not corrected: {', '.join(no_bias)}", stacklevel=2)
    if not layers:
        warnings.warn(f"bias_correction: graph {sim.graph.name!r} has no layer with quantized weights and "
                      "a bias: nothing to correct", stacklevel=2)
        return sim
    folded = _folded_batchnorms(sim) if analytical else ()
    plan = [(layer, analytical_input_mean(sim.graph, layer, folded) if analytical else None) for layer in layers]
    if data is None:
        skipped = [layer.name for layer, mean in plan if mean is None]
        if skipped:
            warnings.warn("bias_correction: no data, and these layers do not read a BatchNormalization "
                          f"(+Relu) output the analytical mode can use; skipped: {', '.join(skipped)}",
                          stacklevel=2)
        plan = [(layer, mean) for layer, mean in plan if mean is not None]
    empirical = [layer for layer, mean in plan if mean is None]
    saved_enabled = {name: q.enabled for name, q in sim.quantizers.items()}
    with _restored_on_error(sim, [layer.bias for layer, _ in plan]):
        try:
            if not quantized_activations:
                for q in sim.quantizers.values():
                    if q.kind == "activation":
                        q.enabled = False
            fp32_means = None
            if empirical and reference == "fp32_model":
                fp32_means = fp32_output_means(sim.graph, empirical, data, batch_size)
            inputs = None
            if carry and empirical:
                inputs, data = _carried_inputs(sim, data, batch_size)  # the batches, read once, stream if need be
            for layer, input_mean in iterate(plan, progress, "bias correction", unit="layer"):
                delta_w = weight_error(sim, layer)
                if input_mean is not None:
                    shift = analytical_shift(layer, delta_w, input_mean)
                else:
                    carried = None if inputs is None else inputs.tensor(layer.input)
                    shift = empirical_shift(sim, layer, delta_w, data, batch_size, inputs=carried,
                                            fp32_mean=None if fp32_means is None else fp32_means[layer.name])
                sim.set_parameter(layer.bias, corrected_bias(sim.graph.initializers[layer.bias], shift, layer))
        finally:
            for name, enabled in saved_enabled.items():
                sim.quantizers[name].enabled = enabled
    return sim


def find_layers(sim) -> tuple[list[Layer], list[str]]:
    """The layers to correct, in graph order, and the names of layers with quantized weights but no
    bias. Raises if a weight quantizer is enabled but has no encoding (``sim`` not calibrated)."""
    graph = sim.graph
    consumers = graph.consumers()
    outputs = set(graph.output_names)
    layers, no_bias = [], []
    for node in graph.nodes:
        if node.op_type not in LAYER_OPS or node.domain or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        quantizer = sim.quantizers.get(weight)
        if quantizer is None or quantizer.kind != "param" or not quantizer.enabled:
            continue
        if sim.encoding_of(weight) is None:
            raise RefquantError(f"bias_correction: weight {weight!r} of node {node.name!r} has no encoding; "
                                "call sim.compute_encodings (or load_encodings) first")
        if node.inputs[0] in graph.initializers:
            continue  # a constant input: the layer's output is a constant, not a data-dependent mean
        layer = _layer_with_bias(graph, node, consumers, outputs)
        if layer is None:
            no_bias.append(node.name or node.outputs[0])
        else:
            layers.append(layer)
    return layers, no_bias


def weight_error(sim, layer: Layer) -> np.ndarray:
    """``dW = W_q - W`` in float64, ``W_q`` being the weight exactly as the simulation uses it."""
    from ..quant.qdq import quantize_dequantize

    weight = np.asarray(sim.graph.initializers[layer.weight])
    quantized = quantize_dequantize(weight.astype(np.float32), sim.encoding_of(layer.weight), sim.rounding)
    quantized = quantized.astype(weight.dtype, copy=False)  # the simulation's constant has the weight's dtype
    return quantized.astype(np.float64) - weight.astype(np.float64)


def corrected_bias(bias: np.ndarray, shift: np.ndarray, layer: Layer) -> np.ndarray:
    """``b - shift / gain`` with ``shift = E[y_q] - E[y]`` per channel, in float64, in the bias's shape."""
    new = np.asarray(bias, dtype=np.float64) - (shift / layer.bias_gain).reshape(np.shape(bias))
    return new.astype(bias.dtype)


# ----------------------------------------------------------------------------------- empirical
def empirical_shift(sim, layer: Layer, delta_w: np.ndarray, data, batch_size: int = 16,
                    inputs: list[np.ndarray] | None = None, fp32_mean: np.ndarray | None = None) -> np.ndarray:
    """Per output channel, over the data and the spatial positions, with ``x_q`` the layer's input in
    the quantized simulation as it is now (``inputs``, its batches already computed, when given; else
    ``sim.run`` on ``data``'s feeds): ``E[(W_q - W) x_q]``, or with ``fp32_mean`` (the FP32 model's mean
    of the layer output) ``E[layer(W_q, x_q)] - fp32_mean``. float64."""
    if fp32_mean is None:
        probe = _probe(layer, delta_w, sim.graph.opset)
    else:
        weight = np.asarray(sim.graph.initializers[layer.weight]).astype(np.float64) + delta_w
        probe = _probe(layer, weight, sim.graph.opset, with_bias=sim.graph)
    total, count = None, 0
    for x in (inputs if inputs is not None else _layer_inputs(sim, layer, data, batch_size)):
        _check_finite(x, layer.input)
        y = probe.run({layer.input: np.asarray(x, dtype=np.float64)})["dy"]
        per_channel = np.moveaxis(y, layer.channel_axis, 0).reshape(y.shape[layer.channel_axis], -1)
        total = per_channel.sum(axis=1) if total is None else total + per_channel.sum(axis=1)
        count += per_channel.shape[1]
    if count == 0:
        raise RefquantError(f"bias_correction: the data set is empty: no batch reached layer {layer.name!r}")
    return total / count if fp32_mean is None else total / count - fp32_mean


def fp32_output_means(graph: Graph, layers: list[Layer], data, batch_size: int = 16) -> dict[str, np.ndarray]:
    """The FP32 model's mean of each layer's output per output channel (float64), in one pass over the
    data (``graph`` as it is now: call before changing any bias)."""
    from ..data import iter_feeds

    wanted = {layer.node.outputs[0]: layer for layer in layers}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def accumulate(name, array, node):
        layer = wanted.get(name)
        if layer is not None and node is not None:  # produced by the layer (not a graph input)
            y = np.moveaxis(np.asarray(array, np.float64), layer.channel_axis, 0)
            y = y.reshape(y.shape[0], -1)
            sums[name] = sums.get(name, 0.0) + y.sum(axis=1)
            counts[name] = counts.get(name, 0) + y.shape[1]
        return None

    session = Session(graph.copy(), hooks=[accumulate])
    outputs = list(graph.output_names)  # the layer outputs they depend on are produced on the way
    for index, feeds in enumerate(iter_feeds(data, graph, batch_size=batch_size)):
        session.run(feeds, outputs=outputs)
        if index == 0:  # layers no graph output depends on: ask for them by name from now on
            missing = [name for name in wanted if name not in counts]
            if missing:
                session.run(feeds, outputs=missing)
                outputs += missing
    if not counts:
        raise RefquantError("bias_correction: the data set is empty: no batch was produced")
    return {layer.name: sums[layer.node.outputs[0]] / counts[layer.node.outputs[0]] for layer in layers}


def _layer_inputs(sim, layer: Layer, data, batch_size: int):
    """The layer's input batches computed by ``sim.run`` from the feeds (one forward prefix each)."""
    from ..data import iter_feeds

    for feeds in iter_feeds(data, sim.graph, batch_size=batch_size):
        yield sim.run(feeds, outputs=[layer.input])[layer.input]


def _carried_inputs(sim, data, batch_size: int):
    """``(carried, feeds)``: every batch's live tensors in the simulation, advanced on demand (see
    ``layer_inputs._CarriedSide``: a tensor is computed with the parameters (corrected biases) as they are when it is
    first asked for), or None when they would not fit in memory (``adaround.carry_fits``); the data to stream then."""
    from ..data import iter_feeds
    from .layer_inputs import _CarriedSide, carry_fits

    if not carry_fits(sim, data, batch_size, sides=1, what="bias_correction"):
        return None, data  # streamed from the source (made reusable by bias_correction)
    feeds = list(iter_feeds(data, sim.graph, batch_size=batch_size))
    if not feeds:
        raise RefquantError("bias_correction: the data set is empty: no batch was produced")
    sim.refresh()
    return _CarriedSide(sim, feeds, simulated=True), feeds


def _probe(layer: Layer, weight: np.ndarray, opset: dict, with_bias: Graph | None = None) -> Session:
    """A one-node graph: the layer with ``weight`` (``dW`` or ``W_q``) and, when ``with_bias`` (the graph)
    is given, the layer's own bias input (a MatMul's Add is left out either way)."""
    inputs = [layer.input, "dW"]
    initializers = {"dW": weight}
    if with_bias is not None and layer.node.op_type != "MatMul" and len(layer.node.inputs) > 2 and layer.node.inputs[2]:
        inputs.append("B")
        initializers["B"] = np.asarray(with_bias.initializers[layer.node.inputs[2]], np.float64)
    node = Node(layer.node.op_type, inputs, ["dy"], dict(layer.node.attrs), "bias_correction_probe",
                layer.node.domain, layer.node.version)
    graph = Graph(nodes=[node], inputs=[Value(layer.input)], outputs=[Value("dy")],
                  initializers=initializers, opset=dict(opset), name="bias_correction_probe")
    return Session(graph)


def _check_finite(x: np.ndarray, name: str) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise RefquantError(f"tensor {name!r} has NaN or Inf in the quantized simulation; "
                            "check the data and the encodings")


# ----------------------------------------------------------------------------------- analytical
def expected_relu_of_gaussian(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``E[max(0, z)]`` for ``z ~ N(mu, sigma^2)``: ``mu (1 - Phi(-mu/sigma)) + sigma phi(-mu/sigma)``.

    sigma = 0 gives ``max(mu, 0)``."""
    from scipy.special import ndtr

    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.abs(np.asarray(sigma, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = -mu / sigma
        value = mu * (1 - ndtr(z)) + sigma * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return np.where(sigma > 0, value, np.maximum(mu, 0.0))


def _folded_batchnorms(sim) -> list:
    """The BNs the sim's preparation folded after a layer (their records, :mod:`refquant.ptq.bn_fold`), found by
    folding the model as given again; :func:`~refquant.ptq.bn_fold.describes` later checks each still applies."""
    source = getattr(sim, "source_graph", None)
    if source is None or source is sim.graph or not any(n.op_type == "BatchNormalization" for n in source.nodes):
        return []
    return [r for r in fold_batchnorms_info(source, warn=False)[1] if r.position == "after"]


def analytical_input_mean(graph: Graph, layer: Layer, folded=()) -> np.ndarray | None:
    """``E[x]`` per channel of a layer input ``x = Relu(BN(.))`` or ``BN(.)`` from the BN's beta and
    gamma (BN output ~ N(beta, gamma^2)); None if the input is not such a tensor or the layer is not
    one the analytical formula covers (ConvTranspose, Gemm with transA, MatMul on rank > 2 inputs).
    ``folded``: records of BNs already folded into the layer before (:func:`_folded_batchnorms`, e.g. by the
    QuantSim's preparation): ``x = Relu(L(.))`` or ``L(.)`` with such a layer ``L`` counts as its BN's output."""
    if layer.node.op_type == "ConvTranspose" or layer.node.attrs.get("transA", 0):
        return None
    if layer.node.op_type == "MatMul":
        rank = graph.value(layer.input).rank
        if rank != 2:  # BN normalizes axis 1; only a [N, K] MatMul input has its features there
            return None
    producers = graph.producers()
    node = producers.get(layer.input)
    relu = node is not None and node.op_type == "Relu"
    if relu:
        node = producers.get(node.inputs[0])
    record = None if node is None else next((r for r in folded if r.layer == node.name), None)
    if record is not None and describes(record, graph):
        gamma, beta = record.gamma, record.beta
    elif node is None or node.op_type != "BatchNormalization" or node.attrs.get("training_mode", 0):
        return None
    else:
        gamma, beta = (graph.initializers.get(name) for name in node.inputs[1:3])
    if gamma is None or beta is None:
        return None
    mu, sigma = beta.astype(np.float64), np.abs(gamma.astype(np.float64))
    return expected_relu_of_gaussian(mu, sigma) if relu else mu


def analytical_shift(layer: Layer, delta_w: np.ndarray, input_mean: np.ndarray) -> np.ndarray:
    """``dW E[x]`` per output channel with ``E[x]`` constant over space: for a conv,
    ``shift[o] = sum_{c in group(o), taps} dW[o, c, taps] E[x][c]`` (padding ignored);
    for Gemm ``alpha dW' E[x]`` (``dW'`` = dW transposed to [N, K] when not transB); MatMul ``E[x] dW``."""
    op = layer.node.op_type
    if op == "Conv":
        taps = delta_w.reshape(delta_w.shape[0], delta_w.shape[1], -1).sum(axis=2)  # [M, C/group]
        group = int(layer.node.attrs.get("group", 1))
        m, cg = taps.shape
        per_group_mean = input_mean.reshape(group, cg)
        return np.einsum("gmc,gc->gm", taps.reshape(group, m // group, cg), per_group_mean).reshape(m)
    if op == "Gemm":
        w = delta_w if layer.node.attrs.get("transB", 0) else delta_w.T
        return float(layer.node.attrs.get("alpha", 1.0)) * (w @ input_mean)
    return input_mean @ delta_w  # MatMul [K] @ [K, N]


# ----------------------------------------------------------------------------------- layers
def _layer_with_bias(graph: Graph, node: Node, consumers, outputs) -> Layer | None:
    """The :class:`Layer` of ``node`` if it has a per-channel bias initializer only it uses, else None."""
    weight = node.inputs[1]
    w = graph.initializers.get(weight)
    if w is None or w.ndim < 2:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        channels = w.shape[0] if node.op_type == "Conv" else w.shape[1] * int(node.attrs.get("group", 1))
        bias = node.inputs[2] if len(node.inputs) > 2 else ""
        return _if_bias(graph, node, bias, channels, 1, 1.0, consumers)
    if node.op_type == "Gemm":
        channels = w.shape[0] if node.attrs.get("transB", 0) else w.shape[1]
        beta = float(node.attrs.get("beta", 1.0))
        bias = node.inputs[2] if len(node.inputs) > 2 and beta != 0 else ""
        return _if_bias(graph, node, bias, channels, -1, beta, consumers)
    # MatMul: the bias is the constant of the only consumer, an Add
    users = consumers.get(node.outputs[0], [])
    if w.ndim != 2 or node.outputs[0] in outputs or len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = [name for name in add.inputs if name != node.outputs[0]]
    if len(other) != 1:
        return None
    return _if_bias(graph, node, other[0], w.shape[1], -1, 1.0, consumers, bias_node=add)


def _if_bias(graph, node, bias, channels, axis, gain, consumers, bias_node=None) -> Layer | None:
    """A Layer when ``bias`` is an initializer with one value per output channel on ``axis`` of the
    output (shape [C], or [1, ..., C] for the last axis) that no other node reads."""
    array = graph.initializers.get(bias) if bias else None
    if array is None or array.size != channels or array.dtype.kind != "f":
        return None
    if axis == -1 and array.shape[-1] != channels:
        return None
    if axis == 1 and array.ndim != 1:
        return None
    if [n for n in consumers.get(bias, []) if n is not (bias_node or node)]:
        return None  # shared: correcting it for this layer would move the others
    return Layer(node, node.inputs[1], bias, axis, gain)


# ----------------------------------------------------------------------------------- helpers
class _restored_on_error:
    """Context manager: on any exception (Ctrl-C included) put the named parameters back."""

    def __init__(self, sim, names):
        self.sim = sim
        self.saved = {name: np.array(sim.graph.initializers[name], copy=True) for name in dict.fromkeys(names)}

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            for name, array in self.saved.items():
                self.sim.set_parameter(name, array)
        return False


__all__ = ["REFERENCES", "Layer", "analytical_input_mean", "analytical_shift", "bias_correction", "corrected_bias",
           "empirical_shift", "expected_relu_of_gaussian", "find_layers", "fp32_output_means", "weight_error"]
