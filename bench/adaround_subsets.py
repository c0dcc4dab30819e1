"""AdaRound, refquant beside aimet-onnx, over several calibration sets: each model's calibration samples less one
of K equal parts (K sets), the same evaluation set. A single AdaRound run on these small models moves by several
dB with the samples (MTCNN O-Net W4A8 1000 its: 35.5-47.0 dB over four such sets), so a comparison is only firm
on the mean of several sets; this prints each set's SQNR of the primary output, refquant's minus AIMET's, and the
means with their standard errors (the paired difference's is the one that decides).

    python bench/adaround_subsets.py --dump /tmp/rq/subsets --models mtcnn_rnet mtcnn_onet --subsets 4
    /tmp/aimet-venv/bin/python bench/aimet_models.py --data /tmp/rq/subsets --out /tmp/rq/subsets_aimet --rows \
        --adaround 200 1000 --models mtcnn_rnet_q0 mtcnn_rnet_q1 ...      # every <model>_q<k> folder
    python bench/adaround_subsets.py --data /tmp/rq/subsets --aimet /tmp/rq/subsets_aimet \
        --models mtcnn_rnet mtcnn_onet --subsets 4 --iterations 200 1000 \
        [--adaround-options '{"qdrop": 0.5, "quantize_activations": true}']

refquant's rows are bench/ptq_vs_aimet_models.py's ``w4a8_adaround_N`` on each set (seed 0, or with ``--seeds N``
the mean over seeds 0..N-1; aimet-onnx's AdaRound is deterministic on these models). The K subsets share most
of their samples; the models whose samples are drawn at random (PP-OCR, NudeNet, MobileNetV2) can have independent
sets instead, ``--dump DIR --fresh-seeds 10 11 12 ...`` (then ``--subsets`` is their count). Results (newest
first): bench/results_ptq_vs_aimet_models.txt. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import ptq_vs_aimet_models as models  # noqa: E402


def subset_indices(count: int, parts: int, k: int) -> np.ndarray:
    """The samples ``0..count-1`` less the ``k``-th of ``parts`` equal parts (the last part takes the rest)."""
    size = count // parts
    stop = count if k == parts - 1 else (k + 1) * size
    return np.r_[0:k * size, stop:count]


def dump(folder: Path, names, parts: int, fresh_seeds=None) -> None:
    """``folder/<model>_q<k>``: calib.npy (the subset, or with ``fresh_seeds`` the independent set drawn with the
    k-th seed), eval.npy and meta.json as ptq_vs_aimet_models.py --dump."""
    for name in names:
        models.dump(folder / "_full", [name])
        full = folder / "_full" / name
        calib = np.load(full / "calib.npy")
        for k in range(len(fresh_seeds) if fresh_seeds else parts):
            out = folder / f"{name}_q{k}"
            out.mkdir(parents=True, exist_ok=True)
            if fresh_seeds:
                subset = models.calibration_samples(name, fresh_seeds[k])
                what = f"{len(subset)} samples drawn with seed {fresh_seeds[k]}"
            else:
                subset = calib[subset_indices(len(calib), parts, k)]
                what = f"{len(subset)} of {len(calib)}"
            np.save(out / "calib.npy", subset)
            for file in ("eval.npy", "meta.json"):
                shutil.copy(full / file, out / file)
            print(f"{name}_q{k}: calibration {what} -> {out}")


def compare(name: str, data: Path, aimet: Path, parts: int, iterations, options: dict, seeds: int = 1) -> None:
    from refquant import load

    spec = models.model_spec(name)
    ref = models.fp32_reference(spec)
    graphs = {"ours": load(spec["ours_model"])}
    models.ADAROUND_OPTIONS.update(options)
    for its in iterations:
        ours, theirs = [], []
        for k in range(parts):
            subset = dict(spec, calib=np.load(data / f"{name}_q{k}" / "calib.npy"))
            values = []
            for seed in range(seeds):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, _ = models.ours(name, f"w4a8_adaround_{its}", subset, graphs, seed=seed)
                values.append(models.metrics(name, spec, ref, out)["sqnr"])
            ours.append(float(np.mean(values)))
            saved = aimet / f"{name}_q{k}" / f"w4a8_adaround_{its}.npz"
            theirs.append(models.metrics(name, spec, ref, dict(np.load(saved)))["sqnr"] if saved.exists()
                          else float("nan"))
        label = "refquant" if seeds == 1 else f"ours x{seeds}"
        difference = np.asarray(ours) - np.asarray(theirs)
        for who, values in ((label, ours), ("AIMET", theirs), ("diff", difference)):
            print(f"{name:<12} {its:>5} its {who:<8} " + " ".join(f"{x:6.2f}" for x in values)
                  + f" | mean {mean_and_error(values)}", flush=True)


def mean_and_error(values) -> str:
    """``mean +- standard error of the mean``; the paired differences' error is the one that decides a comparison
    (a set that is hard for one tool tends to be hard for the other)."""
    v = np.asarray(values, dtype=np.float64)
    error = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():6.2f} +- {error:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, help="write the calibration subsets here for bench/aimet_models.py")
    parser.add_argument("--data", type=Path, default=Path("/tmp/rq/subsets"))
    parser.add_argument("--aimet", type=Path, default=Path("/tmp/rq/subsets_aimet"))
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--subsets", type=int, default=4, help="K: K sets, each without one K-th of the samples")
    parser.add_argument("--fresh-seeds", type=int, nargs="+",
                        help="--dump: independent calibration sets drawn with these seeds instead of the K subsets "
                             "(models with drawn samples: " + ", ".join(models.DRAWN_CALIBRATION) + "; then "
                             "--subsets is their count)")
    parser.add_argument("--iterations", nargs="+", type=int, default=[200, 1000])
    parser.add_argument("--adaround-options", type=json.loads, default={},
                        help="JSON keyword arguments for refquant's adaround() (e.g. qdrop, quantize_activations)")
    parser.add_argument("--seeds", type=int, default=1, help="refquant: the mean over AdaRound seeds 0..N-1 per set")
    args = parser.parse_args(argv)
    if args.subsets < 2:
        parser.error("--subsets must be at least 2")
    if args.dump:
        dump(args.dump, args.models, args.subsets, args.fresh_seeds)
        return 0
    for name in args.models:
        compare(name, args.data, args.aimet, args.subsets, args.iterations, args.adaround_options, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
