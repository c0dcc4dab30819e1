"""AdaRound's layer inputs chosen on held-out calibration data, per model (``adaround(quantize_activations="choose")``)
or per layer (``"per_layer"``).

AdaRound reconstructs each layer's FP32 output from its input in the simulation so far, either with the activation
quantizers off (``False``, what AIMET intends; the default but for the output layers) or on
(``quantize_activations=True``, what aimet-onnx 2.42.0 runs). Which gives the better model depends on the model and
the data, and the calibration set cannot tell in sample: both fits are judged on the samples they were fitted to.
So one calibration sample in four (seeded) is held out (:func:`held_out_split`), both kinds are fitted on the other
three quarters and scored on the held-out quarter:

    SQNR = -10 log10(mean over outputs o of N_o / S_o),  S_o = sum ref_o^2,  N_o = sum (ref_o - out_o)^2

(``ref`` the FP32 model, ``out`` the simulation; AutoQuant's "sqnr").

"choose" (:func:`choose_inputs`) AdaRounds two copies of the simulation, one with each kind, recalibrates their
activations on the fitted samples, and takes the quantized inputs only if they score strictly higher; AdaRound then
runs once more, on all the data, with the chosen kind: 2-3x the default's time.

"per_layer" (:class:`PerLayerInputs`) makes the choice for each layer, which matters where one layer wants the
quantized inputs and the rest do not (NudeNet's YOLOv8n: its DFL conv, the expectation of a 16-bin Softmax's 8-bit
output). Each fit is scored by the model's output noise on the held-out quarter with the layers after it at their
current rounding (the downstream effect, which a layer's own loss does not see); the quantized fit is taken only
where it lowers that noise by more than :data:`SIGNIFICANCE` standard errors of the paired per-sample differences
(:func:`quantized_fit_wins`): on the higher held-out SQNR alone, margins of 0.1-0.3 dB on a few held-out samples
decide many layers by chance. The chosen kind is fitted again on all the data: three fits per layer, 3-4x the
default's time. What each gives on which model, and the cheaper trials that were tried and lost the gain:
docs/adaround.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..data import _fixed_batch, count_samples, graph_inputs, iter_feeds
from ..errors import RefquantError

HELD_OUT_FRACTION = 4  # one sample in this many is held out


@dataclass
class InputChoice:
    """The held-out SQNR (dB, all outputs) of AdaRound fitted with each kind of layer input, and the pick."""

    sqnr_fp32_activations: float  # activation quantizers off while fitting (the default)
    sqnr_quantized_activations: float  # activation quantizers on (quantize_activations=True)
    quantize_activations: bool  # the pick: True only if strictly better
    fit_samples: int
    held_out_samples: int
    seconds: float


def held_out_split(feeds: list[dict], graph, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(fit batches, held-out batches): a seeded random quarter of the samples (at least one) held out, each batch
    cut along axis 0 into its fitted and held-out rows; whole batches when the model fixes its batch size."""
    rng = np.random.default_rng(seed)
    if _fixed_batch(graph_inputs(graph)) is not None:
        if len(feeds) < 2:
            raise RefquantError("adaround: choosing the layer inputs holds out part of the calibration data; the "
                                f"model fixes its batch size, so it needs at least 2 batches, got {len(feeds)}")
        held = set(rng.choice(len(feeds), max(1, len(feeds) // HELD_OUT_FRACTION), replace=False).tolist())
        return [f for i, f in enumerate(feeds) if i not in held], [f for i, f in enumerate(feeds) if i in held]
    sizes = [len(next(iter(f.values()))) for f in feeds]
    total = sum(sizes)
    if total < 2:
        raise RefquantError("adaround: choosing the layer inputs holds out part of the calibration data and "
                            f"needs at least 2 samples, got {total}")
    held_mask = np.zeros(total, dtype=bool)
    held_mask[rng.choice(total, max(1, total // HELD_OUT_FRACTION), replace=False)] = True
    fit, held, start = [], [], 0
    for feed, size in zip(feeds, sizes):
        rows = held_mask[start:start + size]
        start += size
        for part, mask in ((fit, ~rows), (held, rows)):
            if mask.any():
                part.append({name: np.ascontiguousarray(array[mask]) for name, array in feed.items()})
    return fit, held


def held_out_sqnr(sim, feeds: list[dict]) -> float:
    """AutoQuant's "sqnr" of ``sim`` over ``feeds``: ``-10 log10(mean over outputs of N_o / S_o)`` against its FP32
    model (module docstring)."""
    from .autoquant import BuiltinMetric

    return BuiltinMetric("sqnr", sim.graph, feeds)(sim)


def choose_inputs(sim, data, batch_size: int, seed: int, progress: bool,
                  options: dict) -> tuple[list[dict], InputChoice]:
    """(the data as a list of feeds, the :class:`InputChoice`): both kinds of input tried on copies of ``sim``
    (``options``: the rest of :func:`refquant.ptq.adaround.adaround`'s arguments); ``sim`` is not changed."""
    from .adaround import adaround

    start = time.perf_counter()
    feeds = list(iter_feeds(data, sim.graph, batch_size=batch_size))
    fit, held = held_out_split(feeds, sim.graph, seed)
    scores = {}
    for quantized in (False, True):
        trial = sim.copy()
        trial.compute_encodings(fit, progress=False)  # the quantized inputs need encodings; none from held-out data
        adaround(trial, fit, batch_size=batch_size, seed=seed, progress=progress, quantize_activations=quantized,
                 **options)
        trial.compute_encodings(fit, progress=False)
        scores[quantized] = held_out_sqnr(trial, held)
    choice = InputChoice(scores[False], scores[True], bool(scores[True] > scores[False]),
                         count_samples(fit, sim.graph), count_samples(held, sim.graph),
                         time.perf_counter() - start)
    return feeds, choice


SIGNIFICANCE = 2.0  # standard errors by which a layer's quantized-input fit must lower the held-out noise to be kept


def row_noise(outputs: list[dict], reference: list[dict], signal: dict) -> np.ndarray:
    """``N_{o,r} / (S_o |O|)`` for every row ``r`` (along axis 0: the samples) of every output ``o`` in ``signal`` of
    every batch, ``S_o`` = ``signal[o]``: they sum to ``mean_o N_o / S_o``, the held-out SQNR's noise ratio."""
    rows = []
    for out, ref in zip(outputs, reference):
        for name, total in signal.items():
            y = np.asarray(ref[name], np.float64)
            error = np.square(y - np.asarray(out[name], np.float64)).reshape(len(y), -1).sum(axis=1) \
                if y.ndim else np.square(y - np.float64(out[name])).reshape(1)
            rows.append(error / (total * len(signal)))
    return np.concatenate(rows)


def quantized_fit_wins(noise_fp32: np.ndarray, noise_quantized: np.ndarray) -> bool:
    """Whether the paired row differences ``d = noise_fp32 - noise_quantized`` have a mean above
    ``SIGNIFICANCE * sd(d) / sqrt(n)``: the quantized inputs are taken only where the held-out rows show it."""
    d = noise_fp32 - noise_quantized
    return d.size > 1 and float(d.mean()) > SIGNIFICANCE * float(d.std(ddof=1)) / math.sqrt(d.size)


class PerLayerInputs:
    """``quantize_activations="per_layer"``: each layer is AdaRounded on the fitted three quarters of the data twice,
    from its inputs with the activation quantizers off and on, and each rounding scored on the held-out quarter by
    the simulation's output noise (activation quantizers on, the layers after it at their current rounding; module
    docstring). The quantized inputs are chosen when their fit lowers the noise by more than :data:`SIGNIFICANCE`
    standard errors of the paired row differences (:func:`quantized_fit_wins`); the chosen kind is fitted again on
    all the data, and that rounding kept. Every fit starts from the simulation as the layers before left it.
    ``sim`` has its activation encodings; the fits with the quantizers off run on a copy of it."""

    def __init__(self, sim, feeds: list[dict], batch_size: int, seed: int, carry: bool):
        from .layer_inputs import LayerInputs, _CarriedSide, carry_fits, disable_activation_quantizers

        fit, held = held_out_split(feeds, sim.graph, seed)
        self.sims = {True: sim, False: sim.copy()}
        disable_activation_quantizers(self.sims[False])
        # carried: an FP32 side and both simulations' on the fitted and on all the data, the held-out simulation
        carry = carry and carry_fits(sim, feeds, batch_size, sides=6, what="adaround")
        self.trial, self.final = {}, {}
        for inputs, data in ((self.trial, fit), (self.final, feeds)):
            inputs[False] = LayerInputs(self.sims[False], data, batch_size, carry=carry, sides=0)
            inputs[True] = LayerInputs(sim, data, batch_size, carry=carry, sides=0,
                                       float_side=getattr(inputs[False], "float_side", None))
        names = [n for n in sim.graph.output_names if n not in sim.graph.initializers]
        self.reference = [sim.run_float(f, outputs=names) for f in held]
        signal = {n: sum(float(np.sum(np.square(r[n], dtype=np.float64))) for r in self.reference)
                  for n in names if np.asarray(self.reference[0][n]).dtype.kind == "f"}
        self.signal = {n: total for n, total in signal.items() if total > 0}  # as mean_sqnr: no signal, no term
        self.held_feeds = held
        self.held = _CarriedSide(sim, held, simulated=True) if carry else None

    def adaround_layer(self, layer, **options):
        """AdaRound ``layer`` with both kinds of input on the fitted data, then with the chosen kind on all of it;
        that fit's :class:`~refquant.ptq.adaround.AdaroundLayerReport` with both held-out SQNRs."""
        from .adaround import adaround_layer

        start = time.perf_counter()
        noise = []
        for quantized in (False, True):
            adaround_layer(self.sims[quantized], layer, self.trial[quantized], **options)
            trial_rounding = self.sims[quantized].quantizers[layer.weight].fixed_value
            self.sims[True].set_quantized_parameter(layer.weight, trial_rounding)
            noise.append(self._held_out_noise(layer))
        quantized = quantized_fit_wins(*noise)
        report = adaround_layer(self.sims[quantized], layer, self.final[quantized], **options)
        rounding = self.sims[quantized].quantizers[layer.weight].fixed_value
        self.sims[not quantized].set_quantized_parameter(layer.weight, rounding)
        scores = [-10 * math.log10(n.sum()) if n.sum() > 0 else math.inf for n in noise]
        report.quantized_inputs, report.held_out_sqnr = quantized, (scores[0], scores[1])
        report.seconds = time.perf_counter() - start
        return report

    def _held_out_noise(self, layer) -> np.ndarray:
        """:func:`row_noise` of the simulation on the held-out quarter; carried, only the nodes from ``layer``'s
        input on are run."""
        names = list(self.signal)
        if self.held is not None:
            self.held.tensor(layer.input)
            outputs = self.held.rest(names)
        else:
            outputs = [self.sims[True].run(f, outputs=names) for f in self.held_feeds]
        return row_noise(outputs, self.reference, self.signal)


__all__ = ["InputChoice", "PerLayerInputs", "choose_inputs", "held_out_split", "held_out_sqnr",
           "quantized_fit_wins", "row_noise"]
