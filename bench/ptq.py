"""PTQ benchmark: W4A8 nearest rounding, SeqMSE and AdaRound on the AIMET sample models and MobileNetV2.

    python bench/ptq.py                         # convnet, mlp, mobilenet_v2
    python bench/ptq.py --models convnet mlp    # the small ones only (about a minute)
    python bench/ptq.py --optimizers            # Adam vs L-BFGS-B on MobileNetV2 layers (loss vs seconds)
    python bench/ptq.py --w8a8 --models mobilenet_v2   # W8A8 per-channel / per-tensor / CLE / bias correction
    python bench/ptq.py --autoquant --models mobilenet_v2   # AutoQuant (per-tensor W8A8, SQNR target)
    python bench/ptq.py --models mobilenet_v2 --iterations --greedy --seq-mse-variants   # SeqMSE variants
    python bench/ptq.py --w8a8 --models mobilenet_v2 --seed-pair 1   # other crops (seeds 2/3)

Every row is a fresh ``QuantSim(precision="w4a8")`` (AIMET's default per-channel config, min-max) with
``compute_encodings`` on the calibration set; then the technique on the same set; then
``compute_encodings`` again (activation ranges for the new weights: frozen weight encodings and
AdaRound's fixed weights are kept). Reported: logits SQNR against FP32 and top-1 agreement with FP32
on the evaluation set, and the technique's wall seconds (calibration not included).

Data: the AIMET samples' calib.npz (64) and eval.npz (128); MobileNetV2 gets ``--mnv2-calib`` (64)
and ``--mnv2-eval`` (128) random 224x224 crops of the photos in /work/shared/data, normalized with
ImageNet's mean and std, seeded (calibration seed 2k, evaluation seed 2k+1 for ``--seed-pair k``).
``--recipe``/``--photo-set`` choose how the crops are made (bench/ptq_data.py, which also measures how
much the plain figures move with them). Default: ``resize248``/``photos``, the geometry of AIMET's own
example pipelines (their calibration data is the validation loader, ``Resize(224 + 24)`` then a 224
crop; ``Examples/torch/utils/image_net_data_loader.py``) with a random crop for the center crop, no
flip, on the 10 natural photos (page.png and text.png are scanned text, not photos). The crops used
first (``photo_crops`` below, still bench/qat.py's) are ``--recipe resize256 --photo-set all``.
AIMET's figures are printed beside ours where we have them (see AIMET_* below). Asserts nothing.
MobileNetV2 figures of the last runs, 4 seed pairs: bench/results_ptq_mobilenet.txt.

``--w8a8``: instead, W8A8 rows (default per-channel config, and ``config="per_tensor"``) of the
model as it is, after ``equalize`` (CLE; also with AIMET's ReLU6 -> ReLU swap), and with bias
correction (empirical, its defaults), each row a fresh sim calibrated on the calibration set (again
after the bias correction). The FP32 reference is always the original model; the equalized model's
own FP32 distance to it is printed. The bias-correction rows' seconds are the correction's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path("/work/shared")
SAMPLES = SHARED / "refs" / "aimet_samples"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet.onnx"
PHOTOS = SHARED / "data"
BATCH = 16

# AIMET (aimet-onnx 2.42.0 / aimet-torch) figures given with the task: (SQNR dB, top-1 %, seconds)
AIMET = {
    ("convnet", "nearest"): (22.18, 100.0, None),  # aimet_samples/convnet/w4a8_minmax/meta.json
    ("convnet", "adaround 200"): (None, None, 16.0),  # PyTorch AdaRound, 5-layer convnet
    ("convnet", "adaround 1000"): (None, None, 37.0),
    ("mlp", "nearest"): (23.15, 96.1, None),  # aimet_samples/mlp/w4a8_minmax/meta.json
    ("convnet", "W8A8 per-channel"): (38.00, 100.0, None),  # aimet_samples/convnet/w8a8_minmax/meta.json
    ("convnet", "W8A8 per-tensor"): (35.62, 100.0, None),  # .../w8a8_minmax_pertensor/meta.json
    ("mlp", "W8A8 per-channel"): (35.11, 96.9, None),  # aimet_samples/mlp/w8a8_minmax/meta.json
    ("mobilenet_v2", "nearest"): (-0.2, 6.0, None),
    ("mobilenet_v2", "seq_mse"): (4.7, 58.0, None),
    ("mobilenet_v2", "adaround 20 (AIMET)"): (1.5, 17.0, 1057.0),
    ("mobilenet_v2", "W8A8 per-channel"): (11.5, 73.0, None),
    ("mobilenet_v2", "W8A8 per-tensor"): (8.0, 67.0, None),
    ("mobilenet_v2", "W8A8 per-tensor + CLE"): (9.7, 79.0, None),  # AIMET's CLE (ReLU6 -> ReLU)
}


# -- data ------------------------------------------------------------------------------------------

def photo_crops(count: int, seed: int, crop: int = 224) -> np.ndarray:
    """``count`` ImageNet-normalized random crops (and horizontal flips) of the photos, [count,3,224,224]."""
    from refquant.data import Preprocess, load_image

    spec = Preprocess(resize_shorter=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    images = [load_image(p, spec) for p in photos]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, crop, crop), dtype=np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        _, height, width = image.shape
        top, left = rng.integers(height - crop + 1), rng.integers(width - crop + 1)
        sample = image[:, top:top + crop, left:left + crop]
        out[i] = sample[:, :, ::-1] if rng.random() < 0.5 else sample
    return out


def model_and_data(name: str, args):
    """(graph, calibration set, evaluation set, output name)."""
    import refquant

    if name == "mobilenet_v2":
        from bench.ptq_data import crops

        k = args.seed_pair
        return (refquant.load(MOBILENET), crops(args.recipe, args.photo_set, args.mnv2_calib, 2 * k),
                crops(args.recipe, args.photo_set, args.mnv2_eval, 2 * k + 1), "logits")
    file = "model_bnfolded.onnx" if name == "convnet" else "model.onnx"
    return (refquant.load(SAMPLES / name / file), np.load(SAMPLES / name / "calib.npz")["input"],
            np.load(SAMPLES / name / "eval.npz")["input"], "logits")


def data_label(name: str, args) -> str:
    if name != "mobilenet_v2":
        return "aimet_samples calib.npz / eval.npz"
    k = args.seed_pair
    return f"crops {args.recipe}/{args.photo_set}, seeds {2 * k}/{2 * k + 1}"


# -- runs ------------------------------------------------------------------------------------------

def batched(run, data, output):
    return np.concatenate([run({"input": data[i:i + BATCH]}, outputs=[output])[output]
                           for i in range(0, len(data), BATCH)])


def scores(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref64 ** 2) / np.sum((ref64 - out64) ** 2))
    return float(sqnr), float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1)) * 100)


def run_row(graph, calib, ev, output, ref, technique):
    """(SQNR, top-1 %, technique seconds) of one fresh W4A8 sim with ``technique(sim)`` applied."""
    from refquant.quant import QuantSim

    sim = QuantSim(graph, precision="w4a8")
    sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    seconds = None
    if technique is not None:
        start = time.perf_counter()
        technique(sim)
        seconds = time.perf_counter() - start
        sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    return (*scores(ref, batched(sim.run, ev, output)), seconds)


def techniques(name: str, args, calib):
    from refquant.ptq.adaround import adaround
    from refquant.ptq.seq_mse import seq_mse

    rows = [("nearest", None), ("seq_mse", lambda sim: seq_mse(sim, calib, progress=False)),
            ("seq_mse symqt (AIMET default)", lambda sim: seq_mse(sim, calib, inp_symmetry="symqt", progress=False))]
    if args.seq_mse_variants:  # AIMET's other input symmetry, and a finer candidate grid
        rows += [("seq_mse symfp", lambda sim: seq_mse(sim, calib, inp_symmetry="symfp", progress=False)),
                 ("seq_mse 50 candidates", lambda sim: seq_mse(sim, calib, num_candidates=50, progress=False)),
                 ("seq_mse symqt, 50 candidates",
                  lambda sim: seq_mse(sim, calib, num_candidates=50, inp_symmetry="symqt", progress=False))]
    for iterations in args.iterations:
        rows.append((f"adaround {iterations}",
                     lambda sim, n=iterations: adaround(sim, calib, num_iterations=n, progress=False)))
    for iterations in args.greedy:
        rows.append((f"adaround {iterations} greedy",
                     lambda sim, n=iterations: adaround(sim, calib, num_iterations=n, finish="greedy",
                                                        progress=False)))
    if name == "mlp":  # 64 samples are fitted, not generalized: the same distribution, more samples
        more = np.random.default_rng(3).standard_normal((1024, 64)).astype(np.float32)
        rows.append(("adaround 1000, 1024 N(0,1)",
                     lambda sim: adaround(sim, more, num_iterations=1000, progress=False)))
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def bench_model(name: str, args) -> None:
    import refquant

    start = time.perf_counter()
    graph, calib, ev, output = model_and_data(name, args)
    ref = batched(refquant.Session(graph).run, ev, output)
    print(f"\n{name}: calibration {calib.shape}, evaluation {ev.shape} ({data_label(name, args)}), "
          f"data + FP32 reference {time.perf_counter() - start:.1f} s", flush=True)
    print(f"  {'W4A8 +':<28} {'SQNR dB':>8} {'top-1 %':>8} {'seconds':>8}   | AIMET {'SQNR':>6} {'top-1':>6} {'s':>7}")
    for label, technique in techniques(name, args, calib):
        sqnr, top1, seconds = run_row(graph, calib, ev, output, ref, technique)
        aimet = AIMET.get((name, label), (None, None, None))
        print(f"  {label:<28} {sqnr:8.2f} {top1:8.1f} {fmt(seconds, '8.1f'):>8}   | "
              f"{fmt(aimet[0], '6.2f'):>12} {fmt(aimet[1], '6.1f'):>6} {fmt(aimet[2], '7.0f'):>7}", flush=True)
    for (model, label), (sqnr, top1, seconds) in AIMET.items():
        if model == name and "(AIMET)" in label:
            print(f"  {label:<28} {'':>8} {'':>8} {'':>8}   | {fmt(sqnr, '6.2f'):>12} {fmt(top1, '6.1f'):>6} "
                  f"{fmt(seconds, '7.0f'):>7}")


# -- AutoQuant -------------------------------------------------------------------------------------

def bench_autoquant(name: str, args) -> None:
    """AutoQuant on the calibration set, scored by logits SQNR on the evaluation set against FP32; every
    step with its metric and seconds, then the final sim's SQNR and top-1 agreement (same data as above)."""
    import refquant
    from refquant.ptq.autoquant import autoquant

    graph, calib, ev, output = model_and_data(name, args)
    ref = batched(refquant.Session(graph).run, ev, output)
    print(f"\n{name}: AutoQuant {args.aq_precision} config={args.aq_config}, target {args.aq_target} dB SQNR, "
          f"AdaRound {args.aq_iterations} iterations, calibration {calib.shape}, evaluation {ev.shape}", flush=True)
    start = time.perf_counter()
    result = autoquant(graph, calib, "sqnr", target=args.aq_target, eval_data=ev, precision=args.aq_precision,
                       config=args.aq_config, adaround_iterations=args.aq_iterations, batch_size=BATCH,
                       progress=False)
    seconds = time.perf_counter() - start
    print(result.format())
    sqnr, top1 = scores(ref, batched(result.sim.run, ev, output))
    print(f"  final: SQNR {sqnr:.2f} dB, top-1 agreement {top1:.1f} %, AutoQuant total {seconds:.1f} s", flush=True)
    if name == "mobilenet_v2" and args.aq_precision == "w8a8":
        print("  AIMET (MobileNetV2, same data recipe): per-tensor W8A8 8.0 dB / 67 %, after its CLE 9.7 dB / 79 %, "
              "per-channel W8A8 11.5 dB / 73 %")


# -- W8A8: per-channel, per-tensor, CLE, bias correction ---------------------------------------------

def w8a8_row(graph, calib, ev, output, ref, config, correct_bias=False):
    """(SQNR, top-1 %, bias-correction seconds or None) of a fresh W8A8 sim of ``graph`` with ``config``."""
    from refquant.ptq.bias_correction import bias_correction
    from refquant.quant import QuantSim

    # a copy: when preparation changes nothing, the sim simulates the caller's graph object itself, and
    # bias correction's sim.set_parameter would write the corrected biases into it (every later row and
    # the FP32 reference of the caller would see them)
    sim = QuantSim(graph.copy(), config=config)
    sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    seconds = None
    if correct_bias:
        start = time.perf_counter()
        bias_correction(sim, calib, batch_size=BATCH, progress=False)
        seconds = time.perf_counter() - start
        sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    return (*scores(ref, batched(sim.run, ev, output)), seconds)


def bench_w8a8(name: str, args) -> None:
    import warnings

    import refquant
    from refquant.ptq import equalize

    graph, calib, ev, output = model_and_data(name, args)
    ref = batched(refquant.Session(graph).run, ev, output)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        equalized = equalize(graph)
        cle_seconds = time.perf_counter() - start
        relu_equalized = equalize(graph, replace_relu6=True)  # AIMET's equalize_model (changes the FP32 model)
    fp32_sqnr, fp32_top1 = scores(ref, batched(refquant.Session(equalized).run, ev, output))
    relu_sqnr, relu_top1 = scores(ref, batched(refquant.Session(relu_equalized).run, ev, output))
    print(f"\n{name} W8A8: calibration {calib.shape}, evaluation {ev.shape} ({data_label(name, args)}); "
          f"CLE {cle_seconds:.1f} s, the equalized FP32 model against the original: {fp32_sqnr:.1f} dB, "
          f"top-1 {fp32_top1:.1f} % (with ReLU6->ReLU: {relu_sqnr:.1f} dB, {relu_top1:.1f} %)")
    print(f"  {'W8A8':<34} {'SQNR dB':>8} {'top-1 %':>8} {'seconds':>8}   | AIMET {'SQNR':>6} {'top-1':>6}")
    rows = [("W8A8 per-channel", graph, "per_channel", False),
            ("W8A8 per-channel + bias corr.", graph, "per_channel", True),
            ("W8A8 per-tensor", graph, "per_tensor", False),
            ("W8A8 per-tensor + CLE", equalized, "per_tensor", False),
            ("W8A8 per-tensor + CLE, ReLU6->ReLU", relu_equalized, "per_tensor", False),
            ("W8A8 per-tensor + CLE + bias corr.", equalized, "per_tensor", True)]
    for label, g, config, correct in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sqnr, top1, seconds = w8a8_row(g, calib, ev, output, ref, config, correct)
        aimet = AIMET.get((name, label), (None, None, None))
        print(f"  {label:<34} {sqnr:8.2f} {top1:8.1f} {fmt(seconds, '8.1f'):>8}   | "
              f"{fmt(aimet[0], '6.2f'):>12} {fmt(aimet[1], '6.1f'):>6}", flush=True)


# -- optimizer comparison ----------------------------------------------------------------------------

OPTIMIZER_LAYERS = (3, 4, 5, 8)  # MobileNetV2: expansion 1x1 + ReLU6, depthwise 3x3 + ReLU6, projections


def bench_optimizers(args) -> None:
    """Adam vs L-BFGS-B on real layers: hard-rounding loss reached and seconds, FP32 layer inputs."""
    from threadpoolctl import threadpool_limits

    from refquant.ptq import adaround as A
    from refquant.quant import QuantSim

    graph, calib, _, _ = model_and_data("mobilenet_v2", args)
    sim = QuantSim(graph, precision="w4a8")
    layers, _ = A.find_layers(sim)
    A.ensure_weight_encodings(sim, layers)
    A.disable_activation_quantizers(sim)
    inputs = A.LayerInputs(sim, calib, BATCH, use_fp32_inputs=True)
    print(f"\nAdam (lr 1e-3) vs L-BFGS-B, MobileNetV2 layers, W4 per channel, {len(calib)} crops, FP32 inputs, "
          "1 BLAS thread: hard-rounding loss (threshold V >= 0 / greedy finish) and seconds")
    for index in OPTIMIZER_LAYERS:
        layer = layers[index]
        objective, form, positions = A.build_objective(sim, layer, inputs, rng=np.random.default_rng(0))
        rounding = objective.rounding
        nearest = objective.recon_hard(rounding.up(rounding.v0))
        print(f"  {layer.name} W{list(layer.shape)} activation={layer.activation} loss={form} "
              f"positions={positions}: nearest {nearest:.4g}", flush=True)
        with threadpool_limits(1):
            for iterations in (100, 200, 500, 1000, 2000):
                for optimizer in ("adam", "lbfgs"):
                    start = time.perf_counter()
                    if optimizer == "adam":
                        v = A.optimize_adam(objective, rounding.v0.copy(), iterations, (20, 2), 0.2, 1024,
                                            np.random.default_rng(0))
                    else:
                        v = A.optimize_lbfgs(objective, rounding.v0.copy(), iterations, (20, 2), 0.2)
                    seconds = time.perf_counter() - start
                    threshold = objective.recon_hard(rounding.up(v))
                    greedy = objective.recon_hard(A.settle(objective, v))
                    print(f"    {optimizer:<5} {iterations:>5} its {seconds:7.2f} s   {threshold:.4g} / {greedy:.4g}",
                          flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["convnet", "mlp", "mobilenet_v2"],
                        choices=["convnet", "mlp", "mobilenet_v2"])
    parser.add_argument("--iterations", nargs="*", type=int, default=[200, 1000],
                        help="AdaRound iterations (none: no AdaRound rows)")
    parser.add_argument("--greedy", nargs="*", type=int, default=[200],
                        help="AdaRound iterations with finish='greedy' (none: skip)")
    parser.add_argument("--mnv2-calib", type=int, default=64)
    parser.add_argument("--mnv2-eval", type=int, default=128)
    parser.add_argument("--recipe", default="resize248", choices=["resize248", "resize256", "native", "rrc"],
                        help="how MobileNetV2's crops are made (bench/ptq_data.py)")
    parser.add_argument("--photo-set", default="photos", choices=["photos", "all"],
                        help="photos: the 10 natural photos; all: also page.png and text.png")
    parser.add_argument("--seed-pair", type=int, default=0, help="crop seeds: calibration 2k, evaluation 2k+1")
    parser.add_argument("--seq-mse-variants", action="store_true",
                        help="also SeqMSE with inp_symmetry='symfp' and with 50 candidates (asym, symqt)")
    parser.add_argument("--optimizers", action="store_true", help="only the Adam vs L-BFGS-B layer comparison")
    parser.add_argument("--w8a8", action="store_true",
                        help="only W8A8 per-channel / per-tensor / CLE / CLE + bias correction rows")
    parser.add_argument("--autoquant", action="store_true", help="only AutoQuant on --models")
    parser.add_argument("--aq-precision", default="w8a8")
    parser.add_argument("--aq-config", default="per_tensor")
    parser.add_argument("--aq-target", type=float, default=30.0, help="AutoQuant goal: logits SQNR in dB")
    parser.add_argument("--aq-iterations", type=int, default=1000, help="AutoQuant's AdaRound iterations")
    args = parser.parse_args(argv)
    if args.optimizers:
        bench_optimizers(args)
        return 0
    if args.autoquant:
        for name in args.models:
            bench_autoquant(name, args)
        return 0
    if args.w8a8:
        for name in args.models:
            bench_w8a8(name, args)
        return 0
    for name in args.models:
        bench_model(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
