"""Scale-out: the work of calibration, sensitivity sweeps and searches on many processes or machines.

refquant writes every set of independent evaluations against a ``concurrent.futures.Executor``
(``executor=`` on ``QuantSim.compute_encodings``, ``analyze``, ``mixed_precision``...; default: serially
in this process). Any Executor works: a ``ProcessPoolExecutor``, ``dask.distributed``'s
``Client.get_executor()``, or :class:`~refquant.scale.cluster.DaskExecutor` from :func:`open_executor`,
which also sends the model once per worker and lets workers read their data themselves.

Dask is optional (``pip install refquant[dask]``); only :mod:`refquant.scale.cluster` imports it.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import RefquantError
from .calibration import executor_width
from .shards import Shard, Shards, split

__all__ = ["open_executor", "executor_from_args", "add_arguments", "shared", "executor_width", "Shard", "Shards",
           "split"]


@contextmanager
def open_executor(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int | None = None,
                  timeout: float = 10.0, lost_timeout: float = 60.0):
    """``with open_executor(scheduler=ADDRESS) as ex`` (a running Dask scheduler) or
    ``open_executor(workers=N)`` (a local cluster of N worker processes): a Dask executor, shut down on
    exit. With neither: None, i.e. serial. A scheduler that does not answer within ``timeout`` seconds
    is a RefquantError."""
    if scheduler and workers:
        raise RefquantError("give either --scheduler ADDRESS or --workers N, not both")
    if not scheduler and not workers:
        yield None
        return
    try:
        from . import cluster
    except ImportError as error:
        raise RefquantError(f"--scheduler/--workers need Dask: pip install 'refquant[dask]' ({error})") from None
    executor = (cluster.connect(scheduler, timeout=timeout, lost_timeout=lost_timeout) if scheduler
                else cluster.local_cluster(int(workers), threads_per_worker, lost_timeout=lost_timeout))
    try:
        yield executor
    finally:
        executor.shutdown()


@contextmanager
def shared(executor, *objects):
    """While the block runs, ``objects`` (their big arrays) are on every worker of ``executor`` once,
    if the executor can do that (``executor.share``); for other executors this does nothing."""
    share = getattr(executor, "share", None)
    token = share(*objects) if share is not None else None
    try:
        yield
    finally:
        if token is not None:
            executor.release(token)


def add_arguments(parser, what: str = "the work") -> None:
    """``--scheduler ADDRESS``, ``--workers N`` and ``--scheduler-timeout S`` on a CLI subcommand."""
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help=f"run {what} on the Dask cluster of this scheduler (tcp://host:8786); "
                             "needs refquant[dask]")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help=f"run {what} on a local cluster of N worker processes (Dask if installed, else a "
                             "process pool; default: serially in this process)")
    parser.add_argument("--scheduler-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for --scheduler to answer (default 10)")


@contextmanager
def executor_from_args(args):
    """The executor ``--scheduler``/``--workers`` ask for (None: serial), shut down on exit. Without Dask
    installed, ``--workers N`` falls back to a process pool and ``--scheduler`` is an error."""
    scheduler = getattr(args, "scheduler", None)
    workers = getattr(args, "workers", 0) or 0
    if workers < 0:
        raise RefquantError(f"--workers must be at least 1, got {workers}")
    if workers == 1 and not scheduler:
        workers = 0  # one worker process does nothing a serial run does not
    if workers and not scheduler:
        try:
            import distributed  # noqa: F401
        except ImportError:
            import sys
            from concurrent.futures import ProcessPoolExecutor

            print(f"note: Dask is not installed; --workers {workers} runs a process pool", file=sys.stderr)
            with ProcessPoolExecutor(max_workers=workers) as pool:
                yield pool
            return
    with open_executor(scheduler=scheduler, workers=workers or None,
                       timeout=getattr(args, "scheduler_timeout", 10.0)) as executor:
        yield executor
