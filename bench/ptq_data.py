"""How much MobileNetV2's plain W8A8 figures depend on the calibration/evaluation crops.

    python bench/ptq_data.py                                  # every recipe, both photo sets, 4 seed pairs
    python bench/ptq_data.py --recipes resize248 --seeds 0    # one recipe, one seed pair
    python bench/ptq_data.py --decompose --photo-sets photos  # weights-only / activations-only SQNR

The issue gives AIMET's MobileNetV2 figures for "64 calibration and 128 evaluation random crops of the
sample photos, 224x224, ImageNet normalization"; AIMET's exact crops are not available, so this measures
how far the plain (no technique) W8A8 per-channel and per-tensor logits SQNR and top-1 agreement with
FP32 move with the crop seeds and with each reasonable reading of that sentence (``RECIPES``):

* ``resize256``: shorter side resized to 256 (bilinear), random 224 crop, random horizontal flip (what
  bench/ptq.py used first; torchvision's evaluation resize with a random crop).
* ``resize248``: AIMET's example pipelines calibrate on their validation loader
  (``Examples/torch/utils/image_net_data_loader.py``: ``Resize(image_size + 24)``, ``CenterCrop(224)``,
  used by ``Examples/onnx/quantization/quantsim.ipynb``, ``cle.ipynb``, ``adaround.ipynb``); with a
  random crop in place of the center crop (there are only a dozen photos), no flip.
* ``native``: a random 224 crop at the photo's own resolution (a side shorter than 224 is first resized
  to 224), no flip: the literal reading.
* ``rrc``: torchvision's ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3) + horizontal flip,
  the training transform of AIMET's examples.

Photo sets: ``all`` = every .png/.jpg in /work/shared/data (10 natural photos, 2 scanned-text pages);
``photos`` = the 10 natural photos only. Seed pair k = (calibration seed 2k, evaluation seed 2k+1).
Each row: a fresh ``QuantSim`` (default per-channel config, or ``config="per_tensor"``, min-max),
``compute_encodings`` on the 64 calibration crops, logits on the 128 evaluation crops against FP32.
``margin<1``: % of evaluation crops whose FP32 top-1 logit leads the second by less than 1 (ambiguous
crops, where top-1 agreement is fragile). Asserts nothing. Last run (with bench/ptq.py's technique rows on
the default recipe, 4 seed pairs): bench/results_ptq_mobilenet.txt.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ptq import BATCH, batched, scores  # noqa: E402  (the same evaluation as the PTQ bench)

PHOTOS = Path("/work/shared/data")
MOBILENET = Path("/work/shared/models/mobilenet_v2_imagenet.onnx")
TEXT_PAGES = {"page.png", "text.png"}  # scanned text, not photos
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
CROP = 224
RECIPES = ("resize248", "resize256", "native", "rrc")


def load_photos(photo_set: str):
    from PIL import Image

    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    if photo_set == "photos":
        paths = [p for p in paths if p.name not in TEXT_PAGES]
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))  # as torchvision's default_loader
    return images


def _resize_shorter(image, size: int):
    from PIL import Image

    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return image if new == image.size else image.resize(new, Image.Resampling.BILINEAR)


def _normalize(image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def _random_crop(image, rng) -> tuple:
    width, height = image.size
    top, left = int(rng.integers(height - CROP + 1)), int(rng.integers(width - CROP + 1))
    return image.crop((left, top, left + CROP, top + CROP))


def _random_resized_crop(image, rng):
    """torchvision.transforms.RandomResizedCrop(224).get_params + resize (bilinear)."""
    from PIL import Image

    width, height = image.size
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            break
    else:  # fallback: the whole image's central crop with the ratio clamped (as torchvision)
        in_ratio = width / height
        if in_ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif in_ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((CROP, CROP), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def crops(recipe: str, photo_set: str, count: int, seed: int) -> np.ndarray:
    """``count`` [3,224,224] ImageNet-normalized samples of ``recipe`` (module docstring), seeded."""
    images = load_photos(photo_set)
    if recipe == "resize256":
        images = [_resize_shorter(im, 256) for im in images]
    elif recipe == "resize248":
        images = [_resize_shorter(im, CROP + 24) for im in images]
    elif recipe == "native":
        images = [_resize_shorter(im, CROP) if min(im.size) < CROP else im for im in images]
    elif recipe != "rrc":
        raise ValueError(f"unknown recipe {recipe!r}")
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, CROP, CROP), dtype=np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        if recipe == "rrc":
            sample = _random_resized_crop(image, rng)
        else:
            sample = _random_crop(image, rng)
        array = _normalize(sample)
        if recipe in ("resize256", "rrc") and rng.random() < 0.5:
            array = array[:, :, ::-1]
        out[i] = array
    return out


def plain_w8a8(graph, calib, ev, ref, config, only: str | None = None):
    """(SQNR, top-1) of a fresh W8A8 sim; ``only="param"`` / ``"activation"`` keeps just those quantizers."""
    from refquant.quant import QuantSim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantSim(graph, config=config)
        if only is not None:
            for quantizer in sim.quantizers.values():
                if (quantizer.kind == "param") != (only == "param"):
                    quantizer.enabled = False
        sim.compute_encodings(calib, batch_size=BATCH, progress=False)
        return scores(ref, batched(sim.run, ev, "logits"))


def main(argv=None) -> int:
    import refquant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--photo-sets", nargs="+", default=["all", "photos"], choices=["all", "photos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="seed pairs k: (2k, 2k+1)")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--decompose", action="store_true",
                        help="instead: per seed pair, the SQNR with only the weight quantizers and with only the "
                             "activation quantizers (which part of the error depends on the calibration crops)")
    parser.add_argument("--dump", type=Path, metavar="DIR",
                        help="instead: write the crops of the first --recipes/--photo-sets to DIR/calib_K.npy and "
                             "DIR/eval_K.npy for each seed pair K (for bench/aimet_run.py)")
    args = parser.parse_args(argv)
    if args.decompose:
        return decompose(args)
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
        for k in args.seeds:
            np.save(args.dump / f"calib_{k}.npy", crops(args.recipes[0], args.photo_sets[0], args.calib, 2 * k))
            np.save(args.dump / f"eval_{k}.npy", crops(args.recipes[0], args.photo_sets[0], args.eval, 2 * k + 1))
        print(f"crops {args.recipes[0]}/{args.photo_sets[0]}, seed pairs {args.seeds} -> {args.dump}")
        return 0
    graph = refquant.load(MOBILENET)
    print(f"MobileNetV2 plain W8A8, {args.calib} calibration / {args.eval} evaluation crops; AIMET: "
          "per-channel 11.5 dB / 73 %, per-tensor 8.0 dB / 67 %")
    print(f"{'recipe':<10} {'photos':<7} {'seeds':<6} {'pc SQNR':>8} {'pc top1':>8} {'pt SQNR':>8} {'pt top1':>8} "
          f"{'margin<1':>8} {'s':>5}", flush=True)
    for recipe in args.recipes:
        for photo_set in args.photo_sets:
            rows = []
            for k in args.seeds:
                start = time.perf_counter()
                calib = crops(recipe, photo_set, args.calib, 2 * k)
                ev = crops(recipe, photo_set, args.eval, 2 * k + 1)
                ref = batched(refquant.Session(graph).run, ev, "logits")
                row = (*plain_w8a8(graph, calib, ev, ref, "per_channel"),
                       *plain_w8a8(graph, calib, ev, ref, "per_tensor"))
                rows.append(row)
                # how peaked FP32 is: share of eval crops whose top-1 margin over the 2nd logit is < 1
                top2 = np.sort(ref, axis=1)[:, -2:]
                low_margin = float(np.mean(top2[:, 1] - top2[:, 0] < 1.0) * 100)
                print(f"{recipe:<10} {photo_set:<7} {2 * k},{2 * k + 1:<4} {row[0]:8.2f} {row[1]:8.1f} {row[2]:8.2f} "
                      f"{row[3]:8.1f} {low_margin:8.1f} {time.perf_counter() - start:5.0f}", flush=True)
            a = np.array(rows)
            names = ("pc SQNR", "pc top1", "pt SQNR", "pt top1")
            print(f"{recipe:<10} {photo_set:<7} over {len(rows)} seed pairs: " + ", ".join(
                f"{n} {m:.2f} [{lo:.2f}, {hi:.2f}]" for n, m, lo, hi in
                zip(names, a.mean(axis=0), a.min(axis=0), a.max(axis=0))) + "  (mean [min, max])", flush=True)
    return 0


def decompose(args) -> int:
    import refquant

    graph = refquant.load(MOBILENET)
    print("MobileNetV2 W8A8, SQNR dB / top-1 % with only the weight (param) or only the activation quantizers on")
    for recipe in args.recipes:
        for photo_set in args.photo_sets:
            for k in args.seeds:
                calib = crops(recipe, photo_set, args.calib, 2 * k)
                ev = crops(recipe, photo_set, args.eval, 2 * k + 1)
                ref = batched(refquant.Session(graph).run, ev, "logits")
                cells = []
                # the activation quantizers are the same under both configs: per-tensor activation-only is
                # per-channel activation-only
                for config, only in (("per_channel", "param"), ("per_tensor", "param"), ("per_channel", "activation")):
                    sqnr, top1 = plain_w8a8(graph, calib, ev, ref, config, only)
                    cells.append(f"{'activations' if only == 'activation' else config + ' weights'} only "
                                 f"{sqnr:6.2f} / {top1:5.1f}")
                print(f"{recipe:<10} {photo_set:<7} {2 * k},{2 * k + 1:<4} " + "; ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
