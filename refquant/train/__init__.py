"""Training on the IR: reverse-mode gradients (autograd), quantizer gradients (STE, LSQ range
learning), optimizers and quantization-aware training (:func:`qat`)."""

from .autograd import GradientEngine, GradientError, Gradients  # noqa: F401
from .qat import Batch, QatResult, qat  # noqa: F401

__all__ = ["Batch", "GradientEngine", "GradientError", "Gradients", "QatResult", "qat"]
