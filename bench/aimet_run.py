"""Run aimet-onnx itself on a model and crops, so that refquant can be compared on the *same* data.

This script is not part of refquant and never imports it: it runs in a separate virtual environment that
has aimet-onnx (which needs PyTorch; refquant does not). Set it up once (about 6 GB, a CUDA build of torch
that runs on the CPU; see /work/.library/env for where torch comes from on this machine):

    python3 -m venv /tmp/aimet-venv
    /tmp/aimet-venv/bin/pip install torch==2.13.0 aimet-onnx==2.42.0 onnxruntime==1.32.0 onnx==1.23.2 pillow

Then, from the main environment, write the crops and run AIMET on them (bench/ptq_vs_aimet.py does both
and prints refquant beside AIMET):

    python bench/ptq_data.py --dump /tmp/rq/crops --seeds 0 1 2 3
    /tmp/aimet-venv/bin/python bench/aimet_run.py --crops /tmp/rq/crops --seed-pair 0 --out /tmp/rq/aimet

Rows (each a fresh ``QuantizationSimModel`` on the model as given, ``compute_encodings`` on the 64 calibration
crops in batches of 16, exactly the calls of ``/work/shared/refs/aimet_samples/README.md``):

* ``w8a8_pc``: int8/int8, min_max, config "default" (per-channel weights);
* ``w8a8_pt``: the same with the package's ``default_config.json`` (per-tensor weights);
* ``w8a8_pt_cle``: ``equalize_model`` (AIMET's CLE: BN fold, ReLU6 -> ReLU, scaling, high-bias fold), then
  ``w8a8_pt``;
* ``w4a8``: int4 weights, per-channel, nearest;
* ``w4a8_seq_mse``: ``apply_seq_mse(sim, calib, num_candidates=20)``, then ``compute_encodings``;
* ``w4a8_adaround_N``: ``apply_adaround(sim, calib, num_iterations=N)``, then ``compute_encodings``
  (``--adaround N ...``; slow: AIMET took 1,057 s for N=20 on MobileNetV2).

For each row: ``<row>.npz`` (sim outputs on the evaluation crops), ``<row>.encodings`` (encodings 1.0.0) and
``<row>.json`` (wall seconds of the technique and of calibration). Metrics are computed by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

BATCH = 16


def _batches(data: np.ndarray, name: str) -> list[dict]:
    return [{name: data[i:i + BATCH]} for i in range(0, len(data), BATCH)]


def _default_config() -> str:
    import aimet_onnx

    return str(Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "default_config.json")


def aimet_row(row: str, model, calib_batches: list[dict], calibrate_first: bool = False):
    """One row on an ONNX ModelProto (CLE rows: ``equalize_model`` is applied here): a fresh QuantizationSimModel,
    [compute_encodings,] the technique, compute_encodings. Returns (sim, times in seconds)."""
    from aimet_onnx import apply_adaround, apply_seq_mse
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.quantsim import QuantizationSimModel

    times = {}
    start = time.perf_counter()
    if row == "w8a8_pt_cle":
        equalize_model(model)
    else:
        fold_all_batch_norms_to_weight(model)  # no-op on a model without BatchNormalization
    times["prepare_s"] = time.perf_counter() - start
    param_type = "int4" if row.startswith("w4a8") else "int8"
    config = _default_config() if row.startswith("w8a8_pt") else "default"
    sim = QuantizationSimModel(model, param_type=param_type, activation_type="int8", quant_scheme="min_max",
                               config_file=config)
    if calibrate_first:
        start = time.perf_counter()
        sim.compute_encodings(calib_batches)
        times["first_compute_encodings_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if row == "w4a8_seq_mse":
        apply_seq_mse(sim, calib_batches, num_candidates=20)
    elif row.startswith("w4a8_adaround_"):
        apply_adaround(sim, calib_batches, num_iterations=int(row.rsplit("_", 1)[1]))
    times["technique_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sim.compute_encodings(calib_batches)
    times["compute_encodings_s"] = time.perf_counter() - start
    return sim, times


def run_row(row: str, model_path: Path, calib: np.ndarray, ev: np.ndarray, input_name: str, out_dir: Path):
    import onnx

    sim, times = aimet_row(row, onnx.load(str(model_path)), _batches(calib, input_name))
    outputs = [sim.session.run(None, batch)[0] for batch in _batches(ev, input_name)]
    np.save(out_dir / f"{row}.npy", np.concatenate(outputs))
    sim.export(str(out_dir), row, export_model=False, encoding_version="1.0.0")
    (out_dir / f"{row}.json").write_text(json.dumps(times, indent=1))
    print(f"{row}: {times}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/work/shared/models/mobilenet_v2_imagenet.onnx"))
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--crops", type=Path, required=True, help="folder with calib_K.npy / eval_K.npy")
    parser.add_argument("--seed-pair", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", nargs="*", default=["w8a8_pc", "w8a8_pt", "w8a8_pt_cle", "w4a8", "w4a8_seq_mse"])
    parser.add_argument("--adaround", nargs="*", type=int, default=[], help="AdaRound iteration counts to run")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    k = args.seed_pair
    calib = np.load(args.crops / f"calib_{k}.npy")
    ev = np.load(args.crops / f"eval_{k}.npy")
    out_dir = args.out / f"seed_pair_{k}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in args.rows + [f"w4a8_adaround_{n}" for n in args.adaround]:
        run_row(row, args.model, calib, ev, args.input_name, out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
