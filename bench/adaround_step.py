"""AdaRound at several Adam step sizes on one of bench/ptq_vs_aimet_models.py's models, W4A8, on its whole
calibration set: SQNR of the primary output against FP32 on the evaluation set, and AdaRound's seconds.

    python bench/adaround_step.py MODEL ITERATIONS RATES      # RATES: comma-separated numbers or "scaled"
    python bench/adaround_step.py mlp 200 0.001,0.01,scaled

Steps: QuantSim(precision="w4a8", rounding="half_up"), compute_encodings on the calibration batches of 16,
adaround(learning_rate=RATE), compute_encodings again, evaluate. Asserts nothing; last runs:
bench/results_ptq_vs_aimet_models.txt (top).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    import refquant as rq
    from bench.ptq_vs_aimet_models import model_spec

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        raise SystemExit(__doc__)
    model, iterations = args[0], int(args[1])
    rates = [r if r == "scaled" else float(r) for r in args[2].split(",")]
    warnings.simplefilter("ignore")
    spec = model_spec(model)
    name, primary, x = spec["input"], spec["primary"], spec["eval"]
    batches = [{name: spec["calib"][i:i + 16]} for i in range(0, len(spec["calib"]), 16)]
    base = rq.QuantSim(rq.load(spec["ours_model"]), precision="w4a8", rounding="half_up")
    base.compute_encodings(batches, progress=False)
    ref = np.concatenate([base.run_float({name: x[i:i + 16]})[primary] for i in range(0, len(x), 16)])
    ref = ref.astype(np.float64)
    results = []
    for rate in rates:
        sim = base.copy()
        start = time.perf_counter()
        rq.adaround(sim, batches, num_iterations=iterations, progress=False, learning_rate=rate)
        seconds = time.perf_counter() - start
        sim.compute_encodings(batches, progress=False)
        out = np.concatenate([sim.run({name: x[i:i + 16]})[primary] for i in range(0, len(x), 16)])
        sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())
        results.append(f"{rate}: {sqnr:.2f} dB ({seconds:.0f} s)")
    print(f"{model} {iterations} its, learning_rate " + " | ".join(results), flush=True)


if __name__ == "__main__":
    main()
