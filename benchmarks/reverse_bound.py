"""An incremental night's search core on real 1,280-d embeddings, before and after the
reverse scan's reduced two-step pass (one thread, no Spark).

    python benchmarks/reverse_bound.py [--data fashion|mixture1280] [--n 70000] [--nprobe 0]
                                       [--reduced 128] [--added 0.012] [--write LABEL]

The collection: ``--data fashion`` (the default), the 70,000 Fashion-MNIST images embedded
by this project's extract at its defaults (``all_pairs.py``); ``mixture1280``, the first
``--n`` rows of the 1,280-d mixture cache of ``incremental.py``. As an index built on them
keeps it: the basis of the ``--reduced`` top directions (:func:`cbir_lib.index.reduce.fit`
on a sample), each row's projection on it, k-means cells (``kmeans.choose_n_cells``) trained
on the projections and lifted to full dimension (``reduce.lift``), rows assigned at full
dimension.

The night: ``--added`` of the rows, drawn at random, are the added images (threshold
``+inf``: their lists are searched); every other row's threshold is the last score of its
list, its top-15 (k + reserve) from the shortlist search at ``--nprobe`` (0: the cells' count /
14, about what ``method=auto`` calibrated at these sizes), as a night reads it from the
lists. The added images are searched at ``nprobe`` and reverse-scanned over
``REVERSE_PROBES`` x as many cells, in both of auto's modes:

- ``shortlist`` (the reduced first pass, shortlist 40 = 4k): before, the shortlist search
  and then the reverse scan at full dimension (the night's two calls until now); after,
  :func:`~cbir_lib.neighbors.ivf.search_scan` with the shortlist, whose reverse scan takes
  the search's reduced products as the first step of its bound;
- ``full_dim`` (auto chose full dimension): before, ``search_scan`` on the store without
  its reduced vectors; after, on the store with them (the cells only the scan visits take
  the two steps).

Each is timed twice, alternating, and the best kept. The searches must give the same lists
bit for bit, and the reverse pairs after must be a subset of those before with the same
scores (the run stops otherwise); ``lost`` counts the pairs before that are not after.
``--write`` records the line under ``core_checks.reverse_bound.<LABEL>`` of
``benchmarks/results/incremental.json``.
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
RESULTS = ROOT / "benchmarks" / "results" / "incremental.json"
K = 15  # a night's lists: k + reserve
SHORTLIST = 40  # neighbors.shortlist's default, 4k


def vectors(data: str, n: int) -> np.ndarray:
    if data == "fashion":
        from all_pairs import dataset

        return np.asarray(dataset("fashion", 0)[1][:n], dtype=np.float32)
    from all_pairs import mixture

    return np.array(mixture(550_000, 1280)[:n], dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("fashion", "mixture1280"), default="fashion")
    ap.add_argument("--n", type=int, default=70_000)
    ap.add_argument("--nprobe", type=int, default=0)
    ap.add_argument("--reduced", type=int, default=128)
    ap.add_argument("--added", type=float, default=0.012)
    ap.add_argument("--write", help="record under core_checks.reverse_bound.<LABEL>")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from cbir_lib.index import reduce
    from cbir_lib.index.kmeans import assign, choose_n_cells, train_balanced
    from cbir_lib.neighbors.ivf import REVERSE_RESIDUAL, CellStore, dense_search, reverse_scan, search_scan
    from cbir_lib.neighbors.spec import REVERSE_PROBES
    from cbir_lib.vectors.topk import prepare

    x = prepare(vectors(args.data, args.n), "angular")
    n, d = x.shape
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    sample = x[rng.choice(n, min(n, 40_000), replace=False)]
    basis, energy = reduce.fit(sample, args.reduced)
    xr_sample = reduce.project(sample, basis)
    p = choose_n_cells(n, d)
    c = reduce.lift(sample, xr_sample, train_balanced(xr_sample, p, "angular", seed=0), "angular")
    ids = np.arange(n, dtype=np.int64)
    full = CellStore.from_assignment(ids, x, assign(x, c, "angular")[:, 0], c, "angular")
    xr = reduce.project(full.vectors, basis)
    bounded = CellStore(full.ids, full.vectors, full.offsets, full.centroids, "angular", xr, basis)
    nprobe = args.nprobe or max(1, round(full.n_cells / 14))
    wider = math.ceil(REVERSE_PROBES * nprobe)
    build_s = time.perf_counter() - t0

    with threadpool_limits(2):  # the setup: every list, as the reduced first pass finds it
        t0 = time.perf_counter()
        own = full.cells_of_rows(np.arange(n))
        v, _ = dense_search(bounded, full.vectors, full.ids, full.route(full.vectors, nprobe, own), K, shortlist=max(SHORTLIST, K))
        lists_s = time.perf_counter() - t0
    with threadpool_limits(1):
        thr = v[:, K - 1].copy()
        m = int(args.added * n)
        rows = np.sort(rng.choice(n, m, replace=False))
        thr[rows] = np.inf
        q, qids = np.ascontiguousarray(full.vectors[rows]), full.ids[rows]
        probes, wide = full.route_wider(q, nprobe, wider, np.ones(m, bool), own[rows])
        bounded.residual_norms()  # once per store load, as a task's store keeps it
        scan = np.ones(m, bool)

        def before_short():
            return dense_search(bounded, q, qids, probes, 10, shortlist=SHORTLIST), reverse_scan(full, q, qids, wide, thr)

        runs = {
            "shortlist": (before_short, lambda: search_scan(bounded, q, qids, probes, 10, scan, wide, thr, shortlist=SHORTLIST)),
            "full_dim": (
                lambda: search_scan(full, q, qids, probes, 10, scan, wide, thr),
                lambda: search_scan(bounded, q, qids, probes, 10, scan, wide, thr),
            ),
        }
        out = {
            "data": args.data,
            "n": n,
            "dim": d,
            "reduced_dim": int(basis.shape[1]),
            "energy": round(energy, 4),
            "cells": int(full.n_cells),
            "nprobe": nprobe,
            "reverse_cells": wider,
            "added": m,
            "reverse_residual": REVERSE_RESIDUAL,
        }
        for mode, (before, after) in runs.items():
            times = {"before": [], "after": []}
            got = {}
            for _ in range(2):
                for side, fn in (("before", before), ("after", after)):
                    t = time.perf_counter()
                    got[side] = fn()
                    times[side].append(time.perf_counter() - t)
            (fb, rb), (fa, ra) = got["before"], got["after"]
            if not all(np.array_equal(a, b) for a, b in zip(fb, fa, strict=True)):
                raise SystemExit(f"{mode}: the searches' lists differ")
            pairs_b = dict(zip(zip(rb[0].tolist(), rb[1].tolist(), strict=True), rb[2].tolist(), strict=True))
            pairs_a = dict(zip(zip(ra[0].tolist(), ra[1].tolist(), strict=True), ra[2].tolist(), strict=True))
            if any(pairs_b.get(key) != sc for key, sc in pairs_a.items()):
                raise SystemExit(f"{mode}: a reverse pair after is not one before, or scores differ")
            best_b, best_a = min(times["before"]), min(times["after"])
            out[mode] = {
                "before_s": round(best_b, 3),
                "after_s": round(best_a, 3),
                "ratio": round(best_a / best_b, 3),
                "runs_s": {k_: [round(t, 3) for t in v_] for k_, v_ in times.items()},
                "pairs_before": len(pairs_b),
                "pairs_after": len(pairs_a),
                "lost": len(pairs_b) - len(pairs_a),
            }
    out["setup_s"] = {"build": round(build_s, 1), "lists": round(lists_s, 1)}
    out["threads"] = 1
    print(json.dumps(out), flush=True)
    if args.write:
        d_ = json.loads(RESULTS.read_text())
        d_.setdefault("core_checks", {}).setdefault("reverse_bound", {})[args.write] = out
        RESULTS.write_text(json.dumps(d_, indent=1) + "\n")


if __name__ == "__main__":
    main()
