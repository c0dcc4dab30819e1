"""refquant's intra-op parallelism: a shared thread pool whose threads claim work items one at a time.

Why not BLAS's or Numba's own thread pools: both split a job statically, one equal share per thread,
and wait at a barrier for the slowest share. When another process holds one of the cores (calibration
next to a browser, a CI runner, a Dask worker next to another), the thread that lost its core finishes a
scheduler timeslice later, and every op waits for it: MobileNetV2 at batch 8 measured 0.9-3.8 s with
OpenBLAS's two threads on a busy 2-core machine against 0.2 s on one thread. Here the calling thread
claims items too and waits only for items another thread has already started, so a descheduled helper
costs at most one item, never a timeslice per op. BLAS runs single-threaded inside a Session run
(:func:`single_threaded_blas`) and every kernel hands its independent items (images, row bands, column
blocks of a GEMM) to :func:`parallel_for`.

The budget is per thread (``Session(threads=...)`` sets it for the duration of a run): kernels ask
:func:`budget` how many threads they may use, so nested or concurrent sessions never oversubscribe more
than their callers asked for.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0

# below this many multiply-adds a GEMM is not worth a hand-off to another thread (about 20 us of work)
MIN_PARALLEL_FLOPS = 1 << 19
# a split GEMM has at most this many blocks, each at least 16 rows or columns and GEMM_BLOCK_FLOPS of work (a
# block costs ~10 us of calls: MobileNetV2 at batch 1 lost 40 % with 16 blocks of MIN_PARALLEL_FLOPS, 8 % with 8 of
# 2^21, nothing measurable with 8 of 2^22)
MAX_GEMM_BLOCKS = 8
GEMM_BLOCK_FLOPS = 1 << 22


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def budget() -> int:
    """Threads the current thread's kernels may use (1 outside a Session run that set more)."""
    return getattr(_local, "threads", 1)


class thread_budget:
    """Context manager: kernels called in this thread may use ``threads`` threads (None: every core)."""

    def __init__(self, threads: int | None):
        self.threads = available_cores() if threads is None else max(1, int(threads))

    def __enter__(self):
        self._saved = getattr(_local, "threads", 1)
        _local.threads = self.threads
        return self

    def __exit__(self, *exc):
        _local.threads = self._saved
        return False


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads: it starts its own pool when it needs one."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="refquant"), workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def parallel_for(n_items: int, body: Callable[[int], None], threads: int | None = None) -> None:
    """Run ``body(i)`` for i in range(n_items), spread over the thread budget; returns when all are done.

    Items are claimed one at a time from a shared counter by the calling thread and by up to
    ``threads - 1`` pool threads; the caller waits only for items already claimed by others.
    ``body`` must release the GIL for its heavy part (NumPy's BLAS, copies and ufuncs do; Numba
    kernels need ``nogil=True``) and must not depend on the order of items. The first exception
    raised by any item is re-raised here after the claimed items finish.
    """
    threads = budget() if threads is None else threads
    helpers = min(threads, n_items) - 1
    if helpers <= 0:
        for i in range(n_items):
            body(i)
        return
    lock = threading.Lock()
    done = threading.Event()
    state = {"claimed": 0, "finished": 0, "error": None}

    def work() -> None:
        while True:
            with lock:
                if state["claimed"] >= n_items or state["error"] is not None:
                    return
                i = state["claimed"]
                state["claimed"] = i + 1
            try:
                body(i)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
                with lock:
                    state["error"] = state["error"] or exc
            with lock:
                state["finished"] += 1
                if state["finished"] == state["claimed"] and (
                        state["claimed"] >= n_items or state["error"] is not None):
                    done.set()

    pool = _executor(helpers)
    for _ in range(helpers):
        pool.submit(work)
    work()
    with lock:
        if state["finished"] == state["claimed"]:
            done.set()
    done.wait()
    if state["error"] is not None:
        raise state["error"]


def split(length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering range(length), sizes differing by at most one: edge i is
    round(i * length / parts), half to even, in integer arithmetic (np.linspace cost ~15 us a call)."""
    parts = max(1, min(parts, length))
    edges = []
    for i in range(parts + 1):
        quotient, remainder = divmod(i * length, parts)
        edges.append(quotient + (2 * remainder > parts or (2 * remainder == parts and quotient % 2 == 1)))
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def gemm_blocks(m: int, n: int, k: int) -> int:
    """How many blocks :func:`matmul` cuts an [M, K] x [K, N] product into: a function of the shape alone, so
    the result does not depend on the thread budget (BLAS kernels may sum a row differently in a block of
    another shape: OpenBLAS's Haswell kernels do, by one ulp)."""
    return max(1, min(MAX_GEMM_BLOCKS, max(m, n) // 16, m * n * k // GEMM_BLOCK_FLOPS))


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
           epilogue: Callable[[np.ndarray, slice], None] | None = None) -> np.ndarray:
    """``out = a @ b`` for 2-D a [M, K] and b [K, N], split into row or column blocks shared by the threads.

    The wider of M and N is cut into :func:`gemm_blocks` blocks (up to 8, so a slow thread holds back one
    small block), whatever the thread budget, so every thread count gives the same bits; each block is one
    single-threaded BLAS call writing its slice of ``out`` in place, then ``epilogue(block, rows)`` (rows: the
    block's row slice of out) while the block is in cache.
    """
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.result_type(a, b))
    parts = gemm_blocks(m, n, k)
    if parts == 1:
        np.matmul(a, b, out=out)
        if epilogue is not None:
            epilogue(out, slice(None))
        return out
    if n >= m:
        blocks = split(n, parts)

        def column_block(i):
            cols = slice(*blocks[i])
            np.matmul(a, b[:, cols], out=out[:, cols])
            if epilogue is not None:
                epilogue(out[:, cols], slice(None))

        parallel_for(len(blocks), column_block)
    else:
        blocks = split(m, parts)

        def row_block(i):
            rows = slice(*blocks[i])
            np.matmul(a[rows], b, out=out[rows])
            if epilogue is not None:
                epilogue(out[rows], rows)

        parallel_for(len(blocks), row_block)
    return out


class single_threaded_blas:
    """Context manager: BLAS uses one thread (refquant's pool parallelizes around it) while any thread is inside
    one; the last to leave restores BLAS's thread count.

    OpenBLAS's thread count is one setting for the whole process, so it is counted process-wide here.
    threadpoolctl's ``limit`` (3.8) lets only one "controlling" Python thread change it: a Session running in
    any other thread (an executor's worker, refquant's own pool) then ran its GEMMs with OpenBLAS's threads,
    whose split of a GEMM changes the last bit of its sums on some CPUs (OpenBLAS 0.3.31, Haswell kernels:
    13,109 of 131,072 elements of a 32x144 by 144x4096 product), so the same model gave other bits there."""

    _lock = threading.Lock()
    _depth = 0
    _libraries: list | None = None
    _saved: list = []

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._libraries is None:
                from threadpoolctl import ThreadpoolController

                cls._libraries = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
            if cls._depth == 0:
                cls._saved = [lib.get_num_threads() for lib in cls._libraries]
                for lib in cls._libraries:
                    _set_blas_threads(lib, 1)
            cls._depth += 1
        return self

    def __exit__(self, *exc):
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                for lib, threads in zip(cls._libraries, cls._saved):
                    if threads is not None:
                        _set_blas_threads(lib, threads)
        return False


def _set_blas_threads(library, threads: int) -> None:
    """Set a BLAS library's (process-wide) thread count from any Python thread: threadpoolctl's public setter
    ignores calls from threads other than its controlling one for OpenBLAS's own thread pool."""
    setter = getattr(library, "_real_set_num_threads", None) or library.set_num_threads
    setter(threads)


# below this many elements an element-wise op is not worth a hand-off (memory-bound: ~50 us)
MIN_PARALLEL_ELEMENTS = 1 << 16


def elementwise(fn: Callable, out: np.ndarray, *operands) -> np.ndarray:
    """``fn(*operands, out=out)`` for a NumPy ufunc-like ``fn`` whose operands broadcast to ``out.shape``,
    split along out's first axis that has enough rows for the thread budget. Floating-point
    exceptions are ignored (IEEE results, no warnings), as ONNX kernels compute."""
    threads = budget()
    axis = next((a for a in range(min(2, out.ndim)) if out.shape[a] >= 2 * threads), None)
    if threads <= 1 or out.size < MIN_PARALLEL_ELEMENTS or axis is None:
        with np.errstate(all="ignore"):
            fn(*operands, out=out)
        return out
    shaped = [np.asarray(op) for op in operands]
    shaped = [op.reshape((1,) * (out.ndim - op.ndim) + op.shape) if op.ndim < out.ndim else op for op in shaped]
    blocks = split(out.shape[axis], 4 * threads)
    lead = (slice(None),) * axis

    def block(i):
        cut = lead + (slice(*blocks[i]),)
        with np.errstate(all="ignore"):  # errstate is per thread: the pool's threads start with warnings on
            fn(*[op if op.shape[axis] == 1 else op[cut] for op in shaped], out=out[cut])

    parallel_for(len(blocks), block)
    return out
