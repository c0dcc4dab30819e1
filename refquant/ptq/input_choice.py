"""AdaRound's layer inputs chosen on held-out calibration data, per model (``adaround(quantize_activations="choose")``)
or per layer (``"per_layer"``).

AdaRound reconstructs each layer's FP32 output from its input in the simulation so far, either with the activation
quantizers off (the default, what AIMET intends) or on (``quantize_activations=True``, what aimet-onnx 2.42.0
runs). Which one gives the better model depends on the model and the data, and the calibration set cannot tell
in sample: both fits are judged on the samples they were fitted to (on an AVX-512 machine MTCNN R-Net scored 46.5 dB
against 42.6 on its calibration faces with the quantized inputs, and the reverse on new faces).

So "choose" holds out one calibration sample in four (seeded), AdaRounds a copy of the simulation on the other
three quarters with each kind of input, recalibrates the activations on them, and scores both on the held-out
quarter:

    SQNR = -10 log10(mean over outputs o of N_o / S_o),  S_o = sum ref_o^2,  N_o = sum (ref_o - out_o)^2

(``ref`` the FP32 model, ``out`` the simulation; AutoQuant's "sqnr"). The quantized inputs are taken only if they
score strictly higher; AdaRound then runs once more, on all the data, with the chosen inputs.

Measured (W4A8, 1000 iterations, Adam step 1e-3 (before "scaled"), each model's whole calibration set, evaluation
SQNR of the primary output; bench/results_ptq_vs_aimet_models.txt): the default / "choose": mlp sample 24.14 / 24.40
dB, MTCNN P-Net 20.84 / 21.12, R-Net 43.85 / 45.63, O-Net 36.10 / 38.62, NudeNet's YOLOv8n 25.5 / 27.52 (aimet-onnx
27.61), MobileNetV2 11.91 / 11.90 (FP32 inputs chosen), but the convnet sample 26.94 / 24.17. There the trials rank
right (fitted on three quarters, the quantized inputs are better on the evaluation set too, as on the held-out
quarter); the refit on all the samples lands elsewhere, as this model's 1000-iteration fits move by about 1.5 dB
with the samples. Time: 2-3x the default's (MobileNetV2 995 s against 315, MTCNN P-Net 12 s against 4). Hence an
option, not the default; AutoQuant, which has evaluation data, tries the input kinds itself
(:mod:`refquant.ptq.autoquant`). With the "scaled" step it picks the quantized inputs on the mlp, convnet, P-Net and
R-Net, right on two (eval SQNR choose / default: 23.85 / 23.71, 29.86 / 30.33, 23.22 / 23.96, 44.27 / 43.73;
bench/adaround_choose.py).

Per layer. Which kind suits a layer can differ within one model. NudeNet's YOLOv8n decodes each box side as the
expectation of a 16-bin Softmax, a 1x1 conv with the weights 0..15 (its "DFL" conv) reading the Softmax's 8-bit
output: fitted to its FP32-activation inputs, AdaRound rounds those weights to the non-monotone codes 0 0 1 1 2 2
3 4 3 5 4 5 6 6 7 7 (4-bit, scale 15/7), fitted to the quantized probabilities it keeps them monotone and
compensates their rounding: that one layer's rounding, with every other layer as the default leaves it, moves the
model's output SQNR from 26.03 / 26.01 / 25.74 to 27.46 / 27.70 / 27.29 dB on three calibration sets (W4A8, 1000
iterations; aimet-onnx, which fits every layer to quantized inputs, 27.55 on the first), while the quantized inputs
on every layer give 25.70 on the first (bench/results_ptq_vs_aimet_models.txt).

"per_layer" makes the choice for each layer: both kinds are fitted on the held-in three quarters and each fit is
scored on the held-out quarter by the model's output noise with the layers after it at their current rounding
(the downstream effect, which a layer's own loss does not see: in a scratch trial that scored AIMET's settings
against the default by each layer's held-out loss, AIMET's won on 59 and 56 of NudeNet's 64 layers and the model
scored 25.51 and 27.56 dB on two sets). The quantized inputs are taken only where they lower that noise by more
than two standard errors of its paired per-sample differences: taken on the higher held-out SQNR alone (margins of
0.1-0.3 dB on 16 held-out images decide many layers), the model scored 26.27 and 26.76 dB; with the two standard
errors 28.03, 27.65 and 27.71 dB on the three sets (aimet-onnx 27.55 on the first). On the small sample models,
eight calibration sets each, it is level with the default (paired differences, dB: mlp -0.01 +- 0.02, convnet
+0.02 +- 0.60, P-Net -0.15 +- 0.07, R-Net -0.25 +- 0.90, O-Net -0.30 +- 1.20; bench/results_ptq_vs_aimet_models.txt);
on PP-OCR's text direction classifier, four sets of 48 crops, it loses one (15.66 15.18 16.02 14.69 dB against
15.66 15.18 16.02 17.29): the two standard errors of 12 held-out crops do not guard every choice (it took the
first conv at 2.24, scored while every later layer was at nearest rounding). Three standard errors keep PP-OCR at
the default but give NudeNet 27.24 dB on the first set, eight of its 14 picks on layers not picked at two: a choice's
significance depends on how the layers before it were rounded.
The chosen kind is fitted again on all the data. Three fits per layer and one pass over the held-out quarter from
the layer on: 3-4x the default's time (NudeNet 1,890 s with three jobs on two cores, the default 340 s with two; the
convnet sample 65-69 s against 20 s, where AIMET takes 37 s for 1000 iterations), which is why it is an option and
not the default. Cheaper trials were tried and lose NudeNet's gain (set 10, 1000 its; with AdaRound seed 1 the
trials as they are give 27.69 dB, the DFL conv again quantized): trial fits with a quarter of the iterations 26.48
dB (convnet 31 s); trial fits on a sample of 8,192 positions, 512 a step (what the refit does on large layers; on
small ones it takes every position at every step) 26.30 dB (convnet 1.1x the default), the DFL conv's quantized fit
there no better on the held-out quarter (27.11 against 27.13 dB) after other choices upstream. On the eight
sample-model sets both are within noise of the default but for the convnet with the sampled trials (+1.04 +- 0.51 dB
paired; bench/results_ptq_vs_aimet_models.txt).
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
        from .adaround import LayerInputs, _CarriedSide, carry_fits, disable_activation_quantizers

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
