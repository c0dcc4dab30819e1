"""AdaRound: adaptive rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"), layer by layer on a calibrated or uncalibrated QuantSim.

Nearest rounding is not what minimizes a layer's output error. For a weight ``W`` on a grid with
scale ``s`` (per channel) and integer codes ``[lo, hi] = [offset, offset + steps]``, AdaRound learns,
for every weight, whether to round down or up:

    W_soft(V) = s * clip(floor(W/s) + h(V), lo, hi)
    h(V)      = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),     zeta = 1.1, gamma = -0.1

by minimizing (``y = W_mat @ cols`` is the layer as a matrix product, see *Layers as matrices*)

    L(V) = sum over output channels, mean over output positions of (f(y_fp32) - f(y_soft))^2
           + reg_param * sum over weights of (1 - |2 h(V) - 1|^beta)

``y_fp32`` is the FP32 model's layer output (``sim.run_float``); ``y_soft`` is the layer with
``W_soft`` on its input in the quantized model so far (the layers before already AdaRounded; with
``use_fp32_inputs`` the FP32 input). ``f`` is the layer's following activation when it is a Relu, a
Clip, a PRelu with a per-channel (or single) constant slope, a Softmax over the output channels, a Sigmoid,
a Tanh, or a SiLU written as ``Mul(y, Sigmoid(y))``; with ``include_activation="all"`` any elementwise
subgraph of the layer output and scalar constants that nothing else reads into (:mod:`refquant.ptq.pointwise`:
HardSigmoid, HardSwish, Elu, Gelu ops, HardSwish or GELU written out as
``Div(Mul(y, Clip(Add(y, 3), 0, 6)), 6)``...; not the default, see ``pointwise.IN_LOSS_BY_DEFAULT``);
``include_activation=False`` reconstructs the pre-activation output instead. SiLU measured on NudeNet's
YOLOv8n (W4A8, output0 SQNR, bench/results_ptq_vs_aimet_models.txt): 200 / 1000 iterations 25.01 / 25.18 dB
with the pre-activation loss, 25.21 / 25.45 dB through the SiLU (AIMET, whose loss takes the Sigmoid alone:
25.35 / 27.61 dB); at 1000 iterations that figure moves by 1.6 dB with last-bit float32 changes to the SiLU
(25.45 to 27.08 dB), so single runs of this model compare loosely. AIMET puts the following Relu, Clip
(as ReLU6), PRelu (with torch's default slope 0.25, not the model's), Sigmoid, Tanh or Softmax in the loss.
For a classifier head such as MTCNN's the probabilities are what the model outputs, and a logit error that
the Softmax saturates away costs nothing there. Measured on MTCNN R-Net (W4A8, face probability SQNR, seed 0):
200 iterations 42.05 dB with the pre-activation loss, 44.37 dB through its PRelus and Softmax (AIMET 45.60 dB);
1000 iterations 44.10 -> 46.05 dB (AIMET 44.41 dB); bench/results_ptq_vs_aimet_models.txt.
With a Softmax the output channels are coupled in the loss: ``finish="greedy"``, which decides each
channel on its own, is not applied to such a layer (the threshold decides).
``V`` starts where ``h(V) = W/s - floor(W/s)`` (so rounding ``V >= 0`` up is nearest rounding); the
regularizer is off for the first ``warm_start`` fraction of the iterations, then ``beta`` follows
AIMET's cosine decay from ``beta_range[0]`` to ``beta_range[1]``. The result is the hard rounding
``W_q = s * clip(floor(W/s) + [V >= 0], lo, hi)``: every code is ``floor(W/s)`` or ``floor(W/s) + 1``
(clipped to the grid). Weights with ``W/s`` exactly an integer keep that code (their ``V`` is not
optimized), so every code is ``floor`` or ``ceil`` of ``W/s``.

Where the result goes: ``sim.set_quantized_parameter(weight, W_q)`` makes the weight's quantizer
produce ``W_q`` (the simulation and both exports use it) while the graph keeps the FP32 weight, so
``sim.run_float`` stays the original model. The weight encoding is frozen. Encodings are never changed.

Layers as matrices. Conv, ConvTranspose, Gemm and MatMul with a constant weight are written, per
output position ``p`` (a Gemm/MatMul row, a conv output pixel of one sample) and group ``g``, as
``y[g, :, p] = W_mat[g] @ cols[g, :, p] + bias``: ``W_mat = W`` gathered into ``[G, M/G, K/G]``
(a permutation of the weight: Gemm/MatMul transpose it to [out, in]; ConvTranspose swaps its in/out
channels and flips the kernel, being a stride-1 conv over its zero-upsampled input) and ``cols`` the
im2col columns. Then ``dL/dW_mat = dY @ cols^T`` and the gradient reaches ``V`` by the chain rule
through ``W_soft`` and ``h``.

Two exact forms of the reconstruction loss (each layer uses the cheaper that applies):

* quadratic (no activation in the loss): with ``dW = W_soft - W`` and ``R = y_fp32 - y(W)`` the
  residual that input quantization leaves, ``mean_p ||dW cols_p - R_p||^2 = tr(dW H dW^T) - 2 tr(dW G)
  + c`` with ``H = mean cols cols^T``, ``G = mean cols R^T``, ``c = mean ||R||^2`` accumulated over
  *every* position of the data while streaming it (memory ``K^2`` per group, not the activations).
  An iteration costs ``M K^2`` flops whatever the data size.
* sampled (activation in the loss; or all positions fit in the cache and number fewer than K/2, e.g.
  a Gemm on 64 samples, where it is exact and cheaper): a uniform random sample of at most
  ``num_columns`` positions (bottom-k reservoir over the stream), their columns and both outputs
  cached; Adam takes all of them at each step when they are every position of the data and the
  step is cheap enough (:func:`adaround`), else ``columns_per_iteration`` of them; L-BFGS uses them all.
  AIMET's iteration ``i`` takes the samples of data batch ``i mod batches`` (at most 32 of them, drawn at
  random only from a larger batch: with batches of 16 its AdaRound is deterministic, measured 5 runs alike). On
  the sample models that cyclic scheme and random quarter minibatches were both below full batch (convnet 1000
  its: 24.1 and 23.6 dB against 26.9; R-Net 200: 41.0 and 43.0 against 43.6), except on the 64-sample mlp.

Optimizers: Adam in NumPy (default; torch's betas and eps, as AIMET) or SciPy L-BFGS-B (see :func:`adaround` for
the measurement that chose Adam). A final step ``finish="greedy"`` (not in the paper or AIMET, off by
default) decides the weights the annealing left strictly between 0 and 1 by the exact hard loss.
If the result is worse than nearest rounding on the layer's own loss, nearest rounding is kept.

Step size (``learning_rate``; not in the paper or AIMET). AIMET's Adam steps by 1e-3 whatever the iteration count,
while its warm start and annealing are set in fractions of the iterations, and its default count is 10,000. Adam
moves each ``V`` by about the step size per iteration (it normalizes each weight's gradient), so at 1,000 iterations
``V`` travels a tenth of the way it does at 10,000 and at 200 a fiftieth: few weights can cross to the other
side, and AdaRound stays near nearest rounding. ``learning_rate="scaled"`` (the default) steps by
``1e-3 * max(1, 10000 / max(200, num_iterations))``, the path length of 10,000 steps of 1e-3; at 10,000 iterations or
more it is AIMET's step, and below 200 (the fewest measured) it stays 200's, 0.05. A larger step also lets weights
with a weak gradient wander across: a layer whose fit then ends worse than nearest rounding on its own loss is
fitted again at 1e-3 (measured on the convnet sample's depthwise conv). Measured (W4A8; eight calibration sets of
56 of the 64 samples, seed 0, SQNR of the primary output on the evaluation set, mean +- standard error;
bench/adaround_subsets.py, the 1e-3 column with ``--adaround-options '{"learning_rate": 0.001}'``; AIMET
deterministic on the same sets):

    row             1e-3 (AIMET's step)   "scaled"               aimet-onnx 2.42.0
    mlp 200         23.59 (3 seeds)       23.82 (+0.17 +- 0.11)  23.65
    mlp 1000        23.96 (3 seeds)       23.87 (+0.24 +- 0.07)  23.63
    convnet 200     21.88                 26.30                  21.48
    convnet 1000    27.10                 30.10                  26.12
    MTCNN P-Net 200 17.05                 22.40                  16.28
    P-Net 1000      20.77                 23.54                  20.23
    O-Net 200       34.16                 37.87                  33.28
    O-Net 1000      37.90 +- 0.77         38.08 +- 0.70          38.76
    R-Net 200       43.99                 43.76                  41.17
    R-Net 1000      44.01                 44.52 +- 1.36          42.44

(The 1e-3 column is the ninth session's where not given with its error, before ``compute_encodings`` ran constant
inputs such as PRelu slopes in float as AIMET does; the convnet 200 and mlp rows of "scaled" with the refit,
the others without it, which changes only the layers it refits.) MobileNetV2 1000 iterations on 64 crops: 11.92 ->
12.08 dB; NudeNet's YOLOv8n 1000 iterations: 25.53 -> 25.52 (AIMET 27.61). The single 64-sample sets of the AIMET
samples (bench/ptq_vs_aimet_models.py): 200 iterations mlp 23.55 -> 23.91, convnet 21.91 -> 25.28, R-Net 42.91 ->
46.24 (AIMET 23.75, 21.34, 45.60); at 1000 the mlp is 23.71 there against AIMET's 23.85 (over the eight sets
+0.24 +- 0.07). On deep models a single run moves by 1-3 dB with the calibration samples, so only several
sets compare: PP-OCR's text direction classifier (MobileNetV3-small, 54 layers), 1000 iterations, eight
independent sets of 64 crops (bench/adaround_subsets.py --fresh-seeds 10..17): "scaled" 16.74 +- 0.26 against
1e-3 15.78 +- 0.44 dB, paired +0.95 +- 0.56 (on four leave-one-out sets of 48 crops -0.74 +- 0.48; the single
run on the default set, 15.09 against 16.30, had looked like a loss); there the scaled step reaches the lower
calibration loss in 53 of its 54 layers (hard loss relative to nearest rounding 0.65 against 0.75 on average).
MobileNetV2, two independent sets: 12.06 and 11.31 against 11.42 and 12.02 dB (level; AIMET 1.5 at 20
iterations).

Inputs: by default the layer inputs come from the simulation with its activation quantizers disabled (what AIMET's
AdaRound intends: only the weights of the layers before are quantized), so AdaRound can run before activation
calibration; ``quantize_activations=True`` keeps them, which is what aimet-onnx 2.42.0 actually runs (its ``with
(disable_quantizers(...) and TemporaryDirectory())`` enters only the second). Measured (W4A8, 1000 its, seed 0;
bench/results_ptq_vs_aimet_models.txt): on NudeNet's YOLOv8n it is what AIMET's lead was, 25.45 -> 27.72 dB (seed 1:
25.57 -> 27.64; AIMET 27.61), also O-Net +0.6, PP-OCR cls +0.3, mlp +0.2 dB; but MTCNN R-Net 45.33 -> 38.39 and the
convnet sample 26.94 -> 24.03 dB (all at Adam's step 1e-3, on each model's one calibration set). With the "scaled"
step those collapses are gone; over eight calibration sets the quantized inputs minus the default are then within
noise on the sample models (mlp, convnet, P-Net, R-Net at 200 and 1000 iterations: -0.9 to +0.9 dB) except O-Net
1000 (+2.2 +- 0.6). On NudeNet the quantized inputs' gain is that one set's: on three independent sets of 64 crops
they gain nothing (1000 its 25.91 -> 25.75, 200 its 25.69 -> 25.79 dB; AIMET at 200 on the same sets 25.32, below
both). AIMET's lead at 1000 is not: on the first of those sets it reaches 27.55 against refquant's 26.03. Its
rounding put into refquant's simulation gives 27.56 (bench/adaround_layers.py), so the gap is the rounding alone,
mostly of the deep stage and the heads (AIMET's rounding on those 24 of the 64 layers: 27.14). With AIMET's settings
(quantized inputs, step 1e-3, shrinkage 0) refquant reaches 26.58, and 27.15 with 4x the cached positions and
minibatch (32,768 / 2,048). On the deep stage alone (AIMET's rounding before it) AIMET's settings together give
27.58, the default 26.23, either change alone 26.30 / 26.44: there the quantized inputs want the small step. The
default on layers 0:40 and AIMET's settings on the rest give 27.41 / 27.49 / 27.40 on the three sets (default 26.03 /
26.01 / 25.74); the rule that would find such a split is not written yet.
Single runs on the deep models' default sets: MobileNetV2 12.08 -> 9.56, PP-OCR cls 15.09 -> 14.12 dB (1000 its). The
calibration-set SQNR cannot tell which (R-Net at 1e-3: 46.49 against 42.56 there, the reverse on the evaluation
faces), so the default stays off;
``quantize_activations="choose"`` decides per model on a held-out quarter of the data
(:mod:`refquant.ptq.input_choice`).
QDrop inputs (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training
Quantization"), ``qdrop=q`` with ``quantize_activations=True``: each element of a layer's input is the FP32 model's
with probability ``q`` (0.5 in the paper), else the simulation's, a new mask at every optimizer step
(:class:`MixedSampledLoss`); the quadratic form takes the exact expectation over the masks, the loss at the mean
input plus ``sum_k q (1 - q) mean (a_k - b_k)^2 sum_o W[o, k]^2`` (:class:`QuadraticLoss`). Measured (W4A8,
seeds 0/1/2; the other settings seed 0; bench/results_ptq_vs_aimet_models.txt), QDrop is no default either:

    model        200 its: QDrop       default  quantized  AIMET | 1000 its: QDrop     default  quantized  AIMET
    convnet      22.86 (all seeds)    21.91    21.89      21.34 | 27.06 28.61 28.36   26.94    24.03      26.75
    mlp          23.66 23.60 23.62    23.70    23.51      23.75 | 23.80 23.68 23.72   23.31    23.55      23.85
    MTCNN R-Net  44.76 43.39 40.01    43.57    44.58      45.60 | 46.01 47.35 43.42   45.33    38.39      44.41
    MTCNN P-Net  15.81 15.91 15.80    17.09    17.09      16.24 | 21.43 21.19 20.89   20.82    20.79      20.77
    MTCNN O-Net  31.57 31.09 31.35    34.38    36.00      33.25 | 41.84 39.13 41.23   39.66    40.26      37.86
    NudeNet      24.10                25.21    25.64      25.35 | 25.48               25.45    27.72      27.61
    MobileNetV2  (1000 its, 64 crops) 10.62 dB / 74.2 % in 306 s; default 11.64 dB / 78.9 % in 129 s

On these calibration samples it is the best at 1000 iterations on the convnet sample and MTCNN, and costs 1-3 dB
at 200 (the random masks need iterations to average out); NudeNet wants the plain quantized inputs, MobileNetV2 the
default. Over four other calibration sets (each 48 of the 64 samples, means) it is the best on convnet and mlp at
both counts but the worst on R-Net at 1000 (43.32 against the default's 45.63): which inputs suit a model moves with
the samples. AutoQuant tries all three (:mod:`refquant.ptq.autoquant`). Each step draws a random byte
per input element and mixes (:func:`refquant.kernels.adaround.mix_columns`): about 2.4x the default's time
(MobileNetV2 1000 its 306 s against 129 s, MTCNN R-Net 13 s against 6; idle).
Shrinkage (``shrinkage="auto"`` or a number; not in the paper or AIMET). The loss sees the layer inputs through
its Hessian: ``H = mean_p x_p x_p^T`` over the calibration positions without an activation, and per output channel
the Gauss-Newton ``H_o = mean_p f'(t_op)^2 x_p x_p^T`` with one (``t`` the FP32 pre-activation: a ReLU's mask, a
PRelu's slope squared). With few positions per input (a Gemm on 64 samples has 64 of them for its K inputs) the
off-diagonal entries are mostly sampling noise, and AdaRound can fit its rounding to that noise: better on the
calibration data, worse on new data (the mlp sample, W4A8: 0.4 dB below AIMET at 1000 its over eight calibration
sets, and below refquant's own 200 its). The option shrinks each channel's loss toward its uncorrelated-inputs
form, ``(1 - alpha_o) L_o + alpha_o sum_k H_okk dW_ok^2`` (for the quadratic form: the second moment of (input,
residual) shrunk toward its diagonal); "auto" takes Schaefer & Strimmer's (2005) intensity, the estimated variance
of the off-diagonal entries over their squares, per group for ``H`` (:func:`shrinkage_intensity`, streamed) and per
channel for ``H_o`` (:func:`masked_shrinkage_intensity`, on the cached positions; a softmax couples the channels'
losses and keeps alpha 0). ``alpha = 1`` makes nearest rounding the minimum. The mask matters: the convnet
sample's first conv sees N(0, 1) noise over 57,000 positions, so ``H`` is diagonal (its intensity 0.8), but its
ReLU's ``H_o`` is not; shrinking by ``H``'s intensity cost it 0.9 dB at 1000 its, by ``H_o``'s nothing. Measured
over eight calibration sets against AIMET (means over the sets of three seeds each; paired differences refquant -
AIMET with their standard errors; bench/adaround_subsets.py --seeds 3; W4A8):

    row            shrinkage 0             "auto" (the default)    AIMET    "auto" - 0
    mlp 200        23.59 (-0.05 +- 0.05)   23.59 (-0.06 +- 0.05)   23.65    +0.00
    mlp 1000       23.23 (-0.41 +- 0.09)   23.96 (+0.31 +- 0.09)   23.64    +0.73
    convnet 200    21.88 (+0.40 +- 0.04)   21.88 (+0.40 +- 0.04)   21.48    +0.00
    convnet 1000   27.14 (+1.02 +- 0.68)   27.10 (+0.98 +- 0.83)   26.12    -0.04
    P-Net 200      17.05 (+0.77 +- 0.10)   17.05 (+0.77 +- 0.10)   16.28    +0.00
    P-Net 1000     20.90 (+0.67 +- 0.27)   20.77 (+0.54 +- 0.33)   20.23    -0.13 +- 0.10
    R-Net 200      43.71 (+2.54 +- 1.15)   43.99 (+2.82 +- 1.14)   41.17    +0.28 +- 0.16
    R-Net 1000     45.39 (+2.95 +- 1.11)   44.01 (+1.56 +- 1.53)   42.44    -1.38 +- 1.21 (chaotic: below)
    O-Net 200      34.39 (+1.11 +- 0.48)   34.16 (+0.89 +- 0.32)   33.28    -0.23 +- 0.20
    O-Net 1000     38.06 (-0.70 +- 0.64)   38.17 (-0.59 +- 0.62)   38.76    +0.11 +- 0.41
    MobileNetV2 1000 its (64 crops): 11.64 dB / 78.9 % -> 11.91 dB / 82.8 %; NudeNet 1000 its 25.45 -> 25.53 dB

R-Net at 1000 its is chaotic: ``shrinkage=0.001`` (no real change) moves its eight sets by -2.8 to +5.6 dB against
shrinkage 0 (mean +0.79 +- 1.17), as much as "auto" does. With "auto" no row is below AIMET beyond its noise; with
shrinkage 0 the mlp at 1000 its is. ``alpha`` comes out near 0 on real data (MTCNN, MobileNetV2: correlated inputs)
and near 1 on few positions of independent inputs. Near 0 is not nothing on an ill-conditioned ``H``: NudeNet's first
conv (3x3x3 on photos, 8,192 sampled positions) gets 0.0008, which triples that layer's loss on new crops (1.90
against 0.63 with 0; AIMET 0.42), though the whole model's SQNR moves within noise
(bench/results_ptq_vs_aimet_models.txt, sixteenth session). Its cost, ``G min(M K^2 n, (K + M) n^2)`` flops per
layer (``n`` cached positions), is capped at :data:`INTENSITY_FLOPS` by a sample of the inputs.
The inputs are carried forward from layer to layer (:class:`LayerInputs`), so the data goes through the graph once. Call
``sim.compute_encodings`` afterwards: activation ranges are then calibrated with the AdaRounded
weights (frozen weight encodings and their fixed values are kept).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node, Value
from ..kernels.adaround import (CLIP, GAMMA, IDENTITY, PRELU, ZETA, adam_step, mix_columns, reconstruction_gradient,
                                soft_weights)
from ..ops.nn import _as3d, _to3, _windows, conv_geometry
from ..progress import iterate
from ..runtime import Session
from .pointwise import IN_LOSS_BY_DEFAULT, Pointwise
from .pointwise import trace as trace_activation

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ADAM_LR = 1e-3  # AIMET: torch.optim.Adam defaults
STEP_PATH_ITERATIONS = 10000  # "scaled" steps: the path length of this many steps of ADAM_LR (AIMET's default count)
FEWEST_SCALED_ITERATIONS = 200  # below it "scaled" keeps the step of 200 iterations, the fewest measured
LBFGS_STAGES = 10  # L-BFGS-B runs: one per fixed beta of the annealing (plus the warm start)
COLUMN_BUDGET = 1 << 22  # floats of im2col columns built at once while streaming
MOMENTS_BUDGET = 1 << 27  # float64 values of H = sum cols cols^T (1 GB): a layer with a bigger H takes the sampled loss
SAMPLED_COLUMNS, MINIBATCH = 8192, 512  # the sampled loss's cache and Adam's minibatch when the data is large
FULL_BATCH_MACS = 1 << 27  # a layer whose positions x weights stay below this is fitted on all of them, full batch
THREADED_MACS = 1 << 22  # an optimizer step's GEMM work from which all BLAS threads pay (step_threads)
FULL_BATCH_FLOATS = 1 << 24  # ... and whose cached columns and outputs take at most this many floats (64 MB)
INTENSITY_FLOPS = 1e10  # work of a layer's masked shrinkage intensity; above it, on a sample of its inputs
SOFTMAX = "softmax"  # LinearLayer.activation of a layer whose output only a Softmax over its channels reads


@dataclass(frozen=True, eq=False)
class PRelu:
    """LinearLayer.activation of a layer whose output only a PRelu reads: ``f(y) = y`` for ``y >= 0``,
    ``slope[m] * y`` below, with the model's own slope of each output channel ``m`` (flat, ``[M]``)."""

    slope: np.ndarray


# ======================================================================================= layers
@dataclass
class LinearLayer:
    """A layer ``y[g, :, p] = W_mat[g] @ cols[g, :, p] + bias`` with a constant, quantized weight.

    ``index[g, m, k]`` is the flat position in the weight of ``W_mat[g, m, k]``; ``activation`` is
    the ``(lo, hi)`` clip of a Relu/Clip that alone reads the layer output, :data:`SOFTMAX` for a
    Softmax over the output channels (one group) that alone reads it, a :class:`PRelu`, a
    :class:`~refquant.ptq.pointwise.Pointwise` activation, or None;
    ``output_axis`` the weight axis of the output channels (what a per-channel encoding must use).
    """

    node: Node
    weight: str
    shape: tuple[int, ...]
    index: np.ndarray
    output_axis: int
    activation: tuple[float, float] | str | PRelu | Pointwise | None = None
    # include_activation="all": any elementwise subgraph (else the same as activation)
    activation_all: tuple[float, float] | str | PRelu | Pointwise | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0]

    @property
    def input(self) -> str:
        return self.node.inputs[0]

    @property
    def output(self) -> str:
        return self.node.outputs[0]

    @property
    def groups(self) -> int:
        return self.index.shape[0]

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        """A weight-shaped array in the ``[G, M/G, K/G]`` layout (a gather: a copy)."""
        return np.asarray(array).reshape(-1)[self.index]

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_matrix` (``index`` is a permutation)."""
        flat = np.empty(self.index.size, dtype=matrix.dtype)
        flat[self.index.reshape(-1)] = matrix.reshape(-1)
        return flat.reshape(self.shape)

    def columns(self, x: np.ndarray) -> "_RowColumns | _ConvColumns":
        """The im2col columns of the layer input ``x`` (one batch)."""
        op = self.node.op_type
        if op == "Conv":
            return _conv_columns(self.node, self.shape, x)
        if op == "ConvTranspose":
            return _conv_transpose_columns(self.node, self.shape, x)
        if op == "Gemm":
            rows = x.T if self.node.attrs.get("transA", 0) else x
            return _RowColumns(rows * np.float32(self.node.attrs.get("alpha", 1.0)))
        return _RowColumns(x.reshape(-1, x.shape[-1]))  # MatMul

    def output_matrix(self, y: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """The layer output ``[G, M/G, B]`` at flat positions (sample-major), all when None."""
        g, mg = self.index.shape[:2]
        if self.node.op_type in ("Conv", "ConvTranspose"):
            n, m = y.shape[:2]
            y2 = y.reshape(n, m, -1)
            if positions is None:
                rows = y2.transpose(0, 2, 1).reshape(-1, m)
            else:
                p = y2.shape[2]
                rows = y2[positions // p, :, positions % p]
        else:
            y2 = y.reshape(-1, y.shape[-1])
            rows = y2 if positions is None else y2[positions]
        return rows.T.reshape(g, mg, -1)


def find_layers(sim, op_types=LAYER_OPS) -> tuple[list[LinearLayer], list[str]]:
    """The layers to optimize, in graph order, and the names of those skipped (with why).

    A layer: an ``op_types`` node with a dynamic input 0, a constant weight (input 1) that only it
    reads and whose parameter quantizer is enabled and integer, and constant other inputs (bias)."""
    graph = sim.graph
    consumers = graph.consumers()
    outputs = set(graph.output_names)
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op_type not in op_types or node.domain or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        quantizer = sim.quantizers.get(weight)
        if weight not in graph.initializers or quantizer is None or quantizer.kind != "param" or not quantizer.enabled:
            continue
        label = node.name or node.outputs[0]
        if quantizer.data_type != "int":
            skipped.append(f"{label} (weight quantizer is not an integer grid)")
        elif node.inputs[0] in graph.initializers or any(
                name and name not in graph.initializers for name in node.inputs[2:]):
            skipped.append(f"{label} (constant input or dynamic bias)")
        elif len(consumers.get(weight, [])) != 1:
            skipped.append(f"{label} (weight shared with other nodes)")
        else:
            layer = _linear_layer(node, graph.initializers[weight].shape)
            if layer is None:
                skipped.append(f"{label} (weight layout not supported)")
            else:
                layer.activation = _following_activation(graph, node, consumers, outputs, layer.groups)
                layer.activation_all = layer.activation
                if layer.activation is None or isinstance(layer.activation, Pointwise):
                    layer.activation_all = trace_activation(graph, node.outputs[0], consumers, outputs)
                layers.append(layer)
    nested = _layers_in_subgraphs(graph, op_types)
    if nested:
        skipped.append(f"{len(nested)} inside If/Loop/Scan subgraphs ({', '.join(nested[:3])}"
                       f"{', ...' if len(nested) > 3 else ''}: subgraphs are simulated as given)")
    return layers, skipped


def included_layers(sim, layers: list[LinearLayer], skipped: list[str],
                    names) -> tuple[list[LinearLayer], list[str]]:
    """``(layers, skipped)`` restricted to the node names ``names``; a name that is no layer of ``layers`` is a
    :class:`RefquantError` saying why (not in the graph, not a Conv/ConvTranspose/Gemm/MatMul, or skipped)."""
    if isinstance(names, str):
        raise RefquantError("adaround: nodes_to_include is a list of node names, not one string")
    names = list(names)
    by_name = {layer.name: layer for layer in layers}
    nodes = {node.name: node for node in sim.graph.nodes}
    for name in names:
        if name in by_name:
            continue
        why = [s for s in skipped if s.startswith(f"{name} (")]
        reason = why[0][len(name) + 1:] if why else "not in the graph" if name not in nodes else \
            f"a {nodes[name].op_type} node" if nodes[name].op_type not in LAYER_OPS else \
            "its weight is not a constant with an enabled parameter quantizer"
        raise RefquantError(f"adaround: node {name!r} in nodes_to_include cannot be AdaRounded: {reason}")
    wanted = set(names)
    return ([layer for layer in layers if layer.name in wanted],
            [s for s in skipped if any(s.startswith(f"{name} (") for name in wanted)])


def _layers_in_subgraphs(graph: Graph, op_types) -> list[str]:
    """Names of the ``op_types`` nodes inside the subgraphs of ``graph``'s nodes (not optimized)."""
    return [n.name or n.outputs[0] for node in graph.nodes for sub in node.subgraphs() for n in sub.walk()
            if n.op_type in op_types and not n.domain]


def _linear_layer(node: Node, shape: tuple[int, ...]) -> LinearLayer | None:
    """The matrix layout of ``node``'s weight, or None for layouts it does not cover."""
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    op = node.op_type
    if op in ("Gemm", "MatMul"):
        if len(shape) != 2:
            return None
        trans_b = op == "Gemm" and node.attrs.get("transB", 0)
        matrix = flat if trans_b else flat.T  # [out, in]
        return LinearLayer(node, node.inputs[1], shape, np.ascontiguousarray(matrix[None]), 0 if trans_b else 1)
    if len(shape) < 3:
        return None
    group = int(node.attrs.get("group", 1))
    if op == "Conv":  # W [M, C/G, *k]: rows m of group g are g*M/G + m, columns (c, k) row-major
        return LinearLayer(node, node.inputs[1], shape, flat.reshape(group, shape[0] // group, -1), 0)
    # ConvTranspose W [C, M/G, *k] = a stride-1 conv over the upsampled input with weight
    # W'[g*M/G + m, c, k'] = W[g*C/G + c, m, flipped k']
    c, mg = shape[0], shape[1]
    grouped = flat.reshape((group, c // group, mg) + tuple(shape[2:]))
    spatial = tuple(range(3, grouped.ndim))
    conv = np.flip(grouped, axis=spatial).transpose((0, 2, 1) + spatial)
    return LinearLayer(node, node.inputs[1], shape, np.ascontiguousarray(conv).reshape(group, mg, -1), 1)


def _following_activation(graph: Graph, node: Node, consumers, outputs, groups: int = 1):
    """``(lo, hi)`` of a Relu or constant Clip that is the only reader of the layer output,
    :data:`SOFTMAX` for a Softmax over exactly the output channels, a :class:`PRelu` for a PRelu
    with a constant per-channel slope, else the Sigmoid, Tanh or SiLU subgraph that alone reads it
    (a :class:`~refquant.ptq.pointwise.Pointwise` of ``pointwise.IN_LOSS_BY_DEFAULT``), else None."""
    users = consumers.get(node.outputs[0], [])
    if node.outputs[0] in outputs:
        return None
    if len(users) == 1 and users[0].op_type in ("Relu", "Softmax", "PRelu", "Clip"):
        return _single_activation(graph, node, users[0], groups)
    return trace_activation(graph, node.outputs[0], consumers, outputs, IN_LOSS_BY_DEFAULT)


def _single_activation(graph: Graph, node: Node, act: Node, groups: int):
    """The activation of :func:`_following_activation` for its one reader ``act``: Relu, Softmax, PRelu, Clip."""
    if act.op_type == "Relu":
        return 0.0, math.inf
    if act.op_type == "Softmax":
        return SOFTMAX if groups == 1 and _softmax_over_channels(node, act) else None
    if act.op_type == "PRelu":
        return _prelu_slopes(graph, node, act)
    if "min" in act.attrs or "max" in act.attrs:  # Clip before opset 11
        return float(act.attrs.get("min", -math.inf)), float(act.attrs.get("max", math.inf))
    bounds = []
    for i, default in ((1, -math.inf), (2, math.inf)):
        name = act.inputs[i] if len(act.inputs) > i else ""
        if name and name not in graph.initializers:
            return None
        bounds.append(float(graph.initializers[name]) if name else default)
    return bounds[0], bounds[1]


def _softmax_over_channels(layer: Node, softmax: Node) -> bool:
    """Whether ``softmax`` normalizes over the output-channel axis of ``layer``'s output alone: axis 1
    of a Gemm ([N, M]) or Conv ([N, M, *spatial]) output, the last axis of a MatMul's. Before opset 13,
    Softmax flattens the axes from ``axis`` on into one: over the channels alone only for a 2-D output."""
    axis = int(softmax.attrs.get("axis", -1 if softmax.version >= 13 else 1))
    if layer.op_type == "Gemm":
        return axis in (1, -1)
    if layer.op_type == "MatMul":
        return axis == -1 and softmax.version >= 13
    return layer.op_type == "Conv" and axis == 1 and softmax.version >= 13


def _prelu_slopes(graph: Graph, layer: Node, prelu: Node) -> PRelu | None:
    """The PRelu's constant slope as one value per output channel, or None when it varies along another
    axis (or is not constant). The slope broadcasts against ``[N, M]`` (Gemm) or ``[N, M, *spatial]``
    (Conv): a per-channel slope has M entries on axis 1 of that shape; a MatMul's channels are its last axis."""
    slope = graph.initializers.get(prelu.inputs[1]) if len(prelu.inputs) > 1 else None
    if slope is None:
        return None
    slope = np.asarray(slope, dtype=np.float64)
    if slope.size == 1:
        return PRelu(slope.reshape(1))
    shape = slope.shape
    if layer.op_type == "MatMul":
        per_channel = all(d == 1 for d in shape[:-1])
    else:  # right-aligned broadcast: [M] for Gemm, [M, 1, ..., 1] for Conv (rank = weight rank)
        rank = 2 if layer.op_type == "Gemm" else len(graph.initializers[layer.inputs[1]].shape)
        axis = len(shape) - (rank - 1)  # where output axis 1 lands in the slope's shape
        per_channel = 0 <= axis < len(shape) and all(d == 1 for i, d in enumerate(shape) if i != axis)
    return PRelu(slope.reshape(-1)) if per_channel else None


def _softmax(y: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (the output channels of ``[G, M/G, B]``)."""
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ======================================================================================= im2col
class _RowColumns:
    """Gemm/MatMul: the columns are the input rows, ``[1, K, B]``."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.count = rows.shape[0]
        self.height = rows.shape[1]  # G * K/G

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        rows = self.rows if positions is None else self.rows[positions]
        return np.ascontiguousarray(rows.T, dtype=np.float32)[None]


class _ConvColumns:
    """Conv: ``cols[g, (c, kd, kh, kw), p] = xp[n, g*C/G + c, od*s0 + kd*d0, oh*s1 + kh*d1, ow*s2 + kw*d2]``
    for position ``p = (n, od, oh, ow)``, from the padded input ``xp`` [N, C, D, H, W]."""

    def __init__(self, xp, kernel3, stride3, dilation3, out3, groups):
        self.xp, self.kernel3, self.stride3, self.dilation3 = xp, kernel3, stride3, dilation3
        self.out3 = tuple(int(o) for o in out3)
        self.groups = groups
        self.per_sample = int(np.prod(self.out3))
        self.count = xp.shape[0] * self.per_sample
        self.height = xp.shape[1] * int(np.prod(kernel3))

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        """``[G, K/G, B]`` float32 columns at sorted flat positions (all when None)."""
        if positions is None:
            positions = np.arange(self.count)
        out = np.empty((self.height, len(positions)), dtype=np.float32)
        samples = positions // self.per_sample
        bounds = np.flatnonzero(np.diff(samples)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(positions)]):
            n = samples[start]
            view = _windows(self.xp[n], self.kernel3, self.stride3, self.dilation3, self.out3)
            local = positions[start:stop] - n * self.per_sample
            if len(local) == self.per_sample:
                out[:, start:stop] = view.reshape(self.height, -1)
            else:
                a, b, e = np.unravel_index(local, self.out3)
                out[:, start:stop] = view[:, :, :, :, a, b, e].reshape(self.height, -1)
        return out.reshape(self.groups, self.height // self.groups, -1)


def _conv_columns(node: Node, shape, x: np.ndarray) -> _ConvColumns:
    attrs = node.attrs
    kernel = list(attrs.get("kernel_shape") or shape[2:])
    n_spatial = x.ndim - 2
    begin, end, out = conv_geometry(list(x.shape[2:]), kernel, attrs.get("strides"), attrs.get("dilations"),
                                    attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
    x3 = _as3d(np.asarray(x, dtype=np.float32))
    widths = [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(_to3(begin, 0), _to3(end, 0))]
    return _ConvColumns(np.pad(x3, widths), tuple(_to3(kernel, 1)), _to3(attrs.get("strides") or [1] * n_spatial, 1),
                        _to3(attrs.get("dilations") or [1] * n_spatial, 1), _to3(out, 1), int(attrs.get("group", 1)))


def _conv_transpose_columns(node: Node, shape, x: np.ndarray) -> _ConvColumns:
    """ConvTranspose as a stride-1 conv: zero-upsample the input by the strides, pad each side by
    ``dilation*(k-1) - pad`` (crop if negative; the end side sized so the output size matches)."""
    from ..ops.nn import _conv_transpose_geometry

    attrs = node.attrs
    n_spatial = x.ndim - 2
    kernel = list(attrs.get("kernel_shape") or shape[2:])
    strides = list(attrs.get("strides") or [1] * n_spatial)
    dilations = list(attrs.get("dilations") or [1] * n_spatial)
    begin, out = _conv_transpose_geometry(list(x.shape[2:]), kernel, strides, dilations, attrs.get("pads"),
                                          attrs.get("auto_pad", "NOTSET"), attrs.get("output_padding"),
                                          attrs.get("output_shape"))
    up_shape = [s * (i - 1) + 1 for s, i in zip(strides, x.shape[2:])]
    up = np.zeros(x.shape[:2] + tuple(up_shape), dtype=np.float32)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    left = [e - 1 - b for e, b in zip(extent, begin)]
    right = [o + e - 1 - u - lft for o, e, u, lft in zip(out, extent, up_shape, left)]
    for axis, (lft, rgt) in enumerate(zip(left, right), start=2):  # negative padding = cropping
        up = up[(slice(None),) * axis + (slice(max(0, -lft), up.shape[axis] - max(0, -rgt)),)]
    widths = [(0, 0), (0, 0)] + [(max(0, lft), max(0, rgt)) for lft, rgt in zip(left, right)]
    xp = _as3d(np.pad(up, widths))
    return _ConvColumns(xp, tuple(_to3(kernel, 1)), _to3([1] * n_spatial, 1), _to3(dilations, 1), _to3(out, 1),
                        int(attrs.get("group", 1)))


class _PairedColumns:
    """The simulation's and the FP32 model's columns at the same positions: ``take`` stacks them per group,
    ``[G, 2 K/G, B]`` (the simulation's K/G rows, then the FP32 model's), so one reservoir samples both."""

    def __init__(self, sim_columns, fp32_columns):
        self.sim, self.fp32 = sim_columns, fp32_columns
        self.count, self.height = sim_columns.count, 2 * sim_columns.height

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        return np.concatenate([self.sim.take(positions), self.fp32.take(positions)], axis=1)


def position_chunks(columns, budget: int = COLUMN_BUDGET):
    """Sorted position arrays covering all of ``columns``, each at most ``budget`` column floats."""
    size = max(1, budget // max(1, columns.height))
    for start in range(0, columns.count, size):
        yield np.arange(start, min(columns.count, start + size))


# ======================================================================================= data
class LayerInputs:
    """Per-batch inputs and outputs of the layers, in graph order, for the techniques that go layer by
    layer through a QuantSim. ``batches(layer)`` yields ``(x, z, t)``: ``x`` the layer input in the
    simulation as it is now (or the FP32 model's with ``use_fp32_inputs``), ``z`` the layer applied
    with its FP32 weight to ``x``, ``t`` the FP32 model's layer output (``z`` when not ``fp32_target``).

    ``carry=True``: every batch's live tensors (simulation and FP32 side) are kept in memory and
    advanced from layer to layer, so each node runs once per batch in total; a layer's new weights
    are used for everything after it because the simulation side is advanced past a layer only when
    the next layer asks. ``carry=False``: ``sim.run``/``sim.run_float`` from the graph inputs for every
    layer (memory: one batch; time: one forward prefix per layer). ``carry=True`` falls back to that, with a
    warning, when the carried tensors would take more than half the memory available (:func:`carry_fits`:
    MobileNetV2 carries 18 MB a sample, so 2,000 samples would need 36 GB). ``sides``: how many carried sides that
    check counts (0: the caller checked); ``float_side``: another LayerInputs' FP32 side on the same data, shared.
    """

    def __init__(self, sim, data, batch_size: int = 16, use_fp32_inputs: bool = False, carry: bool = True,
                 what: str = "adaround", sides: int = 2, float_side: "_CarriedSide | None" = None):
        from ..data import iter_feeds, reusable

        self.sim, self.data, self.batch_size = sim, data, batch_size
        self.use_fp32_inputs, self.carry = use_fp32_inputs, carry
        if carry and sides and float_side is None and not carry_fits(sim, data, batch_size, sides=sides, what=what):
            self.carry = carry = False
        if not carry:
            self.data = reusable(data, sim.graph, batch_size)  # read once per layer
        else:
            feeds = list(iter_feeds(data, sim.graph, batch_size=batch_size))
            sim.refresh()
            self.sim_side = _CarriedSide(sim, feeds, simulated=True)
            # another simulation's LayerInputs on the same data may lend its FP32 side (the same tensors)
            self.float_side = float_side or _CarriedSide(sim, feeds, simulated=False)

    def batches(self, layer: LinearLayer, fp32_target: bool = True, fp32_inputs: bool = False):
        """``(x, z, t)`` per batch; with ``fp32_inputs`` ``(x, z, t, x_fp32)``, also the FP32 model's layer input."""
        probe = None if self.use_fp32_inputs else _probe(self.sim, layer)
        for x, t, x_fp32 in self._inputs_and_targets(layer, fp32_target or self.use_fp32_inputs, fp32_inputs):
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise RefquantError(f"tensor {layer.input!r} has NaN or Inf in the quantized simulation")
            z = t if probe is None else probe.run({layer.input: x})["y"]
            t = t if fp32_target and t is not None else z
            yield (x, z, t, x_fp32) if fp32_inputs else (x, z, t)

    def output_sqnr(self) -> float:
        """``-10 log10(mean_o sum (y_o - y'_o)^2 / sum y_o^2)`` over the float graph outputs ``o`` and all batches
        (the project's default metric, :func:`refquant.analysis.engine.mean_sqnr`): ``y`` the FP32 model's, ``y'``
        the simulation's as it is now (its quantizers as they are)."""
        from ..analysis.engine import mean_sqnr

        names = [n for n in self.sim.graph.output_names if n not in self.sim.graph.initializers]
        signal, noise = {}, {}
        for sim_out, float_out in self._graph_outputs(names):
            for name in names:
                y = np.asarray(float_out[name])
                if y.dtype.kind != "f":
                    continue
                y = y.astype(np.float64)
                signal[name] = signal.get(name, 0.0) + float(np.sum(y * y))
                noise[name] = noise.get(name, 0.0) + float(np.sum(np.square(y - np.asarray(sim_out[name], np.float64))))
        return float(mean_sqnr(signal, noise))

    def _graph_outputs(self, names):
        if self.carry:
            sims = zip(*(self.sim_side.tensor(n) for n in names))
            floats = zip(*(self.float_side.tensor(n) for n in names))
            for s, f in zip(sims, floats):
                yield dict(zip(names, s)), dict(zip(names, f))
            return
        from ..data import iter_feeds

        for feeds in iter_feeds(self.data, self.sim.graph, batch_size=self.batch_size):
            yield self.sim.run(feeds, outputs=names), self.sim.run_float(feeds, outputs=names)

    def _inputs_and_targets(self, layer, want_target, want_fp32_inputs=False):
        if self.carry:
            side = self.float_side if self.use_fp32_inputs else self.sim_side
            xs = side.tensor(layer.input)
            fps = self.float_side.tensor(layer.input) if want_fp32_inputs else [None] * len(xs)
            ts = self.float_side.tensor(layer.output) if want_target else [None] * len(xs)
            yield from zip(xs, ts, fps)
            return
        from ..data import iter_feeds

        for feeds in iter_feeds(self.data, self.sim.graph, batch_size=self.batch_size):
            if self.use_fp32_inputs:
                out = self.sim.run_float(feeds, outputs=[layer.input, layer.output])
                yield out[layer.input], out[layer.output], out[layer.input]
                continue
            x = self.sim.run(feeds, outputs=[layer.input])[layer.input]
            wanted = ([layer.output] if want_target else []) + ([layer.input] if want_fp32_inputs else [])
            out = self.sim.run_float(feeds, outputs=wanted) if wanted else {}
            yield x, out.get(layer.output), out.get(layer.input)


class _CarriedSide:
    """The live tensors of every batch on one side (simulation or FP32), advanced node range by node
    range with a Session on that range of the graph: the simulation side with the sim's quantized
    constants and its activation quantize-dequantize (as ``sim.run`` computes them)."""

    def __init__(self, sim, feeds: list[dict], simulated: bool):
        self.sim, self.simulated = sim, simulated
        graph = sim.graph
        self.position = 0  # index of the next node to run
        self.last_reader = {}
        for index, node in enumerate(graph.nodes):
            for name in _node_reads(node):  # subgraph reads of the outer scope count
                self.last_reader[name] = index
        for name in graph.output_names:
            self.last_reader[name] = len(graph.nodes)
        self.producer = {out: i for i, node in enumerate(graph.nodes) for out in node.outputs if out}
        # the graph inputs go through their quantizers once, as sim.run does to its feeds
        self.envs = [{name: self._qdq(name, array) for name, array in f.items()} for f in feeds]

    def tensor(self, name: str) -> list[np.ndarray]:
        """``name`` for every batch (running the graph up to its producer if needed)."""
        if name in self.producer and self.producer[name] >= self.position:
            self._advance(self.producer[name] + 1, keep=name)
        return [env[name] for env in self.envs]

    def rest(self, names: list[str]) -> list[dict]:
        """The tensors ``names`` of every batch from running the rest of the graph (the nodes not run yet) with
        the quantizers as they are now; the carried tensors stay where they are."""
        nodes = self.sim.graph.nodes[self.position:]
        produced = {o for node in nodes for o in node.outputs if o}
        outputs = [n for n in names if n in produced]  # the others were produced (and kept) before
        session, inputs = self._segment(nodes, outputs)
        results = []
        for env in self.envs:
            out = session.run({n: env[n] for n in inputs}, outputs=outputs) if outputs else {}
            results.append({n: out[n] if n in out else env[n] for n in names})
        return results

    def _segment(self, nodes, outputs) -> tuple[Session, list[str]]:
        """A Session on ``nodes`` (simulated or FP32 as this side) and the carried tensors it reads."""
        graph = self.sim.graph
        produced = {o for n in nodes for o in n.outputs if o}
        reads = list(dict.fromkeys(name for n in nodes for name in _node_reads(n)))
        inputs = [name for name in reads if name not in produced and name not in graph.initializers]
        sub = Graph(nodes=list(nodes), inputs=[Value(n) for n in inputs], outputs=[Value(n) for n in outputs],
                    initializers={n: graph.initializers[n] for n in reads if n in graph.initializers},
                    opset=dict(graph.opset), name=f"{graph.name}_segment")
        if self.simulated:
            self.sim.refresh()  # the quantized constants as they are now (layers before already optimized)
            constants = self.sim.session.constants
            session = Session(sub, threads=self.sim.session.threads, hooks=[self._hook])
            session.set_constants({n: constants[n] for n in sub.initializers})
        else:
            session = Session(sub, threads=self.sim.session.threads)
        return session, inputs

    def _advance(self, stop: int, keep: str) -> None:
        nodes = self.sim.graph.nodes[self.position:stop]
        produced = {o for n in nodes for o in n.outputs if o}
        outputs = [name for name in produced if self.last_reader.get(name, -1) >= stop or name == keep]
        session, inputs = self._segment(nodes, outputs)
        for env in self.envs:
            env.update(session.run({n: env[n] for n in inputs}, outputs=outputs))
            for name in [n for n in env if self.last_reader.get(n, -1) < stop and n != keep]:
                del env[name]  # no node after this range reads it
        self.position = stop

    def _qdq(self, name, array):
        if not self.simulated:
            return array
        quantizer = self.sim.quantizers.get(name)
        if quantizer is None or quantizer.kind != "activation" or not quantizer.enabled or array.dtype.kind != "f":
            return array
        encoding = self.sim.encoding_of(name)
        if encoding is None:
            return array
        from ..quant.qdq import quantize_dequantize

        return quantize_dequantize(array, encoding, self.sim.rounding).astype(array.dtype, copy=False)

    def _hook(self, name, array, node):
        if node is None:
            return None  # a range's inputs were quantized when they were produced
        out = self._qdq(name, array)
        return None if out is array else out


CARRY_MEMORY_SHARE = 0.5  # carried activations may take at most this share of the memory available


def carried_bytes(sim, first: dict, samples: int, sides: int) -> int:
    """Peak bytes of every batch's live tensors when carried through ``sim.graph`` on ``sides`` sides
    (:class:`_CarriedSide`): ``max_i sum`` of the tensors alive at node ``i`` (produced before it, read at or
    after it), sizes from one FP32 run of the ``first`` batch, times ``samples`` over the first batch's."""
    graph = sim.graph
    sizes = {name: np.asarray(a).nbytes for name, a in first.items()}

    def record(name, array, node):
        sizes[name] = np.asarray(array).nbytes
        return None

    Session(graph, threads=sim.session.threads, hooks=[record]).run(first, outputs=graph.output_names)
    last = {}
    for index, node in enumerate(graph.nodes):
        for name in _node_reads(node):
            last[name] = index
    for name in graph.output_names:
        last[name] = len(graph.nodes)
    born = {name: -1 for name in first}
    born.update({out: i for i, node in enumerate(graph.nodes) for out in node.outputs if out})
    change = np.zeros(len(graph.nodes) + 3, dtype=np.int64)
    for name, start in born.items():
        if name in sizes and name not in graph.initializers:
            change[start + 1] += sizes[name]
            change[last.get(name, start) + 2] -= sizes[name]  # alive through its last reader
    per_batch = int(np.cumsum(change).max(initial=0))
    in_first = len(next(iter(first.values()))) if first else 1
    return int(per_batch * samples / max(1, in_first)) * sides


def available_memory() -> int | None:
    """Bytes the system can still give (Linux ``MemAvailable``), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def carry_fits(sim, data, batch_size: int, sides: int, what: str) -> bool:
    """Whether carrying every batch's activations of ``data`` (:class:`_CarriedSide`, ``sides`` of them) takes at
    most :data:`CARRY_MEMORY_SHARE` of the memory available; if not, warns (the caller streams the data instead).
    Reads the first batch only, when the source says how many samples it holds (``data.count_samples``)."""
    from ..data import count_samples, iter_feeds

    available = available_memory()
    if available is None or isinstance(data, Iterator):  # a one-shot stream is read once into memory anyway
        return True
    first = next(iter(iter_feeds(data, sim.graph, batch_size=batch_size)), None)
    if first is None:
        return True  # empty: the caller reports it
    samples = count_samples(data, sim.graph)
    if samples is None:
        samples = sum(len(next(iter(f.values()))) for f in iter_feeds(data, sim.graph, batch_size=batch_size))
    need = carried_bytes(sim, first, samples, sides)
    if need <= CARRY_MEMORY_SHARE * available:
        return True
    warnings.warn(f"{what}: carrying every batch's activations through the graph would take {need / 2**30:.1f} GB "
                  f"of the {available / 2**30:.1f} GB available; the data is streamed instead (a forward pass "
                  "up to each layer; cache_activations=False says so without measuring)", stacklevel=3)
    return False


def _probe(sim, layer: LinearLayer) -> Session:
    """The layer alone (FP32 weight and bias) as a one-node graph."""
    node = layer.node
    graph = Graph(nodes=[Node(node.op_type, list(node.inputs), ["y"], dict(node.attrs), "probe", node.domain,
                              node.version)],
                  inputs=[Value(layer.input)], outputs=[Value("y")],
                  initializers={n: sim.graph.initializers[n] for n in node.inputs[1:] if n},
                  opset=dict(sim.graph.opset), name="layer_probe")
    return Session(graph, threads=sim.session.threads)


def _node_reads(node: Node) -> list[str]:
    from ..ir import node_reads

    return node_reads(node)


class _Reservoir:
    """A uniform random sample, without replacement, of at most ``size`` positions of a stream
    (the ``size`` smallest of uniform random keys), with their columns and both outputs. Preallocated
    and position-major: a new batch only writes the positions that enter, over those they evict."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.keys = np.empty(0)
        self.rows = None  # [size, G, K/G], [size, G, M/G] x 2 once the first batch is seen
        self.filled = self.seen = 0

    def offer(self, layer: LinearLayer, columns, z, t) -> None:
        keys = self.rng.random(columns.count)
        self.seen += columns.count
        mine = np.arange(columns.count) if columns.count <= self.size else np.argpartition(keys, self.size)[:self.size]
        if self.rows is None:
            g, mg = layer.index.shape[:2]
            shapes = ((g, columns.height // g), (g, mg), (g, mg))
            self.rows = [np.empty((self.size,) + shape, dtype=np.float32) for shape in shapes]
            self.keys = np.full(self.size, np.inf)
        # slots: the free ones first, then those holding the largest keys, while a new key is smaller
        free = np.arange(self.filled, self.size)
        held = np.argsort(self.keys[:self.filled])[::-1]
        slots = np.concatenate([free, held])
        incoming = mine[np.argsort(keys[mine])]
        limit = min(len(incoming), len(slots))
        # smallest new keys against largest held ones: once one does not enter, none after it does
        enter = np.ones(limit, dtype=bool)
        enter[len(free):] = keys[incoming[len(free):limit]] < self.keys[slots[len(free):limit]]
        accepted = limit if enter.all() else int(np.argmin(enter))
        if accepted == 0:
            return
        slots, incoming = slots[:accepted], incoming[:accepted]
        order = np.argsort(incoming)  # take() wants sorted positions
        slots, incoming = slots[order], incoming[order]
        self.keys[slots] = keys[incoming]
        for store, part in zip(self.rows, (columns.take(incoming), layer.output_matrix(z, incoming),
                                           layer.output_matrix(t, incoming))):
            store[slots] = part.transpose(2, 0, 1)
        self.filled += min(accepted, len(free))

    def arrays(self):
        """``(cols [G, K/G, B], z [G, M/G, B], t [G, M/G, B])`` of the cached positions."""
        return tuple(np.ascontiguousarray(rows[:self.filled].transpose(1, 2, 0)) for rows in self.rows)

    @property
    def complete(self) -> bool:
        return self.seen == self.filled

    def shrink(self, size: int) -> None:
        """Keep the ``size`` smallest keys: still a uniform sample of the stream (bottom-k of bottom-K)."""
        if self.filled <= size:
            return
        keep = np.sort(np.argsort(self.keys[:self.filled])[:size])
        self.rows = [rows[keep] for rows in self.rows]
        self.keys = self.keys[keep]
        self.filled = self.size = size


class _Moments:
    """Streaming ``H = sum cols cols^T``, ``G = sum cols R^T``, ``c = sum R^2`` (float64), ``R = t - z``;
    with QDrop inputs also ``variance = sum q (1 - q) (a - b)^2`` per input row (:meth:`add_variance`)."""

    def __init__(self, fourth: bool = False):
        self.h = self.g = self.c = None
        self.variance = None
        self.want_fourth = fourth
        self.fourth = None  # with fourth: (sum_p ||x_p||^4 [G], sum_p x_pk^4 [G, K/G]) for shrinkage_intensity
        self.count = 0

    def add_variance(self, variance: np.ndarray) -> None:
        """Add a chunk's ``sum_positions q (1 - q) (a - b)^2``, ``[G, K/G]``."""
        self.variance = variance if self.variance is None else self.variance + variance

    def add(self, cols: np.ndarray, residual: np.ndarray | None) -> None:
        cols = cols.astype(np.float64)
        # A @ A.T of one buffer: NumPy calls BLAS syrk (half the work of a GEMM on a transposed copy)
        h = (cols[0] @ cols[0].T)[None] if cols.shape[0] == 1 else np.matmul(cols, cols.transpose(0, 2, 1))
        if residual is None:
            g = np.zeros((cols.shape[0], cols.shape[1], 0))
            c = 0.0
        else:
            residual = residual.astype(np.float64)
            g = _bmm(cols, np.ascontiguousarray(residual.transpose(0, 2, 1)))
            c = np.square(residual).sum(axis=2)
        fourth = fourth_moments(cols) if self.want_fourth else None
        if self.h is None:
            self.h, self.g, self.c, self.fourth = h, g, c, fourth
        else:
            self.h += h
            self.g = self.g + g
            self.c = self.c + c
            if fourth is not None:
                self.fourth = (self.fourth[0] + fourth[0], self.fourth[1] + fourth[1])
        self.count += cols.shape[2]


def fourth_moments(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_p ||x_p||^4, sum_p x_pk^4)`` of the columns ``x_p = cols[g, :, p]``: ``[G]`` and ``[G, K/G]``."""
    square = np.square(cols, dtype=np.float64)
    return np.square(square.sum(axis=1)).sum(axis=1), np.square(square).sum(axis=2)


def shrinkage_intensity(h: np.ndarray, fourth: tuple[np.ndarray, np.ndarray], count: int) -> np.ndarray:
    """Schaefer & Strimmer's (2005, target "D") intensity for shrinking ``H = mean_p x_p x_p^T`` to its diagonal,
    per group: ``alpha = clip(sum_{i != j} Var(H_ij) / sum_{i != j} H_ij^2, 0, 1)`` with
    ``Var(H_ij) = (mean_p x_pi^2 x_pj^2 - H_ij^2) / (n - 1)``; ``h`` ``[G, K, K]``, ``fourth`` from
    :func:`fourth_moments` over the same ``n`` positions. The positions are taken as independent draws (a conv's
    neighbouring positions are not: there alpha comes out low, i.e. conservative)."""
    if count < 2:
        return np.ones(h.shape[0])
    diagonal = np.diagonal(h, axis1=1, axis2=2)
    off_squares = np.square(h).sum(axis=(1, 2)) - np.square(diagonal).sum(axis=1)
    off_fourth = (fourth[0] - fourth[1].sum(axis=1)) / count  # sum_{i != j} mean_p x_pi^2 x_pj^2
    return _intensity(off_fourth, off_squares, count)


def _intensity(off_fourth: np.ndarray, off_squares: np.ndarray, count: int) -> np.ndarray:
    """``clip(V / S, 0, 1)``: ``S = sum_{i != j} H_ij^2``, ``V = (sum_{i != j} mean_p w_pij^2 - S) / (n - 1)`` the
    summed variance of the ``H_ij = mean_p w_pij`` (1 where ``S`` is 0: nothing to keep)."""
    variance = np.maximum(off_fourth - off_squares, 0) / (count - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(off_squares > 0, variance / off_squares, 1.0)
    return np.clip(alpha, 0.0, 1.0)


def masked_shrinkage_intensity(cols: np.ndarray, weights: np.ndarray, rng: np.random.Generator,
                               budget: float = INTENSITY_FLOPS) -> np.ndarray:
    """Schaefer & Strimmer's intensity per output channel for the loss's Gauss-Newton Hessian
    ``H_o = mean_p u_op x_p x_p^T`` (``u = f'(t)^2`` at the FP32 target): :func:`shrinkage_intensity` of the
    samples ``u_op x_p x_p^T``, ``alpha_o = sum_{i != j} Var(H_oij) / sum_{i != j} H_oij^2``; ``cols`` ``[G, K, n]``,
    ``weights`` ``u`` ``[G, M, n]``, the result ``[G, M]``. Above ``budget`` flops both sums run over the pairs of
    ``K' < K`` inputs drawn at random (all ``n`` positions: the noise of each ``H_oij`` is the loss's own)."""
    groups, inputs, count = cols.shape
    outputs = weights.shape[1]
    if count < 2:
        return np.ones((groups, outputs))
    sample = _intensity_inputs(groups, inputs, outputs, count, budget)
    if sample < inputs:
        cols = cols[:, np.sort(rng.choice(inputs, size=sample, replace=False))]
    off_fourth, off_squares = np.empty((groups, outputs)), np.empty((groups, outputs))
    chunk = max(1, COLUMN_BUDGET // (sample * count))  # groups at a time, for memory (a depthwise conv has many)
    for start in range(0, groups, chunk):
        part = slice(start, start + chunk)
        x, u = cols[part].astype(np.float64), weights[part].astype(np.float64)
        square = np.square(x)
        diagonal = np.matmul(u, square.transpose(0, 2, 1)) / count  # [g, M, K]: H_okk
        pair_fourth = np.square(square.sum(axis=1)) - np.square(square).sum(axis=1)  # sum_{i != j} x_pi^2 x_pj^2
        off_fourth[part] = np.matmul(np.square(u), pair_fourth[:, :, None])[:, :, 0] / count
        off_squares[part] = _masked_frobenius(x, u) - np.square(diagonal).sum(axis=2)
    return _intensity(off_fourth, off_squares, count)


def _masked_frobenius(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``||H_o||_F^2`` of ``H_o = (1/n) sum_p u_op x_p x_p^T`` per group and channel, ``[G, M]``: directly
    (``M K^2 n``; each ``H_o``, or with many channels all their row blocks at once, ``u (x_i x_j)^T``) or from
    the Gram matrix, ``u_o^T ((X^T X) o (X^T X)) u_o / n^2`` (``(K + M) n^2``; while ``G n^2`` fits
    :data:`COLUMN_BUDGET`)."""
    groups, inputs, count = x.shape
    outputs = u.shape[1]
    if count * (inputs + outputs) < outputs * inputs * inputs and groups * count * count <= COLUMN_BUDGET:
        gram = np.square(np.matmul(x.transpose(0, 2, 1), x))  # [G, n, n]: memory-capped
        return np.sum(np.matmul(u, gram) * u, axis=2) / (count * count)
    out = np.zeros((groups, outputs))
    if outputs <= inputs:  # few channels (a depthwise conv: one per group): one H_o at a time, batched over groups
        for o in range(outputs):
            h = np.matmul(x * u[:, o:o + 1, :], x.transpose(0, 2, 1)) / count
            out[:, o] = np.square(h).sum(axis=(1, 2))
        return out
    rows = max(1, COLUMN_BUDGET // (groups * inputs * count))
    for start in range(0, inputs, rows):  # rows i of every H_o at once: u [M, n] @ (x_i x_j)_p^T [n, rows K]
        products = (x[:, start:start + rows, None, :] * x[:, None, :, :]).reshape(groups, -1, count)
        out += np.square(np.matmul(u, products.transpose(0, 2, 1)) / count).sum(axis=2)
    return out


def _intensity_inputs(groups: int, inputs: int, outputs: int, count: int, budget: float) -> int:
    """The inputs :func:`masked_shrinkage_intensity` takes: all ``K`` when its work, ``G min(M K^2 n,
    (K + M) n^2)`` flops (the second only while ``n^2`` fits :data:`COLUMN_BUDGET`), is within ``budget``; else
    ``K' = sqrt(budget / (G M n))`` (at least 8) by the direct form."""
    gram = (inputs + outputs) * count * count if count * count <= COLUMN_BUDGET else math.inf
    if groups * min(outputs * inputs * inputs * count, gram) <= budget:
        return inputs
    return int(min(inputs, max(8, math.sqrt(budget / (groups * outputs * count)))))


# ======================================================================================= losses
def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched matmul over groups; one group as a plain 2-D product (BLAS on contiguous operands)."""
    if a.shape[0] == 1:
        return (a[0] @ b[0])[None]
    return np.matmul(a, b)


class QuadraticLoss:
    """``L(W) = sum_g tr(dW H dW^T) - 2 tr(dW G) + c`` over means, ``dW = W_mat - W_fp32``: the exact
    ``sum_channels mean_positions (y_fp32 - y(W))^2`` of all streamed positions (no activation).

    With QDrop inputs (``cols = b`` with probability ``q`` per element, else ``a``) it is the exact expectation
    over the masks: with ``m = (1 - q) a + q b`` and ``D = mean q (1 - q) (a - b)^2`` (a diagonal),
    ``E ||t - W cols - bias||^2 = ||t - W m - bias||^2 + sum_k D_k sum_o W[o, k]^2``: the moments of ``m``
    (:func:`build_objective`) plus ``D`` in ``H``, ``-W_fp32 D`` in ``G`` and ``sum W_fp32^2 D`` in ``c``.

    ``alpha`` (per group, :func:`shrinkage_intensity`): the loss with ``H`` shrunk toward its diagonal,
    ``(1 - alpha) L + alpha sum_{o,k} H_kk dW_ok^2``."""

    def __init__(self, moments: _Moments, w_float: np.ndarray, alpha: np.ndarray | None = None):
        n = max(1, moments.count)
        self.h = moments.h / n
        has_residual = moments.g.shape[2] > 0
        self.g = np.ascontiguousarray((moments.g / n).transpose(0, 2, 1)) if has_residual else np.zeros_like(w_float)
        self.c = moments.c / n if has_residual else np.zeros(w_float.shape[:2])
        self.alpha = np.zeros(self.h.shape[0]) if alpha is None else np.asarray(alpha, dtype=np.float64)
        if alpha is not None:  # before the QDrop term, which is an exact expectation, not an estimate
            self._shrink(self.alpha)
        if moments.variance is not None:
            d = moments.variance / n  # [G, K/G]
            self.h = self.h + d[:, :, None] * np.eye(d.shape[1])
            self.g = self.g - w_float * d[:, None, :]
            self.c = self.c + np.einsum("gmk,gk->gm", w_float * w_float, d)
        self.w = w_float
        self.count = moments.count

    def _shrink(self, alpha: np.ndarray) -> None:
        """``(1 - alpha) L + alpha sum_{o,k} H_kk dW_ok^2`` per group: ``H`` shrunk toward its diagonal, ``G`` and
        ``c`` scaled by ``1 - alpha`` (the second moment of (input, residual) shrunk to its diagonal)."""
        keep = (1 - alpha)[:, None, None]
        diagonal = np.diagonal(self.h, axis1=1, axis2=2)
        self.h = keep * self.h + alpha[:, None, None] * (diagonal[:, :, None] * np.eye(self.h.shape[1]))
        self.g = keep * self.g
        self.c = (1 - alpha)[:, None] * self.c

    def __call__(self, w: np.ndarray, grad: bool = True, sample=None, value: bool = True):
        """The loss (None unless ``value``) and, with ``grad``, ``dL/dW``."""
        dw = w - self.w
        dwh = _bmm(dw, self.h)
        loss = float(np.sum(dwh * dw) - 2 * np.sum(dw * self.g) + np.sum(self.c)) if value or not grad else None
        return (loss, 2 * (dwh - self.g)) if grad else loss

    def per_channel(self, w: np.ndarray) -> np.ndarray:
        """The loss of each output channel, ``[G, M/G]`` (they sum to the loss)."""
        dw = w - self.w
        return np.sum((_bmm(dw, self.h) - 2 * self.g) * dw, axis=2) + self.c


class SampledLoss:
    """``L(W) = sum_channels mean_positions (f(t) - f(z + (W - W_fp32) cols))^2`` on cached positions,
    ``f`` = clip to ``activation`` (identity when None), a :class:`Pointwise` ``f`` with its ``f'``, or for
    :data:`SOFTMAX` the softmax over the
    channels ``s = softmax(y)``, whose backward is ``dL/dy = s * (dL/ds - sum_channels(dL/ds * s))``;
    ``dL/dW = dY @ cols^T``. ``sample``: a slice of the cached positions (Adam's minibatch; after a
    :meth:`shuffle`, a view rather than a gather). After :meth:`shrink`, ``sum_o (1 - alpha_o) L_o + alpha_o
    sum_k D_ok dW_ok^2`` over the output channels (``L_o`` a channel's loss, ``D_o`` the diagonal of its
    Hessian)."""

    def __init__(self, cols: np.ndarray, z: np.ndarray, t: np.ndarray, w_float: np.ndarray, activation):
        self.w = w_float.astype(np.float32)
        self.full_batch = False  # set by build_objective: all positions kept, cheap enough for full-batch Adam
        self.softmax = isinstance(activation, str) and activation == SOFTMAX
        self.pointwise = activation if isinstance(activation, Pointwise) else None
        self.slope = None  # PRelu: the slope of each output channel as [G, M/G, 1]
        if isinstance(activation, PRelu):
            g, mg = z.shape[:2]
            self.slope = np.broadcast_to(activation.slope.astype(np.float32), (g * mg,)).reshape(g, mg, 1)
        self.clipped = isinstance(activation, tuple)
        self.lo, self.hi = activation if self.clipped else (-math.inf, math.inf)
        # the fused kernel's view of the activation (float32 bounds: NumPy compares float32 y with them so)
        self.kind = CLIP if self.clipped else PRELU if self.slope is not None else IDENTITY
        self.lo32, self.hi32 = np.float32(self.lo), np.float32(self.hi)
        self.slope2d = (self.slope[:, :, 0] if self.slope is not None
                        else np.ones(z.shape[:2], dtype=np.float32))
        self._store(cols, z, self._f(t))
        self.count = self.cols.shape[2]
        self.alpha = None  # shrink(): the intensity per channel, [G, M/G]
        self.keep = self.ridge = None  # ... and while any is > 0: 1 - alpha [G, M/G, 1], alpha D [G, M/G, K/G]

    def curvature_weights(self, t: np.ndarray) -> np.ndarray | None:
        """``u = f'(t)^2`` per output and position at the FP32 target's pre-activation ``t``, ``[G, M/G, P]``: the
        weight of ``x_p x_p^T`` in channel ``o``'s Gauss-Newton Hessian ``mean_p u_op x_p x_p^T``; None for the
        identity (``u = 1``). A softmax couples the channels: it has no such weights (an error to ask)."""
        if self.softmax:
            raise RefquantError("adaround: a softmax's loss has no per-channel curvature weights")
        if self.clipped:
            return ((t > self.lo) & (t < self.hi)).astype(np.float32)
        if self.slope is not None:
            return np.where(t >= 0, np.float32(1), np.square(self.slope)).astype(np.float32)
        if self.pointwise is not None:
            return np.square(self.pointwise(t, derivative=True)[1]).astype(np.float32)
        return None

    def shrink(self, alpha: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Mix each channel's loss with its uncorrelated-inputs form: ``(1 - alpha_o) L_o + alpha_o sum_k D_ok
        dW_ok^2``, ``D_ok = mean_p u_op x_pk^2`` over the cached positions (``u``: :meth:`curvature_weights`, 1
        when None). ``alpha``: ``[G]`` or ``[G, M/G]``."""
        groups, outputs = self.target.shape[:2]
        self.alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64).reshape(groups, -1), (groups, outputs))
        if not np.any(self.alpha):
            self.keep = self.ridge = None
            return
        square = np.square(self.cols, dtype=np.float64)
        if weights is None:
            diagonal = np.mean(square, axis=2)[:, None, :]  # [G, 1, K/G]
        else:
            diagonal = np.matmul(weights.astype(np.float64), square.transpose(0, 2, 1)) / self.count
        # both precomputed: an optimizer step then adds two passes over the weights
        self.keep = (1 - self.alpha)[:, :, None]
        self.ridge = np.ascontiguousarray(self.alpha[:, :, None] * diagonal)

    def _shrunk_loss(self, dw, channel_loss, grad):
        """``sum_o (1 - alpha_o) L_o + alpha_o ridge_o`` from :meth:`_loss`'s per-channel loss (or None) and
        gradient (a channel's loss depends on its own weights only: no softmax here)."""
        if grad:
            channel_loss, gradient = channel_loss
        if self.ridge is None:
            loss = None if channel_loss is None else float(channel_loss.sum())
            return (loss, gradient) if grad else loss
        loss = None if channel_loss is None else \
            float(np.sum(self.keep[:, :, 0] * channel_loss) + np.sum(self.ridge * dw * dw))
        if not grad:
            return loss
        gradient *= self.keep  # a new float64 array from _loss: updated in place
        gradient += 2 * self.ridge * dw
        return loss, gradient

    def _f(self, y: np.ndarray) -> np.ndarray:
        if self.softmax:
            return _softmax(y)
        if self.pointwise is not None:
            return self.pointwise.value(y)
        if self.slope is not None:
            return np.where(y >= 0, y, self.slope * y)
        return np.clip(y, self.lo, self.hi) if self.clipped else y

    def _store(self, cols, z, target):
        # both layouts contiguous: [G, K, B] for Y = dW cols, [G, B, K] for dY cols^T (BLAS operands)
        self.cols = np.ascontiguousarray(cols)
        self.cols_t = np.ascontiguousarray(cols.transpose(0, 2, 1))
        self.z = np.ascontiguousarray(z)
        self.target = np.ascontiguousarray(target)

    def shuffle(self, rng: np.random.Generator) -> None:
        """Reorder the cached positions at random."""
        order = rng.permutation(self.count)
        self._store(np.take(self.cols, order, axis=2), np.take(self.z, order, axis=2),
                    np.take(self.target, order, axis=2))

    def __call__(self, w: np.ndarray, grad: bool = True, sample: slice | None = None, value: bool = True):
        """The loss (None unless ``value``) and, with ``grad``, ``dL/dW``."""
        part = sample if sample is not None else slice(None)
        dw = w - self.w
        return self._shrunk_loss(dw, self._loss(dw.astype(np.float32), self.cols[:, :, part], self.cols_t[:, part],
                                                self.z[:, :, part], self.target[:, :, part], grad, value), grad)

    def _loss(self, dw, cols, cols_t, z, target, grad, value):
        """The loss of ``y = dw cols + z`` against ``target``, per channel (``[G, M/G]``), and
        ``dL/dW = dL/dy cols^T``."""
        count = cols.shape[2]
        y = _bmm(dw, cols)
        if grad and not value and not self.softmax and self.pointwise is None:  # Adam's step: float32, one pass
            reconstruction_gradient(y, z, target, self.kind, self.lo32, self.hi32, self.slope2d,
                                    np.float32(2.0 / count))
            return None, _bmm(y, cols_t).astype(np.float64)
        y += z
        if self.pointwise is not None:
            out, slope = self.pointwise(y, derivative=grad)
        else:
            out = self._f(y)  # a new array, except for the identity (then y itself)
        if self.softmax:  # its backward below needs its output
            diff = out - target
        else:
            diff = out
            diff -= target
        # the value in float64 (L-BFGS's line search compares values); Adam does not ask for it
        loss = np.square(diff, dtype=np.float64).sum(axis=2) / count if value or not grad else None
        if not grad:
            return loss
        diff *= np.float32(2.0 / count)  # float32 on purpose: the GEMM below is the cost
        if self.clipped:
            diff *= (y > self.lo) & (y < self.hi)
        elif self.softmax:  # the softmax's Jacobian (symmetric): s * (d - <d, s>) per position
            diff = out * (diff - np.sum(diff * out, axis=1, keepdims=True))
        elif self.slope is not None:
            diff = np.where(y >= 0, diff, self.slope * diff)
        elif self.pointwise is not None:  # dL/dy = dL/df f'(y)
            diff *= slope
        return loss, _bmm(diff, cols_t).astype(np.float64)

    def per_channel(self, w: np.ndarray) -> np.ndarray:
        """The loss of each output channel, ``[G, M/G]`` (they sum to the loss; with a softmax each
        depends on every channel's weights)."""
        y = self.z + _bmm((w - self.w).astype(np.float32), self.cols)
        diff = self._f(y) - self.target
        return self._shrunk_channels(w, np.sum(np.square(diff, dtype=np.float64), axis=2) / self.count)

    def _shrunk_channels(self, w, channel_loss):
        """:meth:`per_channel` after :meth:`shrink`: each channel's ``(1 - alpha) L_o + alpha ridge_o``."""
        if self.ridge is None:
            return channel_loss
        dw = np.asarray(w - self.w, dtype=np.float64)
        return self.keep[:, :, 0] * channel_loss + np.sum(self.ridge * dw * dw, axis=2)


class MixedSampledLoss(SampledLoss):
    """:class:`SampledLoss` on QDrop inputs (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for
    Extremely Low-bit Post-Training Quantization"): ``cols = where(mask, b, a)``, ``mask ~ Bernoulli(q)`` per
    element, ``a`` the simulation's columns, ``b`` the FP32 model's; ``y = W cols + bias_p`` with the layer's
    ``bias_p = z_p - W_fp32 a_p``. A gradient draws a new mask; a value (``grad=False``, :meth:`per_channel`)
    uses one mask drawn at the start, so that roundings are compared on the same inputs. ``q`` is a multiple of
    1/256 (:func:`qdrop_threshold`): the mask is one random byte per element below ``256 q``."""

    def __init__(self, cols, cols_fp32, z, t, w_float, activation, probability: float, rng: np.random.Generator):
        self.cols_fp32 = np.ascontiguousarray(cols_fp32)
        self.threshold, self.rng = qdrop_threshold(probability), rng
        super().__init__(cols, z, t, w_float, activation)
        self.fixed_draws = self._draws(self.cols.shape)

    def _draws(self, shape):
        return np.frombuffer(self.rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)

    def _store(self, cols, z, target):
        self.cols = np.ascontiguousarray(cols)
        self.bias = np.ascontiguousarray(z - _bmm(self.w, self.cols))
        self.target = np.ascontiguousarray(target)

    def shuffle(self, rng: np.random.Generator) -> None:
        order = rng.permutation(self.count)
        self.cols, self.cols_fp32, self.bias, self.target, self.fixed_draws = (
            np.ascontiguousarray(np.take(a, order, axis=2))
            for a in (self.cols, self.cols_fp32, self.bias, self.target, self.fixed_draws))

    def _mixed(self, part: slice, fixed: bool):
        """The mixed columns of positions ``part`` (a slice), ``[G, K, B]``."""
        start, stop, _ = part.indices(self.count)
        shape = self.cols.shape[:2] + (stop - start,)
        out = np.empty(shape, dtype=np.float32)
        if fixed:
            mix_columns(self.cols, self.cols_fp32, self.fixed_draws, start, self.threshold, start, stop, out)
        else:
            mix_columns(self.cols, self.cols_fp32, self._draws(shape), 0, self.threshold, start, stop, out)
        return out

    def __call__(self, w: np.ndarray, grad: bool = True, sample: slice | None = None, value: bool = True):
        part = sample if sample is not None else slice(None)
        cols = self._mixed(part, fixed=not grad)
        # the transposed view: NumPy's matmul hands it to BLAS as is (measured no slower than a contiguous copy)
        return self._shrunk_loss(w - self.w, self._loss(w.astype(np.float32), cols, cols.transpose(0, 2, 1),
                                                       self.bias[:, :, part], self.target[:, :, part], grad, value),
                                grad)

    def per_channel(self, w: np.ndarray) -> np.ndarray:
        y = self.bias + _bmm(w.astype(np.float32), self._mixed(slice(None), fixed=True))
        diff = self._f(y) - self.target
        return self._shrunk_channels(w, np.sum(np.square(diff, dtype=np.float64), axis=2) / self.count)


def qdrop_threshold(probability: float) -> int:
    """``round(256 q)``: QDrop's mask takes the FP32 input where a random byte is below it."""
    return int(round(256 * probability))


# ======================================================================================= rounding
class SoftRounding:
    """The rectified-sigmoid rounding of one weight (matrix layout), on its encoding's grid.

    ``W_soft(V) = s * clip(floor(W/s) + h(V), lo, hi)``; ``W/s`` in float64 with the float32 scale
    the simulation uses. ``fixed``: weights with ``W/s`` an exact integer (kept, not optimized)."""

    def __init__(self, w: np.ndarray, scale: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.scale = scale.astype(np.float32).astype(np.float64)
        ratio = w.astype(np.float64) / self.scale
        self.base = np.floor(ratio)
        self.lo, self.hi = lo.astype(np.float64), hi.astype(np.float64)
        frac = ratio - self.base
        self.fixed = frac == 0
        self.free = ~self.fixed
        self.v0 = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(v0) = frac

    @staticmethod
    def h(v):
        """``clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` and its derivative, ``sigmoid(V) = 1 / (1 + exp(-V))``."""
        with np.errstate(over="ignore"):  # exp(-V) = inf: sigmoid 0
            sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        inside = (raw > 0) & (raw < 1)
        return np.clip(raw, 0, 1), (ZETA - GAMMA) * sig * (1 - sig) * inside

    def soft(self, v):
        """``W_soft`` and ``dW_soft/dh``."""
        return self.soft_h(self.h(v)[0])

    def soft_h(self, h):
        """``W_soft`` and ``dW_soft/dh`` as functions of ``h`` itself."""
        codes = self.base + h
        return self.scale * np.clip(codes, self.lo, self.hi), self.scale * ((codes >= self.lo) & (codes <= self.hi))

    @staticmethod
    def v_of_h(h):
        """The ``V`` with ``h(V) = h`` (h in [0, 1]; so ``V >= 0`` iff ``h >= 1/2``)."""
        return -np.log((ZETA - GAMMA) / (np.asarray(h, dtype=np.float64) - GAMMA) - 1)

    def up(self, v) -> np.ndarray:
        """AIMET's hard rounding decision ``V >= 0`` (never for fixed weights)."""
        return (v >= 0) & self.free

    def codes(self, up) -> np.ndarray:
        """``clip(floor(W/s) + up, lo, hi)`` for a boolean decision ``up``."""
        return np.clip(self.base + up, self.lo, self.hi)

    def hard(self, up) -> np.ndarray:
        """``W_q = s * codes`` in float32, exactly the grid values ``qdq`` produces."""
        return (self.codes(up).astype(np.float32) * self.scale.astype(np.float32)).astype(np.float32)


def rounding_regularizer(h: np.ndarray, beta: float):
    """``sum(1 - |2h - 1|^beta)`` and its derivative in ``h``."""
    a = 2 * h - 1
    mag = np.abs(a)
    # np.power, not **: the operator turns an exponent of exactly 2 or 0.5 into square/sqrt (other bits than the
    # fused path's np.power)
    return float(np.sum(1 - np.power(mag, beta))), -2 * beta * np.power(mag, beta - 1) * np.sign(a)


def annealed_beta(iteration: int, num_iterations: int, beta_range, warm_start: float) -> float | None:
    """AIMET's schedule: None (no regularization) during the warm start, then
    ``beta = end + (start - end)/2 * (1 + cos(pi * rel))``, ``rel`` from 0 to 1 over the rest."""
    warm = warm_start * num_iterations
    if iteration < warm:
        return None
    start, end = beta_range
    rel = (iteration - warm) / max(1e-12, num_iterations - warm)
    return end + 0.5 * (start - end) * (1 + math.cos(rel * math.pi))


class Objective:
    """``recon(W_soft(V)) + reg_param * reg(h(V), beta)`` and its gradient in ``V`` (fixed weights: 0)."""

    def __init__(self, rounding: SoftRounding, loss, reg_param: float):
        self.rounding, self.loss, self.reg_param = rounding, loss, reg_param

    def __call__(self, v, beta, sample=None, value: bool = True):
        """``(objective or None unless value, gradient in V)``."""
        h, dh_dv = self.rounding.h(v)
        w_soft, dw_dh = self.rounding.soft_h(h)
        loss, grad_w = self.loss(w_soft, sample=sample, value=value)
        grad_h = grad_w * dw_dh
        if beta is not None:
            reg, reg_grad = rounding_regularizer(h, beta)
            loss = loss + self.reg_param * reg if value else None
            grad_h = grad_h + self.reg_param * reg_grad
        return loss, grad_h * dh_dv * self.rounding.free

    def in_h(self, h, beta):
        """The same objective as a function of ``h`` in [0, 1] (for a bound-constrained optimizer)."""
        w_soft, dw_dh = self.rounding.soft_h(h)
        value, grad_w = self.loss(w_soft)
        grad_h = grad_w * dw_dh
        if beta is not None:
            reg, reg_grad = rounding_regularizer(h, beta)
            value += self.reg_param * reg
            grad_h = grad_h + self.reg_param * reg_grad
        return value, grad_h * self.rounding.free

    def recon_hard(self, up) -> float:
        """The reconstruction loss with the hard rounding ``up``."""
        return self.loss(self.rounding.scale * self.rounding.codes(up), grad=False)


def settle(objective: Objective, v, passes: int = 2) -> np.ndarray:
    """The final up/down decisions (bool, matrix layout). Decided weights (``h`` 0 or 1) keep theirs;
    each output channel's undecided weights (``0 < h < 1``: their reconstruction gradient balanced the
    regularizer) are flipped one at a time from ``h >= 1/2`` when that lowers the channel's exact
    loss with hard rounding. Channels are independent in the loss, so all are done at once."""
    rounding, loss = objective.rounding, objective.loss
    h = rounding.h(v)[0]
    up = (v >= 0) & rounding.free
    undecided = (h > 0) & (h < 1) & rounding.free
    if not undecided.any():
        return up
    rank = np.cumsum(undecided, axis=2) - 1  # position of each undecided weight within its channel

    def channel_loss(decision):
        return loss.per_channel(rounding.scale * np.clip(rounding.base + decision, rounding.lo, rounding.hi))

    current = channel_loss(up)
    for _ in range(passes):
        changed = False
        for r in range(int(rank.max()) + 1):
            pick = undecided & (rank == r)  # at most one weight per channel
            trial = up ^ pick
            trial_loss = channel_loss(trial)
            better = trial_loss < current
            if better.any():
                up = np.where(pick & better[:, :, None], trial, up)
                current = np.where(better, trial_loss, current)
                changed = True
        if not changed:
            break
    return up


# ======================================================================================= optimizers
def adam_learning_rate(learning_rate: float | str, num_iterations: int) -> float:
    """Adam's step size: a number as it is; "scaled": ``ADAM_LR * max(1, 10000 / max(200, num_iterations))``."""
    if learning_rate == "scaled":
        return ADAM_LR * max(1.0, STEP_PATH_ITERATIONS / max(FEWEST_SCALED_ITERATIONS, num_iterations))
    return float(learning_rate)


def optimize_adam(objective: Objective, v, num_iterations, beta_range, warm_start, sample_size=None,
                  rng=None, lr: float = ADAM_LR, fused: bool = True):
    """Adam (torch's defaults: betas 0.9/0.999, eps 1e-8) with the annealed regularizer; a sampled
    loss gets a minibatch of ``sample_size`` cached positions per iteration (:func:`_minibatches`).
    ``fused``: the per-weight work in Numba kernels (NumPy's result, faster)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    v = v.copy()
    m = np.zeros_like(v)
    s = np.zeros_like(v)
    batches = _minibatches(objective.loss, sample_size, rng)
    if fused:
        return _adam_fused(objective, v, m, s, num_iterations, beta_range, warm_start, batches, lr)
    for it in range(num_iterations):
        _, grad = objective(v, annealed_beta(it, num_iterations, beta_range, warm_start), next(batches), value=False)
        m *= 0.9
        m += 0.1 * grad
        s *= 0.999
        s += 0.001 * grad * grad
        # v -= lr * m_hat / (sqrt(s_hat) + eps), m_hat = m / (1 - 0.9^t), s_hat = s / (1 - 0.999^t)
        v -= (lr / (1 - 0.9 ** (it + 1))) * m / (np.sqrt(s / (1 - 0.999 ** (it + 1))) + 1e-8)
    return v


def _adam_fused(objective: Objective, v, m, s, num_iterations, beta_range, warm_start, batches, lr):
    """The loop of :func:`optimize_adam` with the per-weight work in two fused passes
    (:mod:`refquant.kernels.adaround`: the same operations, bit for bit)."""
    r = objective.rounding
    flat = [np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
            for a in np.broadcast_arrays(r.base, r.lo, r.hi, r.scale)]
    free = np.ascontiguousarray(r.free).reshape(-1)
    v_flat, m_flat, s_flat = v.reshape(-1), m.reshape(-1), s.reshape(-1)  # views: v is updated in place
    w_soft = np.empty(v.shape)
    dw_dh, dh_dv, h, magnitude, powed, exp_neg_v = (np.empty(v.size) for _ in range(6))
    for it in range(num_iterations):
        beta = annealed_beta(it, num_iterations, beta_range, warm_start)
        with np.errstate(over="ignore"):  # exp(-v) = inf gives sigmoid 0, as it should
            np.exp(np.negative(v_flat, out=exp_neg_v), out=exp_neg_v)
        soft_weights(exp_neg_v, *flat, w_soft.reshape(-1), dw_dh, dh_dv, h, magnitude)
        _, grad_w = objective.loss(w_soft, sample=next(batches), value=False)
        if beta is not None:  # |2h - 1|^(beta - 1) (unread without a beta)
            np.power(magnitude, beta - 1, out=powed)
        adam_step(v_flat, np.ascontiguousarray(grad_w, dtype=np.float64).reshape(-1), dw_dh, dh_dv, h, free,
                  math.nan if beta is None else beta, powed, objective.reg_param, m_flat, s_flat,
                  lr / (1 - 0.9 ** (it + 1)), 1 - 0.999 ** (it + 1))
    return v


def _minibatches(loss, size, rng):
    """Endless minibatch slices of a sampled loss's cached positions (None: the whole loss). The
    positions are shuffled once, so a minibatch is a contiguous slice (a view, no copy); each epoch
    starts at a random offset, so epochs cut the order into different minibatches."""
    count = getattr(loss, "count", 0)
    if size is None or count <= size or not hasattr(loss, "shuffle"):
        while True:
            yield None
    loss.shuffle(rng)
    per_epoch = count // size
    if per_epoch > 1 and count - per_epoch * size < size // 2:
        per_epoch -= 1  # leave room for the offset to move
    while True:
        offset = int(rng.integers(count - per_epoch * size + 1))
        for k in range(per_epoch):
            yield slice(offset + k * size, offset + (k + 1) * size)


def lbfgs_stages(num_iterations: int, beta_range, warm_start: float, stages: int = LBFGS_STAGES):
    """``[(beta or None, iterations)]``: the warm start, then ``stages`` fixed betas sampled at the
    middle of equal slices of AIMET's cosine schedule."""
    warm = int(round(warm_start * num_iterations))
    rest = num_iterations - warm
    plan = [(None, warm)] if warm else []
    stages = max(1, min(stages, rest))
    for k in range(stages):
        share = rest // stages + (1 if k < rest % stages else 0)
        start, end = beta_range
        beta = end + 0.5 * (start - end) * (1 + math.cos((k + 0.5) / stages * math.pi))
        plan.append((beta, share))
    return [(b, n) for b, n in plan if n > 0]


def optimize_lbfgs(objective: Objective, v, num_iterations, beta_range, warm_start):
    """SciPy L-BFGS-B on the full (cached) loss, one run per annealing stage (each warm-started from
    the last). The variable is ``h`` itself, bounded to [0, 1] (weights with an exact code: [0, 0]):
    through the rectified sigmoid, a quasi-Newton step saturates ``h`` where its gradient is zero
    and the weight can never move back; the bounds let it. ``num_iterations`` is the total number
    of L-BFGS iterations (each ~1 loss + gradient evaluation). Returns ``V`` with ``h(V) = h``."""
    from scipy.optimize import minimize

    shape = v.shape
    h = objective.rounding.h(v)[0].reshape(-1)
    upper = objective.rounding.free.reshape(-1).astype(np.float64)
    bounds = np.stack([np.zeros_like(upper), upper], axis=1)
    for beta, iterations in lbfgs_stages(num_iterations, beta_range, warm_start):
        def fun(flat, beta=beta):
            value, grad = objective.in_h(flat.reshape(shape), beta)
            return value, grad.reshape(-1)

        result = minimize(fun, h, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": iterations, "maxfun": 2 * iterations + 5, "ftol": 0.0, "gtol": 0.0})
        h = np.clip(result.x, 0.0, upper)
    return objective.rounding.v_of_h(h.reshape(shape))


# ======================================================================================= API
@dataclass
class AdaroundLayerReport:
    """What AdaRound did to one layer. Losses: the reconstruction loss of the form used (``form``),
    with nearest rounding (``V`` at its start) and with the final hard rounding."""

    layer: str
    weight: str
    form: str
    loss_nearest: float
    loss_adaround: float
    flipped: float  # fraction of weights whose code differs from nearest rounding
    seconds: float
    columns: int = 0  # positions the loss was computed on
    kept_nearest: bool = False  # AdaRound did not beat nearest rounding: nearest was kept
    shrinkage: float = 0.0  # the loss's shrinkage intensity toward uncorrelated inputs (mean over channels)
    learning_rate: float = 0.0  # Adam's step size of the rounding kept (0: no Adam steps)
    quantized_inputs: bool = False  # fitted to the layer's inputs with the activation quantizers on
    held_out_sqnr: tuple[float, float] | None = None  # quantize_activations="per_layer": off, on (input_choice)


def adaround(sim, data, num_iterations: int = 10000, reg_param: float = 0.01, beta_range=(20, 2),
             warm_start: float = 0.2, batch_size: int = 16, use_fp32_inputs: bool = False, progress: bool = True,
             optimizer: str = "adam", *, include_activation: bool | str = True,
             quantize_activations: bool | str = False, num_columns: int | None = None,
             columns_per_iteration: int | None = None, finish: str = "threshold",
             cache_activations: bool = True, threads: int | str | None = "auto", seed: int = 0,
             qdrop: float = 0.0, shrinkage: float | str = "auto", learning_rate: float | str = "scaled",
             nodes_to_include=None, report: list | None = None):
    """AdaRound every Conv, ConvTranspose, Gemm and MatMul of ``sim`` with a constant weight and an
    enabled integer weight quantizer, in graph order (see the module docstring for the formulas).

    ``data``: anything :func:`refquant.data.iter_feeds` accepts (read once and carried through the
    graph, or once per layer with ``cache_activations=False``). Weight
    encodings: the current ones; if a layer's weight has none, the parameter encodings are computed
    first (``sim`` need not be calibrated; calibrate activations after AdaRound). Each layer's
    rounding is set with ``sim.set_quantized_parameter`` (encoding frozen; FP32 weights untouched).

    ``optimizer``: "adam" (default) or "lbfgs". Measured with ``bench/ptq.py --optimizers`` on real
    MobileNetV2 layers (W4 per channel, 64 photo crops, FP32 inputs, one BLAS thread), hard-rounding
    loss reached and seconds: projection conv 24x96 (nearest 0.191): Adam 200 its 0.079 in 0.03 s,
    1000 its 0.038 in 0.17 s; L-BFGS-B 200 its 0.102 in 0.20 s, 1000 its 0.054 in 0.34 s. Expansion
    conv 96x16 + ReLU6 (0.0243): Adam 1000 its 0.0172 in 0.43 s, L-BFGS-B 0.0191 in 5.0 s. Depthwise
    3x3 + ReLU6 (0.102): Adam 1000 its 0.031 in 0.9 s, L-BFGS-B at best 0.036 (1000 its, 9 s). Adam is
    ahead at equal time on all four layers measured: an L-BFGS iteration evaluates the full cached
    loss (Adam a 1,024-position minibatch) plus line searches, and its better minimum of each stage
    does not make a better rounding: what decides is the path of the annealing. (L-BFGS optimizes
    ``h`` in [0, 1] under bounds: through the rectified sigmoid its steps saturated weights where
    their gradient is zero, for good.)
    ``num_iterations`` counts Adam steps or L-BFGS iterations.
    ``include_activation``: put the following activation in the loss (AIMET, the paper's f_a): True: a
    Relu, Clip, PRelu, Softmax, Sigmoid, Tanh or SiLU (``pointwise.IN_LOSS_BY_DEFAULT``); "all": also any
    other elementwise subgraph (:mod:`refquant.ptq.pointwise`: HardSwish, GELU...); False: none.
    ``quantize_activations``: layer inputs with the activation quantizers on (default off, as AIMET intends;
    aimet-onnx 2.42.0 in fact samples them on: module docstring); "choose": whichever of the two scores better on a
    held-out quarter of ``data`` after fitting on the rest (:mod:`refquant.ptq.input_choice`; about 2.5x the time,
    ``data`` read into memory; ``report`` receives the :class:`~refquant.ptq.input_choice.InputChoice` first);
    "per_layer": the same choice layer by layer, the quantized fit kept where it lowers the model's output noise on
    the held-out quarter by two standard errors (:class:`~refquant.ptq.input_choice.PerLayerInputs`; 3-4x the time;
    NudeNet's YOLOv8n W4A8 1000 its: 28.03 / 27.65 / 27.71 dB on three sets against 26.03 / 26.01 / 25.74, but PP-OCR
    cls 15.39 against 16.04 dB over four sets, one of them -2.6; each report's ``quantized_inputs`` and
    ``held_out_sqnr`` say what was chosen). With the quantized inputs (True or a choice), a simulation whose
    activations are not calibrated is calibrated on ``data`` first.
    ``qdrop``: the probability (in [0, 1), a
    multiple of 1/256) that an element of a layer's input is the FP32 model's instead of the simulation's, drawn
    anew at each step (QDrop, with ``quantize_activations=True``; 0: off, the default; module docstring).
    ``num_columns``: cached positions per layer for the sampled loss; ``columns_per_iteration``:
    Adam's minibatch of them. Default (None): a layer whose positions x weights < 2^27 (and cache < 64 MB) is fitted
    on all its positions with full-batch Adam, so its result does not depend on ``seed`` (MTCNN R-Net W4A8, 1000
    iterations: 36.6-46.7 dB over four seeds with 1,024-position minibatches, 45.33 dB on every seed full batch);
    a larger layer on 8,192 sampled positions, 512 per iteration (measured on MobileNetV2 W4A8, 1000 its, idle:
    a 128 MB cap and 1,024 per iteration 11.29 dB / 81.2 % in 251 s; 64 MB and 1,024 11.49 dB / 78.9 % in 195 s;
    64 MB and 512 11.64 dB / 78.9 % in 161 s, where aimet-onnx takes 199 s for 20 iterations; a full-batch step of
    MobileNetV2's depthwise layers reads 108 MB of columns). ``finish``: "threshold" (``V >= 0``, the paper and
    AIMET) or "greedy" (see the module docstring). ``cache_activations``: see :class:`LayerInputs` (False: a
    forward prefix per layer, memory one batch; True falls back to that when the activations would not fit in
    memory). ``threads``: BLAS threads while optimizing (None: unchanged; "auto":
    unchanged for a layer whose optimizer step multiplies at least 2^22 weight x position pairs, else 1; see
    :func:`step_threads`).
    ``shrinkage``: "auto" (default) shrinks each output channel's loss toward uncorrelated inputs by Schaefer &
    Strimmer's intensity estimated from its data (near 0 where the data holds the correlations, near 1 where they are
    noise); 0 is AdaRound's loss as written; a number in [0, 1] uses that intensity everywhere (module docstring,
    *Shrinkage*).
    ``learning_rate``: Adam's step size: "scaled" (default), ``1e-3 * max(1, 10000 / max(200, num_iterations))``,
    the path length of AIMET's 10,000 steps of 1e-3 from 200 iterations on; or a positive number (1e-3: AIMET's at
    every count; module docstring, *Step size*).
    ``nodes_to_include``: names of the layer nodes to optimize (AIMET's ``nodes_to_include``; None: every layer);
    the others keep their quantized weights as they are, and a later call can AdaRound them with other options
    (each layer fitted to the simulation as the calls before left it). A name that is not a layer AdaRound can
    optimize is an error.
    ``report``: a list that receives one :class:`AdaroundLayerReport` per layer.
    On any error or Ctrl-C the sim is left exactly as it was. Returns ``sim``.
    """
    if optimizer not in ("adam", "lbfgs"):
        raise RefquantError(f"adaround: optimizer {optimizer!r} is not 'adam' or 'lbfgs'")
    if finish not in ("threshold", "greedy"):
        raise RefquantError(f"adaround: finish {finish!r} is not 'threshold' or 'greedy'")
    if not (threads in ("auto", None) or (isinstance(threads, int) and threads >= 1)):
        raise RefquantError(f"adaround: threads must be 'auto', None or a positive int, got {threads!r}")
    if include_activation not in (True, False, "all"):
        raise RefquantError(f"adaround: include_activation must be True, False or 'all', got {include_activation!r}")
    if num_iterations < 0 or not 0 <= warm_start <= 1:
        raise RefquantError("adaround: num_iterations must be >= 0 and warm_start in [0, 1]")
    if not 0 <= qdrop < 1:
        raise RefquantError(f"adaround: qdrop must be in [0, 1), got {qdrop!r}")
    numeric = isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
    if not (learning_rate == "scaled" or (numeric and 0 < learning_rate < math.inf)):
        raise RefquantError(f"adaround: learning_rate must be 'scaled' or a positive number, got {learning_rate!r}")
    if not (shrinkage == "auto" or (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1)):
        raise RefquantError(f"adaround: shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    if quantize_activations not in (True, False, "choose", "per_layer"):
        raise RefquantError("adaround: quantize_activations must be True, False, 'choose' or 'per_layer', "
                            f"got {quantize_activations!r}")
    if quantize_activations in ("choose", "per_layer") and (qdrop or use_fp32_inputs):
        raise RefquantError(f"adaround: quantize_activations={quantize_activations!r} chooses between the "
                            "simulation's inputs with and without activation quantizers; it does not combine with "
                            "qdrop or use_fp32_inputs")
    if qdrop and optimizer == "lbfgs":  # its line searches compare values: a new mask per evaluation breaks them
        raise RefquantError("adaround: qdrop draws a new input mask per step, which L-BFGS cannot take; "
                            "use optimizer='adam'")
    layers, skipped = find_layers(sim, LAYER_OPS)
    if nodes_to_include is not None:
        layers, skipped = included_layers(sim, layers, skipped, nodes_to_include)
    if skipped:
        warnings.warn(f"adaround: layers not optimized: {', '.join(skipped)}", stacklevel=2)
    if not layers:
        warnings.warn(f"adaround: graph {sim.graph.name!r} has no layer to AdaRound", stacklevel=2)
        return sim
    if quantize_activations == "choose":
        quantize_activations = False
        if any(q.enabled and q.kind != "param" for q in sim.quantizers.values()):  # else both kinds are the same
            from .input_choice import choose_inputs

            options = dict(num_iterations=num_iterations, reg_param=reg_param, beta_range=beta_range,
                           warm_start=warm_start, optimizer=optimizer, include_activation=include_activation,
                           num_columns=num_columns, columns_per_iteration=columns_per_iteration, finish=finish,
                           cache_activations=cache_activations, threads=threads, shrinkage=shrinkage,
                           learning_rate=learning_rate, nodes_to_include=nodes_to_include)
            data, choice = choose_inputs(sim, data, batch_size, seed, progress, options)
            quantize_activations = choice.quantize_activations
            if report is not None:
                report.append(choice)
    if quantize_activations == "per_layer" and not any(q.enabled and q.kind != "param"
                                                       for q in sim.quantizers.values()):
        quantize_activations = False  # no activation quantizer: both kinds of input are the same
    rng = np.random.default_rng(seed)
    with SimState(sim) as state:
        if quantize_activations and any(q.enabled and q.kind == "activation" and sim.encoding_of(n) is None
                                        for n, q in sim.quantizers.items()):
            from ..data import reusable

            data = reusable(data, sim.graph, batch_size)  # an uncalibrated quantizer would pass its input as it is
            sim.compute_encodings(data, batch_size=batch_size, progress=progress)
            state.keep_enabled()
        ensure_weight_encodings(sim, layers)
        if quantize_activations == "per_layer":
            from ..data import iter_feeds
            from .input_choice import PerLayerInputs

            feeds = list(iter_feeds(data, sim.graph, batch_size=batch_size))
            inputs = PerLayerInputs(sim, feeds, batch_size, seed, cache_activations)
            fit = inputs.adaround_layer
        else:
            if not quantize_activations:
                disable_activation_quantizers(sim)
            inputs = LayerInputs(sim, data, batch_size, use_fp32_inputs, carry=cache_activations)

            def fit(layer, **options):
                result = adaround_layer(sim, layer, inputs, **options)
                result.quantized_inputs = bool(quantize_activations) and not use_fp32_inputs
                return result
        for layer in iterate(layers, progress, "adaround", unit="layer"):
            result = fit(layer, num_iterations=num_iterations, reg_param=reg_param, beta_range=beta_range,
                         warm_start=warm_start, optimizer=optimizer, include_activation=include_activation,
                         num_columns=num_columns, columns_per_iteration=columns_per_iteration, finish=finish,
                         threads=threads, rng=rng, qdrop=qdrop, shrinkage=shrinkage,
                         learning_rate=adam_learning_rate(learning_rate, num_iterations))
            if report is not None:
                report.append(result)
    return sim


def adaround_layer(sim, layer: LinearLayer, inputs: LayerInputs, *, num_iterations=10000, reg_param=0.01,
                   beta_range=(20, 2), warm_start=0.2, optimizer="adam", include_activation=True, num_columns=None,
                   columns_per_iteration=None, finish="threshold", threads: int | str | None = "auto",
                   rng=None, qdrop: float = 0.0, shrinkage: float | str = "auto",
                   learning_rate: float = ADAM_LR) -> AdaroundLayerReport:
    """AdaRound one layer of ``sim`` (its weight encoding must exist) and fix its rounding in ``sim``."""
    start = time.perf_counter()
    rng = rng if rng is not None else np.random.default_rng(0)
    objective, form, columns = build_objective(sim, layer, inputs, reg_param, include_activation, num_columns, rng,
                                               None if threads == "auto" else threads, qdrop, shrinkage)
    rounding = objective.rounding
    nearest = rounding.up(rounding.v0)
    loss_nearest = objective.recon_hard(nearest)
    up, loss, used_rate = nearest, loss_nearest, 0.0
    if num_iterations:
        if columns_per_iteration is None:  # full batch when all positions were kept (build_objective)
            columns_per_iteration = columns if num_columns is None and full_batch(objective) else MINIBATCH
        per_step = min(columns_per_iteration, columns) if optimizer == "adam" else columns
        # a step above AIMET's that ends worse than nearest rounding: fitted again with AIMET's (module docstring)
        rates = [learning_rate] + ([ADAM_LR] if optimizer == "adam" and learning_rate > ADAM_LR else [])
        with _blas_threads(step_threads(threads, rounding.base.shape, form, per_step)):
            for used_rate in rates:
                if optimizer == "adam":
                    v = optimize_adam(objective, rounding.v0, num_iterations, beta_range, warm_start,
                                      columns_per_iteration if form == "sampled" else None, rng, used_rate)
                else:
                    v = optimize_lbfgs(objective, rounding.v0, num_iterations, beta_range, warm_start)
                # settle decides each channel alone: not with a softmax, which couples the channels
                coupled = include_activation and layer.activation == SOFTMAX
                up = settle(objective, v) if finish == "greedy" and not coupled else rounding.up(v)
                loss = objective.recon_hard(up)
                if loss <= loss_nearest:
                    break
    kept_nearest = loss > loss_nearest  # never worse than nearest rounding on the data it was fitted to
    if kept_nearest:
        up, loss = nearest, loss_nearest
    sim.set_quantized_parameter(layer.weight, layer.from_matrix(rounding.hard(up)))
    return AdaroundLayerReport(layer.name, layer.weight, form, loss_nearest, loss, float(np.mean(up != nearest)),
                               time.perf_counter() - start, columns, kept_nearest,
                               float(np.mean(objective.loss.alpha)) if objective.loss.alpha is not None else 0.0,
                               used_rate if optimizer == "adam" else 0.0)


def build_objective(sim, layer: LinearLayer, inputs: LayerInputs, reg_param=0.01, include_activation=True,
                    num_columns=None, rng=None, threads: int | None = None, qdrop: float = 0.0,
                    shrinkage: float | str = "auto"):
    """Go through the layer's data once: ``(Objective, "quadratic" | "sampled", positions used)``.
    ``num_columns`` None: every position when they fit the full-batch budget, else a sample of 8,192.
    ``qdrop`` > 0 (and the inputs from the simulation): each input element is the FP32 model's with that
    probability (:class:`MixedSampledLoss`; the quadratic form takes the expectation, :class:`QuadraticLoss`)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    w = np.asarray(sim.graph.initializers[layer.weight], dtype=np.float32)
    scale, offset = grid_arrays(sim.encoding_of(layer.weight), w.shape)
    steps = sim.encoding_of(layer.weight).steps
    w_mat = layer.to_matrix(w).astype(np.float64)
    rounding = SoftRounding(w_mat, layer.to_matrix(scale), layer.to_matrix(offset), layer.to_matrix(offset) + steps)
    activation = (layer.activation_all if include_activation == "all" else layer.activation) \
        if include_activation else None
    mixed = qdrop > 0 and not inputs.use_fp32_inputs
    qdrop = qdrop_threshold(qdrop) / 256  # the probability the sampled loss's byte masks have
    reservoir = _Reservoir(num_columns or max(SAMPLED_COLUMNS, _full_batch_positions(w_mat, mixed)), rng)
    groups, _, per_in = w_mat.shape
    moments = None if activation is not None or groups * per_in * per_in > MOMENTS_BUDGET else \
        _Moments(fourth=shrinkage == "auto")
    for batch in inputs.batches(layer, fp32_inputs=mixed):
        x, z, t = batch[:3]
        with _blas_threads(threads):  # the simulation's forward passes above keep their own threads
            columns = layer.columns(x)
            fp32_columns = layer.columns(batch[3]) if mixed else None
            reservoir.offer(layer, _PairedColumns(columns, fp32_columns) if mixed else columns, z, t)
            if moments is None:
                continue
            for positions in position_chunks(columns):
                cols = columns.take(positions)
                residual = None if z is t else layer.output_matrix(t, positions) - layer.output_matrix(z, positions)
                if mixed:  # the mean input m = (1 - q) a + q b, its residual t - z_m = (1 - q) (t - z)
                    fp32_cols = fp32_columns.take(positions)
                    moments.add_variance(qdrop * (1 - qdrop) * np.square(cols - fp32_cols, dtype=np.float64).sum(2))
                    cols = (1 - qdrop) * cols + qdrop * fp32_cols
                    residual = (1 - qdrop) * residual
                moments.add(cols, residual)
    if reservoir.rows is None:
        raise RefquantError("adaround: the data set is empty: no batch was produced")
    if num_columns is None and not reservoir.complete:
        reservoir.shrink(SAMPLED_COLUMNS)  # too many positions for a full batch: the usual sample
    # the quadratic form costs M K^2 per evaluation, the sampled loss ~4 M K B: use the exact cheaper one
    kg = rounding.base.shape[2]
    if moments is None or (reservoir.complete and 2 * reservoir.seen < kg):
        cols, z, t = reservoir.arrays()
        if mixed:
            loss = MixedSampledLoss(cols[:, :kg], cols[:, kg:], z, t, w_mat, activation, qdrop, rng)
        else:
            loss = SampledLoss(cols, z, t, w_mat, activation)
        if shrinkage and not (shrinkage == "auto" and loss.softmax):  # a softmax couples its channels' losses
            weights = None if loss.softmax else loss.curvature_weights(t)
            loss.shrink(_cached_intensity(cols[:, :kg], weights, shrinkage, rng), weights)
        # every position kept, and an iteration over all of them within budget: Adam takes them all at each step
        loss.full_batch = reservoir.complete and reservoir.filled <= _full_batch_positions(w_mat, mixed)
        return Objective(rounding, loss, reg_param), "sampled", reservoir.filled
    alpha = None
    if shrinkage:
        alpha = np.full(groups, float(shrinkage)) if shrinkage != "auto" else \
            shrinkage_intensity(moments.h / max(1, moments.count), moments.fourth, moments.count)
    return Objective(rounding, QuadraticLoss(moments, w_mat, alpha), reg_param), "quadratic", moments.count


def _cached_intensity(cols: np.ndarray, weights: np.ndarray | None, shrinkage: float | str,
                      rng: np.random.Generator) -> np.ndarray:
    """The shrinkage intensity of the cached columns ``[G, K, P]``: ``shrinkage`` itself, or "auto"
    (:func:`masked_shrinkage_intensity`: per channel, or per group without curvature weights, ``u = 1``)."""
    if shrinkage != "auto":
        return np.full(cols.shape[0], float(shrinkage))
    if weights is None:
        return masked_shrinkage_intensity(cols, np.ones((cols.shape[0], 1, cols.shape[2]), np.float32), rng)[:, 0]
    return masked_shrinkage_intensity(cols, weights, rng)


def _full_batch_positions(w_mat: np.ndarray, mixed: bool = False) -> int:
    """Positions a layer may keep for a full-batch fit: positions x weights <= FULL_BATCH_MACS (an iteration's
    cost) and positions x (inputs + 2 outputs per position) <= FULL_BATCH_FLOATS (the cache; QDrop inputs: two
    sets of inputs and a mask)."""
    groups, out_per_group, in_per_group = w_mat.shape
    per_position = groups * ((2.25 if mixed else 1) * in_per_group + 2 * out_per_group)
    return max(1, min(FULL_BATCH_MACS // w_mat.size, int(FULL_BATCH_FLOATS // per_position)))


def full_batch(objective: "Objective") -> bool:
    """Whether a sampled objective holds every position of the data (then Adam takes them all at each step)."""
    return getattr(objective.loss, "full_batch", False)


def grid_arrays(encoding, shape) -> tuple[np.ndarray, np.ndarray]:
    """The encoding's float32 scale and offset broadcast to a tensor of ``shape`` (per tensor,
    per channel on ``axis``, or per block)."""
    scale = np.asarray(encoding.scale, dtype=np.float32)
    offset = np.asarray(encoding.offset, dtype=np.float32)
    if encoding.axis is None:
        return np.broadcast_to(scale, shape).copy(), np.broadcast_to(offset, shape).copy()
    axis = encoding.axis % len(shape)
    if encoding.block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return (np.broadcast_to(scale.reshape(view), shape).copy(),
                np.broadcast_to(offset.reshape(view), shape).copy())
    take = np.arange(shape[axis])
    return (np.repeat(scale, encoding.block_size, axis=axis).take(take, axis=axis),
            np.repeat(np.broadcast_to(offset, scale.shape), encoding.block_size, axis=axis).take(take, axis=axis))


# ======================================================================================= sim state
class SimState:
    """Context manager: snapshot every quantizer (enabled, encoding, frozen, fixed value); restore all
    of it on any exception (Ctrl-C included), and the ``enabled`` flags always (techniques disable the
    activation quantizers while they run)."""

    def __init__(self, sim):
        self.sim = sim
        self.saved = {name: (q.enabled, q.encoding, q.frozen, q.fixed_value) for name, q in sim.quantizers.items()}
        self.enabled = {name: q.enabled for name, q in sim.quantizers.items()}

    def __enter__(self):
        return self

    def keep_enabled(self) -> None:
        """The ``enabled`` flags as they are now are the ones restored on success (after a calibration inside,
        which disables the quantizers it never saw a value for)."""
        self.enabled = {name: q.enabled for name, q in self.sim.quantizers.items()}

    def __exit__(self, kind, exc, tb):
        for name, (enabled, encoding, frozen, fixed) in self.saved.items():
            q = self.sim.quantizers[name]
            if kind is not None:
                q.encoding, q.frozen, q.fixed_value, q.enabled = encoding, frozen, fixed, enabled
            else:
                q.enabled = self.enabled[name]
        return False


def disable_activation_quantizers(sim) -> None:
    """Only parameter quantizers stay on (AIMET's AdaRound and SeqMSE run like this)."""
    for quantizer in sim.quantizers.values():
        if quantizer.kind != "param":
            quantizer.enabled = False


def ensure_weight_encodings(sim, layers) -> None:
    """Compute the parameter encodings (one shot from the weights) if a layer's weight has none."""
    if any(sim.encoding_of(layer.weight) is None for layer in layers):
        compute = getattr(sim, "compute_param_encodings", None) or sim._compute_param_encodings
        compute()


def step_threads(threads, matrix_shape, form: str, positions_per_step: int):
    """BLAS threads for a layer's optimizer steps: ``threads`` itself unless it is "auto"; then all (None) when a
    step's GEMM work (weights x positions for the sampled loss, weights x K/G for the quadratic one) reaches
    :data:`THREADED_MACS`, else one. Measured on the 2-core machine, AIMET's convnet and MTCNN R/O-Net, 500 its:
    all threads 10-25 % faster on their big layers (O-Net conv1, 135,424 positions: 6.5 -> 5.5 s) and no slower on
    the small ones (mlp, P-Net); a 1,024-position minibatch step of a small layer is 2-8x slower with two."""
    if threads != "auto":
        return threads
    groups, rows, inner = matrix_shape
    work = groups * rows * inner * (positions_per_step if form == "sampled" else inner)
    return None if work >= THREADED_MACS else 1


class _blas_threads:
    """Cap BLAS threads (None: leave them); :func:`step_threads` decides for an optimizer's steps."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.limit = None

    def __enter__(self):
        if self.threads is not None:
            from threadpoolctl import threadpool_limits

            self.limit = threadpool_limits(self.threads)
        return self

    def __exit__(self, *exc):
        if self.limit is not None:
            self.limit.unregister()
        return False


__all__ = ["AdaroundLayerReport", "LayerInputs", "LinearLayer", "SoftRounding", "adaround", "adaround_layer",
           "annealed_beta", "build_objective", "find_layers", "grid_arrays", "lbfgs_stages", "rounding_regularizer",
           "settle"]
