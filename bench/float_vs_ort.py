"""Float runtime benchmark: refquant against onnxruntime, both on 2 threads.

    python bench/float_vs_ort.py [--models NAME ...] [--all] [--runs 10]

Per model and batch size (1 and 8): median latency of each runtime after one warm-up run, the ratio,
refquant's first call (load + first run, Numba cache cold and warm), and peak memory (ru_maxrss of a
fresh process that loads the model and runs it). Light models declare a fixed batch of 1; for batch 8
their input's batch dim and a leading 1 in constant Reshape shapes are made dynamic. Prints a table and
the geometric mean of the batch-8 ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_models.py
DEFAULT = [f"light_{n}" for n in ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                                  "shufflenet", "squeezenet", "vgg19", "zfnet512")] + ["mobilenet_v2"]


def batched_model(name: str, batch: int, workdir: Path) -> Path:
    """The zoo model, with a dynamic batch dim where it declares a fixed 1 (for batch > 1)."""
    from _models import dynamic_batch_model

    from refquant import zoo

    path = zoo.fetch(name)
    return path if batch == 1 else dynamic_batch_model(path, workdir)


def feeds_for(path: Path, batch: int) -> dict:
    import refquant
    from refquant.feeds import random_feeds

    return random_feeds(refquant.load(path), batch=batch, seed=0)


def worker(runtime: str, path: str, batch: int, runs: int) -> dict:
    """Runs in a fresh process: first call, median latency, peak RSS."""
    start = time.perf_counter()
    feeds = feeds_for(Path(path), batch)
    if runtime == "refquant":
        import refquant

        session = refquant.Session(refquant.load(path), threads=2)
        run = lambda: session.run(feeds)  # noqa: E731
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, feeds)  # noqa: E731
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"first_call_s": first, "median_s": float(np.median(times)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(runtime, path, batch, runs, env=None) -> dict:
    command = [sys.executable, __file__, "--worker", runtime, str(path), str(batch), str(runs)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--all", action="store_true", help="every zoo model, not just the light ones and MobileNetV2")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    args = parser.parse_args(argv)
    if args.worker:
        runtime, path, batch, runs = args.worker
        print(json.dumps(worker(runtime, path, int(batch), int(runs))))
        return 0
    from refquant import zoo

    models = args.models or (zoo.names() if args.all else DEFAULT)
    ratios8 = []
    print(f"{'model':<20}{'batch':>6}{'refquant ms':>13}{'ort ms':>9}{'ratio':>7}{'first cold s':>14}"
          f"{'first warm s':>14}{'rq MB':>8}{'ort MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for batch in args.batches:
                path = batched_model(name, batch, Path(tmp))
                with tempfile.TemporaryDirectory() as cold_cache:
                    cold = spawn("refquant", path, batch, 1, {"NUMBA_CACHE_DIR": cold_cache})
                ours = spawn("refquant", path, batch, args.runs)
                theirs = spawn("onnxruntime", path, batch, args.runs)
                if "error" in ours or "error" in theirs:
                    print(f"{name:<20}{batch:>6}  error: {ours.get('error') or theirs.get('error')}")
                    continue
                ratio = ours["median_s"] / theirs["median_s"]
                if batch == 8:
                    ratios8.append(ratio)
                print(f"{name:<20}{batch:>6}{ours['median_s'] * 1e3:>13.1f}{theirs['median_s'] * 1e3:>9.1f}"
                      f"{ratio:>7.2f}{cold.get('first_call_s', float('nan')):>14.2f}{ours['first_call_s']:>14.2f}"
                      f"{ours['peak_rss_mb']:>8.0f}{theirs['peak_rss_mb']:>8.0f}", flush=True)
    if ratios8:
        print(f"geometric mean of the batch-8 latency ratio refquant/onnxruntime: "
              f"{float(np.exp(np.mean(np.log(ratios8)))):.2f} over {len(ratios8)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
