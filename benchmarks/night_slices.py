"""A night's in-process search split over slices of the driver's slots, at the shipped 1,280-d.

    python benchmarks/night_slices.py [--n 500000] [--queries 6000,1000] [--slices 1,2]
                                      [--nprobe 88] [--repeat 2] [--label NAME]

An in-process night (``cbir_lib/neighbors/incremental.py``'s ``_in_process``) searches its
added images and reverse-scans their cells as ``w`` slices of neighbouring store rows, one
a driver slot, each with one BLAS thread. This runs that partition function
(``_delta_search``) as the night does, without Spark, for a given number of slices on the
same store, queries and members' bounds in one process, the slice counts in turn and
``--repeat`` times: how much a second slot buys, and from how many queries a slice it pays.

On ``n`` vectors of the cached 1,280-d mixture (``all_pairs.py``): k-means cells (``2
sqrt(n)``, angular, trained on 40,000 of them), the reduced first pass's basis (r = 128, as
``index.reduced_dim``) and each member's bounds from a search of every row at
``--bound-nprobe`` (the benchmark rebuild's calibrated 72 at 500k): its threshold (its 10th
score) and its shortlist cut (its 40th reduced score). Then ``--queries`` random rows as the
night's added images, in store order, each one reverse-scanned as well, routed at
``--nprobe`` (a night keeps its base's: 88 at 500k) and ``REVERSE_PROBES`` x wider.

The cells, basis and bounds are cached (``benchmarks/.cache/night_slices_<n>.npz``: ~4 min
here the first time). With ``--label`` the result goes to ``results/incremental.json``'s
``core_checks``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "incremental.json"
DIM, R, K, L = 1280, 128, 10, 40


def store_and_bounds(n: int, bound_nprobe: int):
    """``(store with its reduced vectors, thresholds, cuts)`` of ``n`` mixture vectors."""
    from all_pairs import mixture
    from threadpoolctl import threadpool_limits

    from cbir_lib.index import reduce
    from cbir_lib.index.kmeans import assign, kmeans
    from cbir_lib.neighbors.ivf import CellStore, dense_search

    x = np.ascontiguousarray(mixture(int(n * 1.1), DIM)[:n], dtype=np.float32)
    path = CACHE / f"night_slices_{n}.npz"
    if path.exists():
        z = np.load(path)
        cells, centroids, basis = z["cells"], z["centroids"], z["basis"]
    else:
        sample = x[np.random.default_rng(0).choice(n, 40_000, replace=False)]
        basis, _ = reduce.fit(sample, R)
        centroids = kmeans(sample, int(round(2 * math.sqrt(n))), "angular", n_iter=8)
        cells = assign(x, centroids, "angular")[:, 0]
    store = CellStore.from_assignment(np.arange(n, dtype=np.int64), x, cells.astype(np.int64), centroids, "angular")
    store.reduced, store.projection = reduce.project(store.vectors, basis), basis
    if path.exists() and "thresholds" in z:
        return store, z["thresholds"], z["cuts"]

    def bounds(lo_hi):
        lo, hi = lo_hi
        rows = np.arange(lo, hi)
        q = store.vectors[lo:hi]
        red, _, full = dense_search(
            store, q, store.ids[rows], store.route(q, bound_nprobe, store.cells_of_rows(rows)), K, shortlist=L, raw=True
        )
        return np.sort(full, axis=1)[:, -K], red[:, -1]

    with threadpool_limits(1), ThreadPoolExecutor(2) as ex:
        got = list(ex.map(bounds, [(s, min(n, s + 4096)) for s in range(0, n, 4096)]))
    thresholds = np.concatenate([g[0] for g in got]).astype(np.float32)
    cuts = np.concatenate([g[1] for g in got]).astype(np.float32)
    np.savez(path, cells=cells, centroids=centroids, basis=basis, thresholds=thresholds, cuts=cuts)
    return store, thresholds, cuts


def night(store, rows: np.ndarray, w: int, nprobe: int, thresholds, cuts) -> tuple[float, int]:
    """Seconds and reverse pairs of the night's partition function
    (``incremental._delta_search``: routing, the fused search and reverse scan, the
    shortlists finished, the rows made) on ``rows`` in ``w`` slices of neighbouring store
    rows, run as an in-process night runs them (``inprocess.running``, two threads, one
    BLAS thread each). The store and the members' bounds are handed to it where the night
    reads them from the index's parts and the thresholds files."""
    import pyarrow as pa

    from cbir_lib.common import inprocess
    from cbir_lib.neighbors import incremental, tasks
    from cbir_lib.neighbors.spec import SearchSpec

    spec = SearchSpec(method="dense", k=K, metric="angular", dim=DIM, nprobe=nprobe, reduced_dim=R, shortlist=L, store_key="night-slices")
    qids = store.ids[rows]
    parts = np.array_split(np.arange(len(rows)), w)  # rows are in store order
    batches = [
        pa.RecordBatch.from_arrays([pa.array(qids[p]), pa.array(np.ones(p.size, bool))], names=["image_id", "reverse"]) for p in parts
    ]
    saved = tasks.local_store, incremental._local_thresholds
    tasks.local_store, incremental._local_thresholds = (lambda _spec: store), (lambda _spec, _store: (thresholds, cuts))
    try:
        with inprocess.running(2) as sc:
            t = time.perf_counter()
            out = sc.parallelize(batches, len(batches)).mapPartitions(incremental._delta_search(spec)).collect()
            seconds = time.perf_counter() - t
    finally:
        tasks.local_store, incremental._local_thresholds = saved
    return seconds, sum(int(b.column("reverse").to_numpy(zero_copy_only=False).sum()) for b in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--queries", default="6000,1000", help="the nights' added images, comma-separated")
    ap.add_argument("--slices", default="2,1", help="slices to time, in this order")
    ap.add_argument("--repeat", type=int, default=2, help="times through the slices (each time kept)")
    ap.add_argument("--nprobe", type=int, default=88)
    ap.add_argument("--bound-nprobe", type=int, default=72)
    ap.add_argument("--label", default=None, help="record under core_checks/<label>")
    args = ap.parse_args()
    t = time.perf_counter()
    store, thresholds, cuts = store_and_bounds(args.n, args.bound_nprobe)
    out: dict = {"n": args.n, "dim": DIM, "cells": store.n_cells, "nprobe": args.nprobe, "prepare_s": round(time.perf_counter() - t, 1)}
    runs = {}
    for m in (int(v) for v in args.queries.split(",")):
        rows = np.sort(np.random.default_rng(1).choice(args.n, m, replace=False))
        seconds: dict[str, list[float]] = {}
        pairs = set()
        for _ in range(args.repeat):
            for w in (int(v) for v in args.slices.split(",")):
                s, p = night(store, rows, w, args.nprobe, thresholds, cuts)
                seconds.setdefault(str(w), []).append(round(s, 3))
                pairs.add(p)
        if len(pairs) != 1:
            raise SystemExit(f"the slices found different reverse pairs: {pairs}")
        one = min(seconds["1"]) if "1" in seconds else None
        runs[str(m)] = {
            "reverse_pairs": pairs.pop(),
            "seconds": seconds,
            "speedup_best": {w: round(one / min(v), 2) for w, v in seconds.items()} if one else None,
        }
        print(json.dumps({"queries": m, **runs[str(m)]}), flush=True)
    out["runs"] = runs
    if args.label:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        results = json.loads(RESULTS.read_text())
        results.setdefault("core_checks", {})[args.label] = {
            "script": "benchmarks/night_slices.py " + " ".join(sys.argv[1:]),
            "code": commit,
            **out,
        }
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
