"""Quantization-aware training of a QuantSim, on the ONNX graph itself.

Each step runs the simulation's forward (the same kernels and quantize-dequantize as ``sim.run``) with
:class:`~refquant.train.autograd.GradientEngine`, computes the loss and its gradient w.r.t. the outputs,
back-propagates (quantizers: straight-through estimator, see :mod:`refquant.train.quantizers`) and
takes an optimizer step.

* **Regular QAT** (``range_learning=False``): the weights (and biases, PRelu slopes, normalization
  scales and shifts) train; before every step each weight encoding is recomputed from the current
  weights exactly as ``QuantSim.compute_encodings`` computes it (its parameter scheme and observer),
  bias encodings follow (``input scale x weight scale``), and activation encodings stay as calibrated.
  Encodings the user froze (loaded, set by hand, AdaRound's) stay fixed.
* **Range learning** (``range_learning=True``): the ranges of every enabled integer quantizer, weights
  and activations, train too (LSQ/AIMET gradients; parameters in :class:`LearnedRangeQDQ`).

A sim whose weights carry AdaRound's fixed quantized values starts from those values (they lie on the
grid, so the first step's forward is the AdaRounded simulation). At the end the trained weights are
written with ``sim.set_parameter`` (the sim's graph, hence its FP32 reference and its export, carry them)
and the encodings are recomputed (regular) or set to the learned ones and frozen (range learning).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import RefquantError
from ..fileio import save_npz
from ..progress import bar as progress_bar
from ..quant.encoding import bias_encoding
from ..quant.observers import make_observer
from .autograd import GradientEngine
from .losses import cross_entropy, kl_distill, mse_distill, sqnr_distill
from .optim import make_optimizer, schedule
from .quantizers import QDQ, LearnedRangeQDQ

# initializer inputs that train besides the quantized parameters (op type -> input positions)
LEARNABLE_INPUTS = {"PRelu": (1,), "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
                    "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2)}
CHECKPOINT_NAME = "qat_checkpoint.npz"


@dataclass
class Batch:
    """What a loss callable receives besides the outputs: the feeds, the labels of these samples (if
    ``labels`` was given), the FP32 model's outputs (computed on first access) and the batch's place."""

    feeds: dict
    labels: np.ndarray | None
    index: int
    start: int
    _teacher: Callable = field(repr=False, default=None)
    _teacher_value: dict | None = field(repr=False, default=None)

    @property
    def teacher(self) -> dict:
        if self._teacher_value is None:
            self._teacher_value = self._teacher()
        return self._teacher_value


@dataclass
class QatResult:
    """``sim`` (trained in place), the loss of every step, and timings (seconds, summed over steps):
    ``forward_seconds`` the recorded forward passes, ``backward_seconds`` the backward passes,
    ``update_seconds`` optimizer steps and weight-encoding updates (the loss and the FP32 teacher are
    in none of them)."""

    sim: object
    losses: list = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    update_seconds: float = 0.0
    folded_graph: object = None  # with bn_training: the graph with re-estimated BNs folded

    @property
    def backward_forward_ratio(self) -> float:
        return self.backward_seconds / self.forward_seconds if self.forward_seconds else float("nan")


def qat(sim, data, loss="distill", epochs: int = 1, lr: float = 1e-4, optimizer: str = "adam",
        range_learning: bool = False, callback: Callable | None = None, *, batch_size: int = 16,
        preprocess=None, labels=None, distill: str = "mse", temperature: float = 1.0,
        lr_schedule: str = "constant", range_lr: float | None = None, momentum: float = 0.9,
        weight_decay: float = 0.0, trainable=None, bn_training: bool = False, checkpoint_dir=None,
        checkpoint_every: int = 50, resume: bool = True, max_steps: int | None = None,
        cache_teacher: bool = True, progress: bool = True) -> QatResult:
    """Fine-tune ``sim`` on ``data`` (anything :func:`refquant.data.iter_feeds` accepts, read in order,
    ``epochs`` times). Returns a :class:`QatResult`; the sim is updated in place and exports as usual.

    ``loss``: ``"distill"`` matches the FP32 model's outputs, no labels needed: ``distill="mse"`` (mean
    squared error on every output, e.g. logits, each divided by the variance of the FP32 output in the
    batch so that no output dominates by its units; see :func:`~refquant.train.losses.mse_distill`),
    ``"mse_raw"`` (the plain sum of the outputs' MSEs), ``"sqnr"`` (minus the sum of the outputs' SQNRs
    in dB: every output's relative improvement counts the same) or ``"kl"`` (KL divergence of
    softmax(outputs / T), ``temperature`` T: for logit outputs, not for outputs that are probabilities
    already); ``"cross_entropy"`` uses ``labels`` (one int per sample, in data order) on the first output;
    or a callable ``loss(outputs, batch) -> (value, {output: dL/doutput})`` where ``batch`` is
    a :class:`Batch` (see :mod:`refquant.train.losses` for ready-made ones).
    ``optimizer``: "adam" or "sgd" (``momentum``); ``lr_schedule``: "constant", "step", "cosine" over the
    run; ``range_lr``: learning rate of the quantizer ranges (default ``lr``).
    ``trainable``: names of the initializers to train (default: weights and biases of quantized layers,
    PRelu slopes, normalization scales/shifts). ``bn_training``: BatchNormalization nodes normalize with
    batch statistics while training; at the end their running statistics are re-estimated on ``data``
    through the trained sim and ``QatResult.folded_graph`` holds the graph with them folded.
    ``callback(info)`` is called after every step with a dict (step, epoch, loss, lr).
    ``checkpoint_dir``: the state (weights, ranges, optimizer moments, step) is written there atomically
    every ``checkpoint_every`` steps and at the end; a later call with the same arguments resumes
    from it (``resume=False``: start over). ``max_steps`` stops early (counting from step 0).
    ``cache_teacher``: keep the FP32 outputs of every batch after the first epoch computed them (memory:
    one epoch of outputs) instead of running the FP32 model again each epoch.
    """
    from ..data import iter_feeds

    if epochs < 1:
        raise RefquantError(f"qat: epochs must be >= 1, got {epochs}")
    if hasattr(data, "__next__"):
        raise RefquantError("qat: the data is a one-shot iterator, but training reads it once per epoch (and once "
                            "to count the steps); pass a list, an array, a file or folder, or a callable that "
                            "returns a fresh iterable")
    sim.refresh()
    if not any(q.active for q in sim.quantizers.values()):
        raise RefquantError("qat: the sim has no encodings; call compute_encodings (or load_encodings) first")
    engine, params, transforms, learned = training_setup(sim, range_learning, trainable, bn_training)
    loss_fn = _loss_function(loss, distill, temperature, sim)
    label_array = None if labels is None else _labels(labels)

    n_batches = sum(1 for _ in iter_feeds(data, sim.graph, batch_size=batch_size, preprocess=preprocess))
    total = epochs * n_batches if max_steps is None else min(max_steps, epochs * n_batches)
    extra = {"momentum": momentum} if optimizer == "sgd" else {}
    opt = make_optimizer(optimizer, lr, weight_decay=weight_decay, **extra)
    range_opt = make_optimizer(optimizer, range_lr or lr, **extra)
    rate = schedule(lr_schedule, 1.0, epochs * n_batches)  # a multiplier of both learning rates
    ranges = {f"{key}\t{p}": v for key, t in learned.items() for p, v in t.params.items()}

    result = QatResult(sim)
    fingerprint = _fingerprint(params, ranges, optimizer, range_learning, n_batches)
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start = 0
    if path is not None and resume and path.exists():
        start, result.losses = _load_checkpoint(path, fingerprint, params, ranges, opt, range_opt)
        for key, t in learned.items():
            t.set_params({p: ranges[f"{key}\t{p}"] for p in t.params})
        result.resumed_from = start

    teacher_cache: dict[int, dict] = {}
    bar = progress_bar(total, progress, "qat", unit="step", initial=start)
    step = 0
    try:
        for epoch in range(epochs):
            sample = 0
            for index, feeds in enumerate(iter_feeds(data, sim.graph, batch_size=batch_size, preprocess=preprocess)):
                n = len(next(iter(feeds.values())))
                if step >= total:
                    break
                if step < start:
                    step, sample = step + 1, sample + n
                    continue
                batch = Batch(feeds, None if label_array is None else _slice_labels(label_array, sample, n),
                              index, sample, _teacher_of(sim, feeds, teacher_cache if cache_teacher else {}, index))
                value = _step(engine, sim, params, transforms, learned, ranges, batch, loss_fn, opt, range_opt,
                              rate(step), range_learning, result)
                result.losses.append(value)
                step += 1
                sample += n
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
                if callback is not None:
                    callback({"step": step, "epoch": epoch, "loss": value, "lr": lr * rate(step - 1)})
                if path is not None and (step % checkpoint_every == 0 or step == total):
                    _save_checkpoint(path, fingerprint, step, result.losses, params, ranges, opt, range_opt)
    finally:
        bar.close()
    result.steps = step
    _write_back(sim, params, learned, range_learning)
    if bn_training and _has_batchnorm(sim.graph):
        from ..ptq.bn_reestimation import reestimate_batchnorm

        from ..ptq.bn_fold import fold_batchnorms

        reestimate_batchnorm(sim, data, batch_size=batch_size, progress=progress, fold=False)
        result.folded_graph = fold_batchnorms(sim.graph)  # the trained sim keeps its BNs and learned ranges
    return result


# ------------------------------------------------------------------------------ one step
def _step(engine, sim, params, transforms, learned, ranges, batch, loss_fn, opt, range_opt, multiplier,
          range_learning, result) -> float:
    t_setup = time.perf_counter()
    _follow_weights(sim, params, transforms, weights=not range_learning)
    t0 = time.perf_counter()
    tape = engine.forward(batch.feeds, params)
    t1 = time.perf_counter()
    value, output_grads = loss_fn(tape.outputs, batch)
    if not np.isfinite(value):
        raise RefquantError(f"qat: the loss became {value} at step {len(result.losses)}; lower the learning rate")
    t2 = time.perf_counter()
    grads = engine.backward(tape, output_grads)
    t3 = time.perf_counter()
    opt.step(params, grads.params, lr=opt.lr * multiplier)
    if range_learning and learned:
        range_grads = {f"{key}\t{p}": g for key, own in grads.transforms.items() if key in learned
                       for p, g in own.items()}
        range_opt.step(ranges, range_grads, lr=range_opt.lr * multiplier)
        for key, t in learned.items():
            t.set_params({p: ranges[f"{key}\t{p}"] for p in t.params})
            for p in t.params:  # keep the projected values
                ranges[f"{key}\t{p}"] = t.params[p]
    t4 = time.perf_counter()
    result.forward_seconds += t1 - t0
    result.backward_seconds += t3 - t2
    result.update_seconds += (t4 - t3) + (t0 - t_setup)
    return float(value)


# ------------------------------------------------------------------------------ setup
def training_setup(sim, range_learning: bool = False, trainable=None, bn_training: bool = False):
    """``(engine, params, transforms, learned)``: the gradient engine over the sim's graph with one
    transform per enabled quantizer, the trainable parameters' starting values, and the learned-range
    quantizers by key. Its forward with these values is the sim's forward (same kernels, same QDQ)."""
    graph = _training_graph(sim.graph, bn_training)
    names = _trainable(sim, trainable)
    params = {name: _start_value(sim, name) for name in names}
    transforms, learned = _transforms(sim, range_learning)
    engine = GradientEngine(graph, names, transforms)
    missing = engine.missing_backwards()
    if missing:
        kinds = sorted({n.op_type for n in missing})
        raise RefquantError(f"qat: no backward for {', '.join(kinds)} (node {missing[0].name!r} and "
                            f"{len(missing) - 1} more) on the path from the trained parameters to the outputs")
    return engine, params, transforms, learned


def _has_batchnorm(graph) -> bool:
    return any(n.op_type == "BatchNormalization" and not n.domain for n in graph.nodes)


def _training_graph(graph, bn_training: bool):
    if not bn_training or not _has_batchnorm(graph):
        return graph
    training = graph.copy()
    for node in training.nodes:
        if node.op_type == "BatchNormalization" and not node.domain:
            node.attrs["training_mode"] = 1
    return training


def _trainable(sim, trainable) -> list[str]:
    graph = sim.graph
    if trainable is not None:
        names = list(trainable)
        bad = [n for n in names if n not in graph.initializers or graph.initializers[n].dtype.kind != "f"]
        if bad:
            raise RefquantError(f"qat: trainable {bad[:5]} are not float initializers of the graph")
        return names
    names = [name for name, q in sim.quantizers.items() if q.kind == "param" and q.role in ("weight", "bias")]
    for node in graph.nodes:
        for position in LEARNABLE_INPUTS.get(node.op_type, ()):
            if position < len(node.inputs) and node.inputs[position] in graph.initializers:
                names.append(node.inputs[position])
    seen = set()
    return [n for n in names if n in graph.initializers and graph.initializers[n].dtype.kind == "f"
            and not (n in seen or seen.add(n))]


def _start_value(sim, name: str) -> np.ndarray:
    quantizer = sim.quantizers.get(name)
    if quantizer is not None and quantizer.enabled and quantizer.fixed_value is not None:
        return np.array(quantizer.fixed_value)  # AdaRound's weights: on the grid already
    return np.array(sim.graph.initializers[name])


def _transforms(sim, range_learning: bool):
    """One transform per quantizer group (tied tensors share their root's object)."""
    by_key: dict[str, QDQ] = {}
    transforms: dict[str, QDQ] = {}
    learned: dict[str, LearnedRangeQDQ] = {}
    for name, q in sim.quantizers.items():
        if not q.enabled:
            continue
        key = q.tied_to or name
        encoding = sim.encoding_of(name)
        if encoding is None:
            continue
        if key not in by_key:
            learn = range_learning and encoding.kind == "int" and q.role != "bias" and encoding.block_size is None
            by_key[key] = LearnedRangeQDQ(key, encoding, sim.rounding) if learn else QDQ(key, encoding, sim.rounding)
            if learn:
                learned[key] = by_key[key]
        transforms[name] = by_key[key]
    return transforms, learned


def _param_encoding(sim, q, weight: np.ndarray):
    """The encoding ``QuantSim`` computes for a weight (its parameter scheme, per channel on its axis)."""
    options = sim.scheme_options if sim.param_scheme == sim.quant_scheme else {}
    observer = make_observer(sim.param_scheme, axis=q.axis, **options)
    observer.update(np.asarray(weight, dtype=np.float32))
    return sim._encoding_from_observer(q, observer)


def _follow_weights(sim, params, transforms, weights: bool = True) -> None:
    """Weight encodings recomputed from the current weights (regular QAT), then the bias grids from
    the input and weight scales (also learned ones)."""
    for name, q in sim.quantizers.items():
        if weights and (q.kind == "param" and q.enabled and not q.frozen and q.role != "bias" and name in params
                and name in transforms and q.data_type == "int" and q.tied_to is None):
            transforms[name].encoding = _param_encoding(sim, q, params[name])
    graph = sim.graph
    for name, q in sim.quantizers.items():
        if q.role != "bias" or not q.enabled or q.frozen or name not in transforms:
            continue
        node = next(n for n in graph.nodes if len(n.inputs) > 2 and n.inputs[2] == name)
        x_t, w_t = transforms.get(node.inputs[0]), transforms.get(node.inputs[1])
        if x_t is not None and w_t is not None and x_t.encoding is not None and w_t.encoding is not None \
                and x_t.encoding.kind == "int" and w_t.encoding.kind == "int":
            transforms[name].encoding = bias_encoding(x_t.encoding.scale, w_t.encoding.scale, axis=0)


def _write_back(sim, params, learned, range_learning: bool) -> None:
    for name, value in params.items():
        quantizer = sim.quantizers.get(name)
        if quantizer is not None:
            quantizer.fixed_value = None  # the trained weights replace AdaRound's rounding
        sim.set_parameter(name, value)
    if range_learning:
        for key, t in learned.items():
            sim.quantizers[key].set_encoding(t.encoding, freeze=True)
    else:
        sim._compute_param_encodings()  # non-frozen weight encodings follow the trained weights
    sim._compute_bias_encodings()
    sim.invalidate()


# ------------------------------------------------------------------------------ loss and data
def _loss_function(loss, distill: str, temperature: float, sim):
    if callable(loss):
        return loss
    if loss == "distill":
        if distill in ("mse", "mse_raw"):
            normalize = distill == "mse"
            return lambda outputs, batch: mse_distill(outputs, batch.teacher, normalize)
        if distill == "sqnr":
            return lambda outputs, batch: sqnr_distill(outputs, batch.teacher)
        if distill == "kl":
            return lambda outputs, batch: kl_distill(outputs, batch.teacher, temperature)
        raise RefquantError(f"qat: distill {distill!r} is not 'mse', 'mse_raw', 'sqnr' or 'kl'")
    if loss == "cross_entropy":
        first = sim.graph.output_names[0]

        def ce(outputs, batch):
            if batch.labels is None:
                raise RefquantError("qat: loss 'cross_entropy' needs labels")
            value, grad = cross_entropy(outputs[first], batch.labels)
            return value, {first: grad}

        return ce
    raise RefquantError(f"qat: loss {loss!r} is not 'distill', 'cross_entropy' or a callable")


def _labels(labels) -> np.ndarray:
    if isinstance(labels, (str, Path)):
        from ..data import load_labels

        return load_labels(labels)
    return np.asarray(labels)


def _slice_labels(labels: np.ndarray, start: int, n: int) -> np.ndarray:
    if start + n > len(labels):
        raise RefquantError(f"qat: {len(labels)} labels, but the data has more samples (batch at {start}, size {n})")
    return labels[start:start + n]


def _teacher_of(sim, feeds, cache: dict, index: int) -> Callable:
    def compute():
        if index not in cache:
            cache[index] = sim.run_float(feeds)
        return cache[index]

    return compute


# ------------------------------------------------------------------------------ checkpoints
def _fingerprint(params, ranges, optimizer, range_learning, n_batches) -> dict:
    return {"params": {k: list(v.shape) for k, v in params.items()},
            "ranges": {k: list(np.shape(v)) for k, v in ranges.items()},
            "optimizer": optimizer, "range_learning": bool(range_learning), "batches_per_epoch": n_batches}


def _save_checkpoint(path, fingerprint, step, losses, params, ranges, opt, range_opt) -> None:
    arrays, names = {}, {}
    for group, store in (("param", params), ("range", ranges), ("opt", opt.state_dict()),
                         ("ropt", range_opt.state_dict())):
        names[group] = list(store)
        for i, key in enumerate(store):
            arrays[f"{group}_{i}"] = np.asarray(store[key])
    meta = {"fingerprint": fingerprint, "step": step, "names": names}
    arrays["meta"] = np.asarray(json.dumps(meta))
    arrays["losses"] = np.asarray(losses, dtype=np.float64)
    save_npz(path, arrays)


def _load_checkpoint(path, fingerprint, params, ranges, opt, range_opt) -> tuple[int, list]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            stores = {group: {key: np.array(npz[f"{group}_{i}"]) for i, key in enumerate(keys)}
                      for group, keys in meta["names"].items()}
            losses = [float(v) for v in npz["losses"]]
    except (OSError, KeyError, ValueError) as exc:
        raise RefquantError(f"{path}: not a readable QAT checkpoint ({exc}); delete it or pass resume=False") from None
    if meta["fingerprint"] != json.loads(json.dumps(fingerprint)):
        raise RefquantError(f"{path}: the checkpoint belongs to another run (different parameters, optimizer, "
                            "range learning or data size); delete it or pass resume=False")
    params.update(stores["param"])
    ranges.update(stores["range"])
    opt.load_state_dict(stores["opt"])
    range_opt.load_state_dict(stores["ropt"])
    return int(meta["step"]), losses


__all__ = ["Batch", "QatResult", "qat", "training_setup"]
