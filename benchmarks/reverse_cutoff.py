"""A lever for the night's reverse scan at 1,280-d, measured in isolation: ask of each
(member, added image) pair what the member's own search would ask, its shortlist's cut.

    python benchmarks/reverse_cutoff.py [--data fashion|mixture1280] [--n 70000] [--write LABEL]

At the shipped 1,280 dims a search with the reduced first pass scores each probed row by
its 128-d projection and keeps the best ``L`` (``neighbors.shortlist``, 4k = 40) for the
full-dimension finish. A night's reverse scan instead multiplies every (added image,
member) pair of ``REVERSE_PROBES`` x ``nprobe`` cells at full dimension and keeps those that
beat the member's last score: at 500k x 1,280 that scan was 7.8 s of the night's 14.2 s
search (README, "At the shipped 1,280 dimensions"), and the night's search 12-13 % of the
rebuild's, against ~5 % at 256-d.

A pair the member's own search would not shortlist, ``<Pq, Px>`` below the member's
``L``-th reduced score (its *cut*), is a pair a rebuild would not find either (unless the
night deleted one of the member's ``L``: that can only lower its cut). So a scan
that first compares each pair's reduced score with the member's cut, and scores at full
dimension only the pairs that pass, asks what the rebuild asks. This measures, on the
same collection and night as ``reverse_bound``'s prototype (79083e0, reverted):

- ``pairs``: the full scan's reverse pairs over the wide cells; of an every-cell scan's,
  the share they hold; and the share whose reduced score passes the member's cut
  (``kept``);
- ``candidates``: the share of visited pairs that pass the cut (all of them get a
  full-dimension pair score);
- ``full_s`` against ``cut_s``: the scan at full dimension (``ivf.reverse_scan``), and a
  prototype of the cut scan written here (the reduced product per cell, the comparison,
  the candidates' pair scores), one thread, best of two. A night fused with its shortlist
  search would have the reduced products of the probed half already.

- ``night_core``: the night's search core, the shortlist search and the full-dimension
  scan apart (as a night runs them today), against the library's fused core with the cuts
  (``ivf.search_scan(..., shortlist, row_cuts)``), whose scan takes the search's own
  reduced products for the probed cells. It must give the same lists, and the prototype's
  pairs less at most 0.1 % (the core checks the cut by exact reduced pair scores).

The members' cuts and last scores come from the shortlist search of every row at the
night's ``nprobe`` (its raw shortlist, ``ivf.dense_search(..., raw=True)``), as a full run
would find them. Session 42 wired the core into the pipeline: every dense run keeps each
list's cut (the snapshot's ``_cuts/``) and a night's reverse scan takes them
(``benchmarks/incremental.py`` measures the night). ``cut_s`` here is still this script's
prototype, recorded before the core existed; ``night_core`` is the library's.
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


def cut_scan(store, xr, q, qr, wide, thr, cut):
    """The prototype: per (cell, added images visiting it) the reduced product, the pairs
    at or above the member's cut, their full pair scores, those at or above its last score:
    ``(store rows, query indices, candidates scored)``."""
    from cbir_lib.neighbors.ivf import _pairs_by_cell
    from cbir_lib.vectors.topk import pair_scores, slack, where2d

    m = len(q)
    rows_, pos_ = [], []
    low_cut = np.where(np.isfinite(cut), slack(cut), cut)  # +inf (the added): nothing passes
    for cell, rows in _pairs_by_cell(np.asarray(wide).ravel(), np.repeat(np.arange(m), wide.shape[1])):
        a, b = int(store.offsets[cell]), int(store.offsets[cell + 1])
        s = qr[rows] @ xr[a:b].T
        r, c = where2d(s >= low_cut[a:b][None, :])
        if r.size:
            rows_.append(rows[r])
            pos_.append(a + c)
    if not rows_:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    qi, pos = np.concatenate(rows_), np.concatenate(pos_)
    exact = pair_scores(q, qi, store.vectors, pos, "angular")
    keep = exact >= thr[pos]
    return pos[keep], qi[keep], int(qi.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("fashion", "mixture1280"), default="fashion")
    ap.add_argument("--n", type=int, default=70_000)
    ap.add_argument("--added", type=float, default=0.012)
    ap.add_argument("--write", help="record under core_checks.reverse_cutoff.<LABEL>")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from cbir_lib.index import reduce
    from cbir_lib.index.kmeans import assign, choose_n_cells, train_balanced
    from cbir_lib.neighbors.ivf import CellStore, dense_search, reverse_scan
    from cbir_lib.neighbors.spec import REVERSE_PROBES
    from cbir_lib.vectors.topk import finish_shortlist, prepare

    x = prepare(vectors(args.data, args.n), "angular")
    n, d = x.shape
    rng = np.random.default_rng(0)
    sample = x[rng.choice(n, min(n, 40_000), replace=False)]
    basis, energy = reduce.fit(sample, 128)
    xs = reduce.project(sample, basis)
    c = reduce.lift(sample, xs, train_balanced(xs, choose_n_cells(n, d), "angular", seed=0), "angular")
    full = CellStore.from_assignment(np.arange(n, dtype=np.int64), x, assign(x, c, "angular")[:, 0], c, "angular")
    xr = reduce.project(full.vectors, basis)
    red = CellStore(full.ids, full.vectors, full.offsets, full.centroids, "angular", xr, basis)
    nprobe = max(1, round(full.n_cells / 14))  # about what method=auto calibrated at these sizes
    wider = int(np.ceil(REVERSE_PROBES * nprobe))
    with threadpool_limits(2):
        own = full.cells_of_rows(np.arange(n))
        probes_all = full.route(full.vectors, nprobe, own)
        shortlists = dense_search(red, full.vectors, full.ids, probes_all, K, shortlist=SHORTLIST, raw=True)
        red_l = shortlists[0]
        v, _ = finish_shortlist(*shortlists, K, "angular", full.vectors)  # as the finished search gives them
    thr, cut = v[:, K - 1].copy(), red_l[:, SHORTLIST - 1].copy()
    m = int(args.added * n)
    rows = np.sort(rng.choice(n, m, replace=False))
    thr[rows], cut[rows] = np.inf, np.inf  # the added: their lists are searched
    q, qids, qr = np.ascontiguousarray(full.vectors[rows]), full.ids[rows], np.ascontiguousarray(xr[rows])
    probes, wide = full.route_wider(q, nprobe, wider, np.ones(m, bool), own[rows])
    with threadpool_limits(2):
        every = reverse_scan(full, q, qids, np.tile(np.arange(full.n_cells, dtype=np.int32), (m, 1)), thr)
    with threadpool_limits(1):
        times: dict[str, list[float]] = {"full": [], "cut": []}
        for _ in range(2):
            t = time.perf_counter()
            pos, qi, _ = reverse_scan(full, q, qids, wide, thr)
            times["full"].append(time.perf_counter() - t)
            t = time.perf_counter()
            cpos, cqi, n_cand = cut_scan(full, xr, q, qr, wide, thr, cut)
            times["cut"].append(time.perf_counter() - t)
        # The night's search core as the library's numpy core runs it: the shortlist
        # search and the full-dimension scan apart (the night today), against the fused core
        # whose scan takes the search's reduced products and the members' cuts.
        from cbir_lib.neighbors.ivf import search_scan

        every_q = np.ones(m, bool)
        core = {"before": [], "after": []}
        for _ in range(2):
            t = time.perf_counter()
            fb = dense_search(red, q, qids, probes, 10, shortlist=SHORTLIST)
            reverse_scan(full, q, qids, wide, thr)
            core["before"].append(time.perf_counter() - t)
            t = time.perf_counter()
            fa, ra = search_scan(red, q, qids, probes, 10, every_q, wide, thr, shortlist=SHORTLIST, row_cuts=cut)
            core["after"].append(time.perf_counter() - t)
        if not all(np.array_equal(a_, b_) for a_, b_ in zip(fa, fb, strict=True)):
            raise SystemExit("the fused core's lists are not the shortlist search's")
        lib, proto = set(zip(ra[0].tolist(), ra[1].tolist(), strict=True)), set(zip(cpos.tolist(), cqi.tolist(), strict=True))
        # The library checks the cut by exact reduced pair scores; the prototype by the product's.
        if not lib <= proto or len(proto - lib) > 1e-3 * len(proto):
            raise SystemExit("the fused core's reverse pairs are not the prototype's")
    got = set(zip(pos.tolist(), qi.tolist(), strict=True))
    truth = set(zip(every[0].tolist(), every[1].tolist(), strict=True))
    cut_pairs = set(zip(cpos.tolist(), cqi.tolist(), strict=True))
    if not cut_pairs <= got:
        raise SystemExit("the cut scan found a pair the full scan did not")
    passes = np.einsum("ij,ij->i", xr[pos], qr[qi]) >= cut[pos] - 1e-5
    visited = int(np.diff(full.offsets)[wide].sum())
    full_s, cut_s = min(times["full"]), min(times["cut"])
    out = {
        "data": args.data,
        "n": n,
        "dim": d,
        "energy_at_128": round(energy, 4),
        "cells": int(full.n_cells),
        "nprobe": nprobe,
        "reverse_cells": wider,
        "added": m,
        "shortlist": SHORTLIST,
        "pairs_full_scan": len(got),
        "pairs_every_cell": len(truth),
        "full_scan_holds": round(len(got & truth) / max(1, len(truth)), 4),
        "pairs_cut_scan": len(cut_pairs),
        "kept": round(len(cut_pairs) / max(1, len(got)), 4),
        "kept_by_reduced_score": round(float(passes.mean()), 4) if passes.size else None,
        "visited_pairs": visited,
        "candidates": n_cand,
        "candidate_share": round(n_cand / max(1, visited), 5),
        "full_s": round(full_s, 3),
        "cut_s": round(cut_s, 3),
        "ratio": round(cut_s / full_s, 3),
        "runs_s": {k: [round(t, 3) for t in v_] for k, v_ in times.items()},
        "night_core": {
            "before_s": round(min(core["before"]), 3),
            "after_s": round(min(core["after"]), 3),
            "ratio": round(min(core["after"]) / min(core["before"]), 3),
            "runs_s": {k: [round(t, 3) for t in v_] for k, v_ in core.items()},
            "pairs": len(lib),
            "what": "the shortlist search and the full-dimension scan apart, against search_scan(shortlist, row_cuts)",
        },
        "threads": 1,
        "note": "cut_s: a prototype in this script; night_core: the library's numpy core, which nights call since session 42",
    }
    print(json.dumps(out), flush=True)
    if args.write:
        d_ = json.loads(RESULTS.read_text())
        d_.setdefault("core_checks", {}).setdefault("reverse_cutoff", {})[args.write] = out
        RESULTS.write_text(json.dumps(d_, indent=1) + "\n")


if __name__ == "__main__":
    main()
