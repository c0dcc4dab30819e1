"""Scale-out benchmark: MobileNetV2 calibration on 1,024 images and its per-layer sensitivity sweep on a
Dask LocalCluster of 1 and 2 worker processes (one core each).

    python bench/scale.py [--samples 1024] [--sweep-samples 16] [--sweep-batch 8] [--workers 1 2] [--repeat 2]

Data: a float32 .npy of ImageNet-preprocessed random crops of the photos in /work/shared/data (the same
recipe as bench/calibration.py); the workers memory-map their own range of it (the client never reads it).
Each worker count runs in a fresh process: it starts ``refquant.scale.cluster.local_cluster(N,
threads_per_worker=1)`` (each worker pinned to its own core), calibrates (``compute_encodings(path,
executor=...)``), then runs ``analyze`` (per-layer only/all-but sweep, SQNR vs FP32) on the first
``--sweep-samples`` images (16), batches of ``--sweep-batch`` (8) = the sweep's tasks. Reported: wall seconds of each phase,
speed-up over 1 worker, peak RSS of each worker process and of the client process, and whether the
encodings and the sweep's per-layer figures are identical across worker counts. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
MODEL = Path("/work/shared/models/mobilenet_v2_imagenet.onnx")
BATCH = 16


def run_one(args) -> dict:
    """One worker count, in this (fresh) process."""
    import hashlib

    import refquant
    from refquant.analysis import analyze
    from refquant.quant import QuantSim
    from refquant.scale.cluster import local_cluster

    t0 = time.perf_counter()
    ex = local_cluster(args.run, threads_per_worker=1)
    startup = time.perf_counter() - t0
    try:
        graph = refquant.load(args.model)
        sim = QuantSim(graph, quant_scheme=args.scheme)
        t0 = time.perf_counter()
        sim.compute_encodings(args.data, batch_size=BATCH, progress=False, executor=ex)
        calibration = time.perf_counter() - t0
        calibration_tasks = list(ex.task_bytes)
        digest = hashlib.sha256()
        for name in sorted(sim.quantizers):
            e = sim.encoding_of(name)
            if e is not None and e.kind == "int":
                digest.update(name.encode() + np.asarray(e.scale, np.float64).tobytes()
                              + np.asarray(e.offset, np.float64).tobytes())
        sweep_data = np.load(args.data, mmap_mode="r")[:args.sweep_samples]
        t0 = time.perf_counter()
        report = analyze(sim, np.ascontiguousarray(sweep_data), batch_size=args.sweep_batch, progress=False,
                         executor=ex)
        sweep = time.perf_counter() - t0
        sweep_tasks = ex.task_bytes[len(calibration_tasks):]
        layers = [(l.name, l.only, l.all_but) for l in report.layers]
        workers = ex.peak_memory()
    finally:
        ex.shutdown()
    return {"workers": args.run, "startup_s": startup, "calibration_s": calibration, "sweep_s": sweep,
            "evaluations": report.settings["evaluations"], "encodings_sha256": digest.hexdigest(),
            "sweep_sha256": hashlib.sha256(repr(layers).encode()).hexdigest(),
            "calibration_task_kb": [n / 1024 for n in calibration_tasks],
            "sweep_task_kb": [n / 1024 for n in sweep_tasks],
            "worker_peak_mb": sorted(v / 2**20 for v in workers.values()),
            "client_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--sweep-samples", type=int, default=16)
    parser.add_argument("--sweep-batch", type=int, default=8, help="batch size of the sweep = images per task")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scheme", default="min_max")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per worker count, interleaved (1, 2, 1, 2...); the table gives each run and "
                             "the speed-up of the best runs (a shared machine's load changes between runs)")
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args)))
        return
    from _models import dynamic_batch_model
    from calibration import make_samples

    with tempfile.TemporaryDirectory() as tmp:
        model = dynamic_batch_model(Path(args.model), Path(tmp))
        data = Path(tmp) / "samples.npy"
        np.save(data, make_samples(args.samples))
        print(f"model {Path(args.model).name}, {args.samples} calibration images ({data.stat().st_size / 2**20:.0f} MiB "
              f".npy, memory-mapped by the workers), sweep on {args.sweep_samples} images in batches of {args.sweep_batch} (one task each); calibration batches of {BATCH}, "
              f"scheme {args.scheme}")
        rows = []
        for n in [n for _ in range(args.repeat) for n in args.workers]:
            out = subprocess.run([sys.executable, __file__, "--run", str(n), "--model", str(model), "--data", str(data),
                                  "--sweep-samples", str(args.sweep_samples), "--scheme", args.scheme,
                                  "--sweep-batch", str(args.sweep_batch)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"run with {n} workers failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {n: {k: min(r[k] for r in rows if r["workers"] == n) for k in ("calibration_s", "sweep_s")}
            for n in args.workers}
    base = best[args.workers[0]]
    print(f"\n{'workers':>7} {'startup s':>9} {'calib s':>8} {'x':>5} {'sweep s':>8} {'x':>5} "
          f"{'worker peak MiB':>18} {'client peak MiB':>15}")
    for r in rows:
        print(f"{r['workers']:>7} {r['startup_s']:>9.1f} {r['calibration_s']:>8.1f} "
              f"{base['calibration_s'] / r['calibration_s']:>5.2f} {r['sweep_s']:>8.1f} "
              f"{base['sweep_s'] / r['sweep_s']:>5.2f} {', '.join(f'{m:.0f}' for m in r['worker_peak_mb']):>18} "
              f"{r['client_peak_mb']:>15.0f}")
    print("best runs: " + "; ".join(f"{n} worker(s) calibration {b['calibration_s']:.1f} s "
                                    f"(x{base['calibration_s'] / b['calibration_s']:.2f}), sweep {b['sweep_s']:.1f} s "
                                    f"(x{base['sweep_s'] / b['sweep_s']:.2f})" for n, b in best.items()))
    print(f"\nsweep: {rows[0]['evaluations']} evaluations; speed-up target >= 1.6x with 2 workers")
    for r in rows:
        print(f"{r['workers']} worker(s): pickled task sizes (what goes through the scheduler), calibration "
              f"{', '.join(f'{k:.1f}' for k in r['calibration_task_kb'])} KiB; sweep "
              f"{', '.join(f'{k:.0f}' for k in r['sweep_task_kb'])} KiB")
    print("encodings identical across worker counts:", len({r["encodings_sha256"] for r in rows}) == 1)
    print("sweep per-layer figures identical across worker counts:", len({r["sweep_sha256"] for r in rows}) == 1)


if __name__ == "__main__":
    main()
