"""How many store groups a search reads: the cells' numbering against a numbering in space.

    python benchmarks/group_locality.py INDEX_RUN_DIR [--queries 12000] [--nprobe 36]

``INDEX_RUN_DIR``: a committed index run (``<output>/index/run=<id>``) with centroids, for
example the base of ``benchmarks/incremental.py --keep``. The grouped layout cuts the
cell-sorted store into groups of consecutive rows, so a group holds consecutive cell
numbers. Cell numbers are k-means labels, in no order in space, so a query's ``nprobe``
cells lie in many groups, and a chunk of queries (a night's chunk, a rebuild's query group)
reaches nearly all of them. This draws ``--queries`` store rows (a night's 1.2 %), routes
them to their ``nprobe`` nearest centroids, and counts the groups reached per query and per
chunk of queries in store order, for 8, 64 and 256 groups, under the k-means labels and
under a numbering in space: the centroids ordered by recursive bisection along their
principal direction (``kmeans.order_in_space``, which full builds number their cells by
since 2026-12-05; an index built so is already in that order). Reads only; nothing is
searched.

Results: ``benchmarks/results/group_locality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "group_locality.json"


def reach(position: np.ndarray, counts: np.ndarray, probes: np.ndarray, query_cells: np.ndarray, n_groups: int) -> dict:
    """Groups reached when cell ``c`` is stored at ``position[c]``: per query, and per chunk
    of queries in store order (2, 8 and 64 chunks). The groups are the grouped layout's
    (``budget.group_bounds`` / ``groups_of_cells``), and a probed cell reaches every group
    holding rows of it, as ``budget.route_visits`` counts them."""
    from cbir_lib.neighbors import budget

    order = np.argsort(position)
    offsets = np.r_[0, np.cumsum(counts[order])]
    bounds = budget.group_bounds(int(offsets[-1]), -(-int(offsets[-1]) // n_groups))
    g = np.arange(len(bounds) - 1)
    first, last = np.empty(len(counts), np.int64), np.empty(len(counts), np.int64)
    first[order], last[order] = budget.groups_of_cells(offsets, bounds)
    holds = (first[:, None] <= g[None, :]) & (last[:, None] >= g[None, :])  # cell x group
    out = {"groups": int(g.size), "per_query": round(float(holds[probes].any(axis=1).sum(axis=1).mean()), 2)}
    in_store_order = np.argsort(position[query_cells], kind="stable")
    for n_chunks in (2, 8, 64):
        chunks = np.array_split(in_store_order, n_chunks)
        out[f"per_chunk_of_{n_chunks}"] = round(float(np.mean([holds[probes[c].ravel()].any(axis=0).sum() for c in chunks])), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index_run")
    ap.add_argument("--queries", type=int, default=12_000)
    ap.add_argument("--nprobe", type=int, default=36)
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from cbir_lib.index.kmeans import assign, order_in_space
    from cbir_lib.vectors.arrow import binary_to_numpy

    run = Path(args.index_run)
    c = np.load(run / "centroids.npy").astype(np.float32)
    manifest = json.loads((run / "_manifest.json").read_text())
    counts = np.asarray(manifest["counts"]["per_cell"], np.int64)
    t = pq.read_table(run / "store", columns=["cell", "vector"])
    pick = np.sort(np.random.default_rng(0).choice(t.num_rows, min(args.queries, t.num_rows), replace=False))
    x = binary_to_numpy(t.column("vector").take(pick), c.shape[1])
    cells = t.column("cell").to_numpy()[pick]
    t0 = time.perf_counter()
    probes = assign(x, c, manifest.get("metric") or "angular", args.nprobe)  # the index's routing, nearest first
    labels = np.arange(len(c))
    bo = order_in_space(c)
    in_space = np.empty(len(c), np.int64)
    in_space[bo] = np.arange(len(c))
    out = {
        "index": manifest.get("run_id"),
        "vectors": int(counts.sum()),
        "cells": len(c),
        "dim": int(c.shape[1]),
        "queries": int(len(pick)),
        "nprobe": args.nprobe,
        "kmeans_labels": [reach(labels, counts, probes, cells, g) for g in (8, 64, 256)],
        "bisection_order": [reach(in_space, counts, probes, cells, g) for g in (8, 64, 256)],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
