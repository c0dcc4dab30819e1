"""refquant: a NumPy/Numba reference implementation of the quantization workflow for ONNX models."""

from .errors import (  # noqa: F401
    FeedError,
    ModelLoadError,
    OpError,
    RefquantError,
    UnsupportedOpError,
    UnsupportedTypeError,
)
from .ir import Graph, Node, Value  # noqa: F401
from .onnx_io import load, save, to_onnx  # noqa: F401
from .runtime import Session  # noqa: F401

# functions named like their modules: bound here, after their modules are imported, so that importing
# ``refquant.validate`` / ``refquant.prepare`` anywhere later cannot rebind the name to the module
from .validate import validate  # noqa: E402,F401
from .prepare import prepare  # noqa: E402,F401  (isort: after validate, which it imports)

__version__ = "0.1.0"


# technique -> its module in refquant.ptq (functions named like their modules are not re-exported by the
# package, so that ``refquant.ptq.adaround`` stays the module)
_PTQ = {"fold_batchnorms": "bn_fold", "equalize": "cle", "bias_correction": "bias_correction",
        "reestimate_batchnorm": "bn_reestimation", "adaround": "adaround", "seq_mse": "seq_mse",
        "autoquant": "autoquant"}
_ANALYSIS = ("analyze", "mixed_precision", "flip_to_higher_precision")


def __getattr__(name):
    # QuantSim and the PTQ techniques pull in the calibration machinery: import them when first asked for
    if name in ("QuantSim", "load_encodings"):
        from . import quant

        return getattr(quant, name)
    if name in ("IntSim", "qdq_gap"):
        from . import intsim

        return getattr(intsim, name)
    if name in _ANALYSIS:
        from . import analysis

        return getattr(analysis, name)
    if name == "qat":
        from .train.qat import qat

        return qat
    if name in _PTQ:
        from importlib import import_module

        return getattr(import_module(f".ptq.{_PTQ[name]}", __name__), name)
    raise AttributeError(f"module 'refquant' has no attribute {name!r}")
