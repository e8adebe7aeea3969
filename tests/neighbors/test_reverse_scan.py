"""The reverse scan of incremental nights against a brute-force oracle."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.neighbors.ivf import dense_search, reverse_scan
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
