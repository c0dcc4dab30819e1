"""The Dask adapter: a ``concurrent.futures.Executor`` on a ``dask.distributed`` cluster.

This is the only module of refquant that imports Dask. Everything else hands independent tasks to an
Executor; :class:`DaskExecutor` runs them on a cluster and adds what a cluster needs:

* **The model once per worker.** Tasks are pickled here (cloudpickle); a :class:`~refquant.ir.Graph`
  they reference, and anything given to :meth:`DaskExecutor.share` (its NumPy arrays of 1 KiB and
  more), is replaced by a key. The objects behind the keys are installed on every worker by a Dask
  ``WorkerPlugin`` (on the workers present now, and by the scheduler on every worker that joins
  later, e.g. one a nanny restarted), so a task carries only its own small payload.
* **Data read on the workers.** :meth:`DaskExecutor.shards_of` turns a ``dask.array`` (cut into
  batch-aligned chunks, computed on the workers) or a ``dask.bag`` of image file names into shards;
  a shard task depends on its chunk's Dask future, so the chunk moves from worker to worker (if at
  all), never through the scheduler or the client.
* **Failures.** Dask re-runs the tasks of a worker that died (up to
  ``distributed.scheduler.allowed-failures`` deaths per task); a task that keeps killing workers, or a
  cluster left with no worker for ``lost_timeout`` seconds, fails its future with a
  :class:`~refquant.errors.RefquantError`. Each task's result is delivered once (one Dask future per
  submit), so a re-run task is never counted twice.

:func:`connect` opens a client on a running scheduler (``--scheduler ADDRESS``) with a timeout;
:func:`local_cluster` starts a ``LocalCluster`` of worker processes (``--workers N``), each pinned to
its own cores so that workers do not compete for them.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import threading
import time
import uuid
import weakref
from concurrent.futures import Executor, Future as CFuture

import cloudpickle
import numpy as np
from distributed import Client, Future, LocalCluster, WorkerPlugin
from distributed.scheduler import KilledWorker

from ..errors import RefquantError
from ..ir import Graph

MIN_SHARED_BYTES = 1 << 10  # arrays of a shared object at least this big are sent once per worker

# ------------------------------------------------------------------------------ worker side
_STORE: dict[str, object] = {}  # this worker's shared objects, by key (filled by _SharedObjects)


class _SharedObjects(WorkerPlugin):
    """Installs objects in the worker's store (``setup``) and drops them (``teardown``)."""

    idempotent = False

    def __init__(self, objects: dict):
        self.objects = objects

    def setup(self, worker):
        _STORE.update(self.objects)

    def teardown(self, worker):
        for key in self.objects:
            _STORE.pop(key, None)


class _PinCores(WorkerPlugin):
    """Pins worker number ``worker.name`` to its own ``per_worker`` cores (LocalCluster names workers
    0..N-1), so that N workers on N cores do not time-share them; and puts the worker process in a
    session of its own. Why the session: Linux's CFS autogroup (on by default on desktops and here)
    gives each *session* one fair share of the CPU, so worker processes left in the client's session
    would split one share between them whenever other sessions compete for the CPU. In their own
    sessions they compete as independent processes, as on separate machines."""

    def __init__(self, per_worker: int):
        self.per_worker = per_worker

    def setup(self, worker):
        if hasattr(os, "setsid"):
            try:
                os.setsid()
            except OSError:  # already a session or group leader
                pass
        if not hasattr(os, "sched_setaffinity"):
            return
        cores = sorted(os.sched_getaffinity(0))
        try:
            index = int(worker.name)
        except (TypeError, ValueError):
            return
        first = (index * self.per_worker) % len(cores)
        mine = {cores[(first + i) % len(cores)] for i in range(self.per_worker)}
        threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
        for tid in threads:  # every thread of the process (later ones inherit it from their creator)
            try:
                os.sched_setaffinity(int(tid), mine)
            except OSError:  # a thread that just ended
                pass


def _run(blob: bytes, *deps):
    """A packed task on a worker: unpickle (shared keys from the store, Dask futures resolved by Dask
    into ``deps``) and call it."""

    class Unpacker(pickle.Unpickler):
        def persistent_load(self, pid):
            kind, key = pid
            if kind == "dep":
                return deps[key]
            try:
                return _STORE[key]
            except KeyError:
                raise RuntimeError(f"shared object {key} is not installed on this worker") from None

    fn, args, kwargs = Unpacker(io.BytesIO(blob)).load()
    return fn(*args, **kwargs)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ client side
class _Packer(cloudpickle.Pickler):
    def __init__(self, file, executor: "DaskExecutor", collect: list | None = None):
        super().__init__(file, protocol=5)
        self.executor = executor
        self.deps: list = []
        self._dep_index: dict[int, int] = {}
        self.collect = collect  # share(): gather the big arrays instead of naming them

    def persistent_id(self, obj):
        if isinstance(obj, np.ndarray):
            if self.collect is not None and obj.nbytes >= MIN_SHARED_BYTES and type(obj) is np.ndarray:
                self.collect.append(obj)
                return None
            key = self.executor._keys.get(id(obj))
            return None if key is None else ("shared", key)
        if type(obj) is Graph:
            return ("shared", self.executor._graph_key(obj))
        if isinstance(obj, Future):
            index = self._dep_index.get(id(obj))
            if index is None:
                index = self._dep_index[id(obj)] = len(self.deps)
                self.deps.append(obj)
            return ("dep", index)
        return None


class DaskExecutor(Executor):
    """``concurrent.futures.Executor`` on a ``distributed.Client`` (see the module docstring).

    ``DaskExecutor(client, cluster=None, lost_timeout=60)``; ``cluster`` (a LocalCluster this executor
    started) is closed by :meth:`shutdown` with the client."""

    def __init__(self, client: Client, cluster=None, lost_timeout: float = 60.0, own_client: bool = True):
        self.client = client
        self.cluster = cluster
        self.own_client = own_client
        self.lost_timeout = float(lost_timeout)
        self._keys: dict[int, str] = {}         # id(array or graph) -> store key
        self._held: dict[str, object] = {}      # key -> the object (keeps its id valid)
        self._plugins: dict[str, list[str]] = {}  # plugin name -> its keys
        self._graphs: dict[int, tuple] = {}     # id(graph) -> (fingerprint, key, plugin name)
        self._pending: dict[CFuture, Future] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.task_bytes: list[int] = []  # pickled size of each submitted task (what goes through the scheduler)
        self._watch = threading.Thread(target=self._watchdog, name="refquant-dask-watchdog", daemon=True)
        self._watch.start()

    # ---- what the cluster looks like
    @property
    def width(self) -> int:
        """Tasks the cluster runs at once (total worker threads; at least 1)."""
        return max(1, sum(self.client.nthreads().values()))

    def peak_memory(self) -> dict[str, int]:
        """Peak resident bytes of each worker process, by worker address."""
        return self.client.run(_peak_rss_bytes)

    # ---- sharing
    def _install(self, objects: dict) -> str:
        name = f"refquant-shared-{uuid.uuid4().hex[:12]}"
        self.client.register_plugin(_SharedObjects(objects), name=name)
        self._plugins[name] = list(objects)
        return name

    def _graph_key(self, graph: Graph) -> str:
        """The store key of ``graph``, installing it on the workers the first time (and again after its
        initializers were replaced)."""
        fingerprint = (len(graph.nodes), tuple((n, id(a)) for n, a in graph.initializers.items()))
        known = self._graphs.get(id(graph))
        if known is not None and known[0] == fingerprint and known[3]() is graph:
            return known[1]
        if known is not None:
            self._drop(known[2])
        key = f"graph-{uuid.uuid4().hex}"
        self._held[key] = graph
        name = self._install({key: graph})
        self._graphs[id(graph)] = (fingerprint, key, name, weakref.ref(graph))
        return key

    def share(self, *objects) -> list[str]:
        """Send the big arrays reachable from ``objects`` (and any Graph) to every worker once; tasks
        that reference them afterwards carry a key instead. Returns a token for :meth:`release`."""
        found: list[np.ndarray] = []
        packer = _Packer(io.BytesIO(), self, collect=found)
        packer.dump(objects)
        new = {}
        for array in found:
            if id(array) not in self._keys:
                key = f"array-{uuid.uuid4().hex}"
                self._keys[id(array)] = key
                self._held[key] = array
                new[key] = array
        return [self._install(new)] if new else []

    def release(self, token: list[str]) -> None:
        """Forget what :meth:`share` sent (the workers drop it)."""
        for name in token:
            self._drop(name)

    def _drop(self, name: str) -> None:
        keys = self._plugins.pop(name, [])
        for key in keys:
            obj = self._held.pop(key, None)
            if obj is not None:
                self._keys.pop(id(obj), None)
        try:
            self.client.unregister_worker_plugin(name)
        except Exception:  # workers already gone: nothing to drop
            pass

    # ---- data
    def shards_of(self, data, graph, batch_size: int, n: int):
        """Shards of a ``dask.array`` (axis 0 = samples; rechunked on batch boundaries, each chunk
        computed on a worker) or of a ``dask.bag`` of image file names; None for other data."""
        from .. import data as data_mod
        from .shards import Shard, batch_ranges

        try:
            import dask.array as da
            import dask.bag as db
        except ImportError:  # pragma: no cover - distributed without dask.array
            return None
        inputs = data_mod.graph_inputs(graph)
        size = data_mod._fixed_batch(inputs) or int(batch_size)
        if isinstance(data, da.Array):
            total = int(data.shape[0])
            bounds = [(a * size, min(total, b * size)) for a, b in batch_ranges(math.ceil(total / size), n)]
            chunks = (tuple(b - a for a, b in bounds),) + tuple((d,) for d in data.shape[1:])
            pieces = data.rechunk(chunks).to_delayed().ravel().tolist()
            futures = self.client.compute(pieces)
            return [Shard(f, "slice", first_sample=a) for f, (a, _) in zip(futures, bounds)]
        if isinstance(data, db.Bag):
            # file names only, listed on the cluster (where the files will be read); the workers read the files
            paths = [str(p) for p in self.client.compute(data).result()]
            bad = [p for p in paths if not p.lower().endswith(data_mod.IMAGE_SUFFIXES)]
            if bad:
                raise RefquantError(f"a dask.bag of calibration data must hold image file names; "
                                    f"{bad[0]!r} is not an image file ({', '.join(data_mod.IMAGE_SUFFIXES)})")
            return [Shard(paths[a * size:b * size], "images", first_sample=a * size, label="dask.bag")
                    for a, b in batch_ranges(math.ceil(len(paths) / size), n)]
        return None

    # ---- tasks
    def submit(self, fn, /, *args, **kwargs) -> CFuture:
        if self._closed:
            raise RuntimeError("cannot submit to a DaskExecutor after shutdown")
        buffer = io.BytesIO()
        packer = _Packer(buffer, self)
        packer.dump((fn, args, kwargs))
        self.task_bytes.append(buffer.tell())
        future = self.client.submit(_run, buffer.getvalue(), *packer.deps, pure=False,
                                    key=f"refquant-{getattr(fn, '__name__', type(fn).__name__)}-{uuid.uuid4().hex}")
        result = CFuture()
        with self._lock:
            self._pending[result] = future

        def cancel_on_cancel(cf):
            if cf.cancelled():
                future.cancel()

        result.add_done_callback(cancel_on_cancel)
        future.add_done_callback(lambda f: self._settle(f, result))
        return result

    def _settle(self, future: Future, result: CFuture) -> None:
        try:
            if result.done():
                return
            if future.status == "cancelled":
                _set(result, error=RefquantError(f"Dask task {future.key} was cancelled (lost with the cluster?)"))
                return
            # "lost" (its result died with a worker) also ends up here: exception() waits for Dask's recomputation,
            # and a recomputed task that succeeded has no exception, so its value is taken, never None for it
            error = future.exception()
            if error is None:
                _set(result, value=future.result())
            else:
                if isinstance(error, KilledWorker):
                    error = RefquantError(
                        f"Dask task {future.key}: the workers running it died too many times "
                        f"(distributed.scheduler.allowed-failures); the run stopped ({error})")
                _set(result, error=error)
        except BaseException as error:  # noqa: BLE001 - the caller sees whatever went wrong
            _set(result, error=error)
        finally:  # only now: while a lost task is recomputed, the watchdog still fails it if the cluster is gone
            with self._lock:
                self._pending.pop(result, None)

    def _watchdog(self) -> None:
        """Fail the pending futures when the cluster has had no worker for ``lost_timeout`` seconds."""
        empty_since = None
        while not self._closed:
            time.sleep(0.5)
            with self._lock:
                pending = list(self._pending.items())
            if not pending:
                empty_since = None
                continue
            try:
                workers = len(self.client.nthreads())
            except Exception:  # the scheduler is gone
                workers = 0
            if workers:
                empty_since = None
                continue
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since < self.lost_timeout:
                continue
            error = RefquantError(f"the Dask cluster has had no worker for {self.lost_timeout:g} s: all workers "
                                  f"died or left; the run stopped")
            for result, future in pending:
                with self._lock:
                    self._pending.pop(result, None)
                _set(result, error=error)
                try:
                    future.cancel()
                except Exception:
                    pass

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        if cancel_futures:
            for result in list(self._pending):
                result.cancel()
        for name in list(self._plugins):
            self._drop(name)
        self._closed = True
        if self.own_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _set(result: CFuture, value=None, error: BaseException | None = None) -> None:
    try:
        if error is None:
            result.set_result(value)
        else:
            result.set_exception(error)
    except Exception:  # already settled (cancelled, or failed by the watchdog)
        pass


# ------------------------------------------------------------------------------ construction
def connect(address: str, timeout: float = 10.0, lost_timeout: float = 60.0) -> DaskExecutor:
    """An executor on the running scheduler at ``address`` ("tcp://host:8786" or "host:8786"); a
    :class:`RefquantError` if it does not answer within ``timeout`` seconds (nothing is started)."""
    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        client = Client(address, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise RefquantError(f"Dask scheduler {address!r} did not answer within {timeout:g} s ({error}); "
                            f"check the address, or start one with `dask scheduler`") from None
    return DaskExecutor(client, lost_timeout=lost_timeout)


def local_cluster(workers: int, threads_per_worker: int | None = None, lost_timeout: float = 60.0,
                  memory_limit="auto") -> DaskExecutor:
    """An executor on a new ``LocalCluster`` of ``workers`` processes (one Dask thread each; refquant's
    kernels inside a worker use ``threads_per_worker`` cores, default: this machine's cores shared out).
    :meth:`DaskExecutor.shutdown` stops the cluster."""
    if workers < 1:
        raise RefquantError(f"--workers must be at least 1, got {workers}")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    per_worker = threads_per_worker or max(1, cores // workers)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, memory_limit=memory_limit)
    client = Client(cluster, set_as_default=False)
    try:
        client.register_plugin(_PinCores(per_worker), name="refquant-pin-cores")
        client.wait_for_workers(workers, timeout=120)
    except BaseException:
        client.close()
        cluster.close()
        raise
    return DaskExecutor(client, cluster=cluster, lost_timeout=lost_timeout)
