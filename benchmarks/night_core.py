"""The night's search arithmetic in one thread, without Spark: how much of a benchmark
night's ``search_tasks`` arithmetic is the numpy core, at a given size.

    python benchmarks/night_core.py [--n 1000000] [--nprobe 36] [--threshold-lift 0.06]

On ``n`` vectors of the cached 256-d mixture (``all_pairs.py``): k-means cells, as many
as a full build chooses (``kmeans.choose_n_cells``, ``2 sqrt(n)``), trained on 40 vectors
a cell; then 1.2 % of the vectors (a night's added images) as queries, in the routed
search's steps of 16,384 rows, one BLAS thread:

- ``route``: their ``nprobe`` cells and their reverse scans' ``REVERSE_PROBES`` x wider ones;
- ``search``: :func:`~cbir_lib.neighbors.ivf.dense_search` at ``nprobe`` (a rebuild's
  query costs about this, or less: its cell products are bigger);
- ``search_scan``: the night's fused search and reverse scan
  (:func:`~cbir_lib.neighbors.ivf.search_scan`).

The members' thresholds (each row's last kept score) are each row's 15th best score in
its own cell plus ``--threshold-lift``: the own cell's bound is far below a real list's,
and 0.06 gives ~20 reverse pairs a query, about what the benchmark's nights find.

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


def cells(n: int):
    from all_pairs import mixture

    from cbir_lib.index.kmeans import assign, choose_n_cells, kmeans
    from cbir_lib.neighbors.ivf import CellStore

    path = CACHE / f"night_core_{n}.npz"
    if not path.exists():
        x = np.asarray(mixture(n))  # unit vectors already; the store below is a copy
        p = choose_n_cells(n, x.shape[1])  # as a full build chooses when none is given
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
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from cbir_lib.neighbors.ivf import dense_search, search_scan
    from cbir_lib.neighbors.spec import REVERSE_PROBES

    st = cells(args.n)
    thr = np.full(args.n, -np.inf, np.float32)
    for c in range(st.n_cells):
        a, b = int(st.offsets[c]), int(st.offsets[c + 1])
        if b - a > K + 1:
            s = st.vectors[a:b] @ st.vectors[a:b].T
            thr[a:b] = np.partition(s, b - a - K - 1, axis=1)[:, b - a - K - 1]
    thr += np.float32(args.threshold_lift)
    m = int(0.012 * args.n)
    rows = np.sort(np.random.default_rng(1).choice(args.n, m, replace=False))
    q, qi, own = np.ascontiguousarray(st.vectors[rows]), st.ids[rows], st.cells_of_rows(rows)
    out: dict = {"n": args.n, "queries": m, "nprobe": args.nprobe, "cells": st.n_cells}
    with threadpool_limits(1):
        t = time.perf_counter()
        probes = st.route(q, args.nprobe, own)
        wide = st.route(q, math.ceil(REVERSE_PROBES * args.nprobe), own)
        out["route_s"] = time.perf_counter() - t
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
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
