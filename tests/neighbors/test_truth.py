"""The carried exact lists of the recall sample (cbir_lib/neighbors/truth.py), night after
night, against exact search over each night's whole collection."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.neighbors import truth as TR
from cbir_lib.vectors.topk import exact_topk

W, K, DIM, SEED = 6, 4, 5, 1234


def exact(qx, qids, x, ids):
    return exact_topk(np.ascontiguousarray(qx), qids, np.ascontiguousarray(x), ids, W, "dot")


def night(rng, ids, x, n_add, n_del, n_chg, next_id, near_of=None):
    """A night's change: ``(removed, added ids, added vectors)`` and the new collection.
    Small integer vectors, so that scores tie often; some added images copy ``near_of``."""
    gone = rng.choice(ids, n_del + n_chg, replace=False)
    changed = gone[:n_chg]
    new_ids = np.r_[np.arange(next_id, next_id + n_add), changed].astype(np.int64)
    new_x = rng.integers(-2, 3, (new_ids.size, DIM)).astype(np.float32)
    if near_of is not None and near_of.size:
        pick = rng.choice(near_of, min(3, near_of.size, new_ids.size), replace=False)
        new_x[: pick.size] = x[np.searchsorted(ids, pick)]
    keep = ~np.isin(ids, gone)
    all_ids = np.r_[ids[keep], new_ids]
    order = np.argsort(all_ids)
    return np.sort(gone), new_ids, new_x, all_ids[order], np.r_[x[keep], new_x][order]


def check_exact(t: TR.Truth, ids, x):
    """Every list is the exact top-depth over the collection ``(ids, x)``."""
    v, i = exact(t.vectors, t.ids, x, ids)
    for r in range(t.ids.size):
        d = int(t.depth[r])
        np.testing.assert_array_equal(t.nbrs[r, :d], i[r, :d])
        np.testing.assert_array_equal(t.scores[r, :d], v[r, :d])
        assert (t.nbrs[r, d:] == -1).all()


@pytest.mark.parametrize("n", [6, 400])  # a collection smaller than a list's width, and one larger
def test_carried_lists_stay_the_exact_top_depth_night_after_night(n):
    rng = np.random.default_rng(n)
    ids = np.sort(rng.choice(10**6, n, replace=False)).astype(np.int64)
    x = rng.integers(-2, 3, (n, DIM)).astype(np.float32)
    m = min(n, 40)
    v, i = exact(x, ids, x, ids)
    t = TR.from_full(ids, x, v, i, SEED, m)
    assert t is not None
    # The full run's members are the collection's first m by key.
    np.testing.assert_array_equal(np.sort(t.ids), TR.first(ids, m, SEED))
    assert TR.in_bound(ids, SEED, t.bound).sum() == m
    next_id, refreshed = 10**7, 0
    for _ in range(8):
        n_add, n_del, n_chg = (1, 1, 1) if n < 10 else (30, 12, 6)
        removed, added, added_x, ids, x = night(rng, ids, x, n_add, n_del, n_chg, next_id, near_of=t.ids)
        next_id += n_add
        stay = t.take(np.flatnonzero(~np.isin(t.ids, removed)))
        cv, ci = exact(stay.vectors, stay.ids, added_x, added)
        adv, refresh = TR.advance(stay, removed, cv, ci, K)
        assert not np.isin(adv.ids, removed).any() and adv.ids.size == stay.ids.size
        check_exact(adv, ids, x)  # exact at its depth, refreshed or not
        assert (adv.depth[refresh] < K).all() and (adv.depth[~refresh] >= K).all()
        refreshed += int(refresh.sum())
        # The members searched whole: those too short and those added within the bound.
        joined = added[TR.in_bound(added, SEED, t.bound)]
        redo = np.r_[adv.ids[refresh], joined]
        redo_x = np.concatenate([adv.vectors[refresh], added_x[np.isin(added, joined)][np.argsort(added[np.isin(added, joined)])]])
        redo_ids = np.r_[adv.ids[refresh], np.sort(joined)]
        sv, si = exact(redo_x, redo_ids, x, ids)
        t = TR.combine(adv.take(np.flatnonzero(~refresh)), TR.searched(redo_ids, redo_x, sv, si, SEED, t.bound))
        assert redo.size == redo_ids.size
        # The members are exactly the collection's images within the bound, in key order.
        np.testing.assert_array_equal(np.sort(t.ids), np.sort(ids[TR.in_bound(ids, SEED, t.bound)]))
        np.testing.assert_array_equal(t.ids, t.ids[TR.by_key(t.ids, SEED)])
        check_exact(t, ids, x)
        # A round trip through the snapshot's table keeps every field.
        back = TR.from_arrow(TR.to_arrow(t), TR.record(t))
        for f in ("ids", "keys", "vectors", "scores", "nbrs", "depth"):
            np.testing.assert_array_equal(getattr(back, f), getattr(t, f))
        assert back.bound == t.bound and back.seed == t.seed
    if n < 10:  # every list held the whole collection: never too short
        assert refreshed == 0 and (t.depth == W).all()


def test_a_list_that_loses_neighbours_keeps_only_the_depth_that_is_still_exact():
    ids = np.arange(10, dtype=np.int64)
    x = np.eye(10, DIM, dtype=np.float32) + np.arange(10, dtype=np.float32)[:, None] / 100
    v, i = exact(x, ids, x, ids)
    t = TR.from_full(ids, x, v, i, SEED, 10)
    q = int(np.flatnonzero(t.ids == 0)[0])
    lost = t.nbrs[q, :3]  # three of its best
    none_v, none_i = np.full((10, W), -np.inf, np.float32), np.full((10, W), -1, np.int64)
    adv, refresh = TR.advance(t, lost, none_v, none_i, K)
    r = int(np.flatnonzero(adv.ids == 0)[0])
    assert adv.depth[r] == W - 3 and refresh[r]  # 3 < K left
    np.testing.assert_array_equal(adv.nbrs[r, : W - 3], t.nbrs[q, 3:W])
    assert (adv.nbrs[r, W - 3 :] == -1).all()


def test_carry_size_keeps_a_margin_over_the_old_half():
    assert TR.carry_size(0) == 0 and TR.carry_size(1) == 0
    assert TR.carry_size(1000) == 600 and TR.carry_size(2) == 2


def test_after_a_calibration_sample_the_members_are_the_images_past_it():
    """A full run that calibrated nprobe on its first images by key carries the ones after
    them (its verification images): the nights' recall is not measured where nprobe was chosen."""
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(10**6, 300, replace=False)).astype(np.int64)
    x = rng.normal(size=(300, DIM)).astype(np.float32)
    v, i = exact(x, ids, x, ids)
    order = TR.by_key(ids, SEED)
    calibrated, verify = ids[order[:100]], ids[order[100:150]]
    after = TR.last_by_key(calibrated, SEED)
    t = TR.from_full(
        np.r_[calibrated, verify],
        x[np.r_[order[:100], order[100:150]]],
        *(a[np.r_[order[:100], order[100:150]]] for a in (v, i)),
        SEED,
        60,
        after,
    )
    assert t is not None and t.after == after
    np.testing.assert_array_equal(np.sort(t.ids), np.sort(verify))  # 50 of them, fewer than the 60 asked
    np.testing.assert_array_equal(np.sort(ids[TR.in_bound(ids, SEED, t.bound, t.after)]), np.sort(verify))
    back = TR.from_arrow(TR.to_arrow(t), TR.record(t))
    assert back.after == after and back.bound == t.bound
