"""The pure numpy cores of the neighbour search against a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.vectors.topk import (
    NO_ID,
    brute_force,
    exact_topk,
    mask_self,
    merge_topk,
    prepare,
    recall_at_k,
    select,
    where2d,
)


def integer_vectors(n: int, d: int, seed: int = 0, duplicates: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer vectors: every product is exact in float32, so ties are real ties.

    A few rows are exact copies of others and ids are shuffled, so the tie-break by id
    is exercised rather than the storage order.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    x[rng.choice(n, duplicates, replace=False)] = x[rng.choice(n, duplicates, replace=False)]
    # Image ids are signed 64-bit hashes: half of them are negative, -1 included here.
    ids = rng.permutation(np.arange(-7 * (n // 2), 7 * (n - n // 2), 7) - 1).astype(np.int64)
    return x, ids


@pytest.mark.parametrize("metric", ["dot", "euclidean", "angular"])
@pytest.mark.parametrize("block_size", [7, 64, 4096])
def test_exact_topk_equals_brute_force_including_ties(metric, block_size):
    x, ids = integer_vectors(300, 6)
    k = 10
    want_v, want_i = brute_force(x, ids, k, metric)
    p = prepare(x, metric)
    got_v, got_i = exact_topk(p, ids, p, ids, k, metric, block_size=block_size)
    np.testing.assert_array_equal(got_i, want_i)
    if metric == "angular":
        np.testing.assert_allclose(got_v, want_v, atol=1e-6)
    else:
        np.testing.assert_array_equal(got_v, want_v)
    # Low-dimensional integer vectors tie a lot: the test is only meaningful if they do.
    assert (np.diff(want_v, axis=1) == 0).sum() > 100


def test_ties_break_by_smaller_id_not_storage_order():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    base = np.array([[1.0, 0.0]] * 4, dtype=np.float32)
    ids = np.array([40, 10, 30, 20])
    v, i = exact_topk(q, np.array([99]), base, ids, k=3, metric="dot", block_size=1)
    assert i.tolist() == [[10, 20, 30]]
    assert v.tolist() == [[1.0, 1.0, 1.0]]


def test_self_is_excluded_and_short_lists_are_padded():
    x = np.eye(3, dtype=np.float32)
    ids = np.array([5, 6, 7])
    v, i = exact_topk(x, ids, x, ids, k=4, metric="dot")
    assert not any(ids[r] in i[r] for r in range(3))
    assert (i[:, 2:] == NO_ID).all() and np.isneginf(v[:, 2:]).all()
    v2, i2 = exact_topk(x, ids, x, ids, k=4, metric="dot", exclude_self=False)
    assert i2[:, 0].tolist() == [5, 6, 7]


def test_merge_in_pieces_equals_merge_at_once():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 50, size=(40, 3000)).astype(np.float32)
    ids = rng.permutation(3000).astype(np.int64)
    v0, i0 = select(np.repeat(np.arange(40), 3000), scores.ravel(), np.tile(ids, 40), 40, 10)
    v, i = np.full((40, 10), -np.inf, np.float32), np.full((40, 10), NO_ID)
    for s in range(0, 3000, 333):
        v, i = merge_topk(v, i, scores[:, s : s + 333], ids[s : s + 333])
    np.testing.assert_array_equal(i, i0)
    np.testing.assert_array_equal(v, v0)


def test_mask_self_only_masks_matching_ids():
    block = np.zeros((3, 4), dtype=np.float32)
    mask_self(block, np.array([2, 9, 4]), np.array([4, 3, 2, 1]))
    assert np.isneginf(block).tolist() == [
        [False, False, True, False],
        [False, False, False, False],
        [True, False, False, False],
    ]


def test_select_drops_non_finite_scores_and_keeps_negative_ids():
    v, i = select(np.array([0, 0, 0, 0]), np.array([np.nan, 1.0, np.inf, -np.inf]), np.array([1, -1, 2, 3]), 1, 2)
    assert i[0, 0] == -1 and v[0, 0] == 1.0
    assert np.isneginf(v[0, 1])


def test_recall_counts_boundary_ties_as_found():
    exact_i = np.array([[1, 2, 3]])
    exact_v = np.array([[0.9, 0.8, 0.7]])
    assert recall_at_k(np.array([[1, 2, 4]]), exact_i) == pytest.approx(2 / 3)
    # id 4 scores exactly the k-th score: an equally good answer, not a miss.
    assert recall_at_k(np.array([[1, 2, 4]]), exact_i, exact_v, np.array([[0.9, 0.8, 0.7]])) == 1.0
    assert recall_at_k(np.array([[1, 2, 4]]), exact_i, exact_v, np.array([[0.9, 0.8, 0.6]])) == pytest.approx(2 / 3)


def test_prepare_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        prepare(np.zeros((2, 2)), "cosine-ish")


def test_shortlist_scores_are_the_pair_scores_bit_for_bit():
    """Scored query by query with the query's row read once: the same float32 values as
    pair_scores, so a shortlist's full scores do not depend on how candidates were batched."""
    from cbir_lib.vectors.topk import pair_scores, shortlist_scores

    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 300)).astype(np.float32)
    q = rng.normal(size=(64, 300)).astype(np.float32)
    pos = rng.integers(0, 500, size=(64, 7))
    pos[3, 5:] = -1
    for metric in ("dot", "euclidean"):
        sq = np.einsum("ij,ij->i", x, x)
        got = shortlist_scores(q, x, pos, metric, sq, block_bytes=4 * 7 * 300 * 5)  # blocks of 5 queries
        rows = np.repeat(np.arange(64), 7)
        want = pair_scores(q, rows, x, np.maximum(pos.ravel(), 0), metric, sq).reshape(64, 7)
        want[pos < 0] = -np.inf
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(6))
def test_select_matches_a_sort_by_minus_score_then_id(seed):
    """select against a plain per-row oracle: many ties (scores from a few values, and
    -0.0 beside 0.0), rows with fewer than k candidates and rows with none, candidates in
    any order, non-finite scores, and a payload that must travel with its candidate."""
    rng = np.random.default_rng(seed)
    m, k = 37, [1, 5, 40][seed % 3]
    n = int(rng.integers(0, 3000))
    rows = rng.integers(0, m - 3, n)  # the last three rows get nothing
    scores = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 0.5, 2.0, np.inf, -np.inf, np.nan], np.float32), n)
    smooth = rng.random(n) < 0.5
    scores[smooth] = rng.normal(size=int(smooth.sum())).astype(np.float32)
    ids = rng.integers(-50, 50, n)  # repeated ids too: two candidates may share (score, id)
    payload = np.arange(n, dtype=np.int64) * 7
    v, i, p = select(rows, scores, ids, m, k, payload=payload)
    for r in range(m):
        at = np.flatnonzero((rows == r) & np.isfinite(scores))
        best = sorted(at, key=lambda j: (-float(scores[j]), int(ids[j])))[:k]
        got = len(best)
        assert v[r, :got].tolist() == [float(scores[j]) for j in best]
        assert i[r, :got].tolist() == [int(ids[j]) for j in best]
        # A payload of candidates tied on (score, id) may come from either of them.
        keys = {(float(scores[j]), int(ids[j])): set() for j in best}
        for j in at:
            if (float(scores[j]), int(ids[j])) in keys:
                keys[(float(scores[j]), int(ids[j]))].add(int(payload[j]))
        assert all(int(p[r, c]) in keys[(float(v[r, c]), int(i[r, c]))] for c in range(got))
        assert np.isneginf(v[r, got:]).all() and (i[r, got:] == NO_ID).all() and (p[r, got:] == -1).all()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (1, 1), (7, 3), (55, 405)])
def test_where2d_is_nonzero_of_a_2d_mask(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) < 0.3
    got, want = where2d(mask), np.nonzero(mask)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
