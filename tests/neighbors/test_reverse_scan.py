"""The reverse scan of incremental nights against a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.neighbors.ivf import dense_search, reverse_scan, search_scan
from tests.neighbors.test_ivf import build, clustered


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
def test_reverse_scan_finds_every_member_a_query_now_beats(metric):
    x = clustered(800, 12, seed=3)
    ids = np.arange(800, dtype=np.int64) * 7 - 2000
    store = build(x, ids, metric, 10)
    # Each member's threshold: its own 5th-best score (exact), a few -inf (takes anything)
    # and +inf (takes nothing: its list is searched anyway).
    probes_all = store.route(store.vectors, store.n_cells)
    v, _ = dense_search(store, store.vectors, store.ids, probes_all, 5)
    thr = v[:, 4].copy()
    thr[::97] = -np.inf
    thr[5::89] = np.inf
    rng = np.random.default_rng(1)
    qpos = rng.choice(800, 40, replace=False)
    q = store.vectors[qpos]
    qids = store.ids[qpos]
    probes = store.route(q, 3)
    pos, qi, sc = reverse_scan(store, q, qids, probes, thr)
    # The oracle: every (member of a probed cell, query) pair at or above the member's threshold.
    want = set()
    for j in range(len(q)):
        for cell in probes[j]:
            for r in range(store.offsets[cell], store.offsets[cell + 1]):
                if store.ids[r] == qids[j]:
                    continue
                if metric == "euclidean":
                    s = -float(np.linalg.norm(q[j].astype(np.float64) - store.vectors[r]))
                else:
                    s = float(q[j].astype(np.float64) @ store.vectors[r])
                if s >= thr[r] + 1e-5 * max(1.0, abs(thr[r])) if np.isfinite(thr[r]) else thr[r] < 0:
                    want.add((r, j))
    got = set(zip(pos.tolist(), qi.tolist(), strict=True))
    assert want <= got
    # Whatever more it returns sits on the threshold (within float error), never a +inf row.
    for r, j in got - want:
        assert np.isfinite(thr[r]) and abs(sc[list(zip(pos, qi, strict=True)).index((r, j))] - thr[r]) < 1e-4
    assert not np.isin(pos, np.flatnonzero(thr == np.inf)).any()
    assert not (store.ids[pos] == qids[qi]).any()


def test_reverse_scan_scores_are_the_members_own_pair_scores():
    """A merged list must rank like a searched one: the reverse score of (member, query) is
    the score the member's own search reports for that query."""
    x = clustered(300, 8, seed=5)
    ids = np.arange(300, dtype=np.int64)
    store = build(x, ids, "angular", 4)
    q, qids = store.vectors[:20], store.ids[:20]
    thr = np.full(300, -np.inf, np.float32)
    pos, qi, sc = reverse_scan(store, q, qids, store.route(q, store.n_cells), thr)
    v, i = dense_search(store, store.vectors[pos], store.ids[pos], store.route(store.vectors[pos], store.n_cells), 300)
    for row, (_p, j, s) in enumerate(zip(pos, qi, sc, strict=True)):
        at = np.flatnonzero(i[row] == qids[j])
        assert at.size == 1 and v[row, at[0]] == s


def test_reverse_scan_of_nothing():
    x = clustered(50, 4)
    store = build(x, np.arange(50, dtype=np.int64), "angular", 2)
    pos, qi, sc = reverse_scan(
        store, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros((0, 2), np.int32), np.zeros(50, np.float32)
    )
    assert pos.size == qi.size == sc.size == 0


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
@pytest.mark.parametrize("seed", range(6))
def test_search_scan_is_the_search_and_the_scan(metric, seed):
    """The fused night core gives, bit for bit, the search of every query and the reverse
    scan of the scanned ones: wide cells that extend the probed ones, wide cells that are
    another route altogether (a probed cell not scanned, a scanned one not probed), self
    pairs, thresholds of -inf and +inf, and a block past SUB_BLOCK's sub-blocks."""
    rng = np.random.default_rng(seed)
    n = 900
    x = clustered(n, 10, seed=seed)
    ids = rng.permutation(n * 3)[:n].astype(np.int64) - n
    store = build(x, ids, metric, 12)
    m = 60
    qpos = rng.choice(n, m, replace=False)
    q, qids = np.ascontiguousarray(store.vectors[qpos]), store.ids[qpos]
    v_all, _ = dense_search(store, store.vectors, store.ids, store.route(store.vectors, store.n_cells), 4)
    thr = v_all[:, 3].copy()
    thr[rng.random(n) < 0.05] = -np.inf
    thr[rng.random(n) < 0.05] = np.inf
    scan = rng.random(m) < (0.0, 0.5, 0.9, 1.0, 0.7, 0.7)[seed]
    probes = store.route(q, 3)
    wide = store.route(q[scan], 5)
    if seed >= 4:  # routes that disagree: another cell first, or the probed cells shuffled away
        wide = np.ascontiguousarray(np.roll(wide, seed - 3, axis=0))
    kth = None if metric == "euclidean" else np.full(m, -np.inf, np.float32)
    (v, i), (pos, qi, sc) = search_scan(store, q, qids, probes, 5, scan, wide, thr, thresholds=kth)
    v0, i0 = dense_search(store, q, qids, probes, 5, thresholds=kth)
    pos0, qi0, sc0 = reverse_scan(store, q[scan], qids[scan], wide, thr)
    assert np.array_equal(i, i0) and np.array_equal(v, v0)
    assert np.array_equal(pos, pos0) and np.array_equal(qi, qi0) and np.array_equal(sc, sc0)
    assert scan.any() or pos.size == 0


def test_search_scan_of_a_big_block_matches():
    """Past SUB_BLOCK queries dense_search selects in sub-blocks; the scan sees every product."""
    import cbir_lib.neighbors.ivf as ivf

    x = clustered(3000, 8, seed=9)
    store = build(x, np.arange(3000, dtype=np.int64), "angular", 6)
    q, qids = np.ascontiguousarray(store.vectors[:2500]), store.ids[:2500]
    scan = np.arange(2500) % 3 != 0
    probes, wide = store.route(q, 2), store.route(q[scan], 3)
    thr = np.full(3000, 0.9, np.float32)
    assert len(q) > ivf.SUB_BLOCK
    (v, i), got = search_scan(store, q, qids, probes, 5, scan, wide, thr)
    v0, i0 = dense_search(store, q, qids, probes, 5)
    want = reverse_scan(store, q[scan], qids[scan], wide, thr)
    assert np.array_equal(i, i0) and np.array_equal(v, v0)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)) and want[0].size


def shortlisted(x: np.ndarray, ids: np.ndarray, metric: str, n_cells: int, r: int, nprobe: int, L: int, seed: int):
    """A store with the reduced first pass's vectors (an r-d basis), every member's
    threshold (the last score of its top-5, a few -inf and +inf) and shortlist cut (the
    L-th reduced score of its shortlist at ``nprobe``, a few -inf), as a full run finds them."""
    from cbir_lib.index import reduce
    from cbir_lib.neighbors.ivf import CellStore
    from cbir_lib.vectors.topk import finish_shortlist

    rng = np.random.default_rng(seed)
    base = build(x, ids, metric, n_cells)
    basis, _ = reduce.fit(base.vectors, r)
    store = CellStore(base.ids, base.vectors, base.offsets, base.centroids, metric, reduce.project(base.vectors, basis), basis)
    probes = store.route(store.vectors, nprobe)
    shortlists = dense_search(store, store.vectors, store.ids, probes, 5, shortlist=L, raw=True)
    red = shortlists[0]
    v, _ = finish_shortlist(*shortlists, 5, metric, store.vectors)  # the finished search, once
    thr, cuts = v[:, 4].copy(), red[:, L - 1].copy()
    thr[rng.random(len(thr)) < 0.03] = -np.inf
    thr[rng.random(len(thr)) < 0.03] = np.inf
    cuts[rng.random(len(cuts)) < 0.03] = -np.inf
    return store, thr, cuts


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
@pytest.mark.parametrize("seed", range(3))
def test_reverse_scan_with_cuts_keeps_the_pairs_the_members_shortlists_take(metric, seed):
    """With the members' shortlist cuts the scan finds exactly the full scan's pairs whose
    reduced pair score reaches the member's cut (as its own shortlist search ranks it),
    with the same scores; a cut of -inf takes every pair."""
    from cbir_lib.index.reduce import project
    from cbir_lib.neighbors.ivf import CellStore
    from cbir_lib.vectors.topk import pair_scores

    rng = np.random.default_rng(seed)
    x = clustered(1000, 32, seed=seed)
    store, thr, cuts = shortlisted(x, rng.permutation(4000)[:1000].astype(np.int64), metric, 10, 8, 3, 12, seed)
    plain = CellStore(store.ids, store.vectors, store.offsets, store.centroids, metric)
    qpos = rng.choice(1000, 80, replace=False)
    q, qids = np.ascontiguousarray(store.vectors[qpos]), store.ids[qpos]
    probes = store.route(q, 5)
    pos0, qi0, sc0 = reverse_scan(plain, q, qids, probes, thr)
    red = pair_scores(project(q, store.projection), qi0, store.reduced, pos0, metric, store.sqnorm)
    want = red >= cuts[pos0]
    assert 0 < want.sum() < want.size
    pos, qi, sc = reverse_scan(store, q, qids, probes, thr, cuts)
    assert np.array_equal(pos, pos0[want]) and np.array_equal(qi, qi0[want]) and np.array_equal(sc, sc0[want])
    # No cut at all: the full scan's pairs.
    got = reverse_scan(store, q, qids, probes, thr, np.full(1000, -np.inf, np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(got, (pos0, qi0, sc0), strict=True))


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_cuts", [True, False])
def test_search_scan_with_the_shortlist_is_the_search_and_the_scan(metric, seed, with_cuts):
    """With the reduced first pass the fused core gives, bit for bit, the shortlist search
    (finished, or raw with a running bound as a search in parts takes it) and the reverse
    scan with the members' cuts (or, without them, at full dimension): routes that agree
    and that do not, self pairs, -inf and +inf thresholds, -inf cuts."""
    rng = np.random.default_rng(seed)
    n = 900
    x = clustered(n, 32, seed=seed)
    store, thr, cuts = shortlisted(x, rng.permutation(n * 3)[:n].astype(np.int64) - n, metric, 12, 8, 3, 12, seed)
    m = 60
    qpos = rng.choice(n, m, replace=False)
    q, qids = np.ascontiguousarray(store.vectors[qpos]), store.ids[qpos]
    scan = rng.random(m) < (0.0, 0.5, 0.9, 1.0, 0.7, 0.7)[seed]
    probes = store.route(q, 3)
    wide = store.route(q[scan], 5)
    if seed >= 4:
        wide = np.ascontiguousarray(np.roll(wide, seed - 3, axis=0))
    raw = seed % 2 == 1
    kth = None if metric == "euclidean" or not raw else np.full(m, -np.inf, np.float32)
    row_cuts = cuts if with_cuts else None
    found, (pos, qi, sc) = search_scan(store, q, qids, probes, 5, scan, wide, thr, thresholds=kth, shortlist=12, raw=raw, row_cuts=row_cuts)
    want = dense_search(store, q, qids, probes, 5, thresholds=kth, shortlist=12, raw=raw)
    pos0, qi0, sc0 = reverse_scan(store, q[scan], qids[scan], wide, thr, row_cuts)
    assert len(found) == len(want) == (3 if raw else 2)
    assert all(np.array_equal(a, b) for a, b in zip(found, want, strict=True))
    assert np.array_equal(pos, pos0) and np.array_equal(qi, qi0) and np.array_equal(sc, sc0)
    assert scan.any() or pos.size == 0
