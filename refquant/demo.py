"""`refquant demo`: the example model that ships with refquant, run and checked against onnxruntime."""

from __future__ import annotations

import time

import numpy as np

from .compare import difference, onnxruntime_outputs
from .examples import RNET, lfw_rnet_inputs
from .onnx_io import load
from .runtime import Session


def run_demo() -> int:
    print("refquant demo: MTCNN R-Net (facenet-pytorch weights) on 200 LFW crops (100 faces, 100 not)")
    start = time.perf_counter()
    graph = load(RNET)
    print(f"  loaded {RNET.name}: {len(graph.nodes)} nodes, opset {graph.opset['']} "
          f"({(time.perf_counter() - start) * 1000:.0f} ms)")
    x, labels = lfw_rnet_inputs()
    feeds = {graph.input_names[0]: x}
    session = Session(graph)
    start = time.perf_counter()
    ours = session.run(feeds)
    first = time.perf_counter() - start
    start = time.perf_counter()
    ours = session.run(feeds)
    again = time.perf_counter() - start
    theirs = onnxruntime_outputs(RNET, feeds)
    prob_name = "prob"  # outputs: bbox_reg [b,4], prob [b,2] (Softmax; column 1 is "face")
    accuracy = float(np.mean(np.argmax(ours[prob_name], axis=1) == labels))
    ort_accuracy = float(np.mean(np.argmax(theirs[prob_name], axis=1) == labels))
    print(f"  refquant FP32: face accuracy {accuracy:.1%}  (first run {first * 1000:.0f} ms incl. "
          f"kernel compilation, then {again * 1000:.1f} ms)")
    print(f"  onnxruntime FP32: face accuracy {ort_accuracy:.1%}")
    worst = 0.0
    for name in graph.output_names:
        d = difference(name, ours[name], theirs[name])
        worst = max(worst, d.max_rel)
        print(f"  {name}: max |refquant - onnxruntime| = {d.max_abs:.2e}  (relative {d.max_rel:.2e})")
    ok = worst <= 1e-4
    print("  agreement with onnxruntime: " + ("OK (<= 1e-4 relative)" if ok else "FAILED (> 1e-4 relative)"))
    return 0 if ok else 1
