"""Scores of a simulation against FP32: SQNR per output and, with labels, top-1 accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - out)^2) in float64; inf when identical."""
    reference = reference.astype(np.float64)
    noise = np.sum((reference - output.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference ** 2) / noise))


@dataclass
class Scores:
    sqnr: dict[str, float] = field(default_factory=dict)  # output -> dB against FP32
    accuracy: float | None = None  # top-1 of the primary output against labels
    fp32_accuracy: float | None = None


def evaluate(sim, batches, labels: np.ndarray | None = None, primary: str | None = None) -> Scores:
    """Run ``sim`` and its FP32 reference over ``batches`` (feed dicts); SQNR accumulates over all of them.

    Only sums are kept, so memory does not grow with the data; accuracy uses argmax over the last axis
    of ``primary`` (default: the first output)."""
    primary = primary or sim.graph.output_names[0]
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    predictions, fp32_predictions = [], []
    for feeds in batches:
        ours = sim.run(feeds)
        reference = sim.run_float(feeds)
        for name, ref in reference.items():
            ref64 = ref.astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(ref64 ** 2))
            noise[name] = noise.get(name, 0.0) + float(np.sum((ref64 - ours[name]) ** 2))
        if labels is not None:
            predictions.append(np.argmax(ours[primary].reshape(len(ours[primary]), -1), axis=1))
            fp32_predictions.append(np.argmax(reference[primary].reshape(len(reference[primary]), -1), axis=1))
    scores = Scores({n: (float("inf") if noise[n] == 0 else 10 * np.log10(signal[n] / noise[n])) for n in signal})
    if labels is not None and predictions:
        predicted = np.concatenate(predictions)
        if len(predicted) != len(labels):
            from ..errors import FeedError

            raise FeedError(f"{len(labels)} labels for {len(predicted)} evaluated samples")
        scores.accuracy = float(np.mean(predicted == labels))
        scores.fp32_accuracy = float(np.mean(np.concatenate(fp32_predictions) == labels))
    return scores
