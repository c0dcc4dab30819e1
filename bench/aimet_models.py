"""Run aimet-onnx itself on the AIMET sample models, the MTCNN nets and PP-OCRv4 rec, on data written by
bench/ptq_vs_aimet_models.py, so that refquant can be compared on the *same* model, configuration and data.

Like bench/aimet_run.py (MobileNetV2), this script never imports refquant: it runs in the side virtual
environment that has aimet-onnx 2.42.0 (and PyTorch):

    python bench/ptq_vs_aimet_models.py --dump /tmp/rq/models_data
    /tmp/aimet-venv/bin/python bench/aimet_models.py --data /tmp/rq/models_data --out /tmp/rq/aimet_models \
        --models convnet mlp mtcnn_rnet mtcnn_pnet mtcnn_onet --adaround 200 1000
    /tmp/aimet-venv/bin/python bench/aimet_models.py --data /tmp/rq/models_data --out /tmp/rq/aimet_models \
        --models ppocr_rec --adaround 20
    python bench/ptq_vs_aimet_models.py --data /tmp/rq/models_data --aimet /tmp/rq/aimet_models

``--data`` holds one folder per model: ``meta.json`` (the model file given to AIMET, the model file for the CLE
row, the input name, output names), ``calib.npy`` and ``eval.npy``. Rows (each a fresh ``QuantizationSimModel``
with ``quant_scheme="min_max"``, ``compute_encodings`` on the calibration set in batches of 16, then the
technique on the same batches, then ``compute_encodings`` again, as the samples' README and bench/ptq.py):

* ``w8a8_pc``: int8/int8, config "default" (per-channel weights);
* ``w8a8_pt``: the package's ``default_config.json`` (per-tensor weights);
* ``w8a8_pt_cle``: ``equalize_model`` on the CLE model (BN fold, ReLU6 -> ReLU, scaling, high-bias fold), then
  ``w8a8_pt``;
* ``w4a8``: int4 weights, config "default" (per-channel), nearest rounding;
* ``w4a8_seq_mse``: ``apply_seq_mse(sim, calib, num_candidates=20)``;
* ``w4a8_adaround_N``: ``apply_adaround(sim, calib, num_iterations=N)`` (``--adaround N ...``). ``--repeats K`` runs
  each AdaRound row K - 1 more times with ``torch.manual_seed(1..K-1)`` into ``<model>/repeats/<row>_seed<k>.npz|json``
  and bench/ptq_vs_aimet_models.py prints the mean and range of all of AIMET's runs of the row. (Measured: with
  batches of 16 all runs are alike. AIMET's iteration i takes data batch i mod batches and draws at most 32 of its
  samples with torch.randperm, which with 16 samples is all of them.)

Every row but the CLE one first calls ``fold_all_batch_norms_to_weight`` (a no-op without BatchNormalization).
For each row: ``<row>.npz`` (every model output on the evaluation set, by the FP32 model's output names),
``<row>.encodings`` (encodings 1.0.0) and ``<row>.json`` (wall seconds: model preparation, technique,
calibration); AdaRound rows also ``<row>_weights.npz``, the model's initializers after AdaRound (AIMET writes its
soft-rounded weights there; its frozen weight quantizer snaps them to the grid; bench/adaround_layers.py reads
them). Metrics are computed by bench/ptq_vs_aimet_models.py. Asserts nothing. Last run (aimet-onnx 2.42.0,
onnxruntime 1.32.0, torch CPU, 2-core shared machine): bench/results_ptq_vs_aimet_models.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimet_run import _batches, aimet_row  # noqa: E402  (the same AIMET calls as the MobileNetV2 bench)

BASE_ROWS = ["w8a8_pc", "w8a8_pt", "w8a8_pt_cle", "w4a8", "w4a8_seq_mse"]


def run_row(row: str, meta: dict, calib: np.ndarray, ev: np.ndarray, out_dir: Path, seed: int | None = None) -> None:
    import onnx

    model_name = out_dir.name
    if seed is not None:
        import torch

        torch.manual_seed(seed)
        np.random.seed(seed)
        out_dir, stem = out_dir / "repeats", f"{row}_seed{seed}"
        out_dir.mkdir(exist_ok=True)
    else:
        stem = row
    name = meta["input"]
    # the CLE row has a model file of its own (meta["cle_model"]); aimet_row folds BNs or equalizes
    model = onnx.load(meta["cle_model"] if row == "w8a8_pt_cle" else meta["model"])
    sim, times = aimet_row(row, model, _batches(calib, name), calibrate_first=True)
    outputs = [sim.session.run(None, batch) for batch in _batches(ev, name)]
    arrays = {out: np.concatenate([o[i] for o in outputs]) for i, out in enumerate(meta["outputs"])}
    np.savez(out_dir / f"{stem}.npz", **arrays)
    if row.startswith("w4a8_adaround_"):  # the AdaRounded weights AIMET wrote into its model, for per-layer checks
        from onnx import numpy_helper

        weights = {t.name: numpy_helper.to_array(t) for t in sim.model.model.graph.initializer}
        np.savez(out_dir / f"{stem}_weights.npz", **weights)
    if seed is None:
        sim.export(str(out_dir), row, export_model=False, encoding_version="1.0.0")
    (out_dir / f"{stem}.json").write_text(json.dumps(times, indent=1))
    print(f"{model_name} {stem}: {json.dumps({k: round(v, 2) for k, v in times.items()})}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder written by ptq_vs_aimet_models.py --dump")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--rows", nargs="*", default=BASE_ROWS)
    parser.add_argument("--adaround", nargs="*", type=int, default=[], help="AdaRound iteration counts to run")
    parser.add_argument("--skip-existing", action="store_true", help="skip rows whose .json is already there")
    parser.add_argument("--repeats", type=int, default=1, help="AdaRound rows: also runs seeded 1..K-1 (repeats/)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    for model in args.models:
        folder = args.data / model
        meta = json.loads((folder / "meta.json").read_text())
        calib, ev = np.load(folder / "calib.npy"), np.load(folder / "eval.npy")
        out_dir = args.out / model
        out_dir.mkdir(parents=True, exist_ok=True)
        for row in args.rows + [f"w4a8_adaround_{n}" for n in args.adaround]:
            try:
                if not (args.skip_existing and (out_dir / f"{row}.json").exists()):
                    run_row(row, meta, calib, ev, out_dir)
                for seed in range(1, args.repeats if row.startswith("w4a8_adaround_") else 1):
                    if not (args.skip_existing and (out_dir / "repeats" / f"{row}_seed{seed}.json").exists()):
                        run_row(row, meta, calib, ev, out_dir, seed)
            except Exception:  # one failing row (an op AIMET does not handle) must not stop the others
                (out_dir / f"{row}.error").write_text(traceback.format_exc())
                print(f"{model} {row}: FAILED\n{traceback.format_exc()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
