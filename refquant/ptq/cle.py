"""Cross-layer equalization (CLE) and high-bias absorption (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", sections 4.1 and 4.2).

**Why.** Per-tensor weight quantization uses one grid for all output channels of a layer, so a
channel whose weights span [-0.01, 0.01] next to one spanning [-10, 10] is quantized to a handful of
levels. CLE moves range between consecutive layers so that each channel gets a fair share.

**Scaling equivariance.** For a positive per-channel factor ``s`` and ``f`` = ReLU, PReLU, LeakyReLU
or the identity, ``f(x / s) = f(x) / s``. So for two layers ``y = W2 f(W1 x + b1) + b2``,

    W1'[i] = W1[i] / s_i,   b1'_i = b1_i / s_i,   W2'[:, i] = W2[:, i] s_i

gives the same ``y`` for every input (``i`` = output channel of layer 1 = input channel of layer 2;
for a conv, ``W[i]`` is all of output channel ``i``'s kernel, ``W[:, i]`` all taps reading channel ``i``).

**The scale.** With ``r1_i = max |W1[i]|`` and ``r2_i = max |W2[:, i]|``, the paper's optimum

    s_i = (1 / r2_i) sqrt(r1_i r2_i) = sqrt(r1_i / r2_i)

makes both ranges ``sqrt(r1_i r2_i)``: after scaling, ``r1_i' == r2_i'``. A channel with ``r1_i`` or
``r2_i`` zero keeps ``s_i = 1``.

**Depthwise-separable triplets** ``conv1 -> depthwise -> conv2`` (AIMET's ``ScaleFactorCalculator::
ForDepthWiseSeparableLayer``): channel ``i`` of the depthwise conv is both its input and output channel,
so three ranges meet. With ``r1`` (conv1 outputs), ``r2`` (depthwise channels), ``r3`` (conv2 inputs) and
``m = (r1 r2 r3)^(1/3)``:

    s12 = r1 / m    (conv1 rows / s12, depthwise * s12)
    s23 = m / r3    (depthwise / s23, conv2 columns * s23)

so that all three ranges become ``m`` in one step.

**Chains and sweeps.** Layers are Conv, ConvTranspose (any groups), Gemm and MatMul with constant
weights (Gemm and MatMul are additions to AIMET's Conv/ConvTranspose). Two layers are a pair when the
first one's output is read only by the second, directly or through a chain of single-reader
Relu / PRelu / LeakyRelu / Clip(min=0) / Min(x, constant) nodes. Consecutive pairs form chains, cut
into sets as AIMET does: ``conv, depthwise, conv`` triplets where they occur, pairs elsewhere, but never a
pair that ends in a depthwise layer (AIMET's ``convert_layer_group_to_cls_sets`` drops them too). Such a pair
leaves the depthwise output as it was and only moves range from layer 1's weights into the per-tensor
activation between them; measured on per-tensor W8A8 (bench/results_ptq_vs_aimet_models.txt), equalizing the
stem ``conv -> BN -> depthwise`` of PP-OCRv4 rec cost 0.27 dB, and PP-OCR's direction classifier lost 1.4 dB
to such pairs. A layer in
two sets (the last of one, the first of the next) has its input channels set by the first and its
output channels by the second, which unbalances the first again; so the sets are swept repeatedly
until every scale is within ``tolerance`` of 1 (``max_sweeps=1`` is AIMET's single pass). At the fixed
point every pair of the chain is equalized (balanced, where a bound takes part: below).

**ReLU6.** ``Clip(x / s, 0, 6) = Clip(x, 0, 6 s) / s``: after scaling, channel ``i`` needs an upper bound
``6 / s_i`` of its own, which ONNX's Clip cannot express (its bounds are scalars). So a Clip(0, m) across
which channels were scaled becomes ``Relu`` followed by ``Min(x, m / s)`` with a per-channel constant
``m / s`` shaped to broadcast along the channel axis: exact, and still an ONNX graph every runtime runs.
The Min keeps the Clip's node and output names. With ``replace_relu6=True`` such Clips are instead
replaced by Relu before equalizing, as AIMET's ``equalize_model`` does (``replace_relu6_with_relu``):
simpler graphs, but the FP32 model changes (outputs above the bound are no longer clipped). Measured against
aimet-onnx's own ``equalize_model`` on the same MobileNetV2 crops (bench/results_ptq_vs_aimet.txt, per-tensor
W8A8, 4 seed pairs): AIMET 11.09 dB / 70.1 % top-1; ``replace_relu6=True, max_sweeps=1`` (AIMET's algorithm)
11.10 dB / 68.2 %; the exact form with ``balance_bounds=False`` 10.31 / 75.2, with the default (below) 11.81 / 73.0.

**Bounded activations** (``balance_bounds=True``, the default; a refquant addition). Equalizing weights alone
moves range into the activation between the layers: where that activation is a ReLU6, every channel spans the
same [0, 6] before scaling and ``[0, 6 / s_i]`` after, so the one per-tensor activation grid has to cover
``6 / min s_i`` (on MobileNetV2's expansion outputs 3-10x more than before). The bound is the one activation range
known without data, so it joins the balance: per channel, with ``x = log`` of each range the scales touch (layer 1
rows ``x1 - t1``, depthwise ``x2 + t1 - t2``, last layer columns ``x3 + t2``, and each bounded activation
``log b_j - t_j``), the log-scales ``t_j = log s_j`` minimize ``sum_k (x_k' - L)^2`` over ``t`` and a common level
``L``. Without a bound this is the rule above (all ranges equal, zero residual); a pair with a bound ``b`` gets

    s_i = (r1_i b_i / r2_i^2)^(1/4).

Measured on MobileNetV2 against aimet-onnx's ``equalize_model`` on the same crops (per-tensor W8A8, 4 seed pairs,
bench/results_ptq_vs_aimet.txt): 11.81 dB / 73.0 % top-1 agreement, AIMET 11.09 / 70.1, weights alone 10.31 / 75.2.
Relu, PRelu and LeakyRelu have no bound: there the rule is the paper's.

**High-bias absorption** (section 4.2). After BN folding, layer 1's pre-activation in channel ``i`` is
``N(beta_i, gamma_i^2)`` by the folded BN's statistics (divided by the channel's CLE scale ``S_i``). When
``c_i = max(0, beta_i - 3 |gamma_i|)`` > 0, almost all values exceed ``c_i`` and ``f(x - c) = f(x) - c``
there for ReLU-like ``f``, so ``c`` moves from layer 1's bias into layer 2's:

    b1' = b1 - c,   b2' = b2 + W2 c      (for a conv, W2 c sums each kernel over its taps)

and a Min bound moves with it (``m' = m - c``). Between linear layers (nothing in between) it is exact
for any ``c``, and ``c = beta`` (AIMET). With an activation it is an approximation: exact for inputs
``x >= c``, which the BN statistics predict for 99.87 % of a Gaussian channel. A conv layer 2 that reads
padding takes nothing: its padded taps read 0, not ``c``, so ``b2 + W2 c`` would be wrong on every border
output, not on a tail of the data (the paper and AIMET ignore this; on PP-OCR's direction classifier
absorbing into padded convs moved the FP32 output to 49 dB SQNR against the original and cost 2.5 dB of
per-tensor W8A8). Only links of an equalized set absorb (AIMET's ``HighBiasFold`` runs on its CLS sets):
PP-OCRv4 rec's stem absorbed into its padded depthwise conv outside any set gave FP32 outputs at 20 dB. Only BNs that
were folded *after* a layer are used (a BN before a layer describes its input, not its output);
a model exported with its BNs already folded into the convs (as PyTorch's ONNX export of MobileNetV2
in eval mode) has no statistics, and nothing is absorbed. (The rule with statistics measured on data
instead, tried on that MobileNetV2: it is far from exact there, the FP32 logits moved to 17 dB SQNR
against the original, so it is not offered.) Layer 2
must be a Conv or Gemm (a ConvTranspose with strides does not turn a constant input into a constant
output); a layer 2 without bias gets one named ``<node name>.bias``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node, Value
from . import bn_fold as bf

SCALE_COMMUTING = ("Relu", "PRelu", "LeakyRelu")  # f(x / s) = f(x) / s for s > 0


class EqualizationError(RefquantError):
    """Equalization asked for something it cannot do (a bad argument)."""


@dataclass
class Between:
    """One op between two equalized layers. ``bound`` (Clip and Min only): the upper bound per channel,
    float64, shaped to broadcast along the layer output's channel axis; it follows the scaling."""

    node: Node
    kind: str  # "relu" (Relu/PRelu/LeakyRelu), "clip" (Clip(0, m) or Clip(0)), "min" (Min(x, const))
    bound: np.ndarray | None = None


@dataclass
class Link:
    """Layer ``first`` feeding layer ``second``, with ``between`` ops in between (possibly none).
    ``scale``: the total factor its channels were divided by on the way (``S_i``; ``x_i / S_i`` flows)."""

    first: Node
    second: Node
    between: list[Between]
    scale: np.ndarray | None = None
    absorbed: np.ndarray | None = None  # the high-bias c moved from first's bias into second's


@dataclass
class EqualizedSet:
    """One CLS set (2 layers, or conv-depthwise-conv) and its links, in the returned graph's names."""

    layers: tuple[str, ...]
    scales: tuple[np.ndarray, ...]  # per link: total S_i (layer 1 channel i was divided by S_i)


@dataclass
class EqualizationReport:
    """What :func:`equalize_pass` did, named as in the returned graph."""

    sets: list[EqualizedSet] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = False  # every scale of the last sweep was within the tolerance of 1
    folded_batchnorms: list[str] = field(default_factory=list)
    absorbed: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (layer1, layer2) -> c
    replaced_clips: list[str] = field(default_factory=list)  # Clip -> Relu (replace_relu6=True)
    split_clips: list[str] = field(default_factory=list)  # Clip -> Relu + Min(per-channel bound)


# ----------------------------------------------------------------------------------- public API
def equalize(graph: Graph, replace_relu6: bool = False, high_bias_absorption: bool = True,
             max_sweeps: int = 100, tolerance: float = 1e-6, balance_bounds: bool = True,
             batchnorms: Sequence[bf.FoldedBatchNorm] = ()) -> Graph:
    """A copy of ``graph`` with BatchNormalizations folded, consecutive layers cross-layer equalized and
    high biases absorbed (module docstring). ``graph`` is not modified. Without any pair of layers to
    equalize, warns and returns an unchanged copy. ``balance_bounds=False``: the paper's rule everywhere (weight
    ranges only), also across Clip(0, m) activations. ``batchnorms``: the records of BNs folded before
    (:func:`~refquant.ptq.bn_fold.fold_batchnorms_info`, e.g. a ``bn_fold`` step); high-bias absorption uses those
    that still describe their layer (:func:`~refquant.ptq.bn_fold.describes`) as it uses the BNs it folds."""
    return equalize_pass(graph, replace_relu6, high_bias_absorption, max_sweeps, tolerance, balance_bounds,
                         batchnorms)[0]


def equalize_pass(graph: Graph, replace_relu6: bool = False, high_bias_absorption: bool = True,
                  max_sweeps: int = 100, tolerance: float = 1e-6, balance_bounds: bool = True,
                  batchnorms: Sequence[bf.FoldedBatchNorm] = ()) -> tuple[Graph, EqualizationReport]:
    """Like :func:`equalize`, and an :class:`EqualizationReport` of what was folded, scaled and absorbed."""
    if int(max_sweeps) < 1:
        raise EqualizationError(f"equalize: max_sweeps must be >= 1, got {max_sweeps!r}")
    g, records = bf.fold_batchnorms_info(graph, warn=False)
    report = EqualizationReport(folded_batchnorms=[r.bn for r in records])
    links = find_links(g)
    if not links:
        warnings.warn(f"equalize: graph {graph.name!r} has no pair of consecutive layers to equalize (Conv, "
                      "ConvTranspose, Gemm or MatMul with constant weights, the first read only by the second "
                      "directly or through Relu/PRelu/LeakyRelu/Clip(0, m)); returning an unchanged copy",
                      stacklevel=2)
        return graph.copy(), EqualizationReport()
    if replace_relu6:
        report.replaced_clips = _clips_to_relu(g, links)
    weights = {id(n): np.asarray(bf.weight_of(g, n), np.float64) for link in links for n in (link.first, link.second)}
    biases = {id(n): bf.bias_of(g, n) for link in links for n in (link.first, link.second)}
    sets = cls_sets(g, links, weights)
    if not sets:
        warnings.warn(f"equalize: graph {graph.name!r} has no set of layers to equalize (its only consecutive "
                      f"layers are pairs ending in a depthwise conv: {', '.join(l.second.name for l in links)}); "
                      "returning an unchanged copy", stacklevel=2)
        return graph.copy(), EqualizationReport()
    report.sweeps, report.converged = _sweep(sets, weights, biases, max_sweeps, tolerance, balance_bounds)
    if high_bias_absorption:
        after = {r.layer: r for r in batchnorms if bf.describes(r, g)}
        after.update({r.layer: r for r in records if r.position == "after"})
        for link in (link for s in sets for link in s.links):
            if link.first.name in after:
                c = absorb_high_bias(link, after[link.first.name], weights, biases)
                if c is not None:
                    report.absorbed[(link.first.name, link.second.name)] = c
    _write_back(g, links, weights, biases)
    report.split_clips = _materialize_bounds(g, links)
    report.sets = [EqualizedSet(tuple(n.name for n in s.layers), tuple(link.scale for link in s.links))
                   for s in sets]
    return g, report


# ----------------------------------------------------------------------------------- finding pairs
def find_links(graph: Graph) -> list[Link]:
    """Every pair of layers that can be equalized (module docstring), in graph order of the first."""
    counts = graph.use_counts()
    readers = graph.consumers()
    links = []
    for node in graph.nodes:
        if not _scalable(graph, node, counts):
            continue
        between: list[Between] = []
        tensor = node.outputs[0]
        while True:
            if counts[tensor] != 1 or len(readers.get(tensor, [])) != 1:
                break
            reader = readers[tensor][0]
            if _scalable(graph, reader, counts) and reader.inputs[0] == tensor and tensor not in reader.inputs[1:]:
                if _fits(graph, node, reader):
                    links.append(Link(node, reader, between))
                break
            op = _between(graph, reader, tensor, node)
            if op is None:
                break
            between.append(op)
            tensor = reader.outputs[0]
    return links


def _scalable(graph: Graph, node: Node, counts) -> bool:
    """A layer whose weight and bias only it reads, so scaling them changes nothing else."""
    if not bf.is_layer(graph, node):
        return False
    return all(counts[name] == 1 for name in node.inputs[1:3] if name)


def _fits(graph: Graph, first: Node, second: Node) -> bool:
    """Whether ``first``'s output channels are ``second``'s input channels: same channel axis (1 for
    Conv/ConvTranspose, the last for Gemm/MatMul: a MatMul after a conv would contract a spatial axis),
    same count, and no transA (a Gemm with transA reads its input channels along A's axis 0)."""
    if (first.op_type in ("Gemm", "MatMul")) != (second.op_type in ("Gemm", "MatMul")):
        return False
    if second.op_type == "Gemm" and second.attrs.get("transA", 0):
        return False
    n_out, _ = bf.channels(first, bf.weight_of(graph, first))
    _, n_in = bf.channels(second, bf.weight_of(graph, second))
    return n_out == n_in


def _between(graph: Graph, node: Node, tensor: str, layer: Node) -> Between | None:
    """``node`` as an op that commutes with positive per-channel scaling of ``tensor``, or None."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.inputs[0] != tensor:
        return None
    if node.op_type in SCALE_COMMUTING:
        # a PRelu's slope is unchanged: PRelu(x / s) = PRelu(x) / s whatever the slope's shape
        return None if tensor in node.inputs[1:] else Between(node, "relu")
    if node.op_type == "Clip":
        low = _constant(graph, node, 1)
        high = _constant(graph, node, 2)
        if low is None or high is None or low.size != 1 or float(low.reshape(())) != 0.0:
            return None  # a nonzero lower bound does not commute with scaling
        if high.size == 0:  # no upper bound: a Relu
            return Between(node, "clip")
        if high.size != 1 or not float(high.reshape(())) > 0 or int(graph.opset.get("", 17)) < 8:
            return None  # a per-channel Min needs broadcasting (Min-8)
        return Between(node, "clip", _channel_shaped(graph, layer, np.full(1, float(high.reshape(())))))
    if node.op_type == "Min" and len(node.inputs) == 2 and node.inputs[1] in graph.initializers:
        bound = np.asarray(graph.initializers[node.inputs[1]], np.float64)
        shaped = _bound_as_channels(graph, layer, bound)
        return None if shaped is None else Between(node, "min", shaped)
    return None


def _constant(graph: Graph, node: Node, index: int) -> np.ndarray | None:
    """Input ``index`` as a constant; an omitted input is an empty array; a computed one is None."""
    if index >= len(node.inputs) or not node.inputs[index]:
        return np.zeros(0)
    value = graph.initializers.get(node.inputs[index])
    return None if value is None else np.asarray(value, np.float64)


def _channel_shape(graph: Graph, layer: Node) -> tuple[int, ...]:
    """Shape of a per-channel constant that broadcasts along ``layer``'s output channel axis: ``[C, 1, 1]``
    for a 2-D conv (NCHW), ``[N]`` for Gemm and MatMul (features last)."""
    weight = bf.weight_of(graph, layer)
    n_out, _ = bf.channels(layer, weight)
    if layer.op_type in ("Conv", "ConvTranspose"):
        return (n_out,) + (1,) * (weight.ndim - 2)
    return (n_out,)


def _channel_shaped(graph: Graph, layer: Node, values: np.ndarray) -> np.ndarray:
    shape = _channel_shape(graph, layer)
    return np.broadcast_to(np.asarray(values, np.float64).reshape(-1), (shape[0],)).reshape(shape).copy()


def _bound_as_channels(graph: Graph, layer: Node, bound: np.ndarray) -> np.ndarray | None:
    """A Min bound that is a scalar or per-channel, as a per-channel array; anything else (a bound that
    varies along other axes) is not handled: None."""
    shape = _channel_shape(graph, layer)
    if bound.size == 1:
        return _channel_shaped(graph, layer, bound.reshape(-1))
    squeezed = bound.reshape(bound.shape[-len(shape):]) if bound.ndim >= len(shape) and \
        all(d == 1 for d in bound.shape[:-len(shape)]) else None
    if squeezed is not None and squeezed.shape == shape:
        return squeezed.copy()
    return None


# ----------------------------------------------------------------------------------- CLS sets
@dataclass
class ClsSet:
    layers: list[Node]  # 2 or 3 (the middle one depthwise)
    links: list[Link]  # 1 or 2


def is_depthwise(node: Node, weight: np.ndarray) -> bool:
    """One input and one output channel per group, several groups (depth multiplier 1)."""
    groups, per_out, per_in, _ = bf.groups_view(node, weight).shape
    return groups > 1 and per_out == 1 and per_in == 1


def cls_sets(graph: Graph, links: list[Link], weights: dict) -> list[ClsSet]:
    """Cut the chains of links into sets: ``conv, depthwise, conv`` triplets where a depthwise layer sits
    between two other layers of a chain, pairs elsewhere except those ending in a depthwise layer (AIMET's
    ``convert_layer_group_to_cls_sets``, which also pairs the remaining depthwise-conv and conv-conv
    neighbours)."""
    following = {id(link.first): link for link in links}
    has_incoming = {id(link.second) for link in links}
    sets = []
    for link in links:
        if id(link.first) in has_incoming:
            continue  # not the start of a chain
        chain = [link]
        while id(chain[-1].second) in following:
            chain.append(following[id(chain[-1].second)])
        dw = [is_depthwise(l.first, weights[id(l.first)]) for l in chain] + \
             [is_depthwise(chain[-1].second, weights[id(chain[-1].second)])]
        i = 0
        while i < len(chain):
            if i + 1 < len(chain) and dw[i + 1] and not dw[i] and not dw[i + 2]:
                sets.append(ClsSet([chain[i].first, chain[i].second, chain[i + 1].second], chain[i:i + 2]))
                i += 2
            elif not dw[i + 1]:
                sets.append(ClsSet([chain[i].first, chain[i].second], [chain[i]]))
                i += 1
            else:
                i += 1  # a pair ending in a depthwise layer: not equalized (module docstring)
    return sets


# ----------------------------------------------------------------------------------- scaling
def pair_scale(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s_i = (1 / r2_i) sqrt(r1_i r2_i)``; 1 where a range is 0 (nothing to balance)."""
    ok = (r1 > 0) & (r2 > 0)
    return np.where(ok, np.sqrt(np.where(ok, r1 * r2, 1.0)) / np.where(ok, r2, 1.0), 1.0)


def triplet_scales(r1: np.ndarray, r2: np.ndarray, r3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``m = (r1 r2 r3)^(1/3)``, ``s12 = r1 / m``, ``s23 = m / r3``; 1 where a range is 0."""
    ok = (r1 > 0) & (r2 > 0) & (r3 > 0)
    m = np.cbrt(np.where(ok, r1 * r2 * r3, 1.0))
    return np.where(ok, r1 / m, 1.0), np.where(ok, m / np.where(ok, r3, 1.0), 1.0)


def _sweep(sets: list[ClsSet], weights: dict, biases: dict, max_sweeps: int, tolerance: float,
           balance_bounds: bool = True) -> tuple[int, bool]:
    """Equalize every set in order, repeatedly, until all scales are within ``tolerance`` of 1
    (``|log s| <= tolerance``). Returns (sweeps done, converged)."""
    for sweep in range(1, int(max_sweeps) + 1):
        worst = 0.0
        for s in sets:
            first, last = s.layers[0], s.layers[-1]
            middle = [bf.output_ranges(n, weights[id(n)]) for n in s.layers[1:-1]]  # depthwise: in = out channel
            bounds = [_link_bound(link) for link in s.links] if balance_bounds else [None] * len(s.links)
            scales = set_scales(bf.output_ranges(first, weights[id(first)]), middle,
                                bf.input_ranges(last, weights[id(last)]), bounds)
            for link, scale in zip(s.links, scales):
                _apply(link, scale, weights, biases)
                worst = max(worst, _distance_from_one(scale))
        if worst <= tolerance:
            return sweep, True
    return int(max_sweeps), False


def set_scales(first: np.ndarray, middle: list[np.ndarray], last: np.ndarray,
               bounds: list[np.ndarray | None]) -> list[np.ndarray]:
    """The scale of each link of a set: :func:`pair_scale` / :func:`triplet_scales` without bounds; with a bounded
    activation, the least-squares balance of the module docstring. 1 where a weight range is 0."""
    if all(b is None for b in bounds):
        if not middle:
            return [pair_scale(first, last)]
        return list(triplet_scales(first, middle[0], last))
    links = len(bounds)
    ok = (first > 0) & (last > 0)
    for r in middle:
        ok &= r > 0
    # rows: (coefficients of t_1..t_m, log range); each range after scaling is log range + coefficients . t
    rows = [([-1.0 if j == 0 else 0.0 for j in range(links)], first)]
    for j, r in enumerate(middle):
        rows.append(([1.0 if k == j else -1.0 if k == j + 1 else 0.0 for k in range(links)], r))
    rows.append(([1.0 if j == links - 1 else 0.0 for j in range(links)], last))
    for j, bound in enumerate(bounds):
        if bound is not None:
            ok &= bound > 0
            rows.append(([-1.0 if k == j else 0.0 for k in range(links)], bound))
    # minimize sum_k (x_k + c_k . t - L)^2 over (t, L): least squares of x_k = -c_k . t + L
    design = np.array([[-c for c in coefficients] + [1.0] for coefficients, _ in rows])
    logs = np.log(np.stack([np.where(ok, r, 1.0) for _, r in rows]))
    solution = np.linalg.lstsq(design, logs, rcond=None)[0]
    return [np.where(ok, np.exp(solution[j]), 1.0) for j in range(links)]


def _reads_padding(layer: Node) -> bool:
    """A Conv some of whose outputs read the zero padding (explicit pads, or SAME auto-padding)."""
    if layer.op_type != "Conv":
        return False
    return any(layer.attrs.get("pads", ())) or layer.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")


def _link_bound(link: Link) -> np.ndarray | None:
    """The per-channel upper bound of a link's activation (a Clip(0, m) or Min), as it stands, flattened."""
    bounds = [op.bound for op in link.between if op.bound is not None]
    if not bounds:
        return None
    return np.min(np.stack([np.ravel(np.broadcast_to(b, bounds[0].shape)) for b in bounds]), axis=0)


def _distance_from_one(scale: np.ndarray) -> float:
    return float(np.max(np.abs(np.log(scale)))) if scale.size else 0.0


def _apply(link: Link, s: np.ndarray, weights: dict, biases: dict) -> None:
    """Channel ``i`` of ``link``: first layer's row and bias / s_i, bounds / s_i, second's column * s_i."""
    first, second = link.first, link.second
    weights[id(first)] = bf.scale_output_channels(first, weights[id(first)], 1.0 / s)
    if biases[id(first)] is not None:
        biases[id(first)] = biases[id(first)] / s  # per output channel, on the bias's last axis
    for op in link.between:
        if op.bound is not None:
            op.bound = op.bound / s.reshape(op.bound.shape)
    weights[id(second)] = bf.scale_input_channels(second, weights[id(second)], s)
    link.scale = s if link.scale is None else link.scale * s


# ----------------------------------------------------------------------------------- high-bias absorption
def absorb_high_bias(link: Link, bn: bf.FoldedBatchNorm, weights: dict, biases: dict) -> np.ndarray | None:
    """Move ``c`` from the first layer's bias into the second's (module docstring); returns ``c`` or None
    when the link does not qualify (no bias to take from, layer 2 a ConvTranspose or MatMul)."""
    first, second = link.first, link.second
    if biases[id(first)] is None or second.op_type not in ("Conv", "Gemm") or _reads_padding(second):
        return None
    n = bn.gamma.size
    scale = np.ones(n) if link.scale is None else link.scale
    gamma, beta = bn.gamma / scale, bn.beta / scale  # the BN statistics of the scaled channels
    if any(op.kind in ("relu", "clip") for op in link.between):
        c = np.maximum(0.0, beta - 3.0 * np.abs(gamma))
        for op in link.between:
            if op.bound is not None:
                # min(x - c, m - c) + c = min(x, m); with m - c >= 0 a Relu after the Min still sees
                # values >= 0 for x >= c, so the shift passes it too
                c = np.minimum(c, np.maximum(op.bound.reshape(-1), 0.0))
    else:
        c = beta  # nothing ReLU-like in between (a Min is shift-equivariant): exact for any c
    if not np.any(c):
        return None
    for op in link.between:
        if op.bound is not None:
            op.bound = op.bound - c.reshape(op.bound.shape)
    biases[id(first)] = biases[id(first)] - c
    shift = bf.response_to_constant_input(second, weights[id(second)], c)
    if second.op_type == "Gemm":
        shift = float(second.attrs.get("alpha", 1.0)) * shift
    biases[id(second)] = shift if biases[id(second)] is None else biases[id(second)] + shift
    link.absorbed = c
    return c


# ----------------------------------------------------------------------------------- graph edits
def _clips_to_relu(graph: Graph, links: list[Link]) -> list[str]:
    """replace_relu6: every Clip(0, m) between two equalized layers becomes a Relu (AIMET's
    ``replace_relu6_with_relu``, which changes the FP32 model). Keeps node and tensor names."""
    replaced = []
    for link in links:
        for op in link.between:
            if op.kind == "clip" and op.bound is not None:
                old_inputs = op.node.inputs[1:]
                op.node.op_type, op.node.inputs, op.node.attrs = "Relu", op.node.inputs[:1], {}
                op.node.version = int(graph.opset.get("", 17))
                op.kind, op.bound = "relu", None
                replaced.append(op.node.name)
                _drop_if_unused(graph, old_inputs)
    if replaced:
        warnings.warn(f"equalize: replace_relu6=True replaced {len(replaced)} Clip(0, m) node(s) between "
                      "equalized layers by Relu, as AIMET does: the FP32 model changes (values above the "
                      "bound are no longer clipped)", stacklevel=3)
    return replaced


def _write_back(graph: Graph, links: list[Link], weights: dict, biases: dict) -> None:
    """Store the scaled float64 weights and biases in the graph, in the layers' original dtypes."""
    done = set()
    for link in links:
        for node in (link.first, link.second):
            if id(node) in done:
                continue
            done.add(id(node))
            dtype = bf.weight_of(graph, node).dtype
            bf.set_weight(graph, node, weights[id(node)])
            if biases[id(node)] is not None:
                bf.set_bias(graph, node, biases[id(node)], dtype)


def _materialize_bounds(graph: Graph, links: list[Link]) -> list[str]:
    """Write the per-channel bounds: a Clip(0, m) whose channels were scaled becomes Relu + Min(x, m / S)
    (the Min keeps the Clip's name and output), a Min gets its new constant."""
    split = []
    for link in links:
        for op in link.between:
            if op.bound is None:
                continue
            dtype = _data_dtype(graph, link.first)
            if op.kind == "min":
                bf.set_initializer(graph, op.node, 1, op.bound.astype(dtype))
                continue
            if np.all(op.bound == op.bound.reshape(-1)[0]):
                high = graph.initializers[op.node.inputs[2]]
                if float(op.bound.reshape(-1)[0]) == float(high.reshape(())):
                    continue  # nothing moved across this Clip: it stays as it is
            split.append(op.node.name)
            old_inputs = op.node.inputs[1:]
            _split_clip(graph, op.node, op.bound.astype(dtype))
            _drop_if_unused(graph, old_inputs)
    return split


def _split_clip(graph: Graph, clip: Node, bound: np.ndarray) -> None:
    """``Clip(x, 0, m)`` -> ``Min(Relu(x), bound)``: Relu gets new names, Min takes over the Clip's."""
    opset = int(graph.opset.get("", 17))
    relu_out = bf.fresh_name(graph, f"{clip.outputs[0]}_relu")
    bound_name = bf.fresh_name(graph, f"{clip.name}_bound")
    relu = Node("Relu", [clip.inputs[0]], [relu_out], {}, bf.fresh_node_name(graph, f"{clip.name}_relu"), "", opset)
    source = graph.values.get(clip.inputs[0])
    graph.values[relu_out] = Value(relu_out, source.dtype if source else None, source.shape if source else None)
    graph.initializers[bound_name] = bound
    graph.values[bound_name] = Value(bound_name, bound.dtype, tuple(bound.shape))
    clip.op_type, clip.inputs, clip.attrs, clip.version = "Min", [relu_out, bound_name], {}, opset
    graph.nodes.insert(next(i for i, n in enumerate(graph.nodes) if n is clip), relu)


def _data_dtype(graph: Graph, layer: Node):
    value = graph.values.get(layer.outputs[0])
    return value.dtype if value is not None and value.dtype is not None else bf.weight_of(graph, layer).dtype


def _drop_if_unused(graph: Graph, names) -> None:
    """Remove the initializers among ``names`` that nothing reads any more (a replaced Clip's bounds)."""
    counts = graph.use_counts()
    for name in names:
        if name in graph.initializers and counts[name] == 0:
            del graph.initializers[name]
            graph.values.pop(name, None)
