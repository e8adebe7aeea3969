"""IVF search cores (dense, annoy, exact, TensorFlow) against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.index.kmeans import assign, train_balanced
from cbir_lib.neighbors.ivf import CellStore, annoy_search, dense_search, exact_search, tf_exact_search
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.vectors.topk import brute_force, prepare, recall_at_k


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Overlapping clusters with a decaying spectrum: harder than blobs, like CNN features."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(np.arange(1, d + 1))
    centres = rng.normal(size=(40, d)) * spectrum
    return (centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, d)) * spectrum).astype(np.float32)


def build(x: np.ndarray, ids: np.ndarray, metric: str, n_cells: int) -> CellStore:
    p = prepare(x, metric)
    c = train_balanced(p, n_cells, metric, seed=0)
    return CellStore.from_assignment(ids, p, assign(p, c, metric)[:, 0], c, metric)


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
def test_dense_probing_every_cell_is_exact(metric):
    x = clustered(600, 12)
    ids = np.arange(600, dtype=np.int64)[::-1] - 300  # negative ids too, -1 among them
    store = build(x, ids, metric, 8)
    q = store.vectors
    probes = store.route(q, store.n_cells)
    got_v, got_i = dense_search(store, q, store.ids, probes, 10)
    want_v, want_i = exact_search(store, q, store.ids, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["angular", "euclidean"])
def test_dense_ivf_recall_on_5k(metric):
    x = clustered(5000, 32, seed=1)
    ids = np.arange(5000, dtype=np.int64)
    store = build(x, ids, metric, 64)
    q = store.vectors
    got_v, got_i = dense_search(store, q, store.ids, store.route(q, 8), 10)
    want_v, want_i = exact_search(store, q, store.ids, 10)
    r = recall_at_k(got_i, want_i, want_v, got_v)
    assert r >= 0.9, r
    # Probing more cells can only find more.
    _, more_i = dense_search(store, q, store.ids, store.route(q, 16), 10)
    assert recall_at_k(more_i, want_i) >= recall_at_k(got_i, want_i)


def test_annoy_search_recall_on_5k():
    from annoy import AnnoyIndex

    x = clustered(5000, 32, seed=2)
    ids = (np.arange(5000, dtype=np.int64) - 2500) * 3
    store = build(x, ids, "angular", 32)
    forests = {}
    for c in range(store.n_cells):
        a, b = store.offsets[c], store.offsets[c + 1]
        f = AnnoyIndex(32, "angular")
        f.set_seed(7)
        for i, v in enumerate(store.vectors[a:b]):
            f.add_item(i, v)
        f.build(10)
        forests[c] = f
    q = store.vectors[:500]
    got_v, got_i = annoy_search(store, forests.get, q, store.ids[:500], store.route(q, 6), 10, search_k=2000, candidates=40)
    want_v, want_i = exact_search(store, q, store.ids[:500], 10)
    assert recall_at_k(got_i, want_i, want_v, got_v) >= 0.9
    assert not (got_i == store.ids[:500, None]).any()
    # Re-scored exactly: every reported score is the true cosine.
    pos = {int(i): r for r, i in enumerate(store.ids)}
    for row in range(5):
        for s, n in zip(got_v[row], got_i[row], strict=True):
            assert s == pytest.approx(float(q[row] @ store.vectors[pos[int(n)]]), abs=1e-6)


def test_empty_cells_are_harmless():
    x = prepare(clustered(200, 8), "angular")
    ids = np.arange(200, dtype=np.int64)
    far = -np.ones((3, 8), dtype=np.float32) * 100  # centroids no vector is routed to
    c = np.vstack([train_balanced(x, 4, "angular"), prepare(far, "angular")])
    store = CellStore.from_assignment(ids, x, assign(x, c, "dot")[:, 0][:], c, "angular")
    assert (store.sizes == 0).any()
    probes = np.tile(np.arange(store.n_cells), (200, 1))
    got_v, got_i = dense_search(store, x, ids, probes, 5)
    _, want_i = brute_force(x, ids, 5, "angular")
    np.testing.assert_array_equal(got_i, want_i)
    only_empty = np.tile(np.flatnonzero(store.sizes == 0)[:1], (200, 1))
    v, i = dense_search(store, x, ids, only_empty, 5)
    assert np.isneginf(v).all()


def test_tensorflow_exact_equals_numpy_exact():
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(400, 8)).astype(np.float32)
    ids = rng.permutation(400).astype(np.int64) - 200
    for metric in ("dot", "euclidean"):
        store = CellStore.from_assignment(ids, x, np.zeros(400, dtype=np.int64), x[:1], metric)
        want = exact_search(store, store.vectors, store.ids, 10, block_size=97)
        got = tf_exact_search(store, store.vectors, store.ids, 10, block_size=97)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("metric", ["angular", "euclidean"])
def test_routing_from_the_own_cell_equals_full_routing(metric):
    x = clustered(3000, 16, seed=4)
    store = build(x, np.arange(3000, dtype=np.int64), metric, 60)
    rows = np.arange(0, 3000, 3)
    q = store.vectors[rows]
    from cbir_lib.index.kmeans import assign

    for nprobe in (2, 7, 16):
        np.testing.assert_array_equal(store.route(q, nprobe, store.cells_of_rows(rows)), assign(q, store.centroids, metric, nprobe))


@pytest.mark.parametrize("metric", ["angular", "euclidean"])
@pytest.mark.parametrize("own", [True, False])
def test_routes_together_are_the_routes_apart(metric, own, monkeypatch):
    """A night routes each added image's search and its wider reverse scan from one product
    (CellStore.routes): the cells each route gives alone, tied centroids among them."""
    import cbir_lib.neighbors.ivf as ivf

    x = clustered(3000, 16, seed=5)
    p = prepare(x, metric)
    c = train_balanced(p, 60, metric, seed=0)
    c = np.concatenate([c, c[:10]])  # ten centroids twice: tied cells (the copies stay empty)
    store = CellStore.from_assignment(np.arange(3000, dtype=np.int64), p, assign(p, c, metric)[:, 0], c, metric)
    rows = np.arange(0, 3000, 2)
    q, cells = store.vectors[rows], (store.cells_of_rows(rows) if own else None)
    mask = rows % 3 == 0
    monkeypatch.setattr(ivf, "SUB_BLOCK", 256)  # several blocks a call
    for nprobe, wider in ((1, 2), (7, 9), (16, 20), (60, 75)):
        narrow, wide = store.routes(q, (nprobe, wider), cells)
        np.testing.assert_array_equal(narrow, store.route(q, nprobe, cells))
        np.testing.assert_array_equal(wide, store.route(q, wider, cells))
        assert wide.shape[1] == min(wider, store.n_cells)
        probes, w = store.route_wider(q, nprobe, wider, mask, cells)
        # Routed in other blocks: the same cells (the order within may follow the BLAS).
        np.testing.assert_array_equal(np.sort(probes, axis=1), np.sort(narrow, axis=1))
        np.testing.assert_array_equal(np.sort(w, axis=1), np.sort(wide[mask], axis=1))
        np.testing.assert_array_equal(store.route_wider(q, nprobe, wider, np.ones(len(q), bool), cells)[1], wide)


def test_split_rows_cuts_only_at_cell_boundaries():
    from cbir_lib.neighbors.tasks import split_rows

    offsets = np.array([0, 5, 5, 12, 30, 31, 40])
    parts = split_rows(offsets, 0, 40, 4)
    assert parts[0][0] == 0 and parts[-1][1] == 40
    assert all(b == c for (_, b), (c, _) in zip(parts[:-1], parts[1:], strict=True))
    assert all(a in offsets and b in offsets for a, b in parts)
    assert split_rows(offsets, 12, 30, 5) == [(12, 30)], "one cell is never split"
    assert split_rows(offsets, 7, 7, 3) == []


def reduced_store(x: np.ndarray, ids: np.ndarray, metric: str, n_cells: int, r: int) -> CellStore:
    from cbir_lib.index import reduce

    store = build(x, ids, metric, n_cells)
    basis, _ = reduce.fit(store.vectors, r)
    store.reduced, store.projection = reduce.project(store.vectors, basis), basis
    return store


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
def test_the_reduced_first_pass_shortlist_holds_the_exact_top_k(metric):
    """Every cell probed: only the reduction can lose a neighbour, and a 4k shortlist of a
    32-of-128-d projection keeps nearly all of the exact top-10; the scores are the full ones."""
    x = clustered(3000, 128, seed=2)
    ids = np.arange(3000, dtype=np.int64) * 7 - 5000
    store = reduced_store(x, ids, metric, 16, 32)
    q = store.vectors
    probes = store.route(q, store.n_cells)
    want_v, want_i = exact_search(store, q, store.ids, 10)
    got_v, got_i = dense_search(store, q, store.ids, probes, 10, shortlist=40)
    assert recall_at_k(got_i, want_i, want_v, got_v) >= 0.97
    found = got_i == want_i
    np.testing.assert_allclose(got_v[found], want_v[found], rtol=1e-5, atol=1e-5)
    # A shortlist of everything is exact.
    all_v, all_i = dense_search(store, q[:200], store.ids[:200], probes[:200], 10, shortlist=3000)
    np.testing.assert_array_equal(all_i, want_i[:200])
    # Shorter shortlists lose more.
    _, short_i = dense_search(store, q, store.ids, probes, 10, shortlist=10)
    assert recall_at_k(short_i, want_i) < recall_at_k(got_i, want_i)


def test_reduced_shortlists_of_parts_merge_to_the_whole_search():
    """The store in three row ranges, each searched raw, the shortlists merged by (reduced
    score, id) and finished once: the whole store's answer, bit for bit (duplicates tied)."""
    from cbir_lib.neighbors import budget

    x = clustered(2000, 128, seed=3)
    x[:30] = x[30:60]
    ids = np.random.default_rng(0).permutation(2000).astype(np.int64)
    store = reduced_store(x, ids, "angular", 12, 32)
    q, probes = store.vectors, store.route(store.vectors, 5)
    want_v, want_i = dense_search(store, q, store.ids, probes, 10, shortlist=40)
    spec = SearchSpec(method="dense", k=10, metric="angular", dim=128, shortlist=40)
    best = None
    for lo, hi in ((0, 500), (500, 1400), (1400, 2000)):
        part = budget.sub_store(
            store.offsets,
            lo,
            hi,
            store.ids[lo:hi],
            store.vectors[lo:hi],
            store.centroids,
            "angular",
            store.reduced[lo:hi],
            store.projection,
        )
        kth = None if best is None else best[0][:, -1]
        best = budget.merge(best, dense_search(part, q, store.ids, probes, 10, thresholds=kth, shortlist=40, raw=True), 40)
    got_v, got_i = budget.finish(spec, best, q, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)


@pytest.mark.parametrize("metric", ["angular", "euclidean"])
@pytest.mark.parametrize("shortlist", [None, 30])
def test_a_big_block_gives_each_query_what_small_blocks_give(metric, shortlist, monkeypatch):
    """dense_search groups a block's cell products, and routes and selects SUB_BLOCK rows at a
    time: every query's result, scores, ids and raw shortlists, is what it gets in small blocks."""
    from cbir_lib.index.reduce import fit, project
    from cbir_lib.neighbors import ivf

    x = clustered(3000, 64, seed=4)
    store = build(x, np.arange(3000, dtype=np.int64) * 3 - 4000, metric, 40)
    if shortlist:
        basis, _ = fit(store.vectors, 16)
        store.projection, store.reduced = basis, project(store.vectors, basis)
    q, qi = store.vectors[:1000], store.ids[:1000]
    thresholds = np.full(1000, -np.inf, np.float32)
    thresholds[::7] = 0.5  # a bound on some rows, as a search in parts passes
    own = store.cells_of_rows(np.arange(1000))
    monkeypatch.setattr(ivf, "SUB_BLOCK", 10_000)
    small = [
        dense_search(
            store,
            q[s : s + 128],
            qi[s : s + 128],
            store.route(q[s : s + 128], 6, own[s : s + 128]),
            10,
            thresholds=thresholds[s : s + 128],
            shortlist=shortlist,
            raw=bool(shortlist),
        )
        for s in range(0, 1000, 128)
    ]
    monkeypatch.setattr(ivf, "SUB_BLOCK", 128)  # so the 1,000-row block is routed and selected in 8 parts
    big = dense_search(store, q, qi, store.route(q, 6, own), 10, thresholds=thresholds, shortlist=shortlist, raw=bool(shortlist))
    for got, want in zip(big, zip(*small, strict=True), strict=True):
        np.testing.assert_array_equal(got, np.concatenate(want))
