"""QuantSim: encodings, AIMET-compatible config and files, calibration, QDQ simulation and export."""

from .config import ConfigError, load_config  # noqa: F401
from .encoding import Encoding, EncodingError, from_min_max, from_onnx  # noqa: F401
from .qdq import quantize_dequantize  # noqa: F401
from .quantsim import CalibrationError, QuantSim, Quantizer  # noqa: F401


def load_encodings(sim: QuantSim, path, strict: bool = True) -> None:
    """Load an AIMET encodings file (0.6.1, 1.0.0 or 2.0.0) into ``sim`` (see QuantSim.load_encodings)."""
    sim.load_encodings(path, strict=strict)
