"""Sequential MSE (AIMET's ``apply_seq_mse``, refs/aimet.md 5.2): a per-channel search of each
weight's quantization range that minimizes the error of the layer's output, layer by layer.

For a layer with weight ``W`` and current encoding range ``[min_c, max_c]`` per output channel ``c``
(from ``compute_encodings``, or the parameter encodings computed here), candidate ``i`` in
``0..n-1`` is the range ``[min_c (i+1)/n, max_c (i+1)/n]`` (AIMET's ``_get_candidate``: the
encoding's min and max scaled alike, so for a symmetric grid ``scale_i = scale (i+1)/n`` and the last
candidate is the current encoding). Each candidate gives ``W_i = qdq(W, encoding_i)`` (the sim's
rounding). The layer input ``x`` and the target ``y`` follow AIMET's ``inp_symmetry``:

* ``"auto"`` (default): the search is run with ``"asym"`` and with ``"symqt"``, and the sim keeps the one
  whose model outputs are nearer the FP32 model's on ``data`` (``-10 log10(mean_o sum (y_o - y'_o)^2 /
  sum y_o^2)`` over the graph outputs ``o``, the project's default metric, measured as the search runs: weights
  quantized, activation quantizers off unless ``quantized_activations``). Which target wins depends on the model: ``"asym"``
  by 0.1-8 dB on AIMET's convnet, mlp, MTCNN P/R/O-Net and MobileNetV2, ``"symqt"`` by 2.6 dB on PP-OCRv4 rec
  (W4A8; bench/results_ptq_vs_aimet_models.txt); the calibration-set score picked the evaluation set's
  winner on all six. Twice the time of one target.
* ``"asym"``: ``x`` the layer input in the simulation so far (the layers before already
  chosen; activation quantizers off while searching, as AIMET), ``y`` the FP32 model's output of the
  layer (on the FP32 model's own input): the search also compensates the error the layers before
  left in ``x``. This is the reconstruction target of AdaRound here and in AIMET (Nagel et al. 2020,
  "asymmetric reconstruction"): what matters is the distance to the FP32 model, not to this layer
  alone. Measured (W4A8 per channel, logits SQNR): AIMET's convnet 27.9 -> 36.0 dB, mlp 24.35 ->
  24.47 dB, MobileNetV2 4.1 -> 6.9 dB against ``"symqt"`` (bench/ptq.py ``--recipe resize256 --photo-set
  all``; on its default crops, AIMET's example recipe, 4.5 -> 8.1 dB, mean of 4 seed pairs);
* ``"symqt"`` (AIMET's default): the same ``x``, ``y = W x`` the output with the FP32 weight on it;
* ``"symfp"``: ``x`` the FP32 model's layer input, ``y = W x``.

Channel ``c``'s loss, with ``dW = W_i - W`` and ``r = y - W x`` (0 except for ``"asym"``), is

* ``mse``:  ``mean_p (y_c - W_i,c x_p)^2 = dW_c H dW_c^T - 2 dW_c g_c + mean_p r_c^2`` with
  ``H = mean_p x_p x_p^T`` (im2col columns) and ``g_c = mean_p x_p r_c,p``: exact over every position
  of the data, with the moments accumulated while streaming;
* ``sqnr``: ``-10 log10(mean_p y_c^2 / (mse_c + 1e-10))`` (AIMET's ``neg_sqnr``; per channel a
  monotone function of ``mse_c``, so it picks the same candidates as ``mse``);
* ``l1``:   ``mean_p |y_c - W_i,c x_p|`` (accumulated per candidate while streaming).

Output channels are independent in these losses, so all channels are scored for every candidate at
once, and channel ``c`` takes its best candidate (the first on ties). The chosen encoding is set and
frozen (``sim.set_encoding``). Weight encodings already frozen (loaded, or set by an earlier
technique) are left alone. Layers: Conv, Gemm and MatMul with a constant weight whose per-channel
axis is the output-channel axis (AIMET: Conv, Gemm, MatMul; ``sequential_mse/dependency_graph.py``).

Call ``sim.compute_encodings`` afterwards: activation ranges are then calibrated with the new weights.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import RefquantError
from ..progress import iterate
from ..quant.encoding import Encoding, from_min_max
from ..quant.qdq import quantize_dequantize
from .adaround import MOMENTS_BUDGET, _blas_threads
from .adaround_loss import _bmm, _Moments
from .layer_inputs import LayerInputs, SimState, disable_activation_quantizers, ensure_weight_encodings
from .layers import LinearLayer, find_layers, position_chunks

SEQ_MSE_OPS = ("Conv", "Gemm", "MatMul")
LOSSES = ("mse", "l1", "sqnr")
INPUT_SYMMETRIES = ("auto", "symqt", "asym", "symfp")  # AIMET's SeqMseParams.inp_symmetry, and "auto"
AUTO_CHOICES = ("asym", "symqt")  # tried in this order by "auto"; the first wins a tie
SQNR_EPS = 1e-10  # AIMET's neg_sqnr eps on the mean noise
DELTAS_BUDGET = 1 << 25  # weight values of all candidates' dW kept at once (256 MB in float64); else made per use


@dataclass
class SeqMseLayerReport:
    """One layer: the loss (summed over channels) of the original encoding and of the chosen one,
    which candidate each channel took (``n - 1`` = the original range), and the target searched with."""

    layer: str
    weight: str
    loss_original: float
    loss_chosen: float
    chosen: np.ndarray
    seconds: float
    inp_symmetry: str = ""  # set by seq_mse
    target_scores: dict = field(default_factory=dict)  # "auto": each target's output SQNR (dB) on the data


def seq_mse(sim, data, num_candidates: int = 20, loss: str = "mse", batch_size: int = 16, progress: bool = True,
            *, inp_symmetry: str = "auto", quantized_activations: bool = False, cache_activations: bool = True,
            threads: int | None = 1, report: list | None = None):
    """Choose per-channel weight encodings of every Conv, Gemm and MatMul of ``sim`` (graph order) by
    the layer-output loss of ``num_candidates`` shrunk ranges (see the module docstring).

    ``data``: anything :func:`refquant.data.iter_feeds` accepts. ``inp_symmetry``: which layer input
    and target the loss compares (``"auto"``, ``"symqt"``, ``"asym"``, ``"symfp"``; module docstring).
    ``quantized_activations``: keep the calibrated activation quantizers on while searching, so that the
    layer inputs carry the activation quantization too (AIMET turns them off). ``cache_activations``: keep every
    batch's live tensors in memory and advance them layer by layer (one forward pass in total) instead
    of a forward prefix per layer (see :class:`~refquant.ptq.layer_inputs.LayerInputs`). ``threads``: BLAS
    threads for the search's own math (None: unchanged; the simulation's forward passes keep theirs).
    ``report``: a list that receives one :class:`SeqMseLayerReport` per layer. Weight encodings
    missing are computed first (``sim`` need not be calibrated). On any error or Ctrl-C ``sim`` is
    left as it was. Returns ``sim``.
    """
    if loss not in LOSSES:
        raise RefquantError(f"seq_mse: loss {loss!r} is not one of {', '.join(LOSSES)}")
    if int(num_candidates) < 1:
        raise RefquantError(f"seq_mse: num_candidates must be >= 1, got {num_candidates}")
    if inp_symmetry not in INPUT_SYMMETRIES:
        raise RefquantError(f"seq_mse: inp_symmetry {inp_symmetry!r} is not one of {', '.join(INPUT_SYMMETRIES)}")
    layers, skipped = find_layers(sim, SEQ_MSE_OPS)
    with SimState(sim):
        ensure_weight_encodings(sim, layers)
        layers, more = _searchable(sim, layers)
        skipped += more
        if skipped:
            warnings.warn(f"seq_mse: layers not optimized: {', '.join(skipped)}", stacklevel=2)
        if not layers:
            warnings.warn(f"seq_mse: graph {sim.graph.name!r} has no layer to optimize", stacklevel=2)
            return sim
        if not quantized_activations:
            disable_activation_quantizers(sim)
        from ..data import reusable

        data = reusable(data, sim.graph, batch_size)  # "auto" reads it once per target
        search = dict(data=data, num_candidates=num_candidates, loss=loss, batch_size=batch_size, progress=progress,
                      cache_activations=cache_activations, threads=threads)
        if inp_symmetry != "auto":
            reports, _ = _search(sim, layers, inp_symmetry, score=False, **search)
        else:
            reports = _search_best_target(sim, layers, search)
        if report is not None:
            report.extend(reports)
    return sim


def _search(sim, layers, inp_symmetry, data, num_candidates, loss, batch_size, progress, cache_activations,
            threads, score: bool) -> tuple[list[SeqMseLayerReport], float | None]:
    """One sequential pass over ``layers`` with one target; with ``score``, also the pass's output SQNR."""
    inputs = LayerInputs(sim, data, batch_size, use_fp32_inputs=inp_symmetry == "symfp", carry=cache_activations,
                         what="seq_mse")
    reports = []
    for layer in iterate(layers, progress, f"seq_mse ({inp_symmetry})", unit="layer"):
        result = seq_mse_layer(sim, layer, inputs, num_candidates, loss, threads, fp32_target=inp_symmetry == "asym")
        result.inp_symmetry = inp_symmetry
        reports.append(result)
    return reports, (inputs.output_sqnr() if score else None)


def _search_best_target(sim, layers, search: dict) -> list[SeqMseLayerReport]:
    """``"auto"``: a pass per target of :data:`AUTO_CHOICES`, each from the same starting encodings; the
    sim keeps the pass with the higher output SQNR."""
    weights = [layer.weight for layer in layers]
    start = {w: _weight_state(sim, w) for w in weights}
    best, scores = None, {}
    for target in AUTO_CHOICES:
        for w in weights:
            _set_weight_state(sim, w, start[w])
        reports, sqnr = _search(sim, layers, target, score=True, **search)
        if best is None or sqnr > best[0]:
            best = (sqnr, {w: _weight_state(sim, w) for w in weights}, reports)
        scores[target] = sqnr
    for w in weights:
        _set_weight_state(sim, w, best[1][w])
    for result in best[2]:
        result.target_scores = dict(scores)
    return best[2]


def _weight_state(sim, name: str) -> tuple:
    q = sim.quantizers[name]
    return q.encoding, q.frozen, q.fixed_value


def _set_weight_state(sim, name: str, state: tuple) -> None:
    q = sim.quantizers[name]
    q.encoding, q.frozen, q.fixed_value = state


def seq_mse_layer(sim, layer: LinearLayer, inputs: LayerInputs, num_candidates: int = 20, loss: str = "mse",
                  threads: int | None = 1, fp32_target: bool = False) -> SeqMseLayerReport:
    """Search one layer's weight encoding and set it (frozen) in ``sim`` (``fp32_target``: the target is the
    FP32 model's layer output, ``"asym"``)."""
    start = time.perf_counter()
    quantizer = sim.quantizers[layer.weight]
    encoding = sim.encoding_of(layer.weight)
    candidates = candidate_encodings(encoding, quantizer, num_candidates)
    losses = candidate_losses(sim, layer, inputs, candidates, loss, threads, fp32_target)  # [candidates, channels]
    best = np.argmin(losses, axis=0)
    channels = np.arange(losses.shape[1])
    chosen = pick_channels(candidates, best)
    sim.set_encoding(layer.weight, chosen)
    return SeqMseLayerReport(layer.name, layer.weight, float(losses[-1].sum()),
                             float(losses[best, channels].sum()), best, time.perf_counter() - start)


def candidate_ranges(encoding: Encoding, num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` of every candidate, ``[n, channels]``: the encoding's range times ``(i+1)/n``."""
    factor = (np.arange(num_candidates, dtype=np.float64) + 1) / num_candidates
    lo = np.atleast_1d(np.asarray(encoding.min, dtype=np.float64))
    hi = np.atleast_1d(np.asarray(encoding.max, dtype=np.float64))
    return lo[None, :] * factor[:, None], hi[None, :] * factor[:, None]


def encoding_from_range(quantizer, lo: np.ndarray, hi: np.ndarray, like: Encoding) -> Encoding:
    """The quantizer's kind of grid (bitwidth, symmetry) on ``[lo, hi]``, per tensor or per channel like ``like``."""
    if like.axis is None:
        lo, hi = lo.reshape(()), hi.reshape(())
    return from_min_max(lo, hi, like.bitwidth, quantizer.symmetric, quantizer.strict_symmetric,
                        quantizer.unsigned_symmetric, axis=like.axis)


def candidate_encodings(encoding: Encoding, quantizer, num_candidates: int) -> list[Encoding]:
    """The candidates' encodings; the last is ``encoding`` itself (recomputing it from its own range
    can move an asymmetric float64 scale by an ulp)."""
    lo, hi = candidate_ranges(encoding, num_candidates)
    return [encoding_from_range(quantizer, lo[i], hi[i], encoding) for i in range(num_candidates - 1)] + [encoding]


def pick_channels(candidates: list[Encoding], best: np.ndarray) -> Encoding:
    """One encoding taking channel ``c``'s scale and offset from candidate ``best[c]``."""
    first = candidates[0]
    scales = np.stack([np.atleast_1d(c.scale) for c in candidates])
    offsets = np.stack([np.atleast_1d(np.broadcast_to(c.offset, np.shape(c.scale))) for c in candidates])
    channels = np.arange(scales.shape[1])
    scale, offset = scales[best, channels], offsets[best, channels]
    if first.axis is None:
        scale, offset = scale.reshape(()), offset.reshape(())
    return Encoding(scale, offset, first.bitwidth, first.symmetric, first.steps, first.axis, first.block_size,
                    first.kind)


def candidate_losses(sim, layer: LinearLayer, inputs: LayerInputs, candidates: list[Encoding],
                     loss: str = "mse", threads: int | None = None, fp32_target: bool = False,
                     form: str = "auto") -> np.ndarray:
    """``[candidates, channels]`` losses of the layer output against the target on the layer's inputs:
    ``W x`` (FP32 weight), or the FP32 model's layer output with ``fp32_target`` (``threads``: BLAS
    threads for this math; the forward passes keep the simulation's).

    ``mse``/``sqnr`` sum ``(r - dW_i x)^2`` over the positions in one of two exact forms per chunk of positions:
    ``"direct"`` (``dW_i x`` for every candidate: ``n M K P`` flops for ``P`` positions, ``G`` groups of ``M/G`` x
    ``K/G``) or ``"moments"`` (``H = sum x x^T``, ``g``, ``c`` while streaming, ``K^2 P / G`` flops, then
    ``dW_i H dW_i^T`` once, ``n M K^2 / G^2``). ``"auto"`` takes the direct form while the positions seen stay below
    the count where the moments become cheaper (:func:`direct_position_limit`) and the moments after; the two add
    up. A Gemm on a few hundred samples (VGG's 25088 x 4096 head: a 5 GB ``H``) never builds ``H``."""
    if form not in ("auto", "direct", "moments"):
        raise RefquantError(f"seq_mse: form {form!r} is not one of auto, direct, moments")
    deltas = _Deltas(sim, layer, candidates)
    groups, per_out, per_in = deltas.shape
    limit = {"direct": math.inf, "moments": 0}.get(form, direct_position_limit(len(candidates), groups, per_out,
                                                                               per_in))
    moments = _Moments()
    direct = np.zeros((len(candidates), groups, per_out))  # sum over the direct form's positions
    signal = 0.0
    l1 = 0.0
    count = 0
    for x, z, t in inputs.batches(layer, fp32_target=fp32_target):
        with _blas_threads(threads):
            columns = layer.columns(x)
            for positions in position_chunks(columns):
                cols = columns.take(positions)
                # r = target - W x: what the error of the layers before left in this layer's output
                residual = (layer.output_matrix(t, positions).astype(np.float64)
                            - layer.output_matrix(z, positions).astype(np.float64)) if fp32_target else None
                if loss == "l1":
                    errors = (_bmm(d.astype(np.float32), cols) for d in deltas)  # W_i x - W x
                    if residual is not None:
                        errors = (e - residual for e in errors)
                    l1 = l1 + np.stack([np.abs(e).sum(axis=2, dtype=np.float64) for e in errors])
                elif count + cols.shape[2] <= limit:
                    cols64 = cols.astype(np.float64)
                    for i, d in enumerate(deltas):
                        error = _bmm(d, cols64)
                        if residual is not None:
                            error -= residual
                        direct[i] += np.square(error).sum(axis=2)
                else:
                    moments.add(cols, residual)
                if loss == "sqnr":
                    signal = signal + np.square(layer.output_matrix(t, positions), dtype=np.float64).sum(axis=2)
                count += cols.shape[2]
    if count == 0:
        raise RefquantError("seq_mse: the data set is empty: no batch was produced")
    if loss == "l1":
        per_output = l1 / count
    else:
        per_output = direct / count
        if moments.h is not None:
            h = moments.h / count
            with _blas_threads(threads):
                for i, d in enumerate(deltas):
                    per_output[i] += np.sum(_bmm(d, h) * d, axis=2)  # mean squared error
                    if fp32_target:  # (r - dW x)^2 = r^2 - 2 dW x r + (dW x)^2, g = sum x r^T: [G, K/G, M/G]
                        per_output[i] += (moments.c - 2 * np.einsum("gmk,gkm->gm", d, moments.g)) / count
        if loss == "sqnr":
            per_output = -10 * np.log10((signal / count)[None] / (per_output + SQNR_EPS))
    per_output = per_output.reshape(len(candidates), -1)  # output channel o = g * M/G + m
    return per_output if candidates[0].axis is not None else per_output.sum(axis=1, keepdims=True)


def direct_position_limit(candidates: int, groups: int, per_out: int, per_in: int) -> float:
    """Positions below which the direct form costs fewer flops than the moments: ``n m k P < k^2 P + n m k^2``
    (``m, k`` = a group's outputs and inputs), i.e. ``P < n m k / (n m - k)``; always when ``n m <= k``, and always
    when ``H`` (``G k^2`` float64) would pass :data:`MOMENTS_BUDGET`."""
    nm = candidates * per_out
    if nm <= per_in or groups * per_in * per_in > MOMENTS_BUDGET:
        return math.inf
    return nm * per_in / (nm - per_in)


class _Deltas:
    """``dW_i = W_mat(qdq(W, encoding_i)) - W_mat`` (float64, ``[G, M/G, K/G]``) for each candidate: all kept when
    they fit :data:`DELTAS_BUDGET`, else made again at each use (one at a time in memory)."""

    def __init__(self, sim, layer: LinearLayer, candidates: list[Encoding]):
        self.sim, self.layer, self.candidates = sim, layer, candidates
        self.weight = np.asarray(sim.graph.initializers[layer.weight], dtype=np.float32)
        self.shape = layer.to_matrix(self.weight).shape
        kept = len(candidates) * self.weight.size <= DELTAS_BUDGET
        self.kept = [self._make(enc) for enc in candidates] if kept else None

    def _make(self, encoding: Encoding) -> np.ndarray:
        to_matrix = self.layer.to_matrix
        return (to_matrix(quantize_dequantize(self.weight, encoding, self.sim.rounding)).astype(np.float64)
                - to_matrix(self.weight).astype(np.float64))

    def __len__(self) -> int:
        return len(self.candidates)

    def __iter__(self):
        return iter(self.kept) if self.kept is not None else (self._make(enc) for enc in self.candidates)


def _searchable(sim, layers) -> tuple[list[LinearLayer], list[str]]:
    """Layers whose weight encoding can be searched: not frozen, integer, per tensor or per channel
    on the output-channel axis (per-block grids are not searched)."""
    keep, skipped = [], []
    for layer in layers:
        quantizer = sim.quantizers[layer.weight]
        encoding = sim.encoding_of(layer.weight)
        if quantizer.frozen or quantizer.tied_to is not None:
            skipped.append(f"{layer.name} (weight encoding frozen)")
        elif encoding is None or encoding.kind != "int":
            skipped.append(f"{layer.name} (no integer weight encoding)")
        elif encoding.block_size is not None:
            skipped.append(f"{layer.name} (per-block weight encoding)")
        elif encoding.axis is not None and encoding.axis % len(layer.shape) != layer.output_axis:
            skipped.append(f"{layer.name} (per-channel axis {encoding.axis} is not the output channels)")
        else:
            keep.append(layer)
    return keep, skipped


__all__ = ["INPUT_SYMMETRIES", "LOSSES", "SeqMseLayerReport", "candidate_encodings", "candidate_losses", "candidate_ranges",
           "pick_channels", "seq_mse", "seq_mse_layer"]
