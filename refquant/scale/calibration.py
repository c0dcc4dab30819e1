"""QuantSim calibration split across an Executor: shards observed on workers, observers merged here.

``calibrate(sim, executor, data, ...)`` is what ``QuantSim.compute_encodings(data, executor=...)``
runs. Steps:

1. parameter encodings from the weights (cheap, here), and the quantized constants the shards run with;
2. the data cut into shards (:func:`refquant.scale.shards.split`, one per worker by default), each a
   small description a worker reads itself (a file and a range, image files, a Dask chunk);
3. the stream's first batch alone, whose observers fix the histogram layouts (``Observer.spawn``);
   then one :class:`ShardJob` per shard: the calibration forward pass over the shard's batches with
   observers spawned from those, exactly the hook ``compute_encodings`` runs in one process; the job
   returns the observers (fixed-size summaries: running min/max or histograms);
4. the observers merged in shard order (``a.merge(b)``) and turned into encodings as in one process.

If any shard fails (bad data, all workers lost) the sim is left exactly as it was.
"""

from __future__ import annotations

from concurrent.futures import as_completed
from dataclasses import dataclass

import numpy as np

from .shards import Shard, split


@dataclass(eq=False)
class ShardJob:
    """Calibrate one shard (picklable; runs on a worker). Returns ``(observers by group root,
    batches, samples)``. ``start``: the (empty, anchored) observers to fill instead of fresh ones;
    ``limit``: stop after that many batches."""

    graph: object
    constants: dict
    members: dict          # quantized tensor -> root of its group
    roots: list
    scheme: str
    options: dict
    threads: int | None
    outputs: list
    batch_size: int
    preprocess: object
    observe_constants: list  # (tensor) constants observed before the data, by the first shard only

    def __call__(self, index: int, shard: Shard, start: dict | None = None, limit: int | None = None):
        from ..quant.observers import make_observer
        from ..quant.quantsim import calibration_hook
        from ..runtime import Session

        if start:  # spawned again: a thread pool hands every task the same objects
            observers = {root: observer.spawn() for root, observer in start.items()}
        else:
            observers = {root: make_observer(self.scheme, **self.options) for root in self.roots}
        members = self.members
        where = {"batch": 0, "first": shard.first_sample}

        observe = calibration_hook(members, observers, lambda: (
            where["first"], f"shard {index}, batch {where['batch']} of the shard"))

        if index == 0:
            for name in self.observe_constants:
                observers[members[name]].update(np.asarray(self.graph.initializers[name], dtype=np.float32))
        session = Session(self.graph, threads=self.threads, hooks=[observe])
        session.set_constants(self.constants)
        samples = 0
        for feeds in shard.batches(self.graph, self.batch_size, self.preprocess):
            if limit is not None and where["batch"] >= limit:
                break
            session.run(feeds, outputs=self.outputs)
            n = len(next(iter(feeds.values()))) if feeds else 0
            samples += n
            where["first"] += n
            where["batch"] += 1
        return observers, where["batch"], samples


def _anchored_observers(executor, job: ShardJob, parts: list) -> dict | None:
    """Empty observers anchored on the stream's first batch, for every shard to start from.

    Observers whose binning the first batch fixes (tf_enhanced's buckets, entropy's T0) merge exactly
    only when all parts bin on the same edges: the first batch of shard 0 (after the constants, as in
    one process) runs alone first, and each shard starts from ``observer.spawn()`` of the result: empty,
    with that batch's anchors (shard 0 counts the batch again, so it is counted once). Costs one batch
    before the shards start. None for one shard or for observers without ``spawn``."""
    if len(parts) < 2:
        return None
    observers, batches, _ = executor.submit(job, 0, parts[0], None, 1).result()
    if not batches or not all(hasattr(o, "spawn") for o in observers.values()):
        return None
    return {root: observer.spawn() for root, observer in observers.items()}


def executor_width(executor) -> int:
    """How many tasks ``executor`` runs at once: ``executor.width`` if it says, a pool's worker count,
    else 1."""
    for attr in ("width", "_max_workers"):
        value = getattr(executor, attr, None)
        if value:
            return max(1, int(value))
    return 1


def calibrate(sim, executor, data, batch_size: int = 16, progress: bool = True, preprocess=None,
              shards: int | None = None) -> None:
    """``sim.compute_encodings`` with the data pass on ``executor`` (see the module docstring).
    ``shards``: how many shards (default: the executor's width)."""
    from ..progress import bar as progress_bar
    from ..quant.quantsim import CalibrationError
    from . import shared

    saved = {name: (q.encoding, q.axis, q.bitwidth) for name, q in sim.quantizers.items()}
    try:
        sim._compute_param_encodings()
        observed = sim._activation_groups()
        members = {name: root for root, names in observed.items() for name in names}
        job = ShardJob(
            graph=sim.graph, constants=sim._calibration_constants(), members=members, roots=list(observed),
            scheme=sim.quant_scheme, options=dict(sim.scheme_options), threads=sim.session.threads,
            outputs=sim._calibration_outputs(observed), batch_size=batch_size, preprocess=preprocess,
            observe_constants=[n for n, q in sim.quantizers.items() if q.kind == "constant" and n in members])
        parts = split(data, sim.graph, batch_size, preprocess, shards or executor_width(executor), executor)
        results = {}
        with shared(executor, job.constants):  # the quantized weights go to each worker once, if it can
            start = _anchored_observers(executor, job, parts)
            bar = progress_bar(len(parts), progress, "calibrating (shards)", unit="sample")
            futures = {executor.submit(job, i, shard, start): i for i, shard in enumerate(parts)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()
        if sum(r[1] for r in results.values()) == 0:
            raise CalibrationError("the calibration data set is empty: no batch was produced")
        merged = results[0][0]
        for i in range(1, len(parts)):
            for root, observer in results[i][0].items():
                merged[root].merge(observer)
    except BaseException:
        for name, (encoding, axis, bitwidth) in saved.items():
            q = sim.quantizers[name]
            q.encoding, q.axis, q.bitwidth = encoding, axis, bitwidth
        raise
    sim._set_activation_encodings(merged, members)
