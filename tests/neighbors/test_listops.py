"""The numpy list operations of an incremental night, against plain-Python oracles."""

from __future__ import annotations

import numpy as np

from cbir_lib.neighbors import listops


def random_lists(rng, n_lists=50, width=6, pool=40):
    qid, rank, nid, score = [], [], [], []
    for q in rng.choice(10_000, n_lists, replace=False) - 5_000:
        m = int(rng.integers(1, width + 1))
        s = np.sort(rng.choice(np.linspace(-1, 1, 9), m))[::-1]  # ties on purpose
        qid += [q] * m
        rank += list(range(1, m + 1))
        nid += list(rng.choice(pool, m, replace=False) - 20)
        score += list(s)
    p = rng.permutation(len(qid))  # any order in, (qid, rank) order out
    return listops.Lists.of(np.array(qid)[p], np.array(rank)[p], np.array(nid)[p], np.array(score)[p])


def as_dict(lists):
    out: dict = {}
    for q, r, n, s in zip(lists.qid, lists.rank, lists.nid, lists.score, strict=True):
        out.setdefault(int(q), []).append((int(r), int(n), float(s)))
    return out


def test_lists_come_out_sorted_by_list_then_rank_whatever_order_they_came_in():
    rng = np.random.default_rng(0)
    lists = random_lists(rng)
    key = list(zip(lists.qid.tolist(), lists.rank.tolist(), strict=True))
    assert key == sorted(key)
    # Reversed rank order inside each list: the fallback sort still orders them.
    p = np.lexsort((-lists.rank, lists.qid))
    again = listops.Lists.of(lists.qid[p], lists.rank[p], lists.nid[p], lists.score[p])
    assert as_dict(again) == as_dict(lists) and np.array_equal(again.rank, lists.rank)


def test_member_is_isin_for_a_sorted_set():
    rng = np.random.default_rng(1)
    values, s = rng.integers(-50, 50, 1000), np.unique(rng.integers(-50, 50, 30))
    assert np.array_equal(listops.member(values, s), np.isin(values, s))
    assert not listops.member(values, np.zeros(0, np.int64)).any()


def test_list_stats():
    rng = np.random.default_rng(2)
    lists = random_lists(rng)
    removed = np.unique(rng.choice(40, 8) - 20)
    ids, length, last, lost = listops.list_stats(lists, removed)
    d = as_dict(lists)
    assert ids.tolist() == sorted(d)
    for q, ln, la, lo in zip(ids, length, last, lost, strict=True):
        rows = d[int(q)]
        assert ln == max(r for r, _, _ in rows) and la == np.float32(min(s for _, _, s in rows))
        assert lo == sum(n in set(removed.tolist()) for _, n, _ in rows)


def test_ranked_orders_by_score_then_neighbour_and_cuts_at_the_width():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 5, 200)
    n = rng.integers(0, 1000, 200)
    s = rng.choice(np.linspace(0, 1, 7), 200).astype(np.float32)
    got = as_dict(listops.ranked(q, n, s, 4))
    for qq in np.unique(q):
        cand = sorted(zip((-s[q == qq]).tolist(), n[q == qq].tolist(), strict=True))[:4]
        assert got[int(qq)] == [(j + 1, nn, -ms) for j, (ms, nn) in enumerate(cand)]


def test_concat_of_disjoint_lists_is_sorted_and_whole():
    rng = np.random.default_rng(4)
    lists = random_lists(rng, n_lists=60)
    ids = np.unique(lists.qid)
    a, b, c = (lists.of_lists(part) for part in (ids[::3], ids[1::3], ids[2::3]))
    both = listops.concat(c, a, listops.Lists.empty(), b)
    assert as_dict(both) == as_dict(lists)
    assert np.array_equal(both.qid, lists.qid) and np.array_equal(both.rank, lists.rank)


def test_top_changed_names_lists_whose_first_k_rows_differ():
    rng = np.random.default_rng(5)
    old = random_lists(rng, width=6)
    ids = np.unique(old.qid)
    new = listops.Lists(old.qid.copy(), old.rank.copy(), old.nid.copy(), old.score.copy())
    first, fourth, dropped = ids[0], ids[1], ids[2]
    new.nid[np.flatnonzero(new.qid == first)[0]] += 1000  # rank 1 changed
    rows4 = np.flatnonzero((new.qid == fourth) & (new.rank > 2))
    new.score[rows4] -= 1  # past k = 2 only: no change to the table
    d = as_dict(old)
    kept = new.where(~((new.qid == dropped) & (new.rank == len(d[int(dropped)]))))  # its last row gone
    got = listops.top_changed(old, kept, ids, k=2)
    want = {int(first)} | ({int(dropped)} if len(d[int(dropped)]) <= 2 else set())
    assert set(got.tolist()) == want
    assert listops.top_changed(old, old, ids, k=2).size == 0
