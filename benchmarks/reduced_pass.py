"""The reduced first pass (index.reduced_dim) against the full-dimension dense search, per probe.

    python benchmarks/reduced_pass.py [--data fashion|mixture1280]

The numpy core alone (no Spark), one core (OPENBLAS_NUM_THREADS=1): cells trained as
build_index trains them (on the 128-d projections, lifted), 8,192 store rows searched in
cell order in blocks of 2,048 (as a search task does), recall@10 of 500 random queries
against exact search. Data: Fashion-MNIST's 70k real 1,280-d embeddings (cells of ~120) or
the first 1M vectors of the 1,280-d mixture (cells of ~370). Results merge into
benchmarks/results/all_pairs.json under "reduced_first_pass".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "all_pairs.json"


def main() -> None:
    from cbir_lib.index import reduce
    from cbir_lib.index.kmeans import assign, train_balanced
    from cbir_lib.neighbors.ivf import CellStore, dense_search
    from cbir_lib.vectors.topk import exact_topk, recall_at_k

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="fashion", choices=["fashion", "mixture1280"])
    args = ap.parse_args()
    cache = ROOT / "benchmarks" / ".cache"
    if args.data == "fashion":
        x = np.load(cache / "fashion_lite0.npz")["x"].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    else:
        x = np.asarray(np.load(cache / "mixture_1000000_1280.npy", mmap_mode="r"))
    n = len(x)
    rng = np.random.default_rng(0)
    n_cells = int(2 * np.sqrt(n))
    sample = np.ascontiguousarray(x[np.sort(rng.choice(n, min(n, 64 * n_cells), replace=False))])
    basis, energy = reduce.fit(sample, 128)
    proj = reduce.project(sample, basis)
    centroids = reduce.lift(sample, proj, train_balanced(proj, n_cells, "angular", seed=0, n_iter=10), "angular")
    cells = np.concatenate([assign(x[s : s + 100_000], centroids, "angular")[:, 0] for s in range(0, n, 100_000)])
    store = CellStore.from_assignment(np.arange(n, dtype=np.int64), x, cells, centroids, "angular")
    store.reduced, store.projection = reduce.project(store.vectors, basis), basis
    q = np.sort(rng.choice(n, 500, replace=False))
    tv, ti = exact_topk(store.vectors[q], store.ids[q], store.vectors, store.ids, 10, "angular")
    rows_out = []
    start = n // 3
    for nprobe in (16, 32, 48):
        for shortlist in (None, 40, 80):
            probes = store.route(store.vectors[q], nprobe, store.cells_of_rows(q))
            v, i = dense_search(store, store.vectors[q], store.ids[q], probes, 10, shortlist=shortlist)
            t0 = time.perf_counter()
            for s in range(start, start + 8192, 2048):
                r = np.arange(s, s + 2048)
                qq = np.ascontiguousarray(store.vectors[r])
                dense_search(store, qq, store.ids[r], store.route(qq, nprobe, store.cells_of_rows(r)), 10, shortlist=shortlist)
            row = {
                "nprobe": nprobe,
                "shortlist": shortlist,
                "recall_at_10": round(recall_at_k(i, ti, tv, v), 4),
                "seconds_per_8192": round(time.perf_counter() - t0, 2),
            }
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    results = json.loads(RESULTS.read_text())
    results.setdefault("reduced_first_pass", {})[args.data] = {
        "n": n,
        "dim": int(x.shape[1]),
        "cells": len(centroids),
        "mean_cell": round(n / len(centroids), 1),
        "reduced_dim": 128,
        "energy": round(energy, 4),
        "threads": 1,
        "rows": rows_out,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
