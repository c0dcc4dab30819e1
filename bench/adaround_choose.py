"""adaround(quantize_activations=MODE) on one of bench/ptq_vs_aimet_models.py's models, W4A8, on its whole
calibration set: SQNR of the primary output against FP32 on the evaluation set, AdaRound's seconds, and the
InputChoice when MODE is "choose" (refquant.ptq.input_choice).

    python bench/adaround_choose.py MODEL [--iterations 1000] [--mode choose|false|true]

Steps: QuantSim(precision="w4a8"), compute_encodings on the calibration batches of 16, adaround, compute_encodings
again, evaluate. Asserts nothing; last runs: bench/results_ptq_vs_aimet_models.txt (top).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"choose": "choose", "false": False, "true": True}


def main(argv=None) -> None:
    import refquant as rq
    from bench.ptq_vs_aimet_models import model_spec
    from refquant.ptq.input_choice import InputChoice

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--mode", choices=list(MODES), default="choose")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    spec = model_spec(args.model)
    graph = rq.load(spec["ours_model"])
    name, primary = spec["input"], spec["primary"]
    batches = [{name: spec["calib"][i:i + 16]} for i in range(0, len(spec["calib"]), 16)]
    sim = rq.QuantSim(graph, precision="w4a8")
    sim.compute_encodings(batches, progress=False)
    report = []
    start = time.perf_counter()
    rq.adaround(sim, batches, num_iterations=args.iterations, progress=False,
                quantize_activations=MODES[args.mode], report=report)
    seconds = time.perf_counter() - start
    sim.compute_encodings(batches, progress=False)
    x = spec["eval"]
    ref = np.concatenate([sim.run_float({name: x[i:i + 16]})[primary] for i in range(0, len(x), 16)])
    out = np.concatenate([sim.run({name: x[i:i + 16]})[primary] for i in range(0, len(x), 16)])
    ref = ref.astype(np.float64)
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())
    choices = [r for r in report if isinstance(r, InputChoice)]
    print(f"{args.model} {args.iterations} its, quantize_activations={args.mode}: eval SQNR {sqnr:.2f} dB, "
          f"{seconds:.0f} s", *choices)


if __name__ == "__main__":
    main()
