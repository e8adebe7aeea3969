"""The night's search arithmetic in one thread, without Spark: how much of a benchmark
night's ``search_tasks`` arithmetic is the numpy core, at a given size.

    python benchmarks/night_core.py [--n 1000000] [--nprobe 36] [--threshold-lift 0.06]
                                    [--cells P] [--queries 0.012] [--rebuild-rows 32768]

On ``n`` vectors of the cached 256-d mixture (``all_pairs.py``): k-means cells, as many
as a full build chooses (``kmeans.choose_n_cells``, ``2 sqrt(n)``) or ``--cells``, trained
on 40 vectors a cell; then ``--queries`` of the vectors (1.2 %: a night's added images)
as queries, in the routed search's steps of 16,384 rows, one BLAS thread:

- ``route``: their ``nprobe`` cells and their reverse scans' ``REVERSE_PROBES`` x wider ones,
  routed together as a night does (``CellStore.route_wider``; ``route_apart``: two calls);
- ``search``: :func:`~cbir_lib.neighbors.ivf.dense_search` at ``nprobe`` (a rebuild's
  query costs about this, or less: its cell products are bigger);
- ``search_scan``: the night's fused search and reverse scan
  (:func:`~cbir_lib.neighbors.ivf.search_scan`).

The members' thresholds (each row's last kept score) are each row's 15th best score in
its own cell plus ``--threshold-lift``: the own cell's bound is far below a real list's,
and 0.06 gives ~20 reverse pairs a query, about what the benchmark's nights find.

Each line also gives the cell products' arithmetic rate (GFlop/s: two flops per query,
probed row and dimension; the scan's counts the cells of ``wide`` the search did not
probe), and ``rebuild_search``, the same rate of a rebuild-shaped search on the same
cells in the same run: ``--rebuild-rows`` consecutive store rows (a rebuild's task step
takes its queries in store order, so a cell meets many of them at once) searched at
``nprobe``. A night's queries are a sparse sample, so each cell product is smaller; with
``--cells`` and ``--queries`` chosen to give a cell size and queries per cell of a larger
collection, the rates say how far the night's arithmetic per query would fall there.

Compare ``route + search_scan`` with a night's ``home_s + visit_s + merge_s - read_s -
exact_s`` (``benchmarks/incremental_projection.py``'s arithmetic) at the same size: the
rest is the routed search's own overhead. Nothing is written but a cache of the cells
(``benchmarks/.cache/night_core_<n>.npz``) and a line on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = ROOT / "benchmarks" / ".cache"
K = 15  # a night's lists: k + reserve
STEP = 16384
DIM = 256  # the cached mixture's


def cells(n: int, p: int | None = None):
    from all_pairs import mixture

    from cbir_lib.index.kmeans import assign, choose_n_cells, kmeans
    from cbir_lib.neighbors.ivf import CellStore

    chosen = choose_n_cells(n, DIM)  # as a full build chooses when none is given
    p = p or chosen
    path = CACHE / (f"night_core_{n}.npz" if p == chosen else f"night_core_{n}_{p}.npz")
    if not path.exists():
        x = np.asarray(mixture(n, DIM))  # unit vectors already; the store below is a copy
        c = kmeans(x[np.random.default_rng(0).choice(n, 40 * p, replace=False)], p, "angular", n_iter=10)
        st = CellStore.from_assignment(np.arange(n, dtype=np.int64), x, assign(x, c, "angular")[:, 0].astype(np.int64), c, "angular")
        np.savez(path, ids=st.ids, vectors=st.vectors, offsets=st.offsets, centroids=st.centroids)
    z = np.load(path)
    return CellStore(z["ids"], z["vectors"], z["offsets"], z["centroids"], "angular")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nprobe", type=int, default=36)
    ap.add_argument("--threshold-lift", type=float, default=0.06)
    ap.add_argument("--cells", type=int, default=None, help="cells (default: kmeans.choose_n_cells)")
    ap.add_argument("--queries", type=float, default=0.012, help="the night's queries, a fraction of n")
    ap.add_argument("--rebuild-rows", type=int, default=32768, help="consecutive store rows of the rebuild-shaped search (0: none)")
    ap.add_argument("--route-cells", type=int, default=0, help="also route the queries over this many centroids (drawn from the vectors)")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from cbir_lib.neighbors.ivf import dense_search, search_scan
    from cbir_lib.neighbors.spec import REVERSE_PROBES

    st = cells(args.n, args.cells)
    sizes = np.diff(st.offsets).astype(np.float64)
    dim = st.vectors.shape[1]

    def gflop(cells_: np.ndarray) -> float:  # the cell products' flops, in GFlop
        return 2.0 * dim * float(sizes[np.asarray(cells_, np.int64)].sum()) / 1e9

    thr = np.full(args.n, -np.inf, np.float32)
    for c in range(st.n_cells):
        a, b = int(st.offsets[c]), int(st.offsets[c + 1])
        if b - a > K + 1:
            s = st.vectors[a:b] @ st.vectors[a:b].T
            thr[a:b] = np.partition(s, b - a - K - 1, axis=1)[:, b - a - K - 1]
    thr += np.float32(args.threshold_lift)
    m = int(args.queries * args.n)
    rows = np.sort(np.random.default_rng(1).choice(args.n, m, replace=False))
    q, qi, own = np.ascontiguousarray(st.vectors[rows]), st.ids[rows], st.cells_of_rows(rows)
    out: dict = {"n": args.n, "queries": m, "nprobe": args.nprobe, "cells": st.n_cells, "mean_cell": round(args.n / st.n_cells, 1)}
    with threadpool_limits(1):
        if args.rebuild_rows:
            lo = max(0, args.n // 2 - args.rebuild_rows // 2)
            r_rows = np.arange(lo, min(args.n, lo + args.rebuild_rows))
            rq = np.ascontiguousarray(st.vectors[r_rows])
            t = time.perf_counter()
            r_probes = st.route(rq, args.nprobe, st.cells_of_rows(r_rows))
            out["rebuild_route_s"] = time.perf_counter() - t
            t = time.perf_counter()
            for s in range(0, len(r_rows), STEP):
                dense_search(st, rq[s : s + STEP], st.ids[r_rows[s : s + STEP]], r_probes[s : s + STEP], K)
            out["rebuild_search_s"] = time.perf_counter() - t
            out["rebuild_search_gflops"] = gflop(r_probes) / out["rebuild_search_s"]
            out["rebuild_ms_per_query"] = 1e3 * (out["rebuild_route_s"] + out["rebuild_search_s"]) / len(r_rows)
        wider = math.ceil(REVERSE_PROBES * args.nprobe)
        t = time.perf_counter()
        probes = st.route(q, args.nprobe, own)
        wide = st.route(q, wider, own)
        out["route_apart_s"] = time.perf_counter() - t
        t = time.perf_counter()
        together = st.route_wider(q, args.nprobe, wider, np.ones(m, bool), own)
        out["route_s"] = time.perf_counter() - t
        if not all(np.array_equal(a, b) for a, b in zip(together, (probes, wide), strict=True)):
            raise SystemExit("the routes together are not the routes apart")
        t = time.perf_counter()
        for s in range(0, m, STEP):
            dense_search(st, q[s : s + STEP], qi[s : s + STEP], probes[s : s + STEP], K)
        out["search_s"] = time.perf_counter() - t
        pairs, t = 0, time.perf_counter()
        for s in range(0, m, STEP):
            sl = slice(s, s + STEP)
            pairs += len(search_scan(st, q[sl], qi[sl], probes[sl], K, np.ones(len(q[sl]), bool), wide[sl], thr)[1][0])
        out["search_scan_s"] = time.perf_counter() - t
    out["reverse_pairs"] = pairs
    if args.route_cells:  # routing at a larger collection's number of cells (100M: 20,000)
        from cbir_lib.index.kmeans import assign
        from cbir_lib.neighbors.ivf import CellStore

        c = np.ascontiguousarray(st.vectors[np.random.default_rng(2).choice(args.n, args.route_cells, replace=False)])
        big = CellStore(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(args.route_cells + 1, np.int64), c, "angular")
        big_own = assign(q, c, "angular")[:, 0]
        big.cell_graph(3 * args.nprobe), big.cell_graph(3 * wider)  # built once a process, as in a night's tasks
        with threadpool_limits(1):
            t = time.perf_counter()
            big.route(q, args.nprobe, big_own)
            out["big_route_one_s"] = time.perf_counter() - t
            t = time.perf_counter()
            big.route(q, args.nprobe, big_own), big.route(q, wider, big_own)
            out["big_route_apart_s"] = time.perf_counter() - t
            t = time.perf_counter()
            big.route_wider(q, args.nprobe, wider, np.ones(m, bool), big_own)
            out["big_route_s"] = time.perf_counter() - t
        out["big_route_cells"] = args.route_cells
    extra = np.zeros(0, np.int64)  # the wide cells each query's search did not probe
    for s in range(0, m, STEP):
        w, p = wide[s : s + STEP], probes[s : s + STEP]
        extra = np.concatenate([extra, w[~(w[:, :, None] == p[:, None, :]).any(axis=2)]])
    out["queries_per_cell_step"] = round(min(m, STEP) * args.nprobe / st.n_cells, 1)
    out["search_gflops"] = gflop(probes) / out["search_s"]
    out["search_scan_gflops"] = (gflop(probes) + gflop(extra)) / out["search_scan_s"]
    out["ms_per_query"] = 1e3 * (out["route_s"] + out["search_scan_s"]) / m
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
