"""AIMET's quantsim config JSON: parsed, validated, and resolved per op and per parameter.

A config file has six sections, applied from general to specific (later wins), as AIMET does:
``defaults`` -> ``params`` -> ``op_type`` -> ``supergroups`` -> ``model_input`` -> ``model_output``.
Booleans are the strings "True"/"False" in AIMET's files; real JSON booleans are accepted too.
AIMET's own files load unchanged. Built-in configs, copies of aimet-onnx 2.42.0's packaged files without their
``supergroup_pass_list`` (see ``_DEFAULT``): ``"default"`` (``default_config_per_channel.json``: per-channel
weights), ``"per_tensor"`` (``default_config.json``: the same without per-channel) and ``"htp_v73"``
(``htp_quantsim_config_v73.json``).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RefquantError


class ConfigError(RefquantError):
    """A quantsim config that is not valid JSON, or has unknown sections, keys or values."""


_OP_KEYS = {"is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization",
            "supported_kernels", "encoding_constraints", "params"}
_PARAM_KEYS = {"is_quantized", "is_symmetric", "per_channel_quantization"}
_DEFAULTS_KEYS = {"ops", "params", "strict_symmetric", "unsigned_symmetric", "per_channel_quantization",
                  "supported_kernels", "hw_version"}
_TOP_KEYS = {"defaults", "params", "op_type", "supergroups", "model_input", "model_output",
             "supergroup_pass_list"}
_REQUIRED_TOP = {"defaults", "params", "op_type", "supergroups", "model_input", "model_output"}

# aimet-onnx 2.42.0's packaged default_config_per_channel.json (its alias "default"), key for key but one: per-channel
# weights come from the op_type entries (Conv, ConvTranspose, Gemm, MatMul, PRelu), not from the defaults; only Cast
# outputs are left unquantized (Pad and Mean outputs are quantized). The file's "supergroup_pass_list": ["MatmulAdd"]
# (MatMul + bias Add as one layer, MatMul output unquantized: placement.py applies it when a config names it) is left
# out of the built-ins: IntSim cannot yet lower a MatMul whose output has no quantizer. Give AIMET's file itself
# (config="path/to/default_config_per_channel.json") for AIMET's exact placement.
_DEFAULT = {
    "defaults": {
        "ops": {"is_output_quantized": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "strict_symmetric": "False",
        "per_channel_quantization": "False",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {
        "Conv": {"per_channel_quantization": "True"},
        "ConvTranspose": {"per_channel_quantization": "True"},
        "Gemm": {"per_channel_quantization": "True"},
        "MatMul": {"per_channel_quantization": "True"},
        "PRelu": {"per_channel_quantization": "True"},
        "BatchNormalization": {"params": {"running_mean": {"is_quantized": "False"},
                                          "running_var": {"is_quantized": "False"}}},
        "Cast": {"is_output_quantized": "False"},
    },
    "supergroups": [
        {"op_list": ["Conv", "Relu"]},
        {"op_list": ["Conv", "Clip"]},
        {"op_list": ["ConvTranspose", "Relu"]},
        {"op_list": ["Add", "Relu"]},
        {"op_list": ["Gemm", "Relu"]},
    ],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}
# default_config.json: the same without the per-channel op_type entries
_PER_TENSOR = copy.deepcopy(_DEFAULT)
for _op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "PRelu"):
    del _PER_TENSOR["op_type"][_op]
_PER_TENSOR["supergroups"][1:3] = _PER_TENSOR["supergroups"][2:0:-1]  # the file's order (no effect on matching)
# htp_quantsim_config_v73.json (alias "htp_v73"), key for key but its "supergroup_pass_list" ("LayerNormalization",
# "RMSNormalization", "MatmulAdd"): see _DEFAULT
_HTP_V73 = {
    "defaults": {
        "hw_version": "V73",
        "ops": {"is_output_quantized": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "per_channel_quantization": "False",
        "strict_symmetric": "False",
        "unsigned_symmetric": "False",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {
        "Conv": {"per_channel_quantization": "True"},
        "ConvTranspose": {"per_channel_quantization": "True"},
        "Gemm": {"per_channel_quantization": "True"},
        "MatMul": {"per_channel_quantization": "True"},
        "PRelu": {"per_channel_quantization": "True"},
        "Cast": {"is_output_quantized": "False"},
        "ChannelShuffle": {"is_output_quantized": "False"},
        "Gather": {"is_output_quantized": "False"},
        "NonMaxSuppression": {"is_output_quantized": "False"},
        "GroupNormalization": {"params": {"bias": {"is_quantized": "True"}}},
        "LayerNormalization": {"params": {"weight": {"is_symmetric": "False"}}},
        "BatchNormalization": {"params": {"running_mean": {"is_quantized": "False"},
                                          "running_var": {"is_quantized": "False"}}},
        "InstanceNormalization": {"params": {"weight": {"is_symmetric": "False"}}},
        "Relu": {"encoding_constraints": {"min": 0.0}},
        "RMSNormalization": {"params": {"weight": {"is_symmetric": "False"}}},
        "Sigmoid": {"encoding_constraints": {"min": 0.0, "max": 1.0}},
        "Softmax": {"encoding_constraints": {"min": 0.0, "max": 1.0}},
        "Sin": {"encoding_constraints": {"min": -1.0, "max": 1.0}},
        "Cos": {"encoding_constraints": {"min": -1.0, "max": 1.0}},
        "Tanh": {"encoding_constraints": {"min": -1.0, "max": 1.0}},
    },
    "supergroups": [{"op_list": ops} for ops in (
        ["Add", "Relu"], ["Conv", "BatchNormalization", "HardSwish"], ["Conv", "BatchNormalization", "PRelu"],
        ["Conv", "BatchNormalization", "LeakyRelu"], ["Conv", "BatchNormalization", "Relu"],
        ["Conv", "Transpose", "Relu"], ["Conv", "Transpose", "PRelu"], ["Conv", "Transpose", "LeakyRelu"],
        ["Conv", "Clip"], ["Conv", "PRelu"], ["Conv", "LeakyRelu"], ["Conv", "Relu"], ["ConvTranspose", "Relu"],
        ["Gemm", "Relu"])],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}
# graph passes of "supergroup_pass_list" that refquant applies: MatMul + bias Add as one layer (placement.py), a
# decomposed LayerNormalization or RMSNormalization as one op (norm_fusion.py); others get a warning
SUPERGROUP_PASSES = {"MatmulAdd", "LayerNormalization", "RMSNormalization"}
BUILTIN = {"default": _DEFAULT, "per_channel": _DEFAULT, "per_tensor": _PER_TENSOR, "htp_v73": _HTP_V73}


@dataclass
class QuantsimConfig:
    """The parsed config. Use :meth:`op` and :meth:`param` for the resolved settings."""

    defaults_ops: dict = field(default_factory=dict)
    defaults_params: dict = field(default_factory=dict)
    strict_symmetric: bool = False
    # aimet-onnx's packaged configs have no unsigned_symmetric key and its C++ quantizer defaults to False:
    # a weight channel that is all >= 0 keeps the signed grid (offset -128), measured on MobileNetV2
    unsigned_symmetric: bool = False
    per_channel: bool = False
    hw_version: str | None = None
    params: dict = field(default_factory=dict)  # role -> {is_quantized, is_symmetric}
    op_type: dict = field(default_factory=dict)  # op type -> section
    supergroups: list = field(default_factory=list)  # lists of op types
    supergroup_passes: list = field(default_factory=list)  # "supergroup_pass_list": graph pass names
    model_input: dict = field(default_factory=dict)
    model_output: dict = field(default_factory=dict)
    source: str = "<config>"

    def op(self, op_type: str) -> dict:
        """Resolved activation settings of an op type: is_input_quantized, is_output_quantized,
        is_symmetric, per_channel_quantization, encoding_constraints (defaults -> op_type)."""
        resolved = {"is_input_quantized": False, "is_output_quantized": False, "is_symmetric": False,
                    "per_channel_quantization": self.per_channel, "encoding_constraints": None}
        resolved.update(self.defaults_ops)
        resolved.update({k: v for k, v in self.op_type.get(op_type, {}).items() if k != "params"})
        return resolved

    def param(self, op_type: str, role: str) -> dict:
        """Resolved settings of one parameter role of an op (defaults -> params -> op_type.params)."""
        resolved = {"is_quantized": False, "is_symmetric": False}
        resolved.update(self.defaults_params)
        resolved.update(self.params.get(role, {}))
        resolved.update(self.op_type.get(op_type, {}).get("params", {}).get(role, {}))
        resolved["per_channel_quantization"] = self.op(op_type)["per_channel_quantization"]
        return resolved


def load_config(config="default") -> QuantsimConfig:
    """A config from a built-in name, a path to AIMET-style JSON, or an already-parsed dict."""
    if isinstance(config, QuantsimConfig):
        return config
    if isinstance(config, dict):
        return _parse(copy.deepcopy(config), "<dict>")
    if isinstance(config, str) and config in BUILTIN:
        return _parse(copy.deepcopy(BUILTIN[config]), f"built-in config {config!r}")
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"{config}: no such config file (built-in names: {', '.join(sorted(BUILTIN))})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return _parse(data, str(path))


def _parse(data: dict, source: str) -> QuantsimConfig:
    _keys(data, _TOP_KEYS, source, "top level")
    missing = _REQUIRED_TOP - set(data)
    if missing:
        raise ConfigError(f"{source}: missing section(s) {sorted(missing)}")
    defaults = data["defaults"]
    _keys(defaults, _DEFAULTS_KEYS, source, "defaults")
    cfg = QuantsimConfig(source=source)
    cfg.defaults_ops = _section(defaults.get("ops", {}), _OP_KEYS - {"params"}, source, "defaults.ops")
    cfg.defaults_params = _section(defaults.get("params", {}), _PARAM_KEYS, source, "defaults.params")
    cfg.strict_symmetric = _bool(defaults.get("strict_symmetric", False), source, "defaults.strict_symmetric")
    cfg.unsigned_symmetric = _bool(defaults.get("unsigned_symmetric", False), source, "defaults.unsigned_symmetric")
    cfg.per_channel = _bool(defaults.get("per_channel_quantization", False), source,
                            "defaults.per_channel_quantization")
    cfg.hw_version = defaults.get("hw_version")
    cfg.params = {role: _section(s, _PARAM_KEYS, source, f"params.{role}") for role, s in data["params"].items()}
    for op_type, section in data["op_type"].items():
        where = f"op_type.{op_type}"
        parsed = _section({k: v for k, v in section.items() if k != "params"}, _OP_KEYS - {"params"}, source, where)
        if "params" in section:
            parsed["params"] = {role: _section(s, _PARAM_KEYS, source, f"{where}.params.{role}")
                                for role, s in section["params"].items()}
        cfg.op_type[op_type] = parsed
    for index, group in enumerate(data["supergroups"]):
        if not isinstance(group, dict) or not isinstance(group.get("op_list"), list) or len(group["op_list"]) < 2:
            raise ConfigError(f"{source}: supergroups[{index}] must be {{\"op_list\": [two or more op types]}}")
        cfg.supergroups.append(list(group["op_list"]))
    passes = data.get("supergroup_pass_list", [])
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise ConfigError(f"{source}: supergroup_pass_list must be a list of pass names")
    cfg.supergroup_passes = list(passes)
    unknown = [p for p in passes if p not in SUPERGROUP_PASSES]
    if unknown:
        warnings.warn(f"{source}: supergroup_pass_list pass(es) {unknown} are not implemented by refquant (it applies "
                      f"{sorted(SUPERGROUP_PASSES)}): the ops they would group keep their own quantizers", stacklevel=3)
    cfg.model_input = _section(data["model_input"], {"is_input_quantized"}, source, "model_input")
    cfg.model_output = _section(data["model_output"], {"is_output_quantized"}, source, "model_output")
    return cfg


def _section(section, allowed: set, source: str, where: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {where} must be a JSON object")
    _keys(section, allowed, source, where)
    out = {}
    for key, value in section.items():
        if key == "encoding_constraints":
            # AIMET requires "min"; without "max" the calibrated maximum is kept (htp configs: Relu {"min": 0.0})
            if not isinstance(value, dict) or "min" not in value or not set(value) <= {"min", "max"}:
                raise ConfigError(f"{source}: {where}.encoding_constraints needs 'min' (and optionally 'max')")
            out[key] = (float(value["min"]), None if value.get("max") is None else float(value["max"]))
        elif key == "supported_kernels":
            out[key] = value
        else:
            out[key] = _bool(value, source, f"{where}.{key}")
    return out


def _keys(section: dict, allowed: set, source: str, where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in {where} (allowed: {sorted(allowed)})")


def _bool(value, source: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    raise ConfigError(f"{source}: {where} must be \"True\" or \"False\", got {value!r}")
