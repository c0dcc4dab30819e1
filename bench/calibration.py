"""Calibration benchmark: refquant's QuantSim.compute_encodings against onnxruntime's quantize_static.

    python bench/calibration.py [--model PATH] [--samples 64 256] [--methods minmax entropy percentile]
                                [--repeat N]

Same model, same data: a float32 .npy of ImageNet-preprocessed random crops of the photos in
/work/shared/data (resize shorter side 256, random 224x224 crop, random horizontal flip, seeded), of
which an N-sample run reads the first N. refquant streams the .npy (read batch by batch, batches of 16)
through ``compute_encodings``; onnxruntime gets a CalibrationDataReader yielding batches of 16 read the
same way (``refquant.data.NpyRows``) and ``quantize_static(..., QDQ, per_channel=True, calibrate_method=...)``.
With ``--repeat N`` every (method, samples) pair runs N times, refquant and onnxruntime back to back,
and the ratio and targets use the medians (wall times on a shared machine are noisy; CPU seconds less so).

Each (runtime, method, samples) run is a fresh process reporting wall seconds and ru_maxrss. refquant's
time is ``compute_encodings`` alone (load and QuantSim construction are reported apart); onnxruntime's is
the whole ``quantize_static`` call (augmenting the model, calibration, computing ranges, quantizing and
writing the QDQ model). Both runtimes use 2 threads. Prints a table with the targets; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = Path("/work/shared/models/mobilenet_v2_imagenet.onnx")
PHOTOS = Path("/work/shared/data")
BATCH = 16
THREADS = 2
SCHEMES = {"minmax": "min_max", "entropy": "entropy", "percentile": "percentile"}
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# the targets, checked on the largest sample count
TIME_TARGET = {"minmax": 1.0, "entropy": 0.5, "percentile": 0.5}  # refquant s / onnxruntime s
GROWTH_TARGET = 1.2  # refquant peak RSS, largest / smallest sample count


# -- model and data --------------------------------------------------------------------------------

def batched_model(path: Path, workdir: Path) -> Path:
    """The model, with a dynamic batch dim where it declares a fixed 1."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _models import dynamic_batch_model

    return dynamic_batch_model(path, workdir)


def input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def make_samples(count: int, seed: int = 0, crop: int = 224) -> np.ndarray:
    """``count`` ImageNet-preprocessed samples [count,3,224,224]: random crops and flips of the photos."""
    from refquant.data import Preprocess, load_image

    spec = Preprocess(resize_shorter=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    images = [load_image(p, spec) for p in photos]  # [3, H, W], shorter side 256, normalized
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, crop, crop), dtype=np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        _, height, width = image.shape
        top, left = rng.integers(height - crop + 1), rng.integers(width - crop + 1)
        sample = image[:, top:top + crop, left:left + crop]
        out[i] = sample[:, :, ::-1] if rng.random() < 0.5 else sample
    return out


# -- workers (each in a fresh process) -------------------------------------------------------------

def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class AnonPeak:
    """Peak anonymous RSS (heap, arrays: not file pages such as the memory-mapped .npy or shared
    libraries), sampled from /proc/self/status every 10 ms by a thread while the block runs."""

    def __enter__(self):
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def refquant_worker(model: str, data: str, method: str) -> dict:
    import refquant
    from refquant.quant import QuantSim

    start = time.perf_counter()
    sim = QuantSim(refquant.load(model), quant_scheme=SCHEMES[method], threads=THREADS)
    setup = time.perf_counter() - start
    base = peak_mb()
    with AnonPeak() as anon:
        start, cpu = time.perf_counter(), cpu_s()
        sim.compute_encodings(data, batch_size=BATCH, progress=False)
        seconds, cpu = time.perf_counter() - start, cpu_s() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "setup_s": setup, "base_mb": base, "peak_mb": peak_mb(),
            "anon_mb": anon.peak}


def ort_worker(model: str, data: str, method: str) -> dict:
    import onnxruntime

    class TwoThreads(onnxruntime.SessionOptions):
        """quantize_static has no thread option: its calibration session gets these options instead."""

        def __init__(self):
            super().__init__()
            self.intra_op_num_threads = THREADS
            self.inter_op_num_threads = 1

    onnxruntime.SessionOptions = TwoThreads  # before importing the quantization package (it imports the name)
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          quantize_static)

    name = input_name(Path(model))

    from refquant.data import NpyRows

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.array = NpyRows(Path(data))  # read batch by batch, as refquant reads it
            self.start = 0

        def get_next(self):
            if self.start >= len(self.array):
                return None
            batch = np.ascontiguousarray(self.array[self.start:self.start + BATCH], dtype=np.float32)
            self.start += BATCH
            return {name: batch}

        def rewind(self):
            self.start = 0

    base = peak_mb()
    with tempfile.TemporaryDirectory() as tmp, AnonPeak() as anon:
        start, cpu = time.perf_counter(), cpu_s()
        quantize_static(model, str(Path(tmp) / "model_qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]))
        seconds, cpu = time.perf_counter() - start, cpu_s() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "base_mb": base, "peak_mb": peak_mb(), "anon_mb": anon.peak}


def spawn(runtime: str, model: Path, data: Path, method: str) -> dict:
    command = [sys.executable, __file__, "--worker", runtime, str(model), str(data), method]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- main ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--methods", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per (method, samples); medians are used")
    args = parser.parse_args(argv)
    if args.worker:
        runtime, model, data, method = args.worker
        work = refquant_worker if runtime == "refquant" else ort_worker
        print(json.dumps(work(model, data, method)))
        return 0

    samples = sorted(set(args.samples))
    results: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = batched_model(args.model, tmp)
        start = time.perf_counter()
        everything = make_samples(max(samples))
        files = {}
        for n in sorted(set(samples) | {BATCH}):
            files[n] = tmp / f"calib_{n}.npy"
            np.save(files[n], everything[:n])
        del everything
        print(f"model {args.model}{' (batch made dynamic)' if model != args.model else ''}; "
              f"data: {max(samples)} crops of {PHOTOS}/*.png|*.jpg in {time.perf_counter() - start:.1f} s; "
              f"batches of {BATCH}; {THREADS} threads; load average {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} CPUs", flush=True)
        for method in args.methods:  # warm Numba's on-disk cache so no timed run compiles
            spawn("refquant", model, files[BATCH], method)
        head = (f"{'method':<11}{'samples':>8}{'refquant s':>12}{'ort s':>8}{'ratio':>7}{'target':>13}"
                f"{'rq MB':>8}{'ort MB':>8}{'rq anon':>9}{'ort anon':>10}{'rq cpu s':>10}{'ort cpu s':>11}"
                f"{'rq setup s':>12}")
        print(head)
        for method in args.methods:
            for n in samples:
                for _ in range(args.repeat):
                    ours = spawn("refquant", model, files[n], method)
                    theirs = spawn("ort", model, files[n], method)
                    if "error" in ours or "error" in theirs:
                        print(f"{method:<11}{n:>8}  error: refquant: {ours.get('error', 'ok')}; "
                              f"onnxruntime: {theirs.get('error', 'ok')}", flush=True)
                        continue
                    results.setdefault(("refquant", method, n), []).append(ours)
                    results.setdefault(("ort", method, n), []).append(theirs)
                    ratio = ours["seconds"] / theirs["seconds"]
                    print(f"{method:<11}{n:>8}{ours['seconds']:>12.2f}{theirs['seconds']:>8.2f}{ratio:>7.2f}"
                          f"{'':>13}{ours['peak_mb']:>8.0f}{theirs['peak_mb']:>8.0f}{ours['anon_mb']:>9.0f}"
                          f"{theirs['anon_mb']:>10.0f}{ours['cpu_s']:>10.2f}{theirs['cpu_s']:>11.2f}"
                          f"{ours['setup_s']:>12.2f}  load {os.getloadavg()[0]:.1f}", flush=True)
        results = {key: {field: float(np.median([r[field] for r in runs])) for field in runs[0]}
                   for key, runs in results.items()}
        print(f"\nmedians over {args.repeat} run(s); time target at {samples[-1]} samples "
              "(wall ratio, and the same ratio of CPU seconds)")
        print(f"{'method':<11}{'samples':>8}{'refquant s':>12}{'ort s':>8}{'ratio':>7}{'target':>13}"
              f"{'rq cpu s':>10}{'ort cpu s':>11}{'cpu ratio':>11}")
        for method in args.methods:
            for n in samples:
                ours, theirs = results.get(("refquant", method, n)), results.get(("ort", method, n))
                if ours is None or theirs is None:
                    continue
                ratio = ours["seconds"] / theirs["seconds"]
                target = ""
                if n == samples[-1]:
                    want = TIME_TARGET[method]
                    target = f"<={want:g} {'ok' if ratio <= want else 'MISS'}"
                print(f"{method:<11}{n:>8}{ours['seconds']:>12.2f}{theirs['seconds']:>8.2f}{ratio:>7.2f}"
                      f"{target:>13}{ours['cpu_s']:>10.2f}{theirs['cpu_s']:>11.2f}"
                      f"{ours['cpu_s'] / theirs['cpu_s']:>11.2f}", flush=True)

    if len(samples) > 1:
        small, large = samples[0], samples[-1]
        print(f"\npeak memory growth, {large} vs {small} samples: ru_maxrss ratio (the target) and, in "
              f"brackets, the peak anonymous RSS ratio")
        print(f"{'method':<11}{'refquant':>14}{'target':>13}{'onnxruntime':>16}")
        for method in args.methods:
            runs = [results.get((rt, method, n), {}) for rt in ("refquant", "ort") for n in (small, large)]
            if any("peak_mb" not in r for r in runs):
                print(f"{method:<11}  (a run failed)")
                continue
            rq_s, rq_l, ort_s, ort_l = runs

            def growth(a, b):
                return f"{b['peak_mb'] / a['peak_mb']:.2f} ({b['anon_mb'] / a['anon_mb']:.2f})"

            ratio = rq_l["peak_mb"] / rq_s["peak_mb"]
            target = f"<={GROWTH_TARGET:g} {'ok' if ratio <= GROWTH_TARGET else 'MISS'}"
            print(f"{method:<11}{growth(rq_s, rq_l):>14}{target:>13}{growth(ort_s, ort_l):>16}")

    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    data_mb = 3 * 224 * 224 * 4 / 2**20
    print("\nnotes: refquant s = compute_encodings only (param encodings + activation calibration; Numba "
          "cache warmed by an untimed run); rq setup s = load + QuantSim construction, not in the ratio.\n"
          "ort s = the whole quantize_static call: augmented-model build, calibration session, range "
          "computation, quantization and writing the QDQ model.\n"
          f"ratio = refquant s / ort s; targets (at {samples[-1]} samples): <=1 vs MinMax, <=0.5 vs "
          f"Entropy/Percentile; refquant peak memory <={GROWTH_TARGET:g}x from {samples[0]} to {samples[-1]} samples.\n"
          f"threads: refquant QuantSim(threads={THREADS}); onnxruntime has no thread option in quantize_static, so "
          f"its SessionOptions class is replaced by one with intra_op_num_threads={THREADS}, inter_op_num_threads=1.\n"
          "method defaults differ: refquant percentile 99.99 over 2048 bins, entropy 2048 bins / 128 quantized "
          "bins; onnxruntime Percentile 99.999 over 2048 bins, Entropy 128 bins / 128 quantized bins; "
          "weights: onnxruntime takes their ranges by MinMax whatever the method, refquant by its param_scheme "
          "(default: min_max under percentile and entropy).\n"
          "MB = ru_maxrss of the fresh worker process (imports and shared libraries included); the .npy is "
          f"read batch by batch into ordinary arrays ({data_mb:.2f} MB a sample), so its pages are not in it. "
          "anon = peak anonymous RSS during the timed call (sampled every 10 ms).\n"
          "cpu s = CPU seconds (all threads) of the timed call: less sensitive than wall time to other load.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
