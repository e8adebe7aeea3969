"""The incremental build's key diff in numpy, against the full outer join it replaces."""

from __future__ import annotations

import numpy as np

from cbir_lib.index.incremental import diff_keys


def oracle(old_ids, old_fps, now_ids, now_fps):
    o, w = set(zip(old_ids.tolist(), old_fps.tolist(), strict=True)), set(zip(now_ids.tolist(), now_fps.tolist(), strict=True))
    gone = np.array([(i, f) not in w for i, f in zip(old_ids.tolist(), old_fps.tolist(), strict=True)])
    new = np.array([(i, f) not in o for i, f in zip(now_ids.tolist(), now_fps.tolist(), strict=True)])
    return gone, new


def test_diff_keys_finds_added_removed_and_changed_rows():
    rng = np.random.default_rng(0)
    old_ids = rng.permutation(np.arange(-500, 500))
    old_fps = rng.integers(-(2**62), 2**62, old_ids.size)
    keep = rng.random(old_ids.size) > 0.1
    now_ids, now_fps = old_ids[keep], old_fps[keep].copy()
    now_fps[:20] += 1  # changed content
    now_ids = np.concatenate([now_ids, np.arange(1000, 1050)])  # new
    now_fps = np.concatenate([now_fps, rng.integers(0, 99, 50)])
    p = rng.permutation(now_ids.size)
    now_ids, now_fps = now_ids[p], now_fps[p]
    gone, new = diff_keys(old_ids, old_fps, now_ids, now_fps)
    want_gone, want_new = oracle(old_ids, old_fps, now_ids, now_fps)
    assert np.array_equal(gone, want_gone) and np.array_equal(new, want_new)
    assert gone.sum() == (~keep).sum() + 20 and new.sum() == 70


def test_diff_keys_with_an_id_twice_and_empty_sides():
    old_ids, old_fps = np.array([1, 2, 3]), np.array([10, 20, 30])
    now_ids, now_fps = np.array([2, 2, 3, 4]), np.array([20, 21, 31, 40])
    gone, new = diff_keys(old_ids, old_fps, now_ids, now_fps)
    assert gone.tolist() == [True, False, True] and new.tolist() == [False, True, True, True]
    e = np.zeros(0, np.int64)
    gone, new = diff_keys(old_ids, old_fps, e, e)
    assert gone.all() and new.size == 0
    gone, new = diff_keys(e, e, now_ids, now_fps)
    assert gone.size == 0 and new.all()
