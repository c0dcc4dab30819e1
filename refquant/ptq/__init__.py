"""Post-training quantization techniques. Each takes a Graph (and a QuantSim where it needs one) and
returns a new Graph or updated encodings; none reaches into the runtime.

* :mod:`.bn_fold`: BatchNormalization folding (``fold_batchnorms``, ``fold_batchnorms_pass``)
* :mod:`.cle`: cross-layer equalization and high-bias absorption (``equalize``, ``equalize_pass``)
* :mod:`.bias_correction`: empirical and analytical bias correction (``bias_correction``)
* :mod:`.bn_reestimation`: BatchNorm statistics re-estimated under quantization (``reestimate_batchnorm``)
* :mod:`.adaround`: adaptive rounding of weights (``adaround``)
* :mod:`.seq_mse`: sequential per-channel weight-range search (``seq_mse``)
"""

from .bn_fold import FoldedBatchNorm, FoldError, fold_batchnorms, fold_batchnorms_info, fold_batchnorms_pass  # noqa: F401
from .cle import EqualizationError, EqualizationReport, equalize, equalize_pass  # noqa: F401
