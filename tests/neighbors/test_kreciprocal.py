"""k-reciprocal re-ranking: the graph version against a dense transcription of the paper's code."""

import numpy as np
import pytest

from cbir_lib.neighbors import kreciprocal as kr


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n=60, d=8, seed=0, dups=4):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(4, d)))
    x = _unit(centres[rng.integers(0, 4, n)] + 0.35 * rng.normal(size=(n, d)))
    x[n - dups :] = x[:dups]  # exact duplicates: tied scores everywhere
    return x


def _ranked(s, ids):
    """Row i's other rows by descending score, ties by id (the stage's list order)."""
    n = len(s)
    nbr = np.empty((n, n - 1), np.int64)
    sc = np.empty((n, n - 1), np.float32)
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        order = others[np.lexsort((ids[others], -s[i, others]))]
        nbr[i] = ids[order]
        sc[i] = s[i, order]
    return nbr, sc


def zhong_dense(x, ids, k1, k2, lam):
    """The paper's re_ranking, transcribed on a full matrix, with d = 1 - s and the row itself first."""
    s = (x @ x.T).astype(np.float64)
    n = len(x)
    dist = 1.0 - s
    np.fill_diagonal(dist, 0.0)
    rank_key = dist.copy()
    np.fill_diagonal(rank_key, -1.0)  # itself first, even beside an exact duplicate
    initial_rank = np.array([np.lexsort((ids, rank_key[i])) for i in range(n)])
    V = np.zeros((n, n))
    h = int(np.around(k1 / 2))
    for i in range(n):
        fwd = initial_rank[i, : k1 + 1]
        bwd = initial_rank[fwd, : k1 + 1]
        rec = fwd[np.where(bwd == i)[0]]
        exp_idx = rec
        for c in rec:
            cf = initial_rank[c, : h + 1]
            cb = initial_rank[cf, : h + 1]
            crec = cf[np.where(cb == c)[0]]
            if len(np.intersect1d(crec, rec)) > 2 / 3 * len(crec):
                exp_idx = np.append(exp_idx, crec)
        exp_idx = np.unique(exp_idx)
        w = np.exp(-dist[i, exp_idx])
        V[i, exp_idx] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((n, n))
    for i in range(n):
        m = np.minimum(V[i][None, :], V).sum(1)
        jac[i] = 1 - m / (2 - m)
    return jac * (1 - lam) + dist * lam


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (6, 1, 0.0), (9, 3, 0.5)])
def test_graph_version_is_the_papers_method_on_whole_lists(k1, k2, lam):
    x = _data()
    ids = np.arange(-30, -30 + len(x), dtype=np.int64)[::-1].copy()  # signed ids, not in row order
    nbr, sc = _ranked(x @ x.T, ids)
    out_ids, out_s = kr.rerank_graph(ids, nbr, sc, k1, k2, lam)
    want = zhong_dense(x, ids, k1, k2, lam)
    pos = {int(p): i for i, p in enumerate(ids)}
    for i in range(len(ids)):
        got = np.array([pos[int(g)] for g in out_ids[i]])
        d = want[i, got]
        # our distances are the oracle's, and in its order (ties within rounding by id)
        np.testing.assert_allclose(1.0 - out_s[i], d, atol=1e-6)
        assert np.all(np.diff(d) >= -1e-9), i
        others = np.array([j for j in range(len(ids)) if j != i])
        oracle = others[np.lexsort((ids[others], np.round(want[i, others], 9)))]
        top = 10
        clear = np.round(want[i, oracle[top - 1]], 9) != np.round(want[i, oracle[top]], 9)
        if clear:
            assert set(got[:top].tolist()) == set(oracle[:top].tolist()), i


def test_duplicates_keep_ties_by_id_and_enter_each_others_lists():
    x = _data(dups=4)
    ids = np.arange(len(x), dtype=np.int64)
    nbr, sc = _ranked(x @ x.T, ids)
    out_ids, out_s = kr.rerank_graph(ids, nbr, sc, 20, 6, 0.3)
    n = len(x)
    for a in range(4):
        b = n - 4 + a
        assert out_ids[a, 0] == b and out_ids[b, 0] == a
    assert np.all(np.diff(out_s, axis=1) <= 0)


def test_truncated_lists_drop_only_members_they_do_not_hold():
    x = _data(n=80, seed=3, dups=0)
    ids = np.arange(len(x), dtype=np.int64)
    nbr, sc = _ranked(x @ x.T, ids)
    stats = {}
    short_ids, short_s = kr.rerank_graph(ids, nbr[:, :25], sc[:, :25], 20, 6, 0.3, stats=stats)
    assert stats["rows"] == 80 and stats["dropped_members"] >= 0
    full_ids, _ = kr.rerank_graph(ids, nbr, sc, 20, 6, 0.3)
    # the top 10 after re-ranking 25 candidates mostly agrees with re-ranking all 79
    agree = np.mean([len(set(short_ids[i, :10]) & set(full_ids[i, :10])) / 10 for i in range(80)])
    assert agree > 0.8, agree
    assert short_ids.shape == (80, 25) and set(short_ids[0]) == set(nbr[0, :25])


def test_padding_stays_last_and_pieces_by_hand():
    assert kr.half(20) == 10 and kr.half(5) == 2 and kr.half(7) == 4  # numpy's rounding, as the paper
    # expand: the half set {1, 2, 9} has 2 of 3 in r_p: not more than 2/3, so not added
    assert kr.expand(0, np.array([0, 1, 2]), [np.array([1, 2, 9])]).tolist() == [0, 1, 2]
    assert kr.expand(0, np.array([0, 1, 2, 9]), [np.array([1, 2, 9, 7])]).tolist() == [0, 1, 2, 7, 9]
    ids, w, dropped = kr.encode(0, np.array([0, 1, 5]), np.array([1, 2]), np.array([0.5, 0.4]))
    assert ids.tolist() == [0, 1] and dropped == 1
    np.testing.assert_allclose(w, np.exp([0.0, -0.5]) / np.exp([0.0, -0.5]).sum())
    v = (np.array([1, 2]), np.array([0.5, 0.5]))
    assert kr.jaccard(v, v) == 0.0 and kr.jaccard(v, (np.array([3]), np.array([1.0]))) == 1.0
    ids_ = np.array([0, 1, 2], np.int64)
    nbr = np.array([[1, 2], [0, -1], [0, -1]], np.int64)
    sc = np.array([[0.9, 0.1], [0.9, -np.inf], [0.1, -np.inf]], np.float32)
    o, s = kr.rerank_graph(ids_, nbr, sc, 2, 1, 0.3)
    assert o[1].tolist() == [0, -1] and np.isneginf(s[1, 1])


def test_the_lists_it_re_ranks_break_ties_by_id_at_the_cut():
    from cbir_lib.vectors.topk import exact_topk, row_dots  # what split_order and the split evaluation search with

    x = _data(n=40, dups=6)
    x[10:14] = x[20]  # a block of ties
    ids = np.arange(1000, 1040, dtype=np.int64)[::-1].copy()
    sc, nbr = exact_topk(x, ids, x, ids, 5, "angular", block_size=7)
    pairwise = np.stack([row_dots(x, x[i]) for i in range(len(x))])  # the stage's score of a pair
    full, fs = _ranked(pairwise, ids)
    np.testing.assert_array_equal(nbr, full[:, :5])
    np.testing.assert_array_equal(sc, fs[:, :5])


def test_split_order_is_a_ranking_of_the_whole_gallery():
    x = _data(n=70, dups=0)
    q, g = x[:10], x[10:]
    order = kr.split_order(q, g, 20, 8, 3, 0.3)
    assert order.shape == (10, 60)
    assert all(sorted(o.tolist()) == list(range(60)) for o in order)


def test_spark_path_is_the_graph_version_bit_for_bit(spark):
    k2 = 6  # k2 = 1 skips one step of the same code (the split evaluation test runs k2 = 3)
    x = _data(n=90, seed=5, dups=5)
    ids = (np.arange(len(x), dtype=np.int64) * 7919) % 100_003 - 50_000  # scattered signed ids
    nbr, sc = _ranked(x @ x.T, ids)
    depth = 30
    nbr, sc = nbr[:, :depth], sc[:, :depth]
    want_ids, want_s = kr.rerank_graph(ids, nbr, sc, 20, k2, 0.3)
    rows = [(int(p), r + 1, int(nbr[i, r]), float(sc[i, r])) for i, p in enumerate(ids) for r in range(depth)]
    lists = spark.createDataFrame(rows, kr.LISTS_DDL).repartition(3)
    out = kr.rerank_frame(lists, 20, k2, 0.3)
    enc = kr.encodings(lists, 20)
    got = {}
    for r in out.collect():
        got.setdefault(r.image_id, []).append((r.rank, r.neighbor_id, r.score))
    assert enc.count() == len(ids)
    for i, p in enumerate(ids):
        lst = sorted(got[int(p)])
        assert [g for _, g, _ in lst] == want_ids[i].tolist()
        np.testing.assert_array_equal(np.array([s for _, _, s in lst], np.float32), want_s[i])
