"""Can a held-out part of the calibration set choose AdaRound's layer inputs (FP32 activations, the default, or
the simulation's quantized ones, ``quantize_activations=True``) per model? W4A8, AdaRound on 3/4 of the
calibration samples (two random splits), both input kinds; logits/probability SQNR against FP32 on the held-out
quarter and on the evaluation set. A pick is right when the held-out ranking is the evaluation's.

    python bench/adaround_input_choice.py --models mtcnn_rnet convnet mtcnn_onet mlp mtcnn_pnet [--iterations 1000]
    python bench/adaround_input_choice.py --models nudenet_320n mobilenet_v2      # about 40 minutes on 2 cores

Data: bench/ptq_vs_aimet_models.py's (the AIMET samples' calib/eval, the LFW faces for MTCNN, photo crops).
Asserts nothing; last runs: bench/results_ptq_vs_aimet_models.txt (top). The implementation is
``adaround(quantize_activations="choose")`` (refquant.ptq.input_choice), which scores all outputs, not the primary.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sqnr(sim, name, primary, x) -> float:
    ref = sim.run_float({name: x})[primary].astype(np.float64)
    out = sim.run({name: x})[primary]
    return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def main(argv=None) -> None:
    import refquant as rq
    from bench.ptq_vs_aimet_models import model_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mtcnn_rnet", "convnet", "mtcnn_onet", "mlp", "mtcnn_pnet"])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--splits", type=int, default=2)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    for model in args.models:
        spec = model_spec(model)
        graph = rq.load(spec["ours_model"])
        name, primary, calib, evaluation = spec["input"], spec["primary"], spec["calib"], spec["eval"]
        for seed in range(args.splits):
            order = np.random.default_rng(seed).permutation(len(calib))
            fit, held = calib[order[:len(calib) * 3 // 4]], calib[order[len(calib) * 3 // 4:]]
            batches = [{name: fit[i:i + 16]} for i in range(0, len(fit), 16)]
            scores = {}
            for quantized in (False, True):
                sim = rq.QuantSim(graph, precision="w4a8")
                sim.compute_encodings(batches, progress=False)
                rq.adaround(sim, batches, num_iterations=args.iterations, progress=False,
                            quantize_activations=quantized)
                sim.compute_encodings(batches, progress=False)
                scores[quantized] = (sqnr(sim, name, primary, held), sqnr(sim, name, primary, evaluation))
            pick = scores[True][0] > scores[False][0]
            right = (scores[True][1] > scores[False][1]) == pick
            print(f"{model:<11} split {seed}: held-out fp32 {scores[False][0]:6.2f} quantized {scores[True][0]:6.2f}"
                  f" | eval fp32 {scores[False][1]:6.2f} quantized {scores[True][1]:6.2f} -> "
                  f"{'quantized' if pick else 'fp32':<9} {'right' if right else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
