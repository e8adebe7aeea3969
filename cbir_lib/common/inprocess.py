"""The driver as a one-machine cluster: the neighbours stage's tasks run in this process.

A small collection pays Spark's fixed costs for nothing: every executor reads the store
and writes its ``.npy`` copy, each of a dozen jobs schedules tasks and starts Python
workers, and in local mode the "executors" are this machine's own cores anyway. Measured
on Fashion-MNIST's 70k x 1,280 here: loading the store on the executors 5.3 s, the exact
sample 2.4 s, the search 12.1 s as Spark tasks (benchmarks/results/all_pairs.json).

:class:`InProcess` answers the few calls the stage makes of a ``SparkContext``
(``parallelize(items, n).mapPartitions(fn).collect()``, ``defaultParallelism``) by
calling the same partition functions here, its slices side by side in a thread pool as
wide as the driver's cores, one BLAS thread each (as one-core tasks). The store is read once into this process's memory (no ``.npy``
copy) and dropped when the block ends. The results are the same rows as the executors'
by construction: the functions are the same, and a query's top-k does not depend on the
block of queries it is searched in (:mod:`cbir_lib.vectors.topk`).

:func:`choose` decides where a run goes (``run.execution``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Set while an InProcess block runs: the stage's store and thread helpers read them.
# "threads": the driver's cores, as many slices side by side; "blas": BLAS threads per slice.
_ACTIVE: dict[str, Any] = {"on": False, "threads": 1, "blas": 1}
LOCK = threading.Lock()  # held while a slice loads what the others share (the store)

# The cost model of neighbors.execution=auto off local mode (see choose()).
SPARK_FIXED_S = 10.0  # store load on the executors and the stage's jobs, measured 8-12 s at 70k-100k here
FLOPS_PER_CORE = 5e9  # dense search's effective float32 multiply-adds x 2 per second per core, measured ~6e9 here
# Slices side by side are threads of one interpreter, and about 12 % of the search holds the
# GIL (the per-cell Python between numpy calls, profiled at 70k x 1,280): by Amdahl they
# stop scaling near 8 threads (projected; measured here with 2). A local master with more
# cores than this is costed like a cluster.
GIL_CORES = 8


def active() -> bool:
    return bool(_ACTIVE["on"])


def threads() -> int:
    """BLAS threads for the partition function running now."""
    return int(_ACTIVE["blas"])


class _Slices:
    """What ``parallelize`` returns: the items in ``n`` slices, as Spark cuts them.

    ``mapPartitions`` runs the slices side by side on the driver's cores, each with one
    BLAS thread, as Spark's tasks with one core each would (numpy releases the GIL in its
    products, sorts and gathers). A lone slice has one BLAS thread too, as a lone task
    would: auto's calibration times the search as one slice of it, and compares that with
    the exact sample's time over every slot, so both must be measured as the search runs
    (with every BLAS thread, the calibration's small products measured slower than they
    run, and auto took exact search where dense was cheaper). Measured at 1M x 256:
    one process with two BLAS threads searched in 179 s what two tasks searched in 144 s,
    as most products there are small (a cell of ~500 rows).
    """

    def __init__(self, items: list, n: int):
        n = max(1, min(n, len(items))) if items else 1
        self.slices = [items[i * len(items) // n : (i + 1) * len(items) // n] for i in range(n)]

    def map(self, f: Callable) -> _Slices:
        out = _Slices([], 1)
        out.slices = [[f(x) for x in s] for s in self.slices]
        return out

    def mapPartitions(self, fn: Callable[[Iterator], Iterable]) -> _Slices:  # noqa: N802 - Spark's name
        out = _Slices([], 1)
        workers = min(len(self.slices), int(_ACTIVE["threads"]))
        if workers <= 1:
            out.slices = [list(fn(iter(s))) for s in self.slices]
            return out
        with ThreadPoolExecutor(workers, thread_name_prefix="cbir-slice") as pool:
            out.slices = list(pool.map(lambda s: list(fn(iter(s))), self.slices))
        return out

    def collect(self) -> list:
        return [x for s in self.slices for x in s]


class InProcess:
    """A stand-in for the ``SparkContext`` of the neighbours stage that runs its tasks here."""

    def __init__(self, threads: int):
        self.defaultParallelism = max(1, threads)  # noqa: N815 - Spark's name

    def parallelize(self, items: Iterable, n: int | None = None) -> _Slices:
        items = list(items)
        return _Slices(items, n or self.defaultParallelism)


@contextlib.contextmanager
def running(threads: int, *caches: dict):
    """Run the block's partition functions in this process, ``threads`` slices side by side.
    What they put in ``caches`` (the stage's loaded stores and forests) is dropped when it
    ends, so a long-lived driver (a notebook, Airflow's worker) does not keep the store."""
    before = [set(c) for c in caches]
    _ACTIVE.update(on=True, threads=max(1, threads), blas=1)
    try:
        yield InProcess(threads)
    finally:
        _ACTIVE.update(on=False, threads=1, blas=1)
        # The slices capped this process's BLAS; give later stages of the driver its default back.
        limit_blas_threads(int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1))
        for cache, keys in zip(caches, before, strict=True):
            for key in set(cache) - keys:
                cache.pop(key, None)


def driver_threads(spark) -> int:
    """Cores the driver may use: a local master's slots, else ``spark.driver.cores`` (1)."""
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        return max(1, min(sc.defaultParallelism, os.cpu_count() or 1))
    return max(1, int(sc.getConf().get("spark.driver.cores", "1")))


def bytes_of(value: str) -> int | None:
    """A Spark-style size ("512m", "4g", "1024") in bytes; None if it is not one."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)b?\s*", str(value).lower())
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ") if m else None


def driver_max_bytes(spark, configured_mb: int) -> int:
    """The most vector bytes the driver's Python may hold: ``run.driver_max_mb``, and in
    cluster deploy mode a third of the driver container's memory overhead, where its Python
    lives (YARN and Kubernetes kill a container past it; the store, the query block and
    the results are about three times the store)."""
    conf = spark.sparkContext.getConf()
    limit = configured_mb << 20
    if conf.get("spark.submit.deployMode", "client") == "cluster":
        overhead = bytes_of(conf.get("spark.driver.memoryOverhead", "0")) or max(
            384 << 20, int(0.1 * (bytes_of(conf.get("spark.driver.memory", "1g")) or 0))
        )
        limit = min(limit, overhead // 3)
    return limit


def choose(
    execution: str,
    *,
    local: bool,
    store_bytes: int,
    driver_max_bytes: int,
    grouped: bool,
    work_flops: float,
    driver_cores: int,
    slots: int,
) -> tuple[bool, str]:
    """Whether the run's tasks go to the driver, and why (for the log and the manifest).

    ``driver`` and ``executors`` are obeyed. ``auto`` keeps the store off the driver above
    ``driver_max_bytes``, and in the executors' groups where it is over their memory budget
    (``grouped``: a budget set that low is asked for). Otherwise, in local mode with at most
    :data:`GIL_CORES` cores, the executors are this machine's cores with Spark's costs on
    top, so the driver; on a cluster (or a bigger local machine), the driver when its
    estimated time (``work_flops`` over at most ``GIL_CORES`` of its cores) beats the
    executors' (over every slot) plus the Spark path's fixed cost.
    """
    if execution != "auto":
        return execution == "driver", f"run.execution={execution}"
    if store_bytes > driver_max_bytes:
        return False, f"store {store_bytes / 2**20:.0f} MB > run.driver_max_mb {driver_max_bytes / 2**20:.0f} MB"
    if grouped:
        return False, "the store is over neighbors.memory_budget: searched in groups on the executors"
    if local and driver_cores <= GIL_CORES:
        return True, f"local master; store {store_bytes / 2**20:.0f} MB fits the driver"
    # Threads share one interpreter: past GIL_CORES of them, count the driver as GIL_CORES.
    driver_cores = min(driver_cores, GIL_CORES)
    on_driver = work_flops / (FLOPS_PER_CORE * driver_cores)
    on_cluster = work_flops / (FLOPS_PER_CORE * max(1, slots)) + SPARK_FIXED_S
    why = f"estimated {on_driver:.1f} s on the driver's {driver_cores} cores against {on_cluster:.1f} s on {slots} slots"
    return on_driver <= on_cluster, why


def limit_blas_threads(n: int) -> bool:
    """Cap numpy's OpenBLAS at ``n`` threads in this process (a task's ``spark.task.cpus``).

    Each Python worker is one task slot; letting every worker's BLAS spawn a thread per
    core oversubscribes the machine (two workers x two threads on two cores here), and
    OpenBLAS threads spin while they wait. Returns whether a cap could be set.
    """
    import ctypes
    import glob

    import numpy as np

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libopenblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(max(1, n)))
                return True
    return False


def task_threads() -> int:
    """The BLAS threads a partition function may use: its task's ``spark.task.cpus`` on an
    executor, this block's share in process, else every core."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is not None:
        return ctx.cpus()
    return threads() if active() else os.cpu_count() or 1
