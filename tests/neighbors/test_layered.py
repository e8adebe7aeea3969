"""A night's groups as kept groups plus a delta, against a brute-force merge."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.neighbors import budget, layered


def _case(seed: int):
    rng = np.random.default_rng(seed)
    n_cells = int(rng.integers(3, 12))
    counts = rng.integers(0, 9, n_cells)
    counts[rng.integers(0, n_cells)] = 0  # an empty cell, at least
    offsets = np.r_[0, np.cumsum(counts)]
    n = int(offsets[-1])
    cells = np.repeat(np.arange(n_cells), counts)
    ids = rng.choice(20_000, n, replace=False)
    ids = ids[np.lexsort((ids, cells))]  # the base store: (cell, id) order
    bounds = budget.group_bounds(n, int(rng.integers(1, max(2, n // 2))))
    gone = np.sort(rng.choice(n, int(rng.integers(0, n // 3 + 1)), replace=False))
    d = int(rng.integers(0, 15))
    delta_ids = rng.choice(np.setdiff1d(np.arange(20_000), ids), d, replace=False)  # ids above and below the base's
    delta_cells = rng.integers(0, n_cells, d)
    return offsets, bounds, cells, ids, gone, delta_ids, delta_cells


@pytest.mark.parametrize("seed", range(40))
def test_the_nights_groups_are_its_cells_in_order_and_sorted_by_id_within_each_group(seed):
    offsets, bounds, cells, ids, gone, delta_ids, delta_cells = _case(seed)
    night = layered.plan(offsets, bounds, gone, delta_ids, delta_cells)
    keep = np.setdiff1d(np.arange(len(ids)), gone)
    n = keep.size + delta_ids.size
    assert night.offsets[-1] == night.bounds[-1] == n
    all_cells = np.r_[cells[keep], delta_cells]
    np.testing.assert_array_equal(night.offsets, np.r_[0, np.cumsum(np.bincount(all_cells, minlength=len(offsets) - 1))])
    # Each group read as base group g's kept rows plus the delta rows of g, in group_order.
    got_cells, got_ids = [], []
    for g in range(len(bounds) - 1):
        b = keep[(keep >= bounds[g]) & (keep < bounds[g + 1])]
        mine = night.delta_groups == g
        gc, gi = np.r_[cells[b], night.delta_cells[mine]], np.r_[ids[b], night.delta_ids[mine]]
        o = layered.group_order(gc, gi)
        assert len(o) == night.bounds[g + 1] - night.bounds[g], g
        got_cells.append(gc[o])
        got_ids.append(gi[o])
        # Within the group, each cell's rows by id: the search's self-exclusion needs it.
        for c in np.unique(gc):
            assert (np.diff(gi[o][gc[o] == c]) > 0).all()
    got_cells_ = np.concatenate(got_cells)
    # The groups in turn: every row once, the cells in order, so each cell at its offsets.
    assert sorted(np.concatenate(got_ids).tolist()) == sorted(np.r_[ids[keep], delta_ids].tolist())
    assert (np.diff(got_cells_) >= 0).all()
    for c in range(len(offsets) - 1):
        assert (got_cells_[night.offsets[c] : night.offsets[c + 1]] == c).all()
    # The search finds a cell's rows in the groups groups_of_cells names.
    first, last = budget.groups_of_cells(night.offsets, night.bounds)
    for c in range(len(offsets) - 1):
        lo, hi = night.offsets[c], night.offsets[c + 1]
        if hi > lo:
            assert night.bounds[first[c]] <= lo and hi <= night.bounds[last[c] + 1]
    # Row numbers: the kept base rows in base order, then the delta's.
    base, delta = layered.rows(night, np.arange(n))
    np.testing.assert_array_equal(base[: keep.size], keep)
    assert (delta[: keep.size] == -1).all() and (base[keep.size :] == -1).all()
    np.testing.assert_array_equal(night.delta_ids[delta[keep.size :]], night.delta_ids)
    np.testing.assert_array_equal(layered.delta_rows(night, delta_ids), keep.size + layered.delta_index(night, delta_ids))
    np.testing.assert_array_equal(night.delta_ids[layered.delta_index(night, delta_ids)], delta_ids)


def test_an_empty_night_is_the_base():
    offsets, bounds, *_ = _case(3)
    night = layered.plan(offsets, bounds, [], [], [])
    np.testing.assert_array_equal(night.offsets, offsets)
    np.testing.assert_array_equal(night.bounds, bounds)


def test_a_delta_id_not_in_the_delta_is_an_error():
    offsets, bounds, *_ = _case(3)
    night = layered.plan(offsets, bounds, [], [7, 9], [0, 1])
    with pytest.raises(KeyError):
        layered.delta_index(night, np.array([8]))
