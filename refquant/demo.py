"""`refquant demo`: the quantization walkthrough on the example that ships with refquant.

MTCNN R-Net on 200 LFW crops: FP32 checked against onnxruntime, then QuantSim at W16A16, W8A16, W8A8
and W4A8 (calibrated on 64 crops, evaluated on all 200), each exported as FP32 ONNX + AIMET encodings
+ QDQ ONNX, printing face accuracy and SQNR against FP32 at each step.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .compare import difference, onnxruntime_outputs
from .examples import RNET, lfw_rnet_inputs
from .onnx_io import load
from .runtime import Session

STEPS = ("w16a16", "w8a16", "w8a8", "w4a8")


def run_demo(output_dir: str | None = None) -> int:
    from .quant import QuantSim
    from .quant.evaluate import evaluate

    print("refquant demo: MTCNN R-Net (facenet-pytorch weights) on 200 LFW crops (100 faces, 100 not)")
    graph = load(RNET)
    x, labels = lfw_rnet_inputs()
    name = graph.input_names[0]
    start = time.perf_counter()
    ours = Session(graph).run({name: x})
    theirs = onnxruntime_outputs(RNET, {name: x})
    worst = max(difference(o, ours[o], theirs[o]).max_rel for o in graph.output_names)
    fp32_accuracy = float(np.mean(np.argmax(ours["prob"], axis=1) == labels))
    print(f"1. FP32: face accuracy {fp32_accuracy:.1%}; refquant vs onnxruntime max relative difference "
          f"{worst:.1e} ({'OK' if worst <= 1e-4 else 'FAILED'}, {time.perf_counter() - start:.1f} s)")
    calibration = x[np.random.default_rng(0).choice(len(x), 64, replace=False)]
    batches = [{name: x[i:i + 50]} for i in range(0, len(x), 50)]
    out_root = Path(output_dir or tempfile.mkdtemp(prefix="refquant_demo_"))
    print(f"2. QuantSim, calibrated (min_max) on 64 crops, evaluated on all 200; files in {out_root}")
    print(f"   {'precision':<10}{'accuracy':>10}{'SQNR prob':>12}{'SQNR bbox':>12}{'time s':>9}")
    for precision in STEPS:
        start = time.perf_counter()
        sim = QuantSim(graph, precision=precision)
        sim.compute_encodings([{name: calibration}], progress=False)
        scores = evaluate(sim, batches, labels, primary="prob")
        sim.export(out_root / precision, "mtcnn_rnet")
        print(f"   {precision:<10}{scores.accuracy:>10.1%}{scores.sqnr['prob']:>12.1f}{scores.sqnr['bbox_reg']:>12.1f}"
              f"{time.perf_counter() - start:>9.2f}")
    print("   each folder holds mtcnn_rnet.onnx (FP32), mtcnn_rnet.encodings (AIMET 1.0.0) and "
          "mtcnn_rnet_qdq.onnx (runs in onnxruntime)")
    from .intsim import unsigned_weights

    unsigned_weights.note(False)  # where onnxruntime's uint8 x int8 kernels saturate, say so
    return 0 if worst <= 1e-4 else 1
