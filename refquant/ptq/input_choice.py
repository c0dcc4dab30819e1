"""AdaRound's layer inputs chosen per model on held-out calibration data (``adaround(quantize_activations="choose")``).

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
"""

from __future__ import annotations

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
            raise RefquantError("adaround: quantize_activations='choose' holds out part of the calibration data; the "
                                f"model fixes its batch size, so it needs at least 2 batches, got {len(feeds)}")
        held = set(rng.choice(len(feeds), max(1, len(feeds) // HELD_OUT_FRACTION), replace=False).tolist())
        return [f for i, f in enumerate(feeds) if i not in held], [f for i, f in enumerate(feeds) if i in held]
    sizes = [len(next(iter(f.values()))) for f in feeds]
    total = sum(sizes)
    if total < 2:
        raise RefquantError("adaround: quantize_activations='choose' holds out part of the calibration data and "
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


__all__ = ["InputChoice", "choose_inputs", "held_out_split", "held_out_sqnr"]
