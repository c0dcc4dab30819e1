"""refquant's PTQ rows beside aimet-onnx's on the *same* data: the AIMET sample models (convnet, mlp, mtcnn_rnet),
MTCNN P-Net and O-Net, PP-OCRv4 rec. (MobileNetV2: bench/ptq_vs_aimet.py.)

    python bench/ptq_vs_aimet_models.py --dump /tmp/rq/models_data
    /tmp/aimet-venv/bin/python bench/aimet_models.py --data /tmp/rq/models_data --out /tmp/rq/aimet_models \
        --models convnet mlp mtcnn_rnet mtcnn_pnet mtcnn_onet --adaround 200 1000
    /tmp/aimet-venv/bin/python bench/aimet_models.py --data /tmp/rq/models_data --out /tmp/rq/aimet_models \
        --models ppocr_rec --adaround 20           # AIMET: about 20 minutes per AdaRound row here
    python bench/ptq_vs_aimet_models.py --data /tmp/rq/models_data --aimet /tmp/rq/aimet_models \
        --ours /tmp/rq/ours_models --seeds 5       # --ours: keep refquant's outputs; --seeds: AdaRound's spread
    python bench/ptq_vs_aimet_models.py --models mtcnn_rnet --rows w4a8_adaround_1000 --seeds 3 \
        --adaround-options '{"qdrop": 0.5, "quantize_activations": true}'   # refquant's AdaRound rows with options

``--dump`` writes each model's calibration and evaluation inputs and a ``meta.json`` (model files, input and
output names) for bench/aimet_models.py, which runs aimet-onnx 2.42.0 in its own virtual environment and saves its
outputs, encodings and seconds. Without ``--dump`` this script runs refquant's counterpart of every row AIMET has
results for (a fresh ``QuantSim``, min_max, ``compute_encodings`` on the calibration set in batches of 16, the
technique on the same set, ``compute_encodings`` again) and prints both.

Data (``MODELS``):

* convnet, mlp, mtcnn_rnet: the samples' calib.npz (64) and eval.npz (128, 128, 200) exactly as AIMET's golden
  runs (/work/shared/refs/aimet_samples/README.md). convnet: AIMET gets model.onnx and folds its BatchNorms itself
  (``fold_all_batch_norms_to_weight``); refquant's rows use model_bnfolded.onnx (the same folded graph, written
  by AIMET); the CLE rows of both start from model.onnx (CLE folds the BNs and uses their statistics for
  high-bias absorption).
* mtcnn_onet: the 200 LFW images resized to 48x48 with the samples' recipe (PIL mode "F" bilinear,
  ``(x*255 - 127.5)/128``, 3 channels); calibration = the same 64 indices as mtcnn_rnet's calib.npz.
* mtcnn_pnet: fully convolutional; the 24x24 inputs of mtcnn_rnet (prob map [b,2,7,7]). Top-1 agreement is per
  map position; accuracy counts an image as a face when its largest face probability on the map is > 0.5
  (FP32: 97 %).
* ppocr_rec: PP-OCRv4 rec (rapidocr-onnxruntime 1.4.4), bench/prepare_targets.py's text-line crops of page.png
  and text.png: calibration ``text_crops(64, seed=1)``, evaluation ``text_crops(128, seed=2)``, [b,3,48,320].
  Top-1 agreement is per time step (argmax over the 6,625 classes); "acc" is 100 - CER (%) of greedy CTC decoding
  against FP32's decoding.
* nudenet_320n: NudeNet's YOLOv8n detector (nudenet 3.4.2; SiLU, Concat, Resize, DFL Softmax), random 320x320 crops of
  the natural photos (``photo_crops``, RGB / 255): calibration seed 1 (64), evaluation seed 2 (128). SQNR of
  ``output0`` (boxes and class scores, [N, 4 + 18, 2100]); top-1 agreement of the class of each anchor whose FP32
  class score passes 0.25.
* mobilenet_v2 (bench/adaround_input_choice.py only; no AIMET rows here, see bench/ptq_vs_aimet.py): bench/ptq.py's
  default crops, ``crops("resize248", "photos", 64, 0)`` and ``(128, 1)``.
* ppocr_cls: PP-OCR's text direction classifier (rapidocr-onnxruntime 1.4.4, MobileNetV3-small with BatchNorms and
  HardSwish), the same crops cut to its [b,3,48,192] input: calibration ``text_crops(64, seed=1)``, evaluation
  ``text_crops(128, seed=2)``. Top-1 agreement of the two-way 0/180 degree decision.

Metrics: SQNR (dB) of the primary output against FP32 (onnxruntime) over the evaluation set, in float64 (the
samples' formula); for the MTCNN nets also bbox_reg's SQNR; top-1 agreement with FP32 (%); accuracy (%) against
the labels where they exist; wall seconds of the technique (CLE: ``equalize``/``equalize_model``; SeqMSE,
AdaRound: the call alone, not the calibrations around it).

refquant's sims round ties half up as AIMET's (``QuantSim(rounding="half_up")``; refquant's default is half to
even). refquant's rows: the same as AIMET's, plus ``w8a8_pt_cle_relu`` (refquant's ``equalize(replace_relu6=True)``,
AIMET's ReLU6 -> ReLU swap), ``w4a8_seq_mse_asym`` and ``w4a8_seq_mse_symqt`` (``seq_mse(inp_symmetry=...)``, one
target each; "symqt" is AIMET's default; refquant's default "auto" runs both and keeps the one with the better output
SQNR on the calibration set). On PP-OCRv4 rec refquant's ``QuantSim`` runs with ``residual_rule=False`` so that
every activation is 8-bit like AIMET's (its default preparation gives 16 bits to the residual stream's tensors).
Asserts nothing; last run: bench/results_ptq_vs_aimet_models.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path("/work/shared")
SAMPLES = SHARED / "refs" / "aimet_samples"
MODELS_DIR = SHARED / "models"
BATCH = 16
MODELS = ("convnet", "mlp", "mtcnn_rnet", "mtcnn_pnet", "mtcnn_onet", "ppocr_rec", "ppocr_cls")


# -- data ------------------------------------------------------------------------------------------

def lfw_inputs(size: int) -> np.ndarray:
    """The 200 LFW images as the samples' mtcnn_rnet recipe, at ``size`` x ``size``: [200,3,size,size]."""
    from PIL import Image

    images = np.load(SHARED / "data" / "lfw_subset.npy")
    resized = np.stack([np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize((size, size),
                                                                                        Image.BILINEAR))
                        for im in images])
    return np.repeat(((resized * 255 - 127.5) / 128)[:, None], 3, axis=1).astype(np.float32)


def model_spec(name: str) -> dict:
    """meta for one model: AIMET's model file, the CLE rows' model file, refquant's model file for the other rows,
    input and output names, primary output; with the calibration and evaluation arrays and labels."""
    if name in ("convnet", "mlp", "mtcnn_rnet"):
        folder = SAMPLES / name
        entry = json.loads((folder / "entry.json").read_text()) if (folder / "entry.json").exists() else {}
        model = str(folder / "model.onnx")
        ours = str(folder / "model_bnfolded.onnx") if name == "convnet" else model
        calib, ev = np.load(folder / "calib.npz")["input"], np.load(folder / "eval.npz")["input"]
        labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64) if name == "mtcnn_rnet" else None
        outputs = ["bbox_reg", "prob"] if name == "mtcnn_rnet" else ["logits"]
        primary = entry.get("primary_output", outputs[-1])
        return dict(model=model, cle_model=model, ours_model=ours, input="input", outputs=outputs,
                    primary=primary, calib=calib, eval=ev, labels=labels)
    if name in ("mtcnn_pnet", "mtcnn_onet"):
        rnet_entry = json.loads((SAMPLES / "mtcnn_rnet" / "entry.json").read_text())
        ev = lfw_inputs(24 if name == "mtcnn_pnet" else 48)
        model = str(MODELS_DIR / f"{name}.onnx")
        outputs = ["bbox_reg", "prob"] if name == "mtcnn_pnet" else ["bbox_reg", "landmarks", "prob"]
        return dict(model=model, cle_model=model, ours_model=model, input="input", outputs=outputs, primary="prob",
                    calib=ev[np.array(rnet_entry["calib_indices"])], eval=ev,
                    labels=np.r_[np.ones(100), np.zeros(100)].astype(np.int64))
    if name == "ppocr_rec":
        from bench.prepare_targets import text_crops
        from refquant import zoo

        model = str(zoo.fetch("ppocr_rec"))
        return dict(model=model, cle_model=model, ours_model=model, input="x", outputs=["softmax_11.tmp_0"],
                    primary="softmax_11.tmp_0", calib=calibration_samples(name, 1), eval=text_crops(128, seed=2),
                    labels=None)
    if name == "ppocr_cls":
        from bench.prepare_targets import text_crops
        from refquant import zoo

        model = str(zoo.fetch("ppocr_cls"))
        output = "save_infer_model/scale_0.tmp_1"
        return dict(model=model, cle_model=model, ours_model=model, input="x", outputs=[output], primary=output,
                    calib=calibration_samples(name, 1),
                    eval=np.ascontiguousarray(text_crops(128, seed=2)[..., :192]), labels=None)
    if name == "nudenet_320n":
        from refquant import zoo

        model = str(zoo.fetch("nudenet_320n"))
        return dict(model=model, cle_model=model, ours_model=model, input="images", outputs=["output0"],
                    primary="output0", calib=calibration_samples(name, 1), eval=photo_crops(128, seed=2, size=320),
                    labels=None)
    if name == "mobilenet_v2":  # bench/ptq.py's default crops (resize248, the 10 photos, seed pair 0)
        from bench.ptq_data import crops

        model = str(MODELS_DIR / "mobilenet_v2_imagenet.onnx")
        return dict(model=model, cle_model=model, ours_model=model, input="input", outputs=["logits"],
                    primary="logits", calib=calibration_samples(name, 0),
                    eval=crops("resize248", "photos", 128, 1), labels=None)
    raise ValueError(name)


DRAWN_CALIBRATION = ("ppocr_rec", "ppocr_cls", "nudenet_320n", "mobilenet_v2")


def calibration_samples(name: str, seed: int) -> np.ndarray:
    """The 64 calibration samples of a model whose samples are drawn at random (DRAWN_CALIBRATION), drawn with
    ``seed``: model_spec's with seed 1 (MobileNetV2: 0; the evaluation sets are seed 2, MobileNetV2's 1), an
    independent set with another (bench/adaround_subsets.py --fresh-seeds)."""
    if name in ("ppocr_rec", "ppocr_cls"):
        from bench.prepare_targets import text_crops

        crops = text_crops(64, seed=seed)
        return np.ascontiguousarray(crops[..., :192]) if name == "ppocr_cls" else crops
    if name == "nudenet_320n":
        return photo_crops(64, seed=seed, size=320)
    if name == "mobilenet_v2":
        from bench.ptq_data import crops

        return crops("resize248", "photos", 64, seed)
    raise ValueError(f"{name}: its calibration samples are fixed; drawn only for {', '.join(DRAWN_CALIBRATION)}")


def photo_crops(count: int, seed: int, size: int) -> np.ndarray:
    """``count`` random ``size`` x ``size`` crops of the natural photos (shorter side resized to size * 1.1),
    RGB in [0, 1], [count, 3, size, size] (YOLOv8's input scaling)."""
    from bench.ptq_data import _resize_shorter, load_photos

    images = [_resize_shorter(image, int(size * 1.1)) for image in load_photos("photos")]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        top, left = int(rng.integers(image.size[1] - size + 1)), int(rng.integers(image.size[0] - size + 1))
        crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        out[i] = crop.transpose(2, 0, 1)
    return out


def static_copy(model_path: str, target: Path, shape: tuple) -> Path:
    """The model with its (single) input fixed to ``shape`` and its outputs' batch axis to ``shape[0]``."""
    import onnx

    model = onnx.load(model_path)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = value
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = shape[0]
    onnx.save(model, str(target))
    return target


def dump(folder: Path, names) -> None:
    for name in names:
        spec = model_spec(name)
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "calib.npy", spec["calib"])
        np.save(out / "eval.npy", spec["eval"])
        meta = {k: spec[k] for k in ("model", "cle_model", "ours_model", "input", "outputs", "primary")}
        if name in ("ppocr_cls", "nudenet_320n"):  # dynamic input dims: aimet-onnx's make_dummy_input fails on them
            meta["model"] = meta["cle_model"] = str(static_copy(spec["model"], out / "model_static.onnx",
                                                                (BATCH,) + spec["calib"].shape[1:]))
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"{name}: calib {spec['calib'].shape}, eval {spec['eval'].shape} -> {out}")


# -- metrics ---------------------------------------------------------------------------------------

def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref64 ** 2) / np.sum((ref64 - out64) ** 2)))


def metrics(name: str, spec: dict, ref: dict, out: dict) -> dict:
    """SQNR of every output, top-1 agreement and accuracy (see the module docstring) of the primary output."""
    primary = spec["primary"]
    r, o = ref[primary], out[primary]
    result = {f"sqnr_{k}": sqnr(ref[k], out[k]) for k in spec["outputs"]}
    result["sqnr"] = result[f"sqnr_{primary}"]
    axis = -1 if name == "ppocr_rec" else 1
    if name == "nudenet_320n":  # [N, 4 box + classes, anchors]: the class of each anchor that detects (score > 0.25)
        detects = r[:, 4:].max(axis=1) > 0.25
        result["top1"] = float(np.mean((r[:, 4:].argmax(1) == o[:, 4:].argmax(1))[detects]) * 100)
    else:
        result["top1"] = float(np.mean(r.argmax(axis) == o.argmax(axis)) * 100)
    if name == "mtcnn_pnet":
        result["acc"] = float(np.mean((o[:, 1].max(axis=(1, 2)) > 0.5) == spec["labels"]) * 100)
    elif spec["labels"] is not None:
        result["acc"] = float(np.mean(o.argmax(1) == spec["labels"]) * 100)
    elif name == "ppocr_rec":
        from bench.prepare_targets import ctc_greedy, edit_distance

        truth, got = ctc_greedy(r), ctc_greedy(o)
        result["acc"] = 100 - 100 * sum(edit_distance(g, t) for g, t in zip(got, truth)) / sum(map(len, truth))
    return result


def fp32_reference(spec: dict) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ev = spec["eval"]
    runs = [session.run(None, {spec["input"]: ev[i:i + BATCH]}) for i in range(0, len(ev), BATCH)]
    return {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}


# -- refquant's rows -------------------------------------------------------------------------------

def sim_options(name: str) -> dict:
    """AIMET's simulation: ties round half up on the shifted grid (refquant's default is half to even, as
    onnxruntime's QuantizeLinear; with half_up plain W8A8 on mtcnn_rnet gives AIMET's outputs within one float32
    ulp, with half_even its SQNR is 0.4 dB lower). The PP-OCR models: no 16-bit residual stream, as AIMET (every
    activation int8)."""
    options = {"rounding": "half_up"}
    if name in ("ppocr_rec", "ppocr_cls"):
        options["residual_rule"] = False
    return options


def sim_outputs(sim, spec: dict) -> dict:
    ev, runs = spec["eval"], []
    for i in range(0, len(ev), BATCH):
        runs.append(sim.run({spec["input"]: ev[i:i + BATCH]}, outputs=spec["outputs"]))
    return {k: np.concatenate([r[k] for r in runs]) for k in spec["outputs"]}


ADAROUND_OPTIONS: dict = {}  # --adaround-options: more keyword arguments of refquant's adaround()


def ours(name: str, row: str, spec: dict, graphs: dict, seed: int = 0) -> tuple[dict, float]:
    """(outputs on the evaluation set, technique seconds) of refquant's counterpart of ``row`` (``seed``:
    AdaRound's, which draws the cached positions and Adam's minibatches)."""
    from refquant.ptq.adaround import adaround
    from refquant.ptq.cle import equalize
    from refquant.ptq.seq_mse import seq_mse
    from refquant.quant import QuantSim

    calib = {spec["input"]: spec["calib"]}
    graph = graphs["ours"]
    seconds = float("nan")
    if row.startswith("w8a8_pt_cle"):
        start = time.perf_counter()
        graph = equalize(graphs["cle"], replace_relu6=row.endswith("_relu"))
        seconds = time.perf_counter() - start
    precision = "w4a8" if row.startswith("w4a8") else "w8a8"
    config = "per_tensor" if row.startswith("w8a8_pt") else "per_channel"
    sim = QuantSim(graph.copy(), precision=precision, config=config, **sim_options(name))
    sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    technique = None
    if row == "w4a8_seq_mse":
        technique = lambda: seq_mse(sim, calib, batch_size=BATCH, progress=False)  # noqa: E731
    elif row.startswith("w4a8_seq_mse_"):
        target = row.rsplit("_", 1)[1]
        technique = lambda: seq_mse(sim, calib, batch_size=BATCH, inp_symmetry=target, progress=False)  # noqa: E731
    elif row.startswith("w4a8_adaround_"):
        n = int(row.rsplit("_", 1)[1])
        technique = lambda: adaround(sim, calib, num_iterations=n, batch_size=BATCH, seed=seed,  # noqa: E731
                                     progress=False, **ADAROUND_OPTIONS)
    if technique is not None:
        start = time.perf_counter()
        technique()
        seconds = time.perf_counter() - start
        sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    return sim_outputs(sim, spec), seconds


LABELS = {"w8a8_pc": "W8A8 per-channel", "w8a8_pt": "W8A8 per-tensor", "w8a8_pt_cle": "W8A8 per-tensor + CLE",
          "w8a8_pt_cle_relu": "  + CLE, ReLU6->ReLU (ours)", "w4a8": "W4A8 nearest", "w4a8_seq_mse": "W4A8 + SeqMSE",
          "w4a8_seq_mse_asym": "  SeqMSE asym (ours)", "w4a8_seq_mse_symqt": "  SeqMSE symqt (ours)"}
ORDER = ["w8a8_pc", "w8a8_pt", "w8a8_pt_cle", "w8a8_pt_cle_relu", "w4a8", "w4a8_seq_mse", "w4a8_seq_mse_asym",
         "w4a8_seq_mse_symqt"]


def label(row: str) -> str:
    return LABELS.get(row) or f"W4A8 + AdaRound {row.rsplit('_', 1)[1]} its"


def fmt(value, spec) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def ours_cached(name: str, row: str, spec: dict, graphs: dict, ours_dir: Path | None) -> tuple[dict, float]:
    """``ours``, or its saved outputs and seconds from an earlier run (``--ours DIR``: saved there if new)."""
    suffix = "".join(f"_{k}={v}" for k, v in sorted(ADAROUND_OPTIONS.items())) if row.startswith("w4a8_adaround") \
        else ""
    cache = ours_dir / name / (row + suffix) if ours_dir else None
    if cache and cache.with_suffix(".npz").exists():
        return dict(np.load(cache.with_suffix(".npz"))), json.loads(cache.with_suffix(".json").read_text())["s"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, seconds = ours(name, row, spec, graphs)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache.with_suffix(".npz"), **out)
        cache.with_suffix(".json").write_text(json.dumps({"s": seconds}))
    return out, seconds


def compare(name: str, aimet_dir: Path, rows_wanted, ours_dir: Path | None = None, seeds: int = 1) -> None:
    import refquant

    spec = model_spec(name)
    ref = fp32_reference(spec)
    graphs = {"ours": refquant.load(spec["ours_model"]), "cle": refquant.load(spec["cle_model"])}
    folder = aimet_dir / name
    rows = {p.stem for p in folder.glob("*.json")} if folder.exists() else set()
    failed = {p.stem for p in folder.glob("*.error")} if folder.exists() else set()
    rows |= failed
    if "w8a8_pt_cle" in rows:
        rows.add("w8a8_pt_cle_relu")
    if "w4a8_seq_mse" in rows:
        rows |= {"w4a8_seq_mse_asym", "w4a8_seq_mse_symqt"}
    if rows_wanted:
        rows &= set(rows_wanted)
    ordered = [r for r in ORDER if r in rows] + sorted((r for r in rows if r not in ORDER),
                                                       key=lambda r: int(r.rsplit("_", 1)[1]))
    extra = [o for o in spec["outputs"] if o != spec["primary"]]
    print(f"\n{name}: calibration {spec['calib'].shape}, evaluation {spec['eval'].shape}; SQNR of "
          f"{spec['primary']}" + (f" (also {', '.join(extra)})" if extra else ""), flush=True)
    print(f"  {'row':<30} | {'AIMET SQNR':>10} {'top-1':>6} {'acc':>6} {'s':>7} | {'ours SQNR':>9} {'top-1':>6} "
          f"{'acc':>6} {'s':>7} | {'d SQNR':>6}" + "".join(f" | {o[:9]:>9} A/ours" for o in extra))
    for row in ordered:
        a = None
        if row in failed:
            a_cols = f"{'AIMET failed':>10} {'':>6} {'':>6} {'':>7}"
        elif (folder / f"{row}.npz").exists():
            times = json.loads((folder / f"{row}.json").read_text())
            a = metrics(name, spec, ref, dict(np.load(folder / f"{row}.npz")))
            # technique seconds (CLE: equalize_model, which includes its BN fold); none for the plain rows
            a_s = None if row in ("w8a8_pc", "w8a8_pt", "w4a8") else \
                times["technique_s"] + (times["prepare_s"] if row == "w8a8_pt_cle" else 0.0)
            a_cols = f"{a['sqnr']:10.2f} {a['top1']:6.1f} {fmt(a.get('acc'), '6.1f'):>6} {fmt(a_s, '7.1f'):>7}"
        else:
            a_cols = f"{'-':>10} {'':>6} {'':>6} {'':>7}"
        out, seconds = ours_cached(name, row, spec, graphs, ours_dir)
        m = metrics(name, spec, ref, out)
        delta = m["sqnr"] - a["sqnr"] if a else float("nan")
        extras = "".join(f" | {a[f'sqnr_{o}'] if a else float('nan'):6.2f}/{m[f'sqnr_{o}']:6.2f}" for o in extra)
        print(f"  {label(row):<30} | {a_cols} | {m['sqnr']:9.2f} {m['top1']:6.1f} {fmt(m.get('acc'), '6.1f'):>6} "
              f"{fmt(seconds, '7.1f'):>7} | {fmt(delta, '+6.2f'):>6}{extras}", flush=True)
        repeats = sorted((folder / "repeats").glob(f"{row}_seed*.npz")) if a else []
        if repeats:  # AIMET's AdaRound is random too: its spread over runs (bench/aimet_models.py --repeats)
            values = [a["sqnr"]] + [metrics(name, spec, ref, dict(np.load(f)))["sqnr"] for f in repeats]
            print(f"  {'  AIMET, ' + str(len(values)) + ' runs':<30} | mean {np.mean(values):5.2f} "
                  f"[{min(values):.2f}, {max(values):.2f}]", flush=True)
        if row.startswith("w4a8_adaround_") and seeds > 1:  # AdaRound's spread over its random draws
            values = [m["sqnr"]]
            for seed in range(1, seeds):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    values.append(metrics(name, spec, ref, ours(name, row, spec, graphs, seed)[0])["sqnr"])
            print(f"  {'  ours, AdaRound seeds 0-' + str(seeds - 1):<30} | {'':>33} | mean {np.mean(values):.2f} "
                  f"[{min(values):.2f}, {max(values):.2f}]", flush=True)


def main(argv=None) -> int:
    import refquant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, help="write the data and meta.json for bench/aimet_models.py, then stop")
    parser.add_argument("--data", type=Path, default=Path("/tmp/rq/models_data"))
    parser.add_argument("--aimet", type=Path, default=Path("/tmp/rq/aimet_models"))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rows", nargs="*", help="only these rows (default: every row AIMET has, and ours extra)")
    parser.add_argument("--ours", type=Path, help="save refquant's outputs and seconds per row here, and reuse them")
    parser.add_argument("--only-ours", action="store_true", help="with --ours: run and save refquant's rows only")
    parser.add_argument("--seeds", type=int, default=1, help="also run refquant's AdaRound rows with seeds 1..N-1")
    parser.add_argument("--adaround-options", type=json.loads, default={},
                        help="JSON keyword arguments for refquant's adaround() (e.g. qdrop, quantize_activations)")
    args = parser.parse_args(argv)
    ADAROUND_OPTIONS.update(args.adaround_options)
    if args.dump:
        dump(args.dump, args.models)
        return 0
    for name in args.models:
        if args.only_ours:
            spec = model_spec(name)
            graphs = {"ours": refquant.load(spec["ours_model"]), "cle": refquant.load(spec["cle_model"])}
            for row in args.rows:
                start = time.perf_counter()
                ours_cached(name, row, spec, graphs, args.ours)
                print(f"{name} {row}: saved ({time.perf_counter() - start:.0f} s)", flush=True)
        else:
            compare(name, args.aimet, args.rows, args.ours, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
