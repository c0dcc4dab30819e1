"""AIMET's guard on weight scales against int32 bias overflow and requantization-scale underflow.

An integer target computes a quantized layer as ``y = round((x W + b) s' - z_y)`` with int32 bias
``b = round(b_float / (s_x s_w))`` and requantization scale ``s' = s_x s_w / s_y``. A channel whose weights are
nearly zero gets a tiny ``s_w``, and then ``b`` leaves int32 or ``s'`` underflows. After calibration, aimet-onnx
(``QuantizationSimModel._adjust_weight_scales_against_overflow``, refs/aimet.md §5.3) raises each weight scale of
Conv, ConvTranspose, Gemm and MatMul to at least, per output channel, with ``N = 2^31 - 2^15``:

1. ``|b_float| / (N s_x)``: the int32 bias fits;
2. ``2^-23.5 s_y / s_x`` when the layer's own output is quantized: ``s' > 2^-24``;
3. ``|b'| s_x s_w / (N s_x)`` with ``b' = round(b_float / (s_x s_w)) + round(o_y s_y / (s_x s_w))`` (the
   accumulator bias with the output offset folded in, as Hexagon stores it), again when the output is quantized.

The offset is kept; the arithmetic is AIMET's (float32 scales, steps 1 and 3 in float64 then rounded to float32,
steps 2 and 3's bias in float32), so the adjusted scales equal aimet-onnx's. The channel's weights then quantize to
codes near zero, which they nearly are. A weight encoding that is frozen (loaded, or fixed by AdaRound/SeqMSE) is
left as it is, with a warning when it would have needed the adjustment, as AIMET does.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..ir import Graph, Node
from .encoding import Encoding
from .subgraphs import all_initializers, all_producers

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BIAS_LIMIT = float(2 ** 31 - 2 ** 15)  # 2^31 less a margin for float error, as AIMET
MIN_REQUANT_SCALE = 2.0 ** -23.5  # strictly above 2^-24


def adjust_weight_scales(sim) -> list[str]:
    """Raise the weight scales of ``sim``'s layers as the module docstring says; returns the names of the layers
    whose weight encoding changed."""
    from .placement import feeding_quantizer

    graph: Graph = sim.graph
    producers, initializers = all_producers(graph), all_initializers(graph)
    consumers: dict[str, list[Node]] = {}
    for node in graph.walk():
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    adjusted = []
    for node in graph.walk():
        if node.op_type not in LAYERS or len(node.inputs) < 2:
            continue
        weight_q = sim.quantizers.get(node.inputs[1])
        if weight_q is None or weight_q.kind != "param" or not weight_q.active or weight_q.block_size is not None:
            continue
        w_enc = weight_q.encoding
        source = feeding_quantizer(sim, node.inputs[0], producers)
        x_enc = sim.encoding_of(source) if source is not None and sim.quantizers[source].kind != "param" else None
        if w_enc.kind != "int" or x_enc is None or x_enc.kind != "int" or x_enc.axis is not None:
            continue
        bias = _bias(node, graph, initializers, consumers)
        y_q = sim.quantizers.get(node.outputs[0]) if node.outputs else None
        y_enc = sim.encoding_of(node.outputs[0]) if y_q is not None and y_q.enabled else None
        if y_enc is not None and y_enc.kind != "int":
            y_enc = None
        new_scale = guarded_weight_scale(w_enc.scale, bias, x_enc.scale, y_enc)
        if new_scale is None or np.array_equal(new_scale, np.asarray(w_enc.scale, dtype=np.float64)):
            continue
        if weight_q.frozen or weight_q.fixed_value is not None:
            warnings.warn(f"{node.name or node.op_type}: the int32 bias or the requantization scale of this layer "
                          f"is out of range for an integer target, but its weight encoding is frozen and was not "
                          f"adjusted", RuntimeWarning, stacklevel=3)
            continue
        weight_q.encoding = w_enc.with_scale(new_scale.reshape(np.shape(w_enc.scale)))
        adjusted.append(node.name or node.outputs[0])
    return adjusted


def guarded_weight_scale(weight_scale, bias, input_scale, output: Encoding | None) -> np.ndarray | None:
    """The weight scale (float32 values, per channel or scalar) after steps 1-3, or None if the shapes of the
    bias and a per-channel scale disagree (nothing is adjusted then)."""
    w = np.asarray(weight_scale, dtype=np.float32).reshape(-1) if np.ndim(weight_scale) else \
        np.float32(weight_scale)
    s_x = np.float32(input_scale)
    b = np.zeros(np.shape(w), np.float32) if bias is None else np.asarray(bias, dtype=np.float32).reshape(-1)
    if np.ndim(w) and b.shape != w.shape:
        return None
    w = _against_bias(b, s_x, w)
    if output is not None:
        s_y, o_y = np.float32(output.scale), np.float32(output.offset)
        w = np.maximum(w, np.float32(MIN_REQUANT_SCALE) * s_y / s_x)  # step 2, float32 as AIMET's
        bias_scale = s_x * w
        accumulator = np.round(b / bias_scale) + np.round(o_y * s_y / bias_scale)
        w = _against_bias(accumulator * bias_scale, s_x, w)
    return np.asarray(w, dtype=np.float64)


def _against_bias(bias: np.ndarray, s_x: np.float32, w):
    """max(s_w, |b| / (N s_x)) in float64, rounded to float32; a scalar s_w takes the largest |b|."""
    b = np.abs(bias.astype(np.float64))
    if not np.ndim(w):
        b = b.max() if b.size else 0.0
    return np.maximum(np.asarray(w, np.float64), b / (BIAS_LIMIT * np.float64(s_x))).astype(np.float32)


def _bias(node: Node, graph: Graph, initializers, consumers) -> np.ndarray | None:
    """A Conv/Gemm's constant third input; for MatMul, the bias of AIMET's MatmulAdd rule (placement.matmul_bias)."""
    from .placement import matmul_bias

    if node.op_type != "MatMul":
        if len(node.inputs) > 2 and node.inputs[2] in initializers:
            return np.asarray(initializers[node.inputs[2]])
        return None
    found = matmul_bias(node, graph, consumers)
    return None if found is None else np.asarray(initializers[found[1]])
