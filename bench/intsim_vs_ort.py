"""Integer program benchmark: IntSim.run against onnxruntime running the exported QOperator model.

    python bench/intsim_vs_ort.py [--runs 10] [--threads 2] [--samples]

MobileNetV2 (W8A8, calibrated on the photos of shared/data with the ImageNet preprocessing) is lowered to its
integer program once; then, for batch 1 and 8: median latency of ``isim.run`` with the fused QLinearConv kernel
(kernels="fast", the default) and with the reference kernels, against onnxruntime (ORT_ENABLE_ALL and
ORT_DISABLE_ALL) on the model ``isim.export`` wrote, all on the same number of threads, plus whether the outputs
are identical. ``--samples`` adds the aimet_samples models (convnet, mlp, mtcnn_rnet) at batch 64. On a CPU where
onnxruntime's uint8 x int8 kernels saturate (x86 AVX2 without VNNI) the program is exported with uint8 weights
(``unsigned_weights=True``), the same program, which onnxruntime runs exactly there.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "china.jpg", "flower.jpg",
          "motorcycle_left.png", "horse.png"]


def median_time(fn, runs: int) -> float:
    fn()  # warm-up (Numba compile / onnxruntime first run)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_session(path, level, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def mobilenet(workdir: Path):
    import refquant
    from refquant.data import Preprocess, iter_feeds
    from refquant.quant import QuantSim

    folder = workdir / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        (folder / photo).symlink_to(SHARED / "data" / photo)
    graph = refquant.load(SHARED / "models" / "mobilenet_v2_imagenet.onnx")
    pre = Preprocess.parse("resize_shorter=256;crop=224,224;mean=0.485,0.456,0.406;std=0.229,0.224,0.225")
    batches = list(iter_feeds(folder, graph, batch_size=4, preprocess=pre))
    sim = QuantSim(graph, precision="w8a8")
    sim.compute_encodings(batches, progress=False)
    data = np.concatenate([b["input"] for b in batches])
    return sim, {1: {"input": data[:1]}, 8: {"input": data[:8]}}


def sample(entry: str):
    import refquant
    from refquant.quant import QuantSim

    base = SHARED / "refs" / "aimet_samples" / entry
    sim = QuantSim(refquant.load(base / ("model_bnfolded.onnx" if entry == "convnet" else "model.onnx")),
                   precision="w8a8")
    calib = np.load(base / "calib.npz")["input"]
    sim.compute_encodings([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)], progress=False)
    data = np.load(base / "eval.npz")["input"]
    return sim, {64: {"input": data[:64]}}


def bench(name, sim, feeds_by_batch, runs, threads, workdir, rows):
    import onnxruntime as ort

    from refquant.intsim.program import IntSim

    start = time.perf_counter()
    fallback = name == "mtcnn_rnet"  # Softmax runs in float
    isim = IntSim(sim, threads=threads, float_fallback=fallback)
    lower_time = time.perf_counter() - start
    reference = IntSim(sim, threads=threads, kernels="reference", float_fallback=fallback)
    from refquant.intsim.unsigned_weights import onnxruntime_saturates_u8s8

    # where onnxruntime's uint8 x int8 kernels saturate (AVX2 without VNNI), its exact form: uint8 weights
    path = isim.export(workdir / f"{name}_int.onnx", unsigned_weights=onnxruntime_saturates_u8s8())
    sessions = {"ort_all": ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads),
                "ort_none": ort_session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, threads)}
    for batch, feeds in feeds_by_batch.items():
        start = time.perf_counter()
        ours = isim.run(feeds)
        first = time.perf_counter() - start
        theirs = sessions["ort_all"].run(None, feeds)
        same = all(np.array_equal(a, ours[o.name]) for a, o in zip(theirs, sessions["ort_all"].get_outputs()))
        t_fast = median_time(lambda: isim.run(feeds), runs)
        t_ref = median_time(lambda: reference.run(feeds), runs)
        t_all = median_time(lambda: sessions["ort_all"].run(None, feeds), runs)
        t_none = median_time(lambda: sessions["ort_none"].run(None, feeds), runs)
        rows.append((name, batch, lower_time, first, t_fast, t_ref, t_all, t_none, same))
        print(f"{name:<14} b{batch:<3} fast {t_fast * 1e3:8.1f} ms  reference {t_ref * 1e3:8.1f} ms  "
              f"ort(all) {t_all * 1e3:8.1f} ms  ort(none) {t_none * 1e3:8.1f} ms  "
              f"fast/ort {t_fast / t_all:5.2f}x  identical {same}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", action="store_true", help="also the aimet_samples models")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sim, feeds = mobilenet(workdir)
        bench("mobilenet_v2", sim, feeds, args.runs, args.threads, workdir, rows)
        if args.samples:
            for entry in ("convnet", "mlp", "mtcnn_rnet"):
                sim, feeds = sample(entry)
                bench(entry, sim, feeds, args.runs, args.threads, workdir, rows)
    print()
    print(f"{'model':<14} {'batch':>5} {'lower s':>8} {'first ms':>9} {'fast ms':>8} {'ref ms':>8} {'ort ms':>8} "
          f"{'ort0 ms':>8} {'fast/ort':>8} {'ref/ort':>8} {'identical':>9}")
    for name, batch, lower, first, fast, ref, ort_all, ort_none, same in rows:
        print(f"{name:<14} {batch:>5} {lower:>8.2f} {first * 1e3:>9.1f} {fast * 1e3:>8.1f} {ref * 1e3:>8.1f} "
              f"{ort_all * 1e3:>8.1f} {ort_none * 1e3:>8.1f} {fast / ort_all:>7.2f}x {ref / ort_all:>7.2f}x "
              f"{str(same):>9}")
    print("ort = onnxruntime ORT_ENABLE_ALL, ort0 = ORT_DISABLE_ALL, on the exported QOperator model; "
          "first = first isim.run after lowering (Numba cache warm)")


if __name__ == "__main__":
    main()
