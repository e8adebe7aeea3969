"""The numpy list operations of an incremental night, against plain-Python oracles."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cbir_lib.neighbors import listops


def random_rows(rng, n_lists=50, width=6, pool=40):
    """Lists as rows ``(qid, rank, nid, score)`` in a random order (ties on purpose)."""
    qid, rank, nid, score = [], [], [], []
    for q in rng.choice(10_000, n_lists, replace=False) - 5_000:
        m = int(rng.integers(1, width + 1))
        s = np.sort(rng.choice(np.linspace(-1, 1, 9), m))[::-1]
        qid += [q] * m
        rank += list(range(1, m + 1))
        nid += list(rng.choice(pool, m, replace=False) - 20)
        score += list(s)
    p = rng.permutation(len(qid))
    return pa.table(
        [
            pa.array(np.array(qid, np.int64)[p]),
            pa.array(np.array(rank, np.int32)[p]),
            pa.array(np.array(nid, np.int64)[p]),
            pa.array(np.array(score, np.float32)[p]),
        ],
        names=["image_id", "rank", "neighbor_id", "score"],
    )


def as_dict(table_or_lists):
    t = table_or_lists if isinstance(table_or_lists, pa.Table) else table_or_lists.to_arrow()
    out: dict = {}
    for q, r, n, s in zip(*(t.column(c).to_pylist() for c in ("image_id", "rank", "neighbor_id", "score")), strict=True):
        out.setdefault(int(q), []).append((int(r), int(n), float(s)))
    return {q: sorted(v) for q, v in out.items()}


def sorted_rows(t: pa.Table) -> pa.Table:
    return t.sort_by([("image_id", "ascending"), ("rank", "ascending")])


def test_dense_lists_from_rows_in_any_order_come_out_sorted_by_list_then_rank():
    rng = np.random.default_rng(0)
    t = random_rows(rng)
    d = listops.Dense.from_arrow([t], width=6)
    assert as_dict(d) == as_dict(t)
    out = d.to_arrow()
    key = list(zip(out.column("image_id").to_pylist(), out.column("rank").to_pylist(), strict=True))
    assert key == sorted(key)
    # A snapshot's two tables (the top k, and the reserve past it), each in list order.
    s = sorted_rows(t)
    top, rest = s.filter(pa.compute.less_equal(s.column("rank"), 2)), s.filter(pa.compute.greater(s.column("rank"), 2))
    assert as_dict(listops.Dense.from_arrow([rest, top], width=6)) == as_dict(t)
    # The width grows to the largest rank; no rows, no lists.
    assert listops.Dense.from_arrow([t], width=2).width == 6
    assert len(listops.Dense.from_arrow([t.slice(0, 0)], width=3)) == 0


def test_dense_lists_refuse_ranks_that_are_not_one_to_length():
    t = pa.table({"image_id": [1, 1, 2], "rank": [1, 3, 1], "neighbor_id": [5, 6, 7], "score": pa.array([0.9, 0.8, 0.7], pa.float32())})
    with pytest.raises(ValueError, match="1..length"):
        listops.Dense.from_arrow([t], width=4)
    twice = pa.table({"image_id": [1, 1], "rank": [1, 1], "neighbor_id": [5, 6], "score": pa.array([0.9, 0.8], pa.float32())})
    with pytest.raises(ValueError, match="1..length"):
        listops.Dense.from_arrow([twice], width=4)


@pytest.mark.parametrize("n_values", [1000, 200_000])
def test_member_is_isin_for_a_sorted_set(n_values):
    rng = np.random.default_rng(1)
    # Both lookups: binary search for a set near the values' size, the low-bit bitmap for a
    # small one (ids that share their low bits, and negative ids, included).
    values = np.r_[rng.integers(-50, 50, n_values // 2), rng.integers(-(2**62), 2**62, n_values // 2)]
    s = np.unique(np.r_[rng.integers(-50, 50, 30), values[-5:], np.arange(5) << 40])
    assert np.array_equal(listops.member(values, s), np.isin(values, s))
    grid = values[: (n_values // 10) * 10].reshape(-1, 10)
    assert np.array_equal(listops.member(grid, s), np.isin(grid, s))
    assert not listops.member(values, np.zeros(0, np.int64)).any()


def test_list_stats():
    rng = np.random.default_rng(2)
    t = random_rows(rng)
    removed = np.unique(rng.choice(40, 8) - 20)
    ids, length, last, lost = listops.list_stats(listops.Dense.from_arrow([t], 6), removed)
    d = as_dict(t)
    assert ids.tolist() == sorted(d)
    for q, ln, la, lo in zip(ids, length, last, lost, strict=True):
        rows = d[int(q)]
        assert ln == max(r for r, _, _ in rows) and la == np.float32(min(s for _, _, s in rows))
        assert lo == sum(n in set(removed.tolist()) for _, n, _ in rows)


def test_merged_drops_the_removed_ranks_by_score_then_neighbour_and_cuts_at_the_width():
    rng = np.random.default_rng(3)
    t = random_rows(rng, n_lists=30)
    old = listops.Dense.from_arrow([t], 6)
    ids = np.sort(old.ids[::2])
    removed = np.unique(rng.choice(40, 6) - 20)
    q = rng.choice(ids, 80)
    n = rng.integers(100, 1000, 80)
    s = rng.choice(np.linspace(-1, 1, 9), 80).astype(np.float32)
    extra = listops.Lists.of(q, np.ones(80), n, s)
    got = as_dict(listops.merged(old, ids, removed, extra, 4))
    d = as_dict(t)
    for qq in ids:
        cand = [(-sc, nn) for _, nn, sc in d[int(qq)] if nn not in set(removed.tolist())]
        cand += list(zip((-s[q == qq]).tolist(), n[q == qq].tolist(), strict=True))
        want = [(j + 1, nn, -ms) for j, (ms, nn) in enumerate(sorted(cand)[:4])]
        assert got.get(int(qq), []) == want


def test_assemble_of_disjoint_lists_is_sorted_and_whole():
    rng = np.random.default_rng(4)
    t = random_rows(rng, n_lists=60)
    whole = listops.Dense.from_arrow([t], 6)
    ids = whole.ids
    a, b, c = (whole.of_lists(part) for part in (ids[::3], ids[1::3], ids[2::3]))
    wider = listops.Dense.from_arrow([c.to_arrow()], 8)
    got = listops.assemble(a, np.zeros(0, np.int64), wider, listops.Dense.empty(6), b)
    assert as_dict(got) == as_dict(t) and np.array_equal(got.ids, ids) and got.width == 8
    # Dropped lists leave; a dropped list may come back in a part.
    got = listops.assemble(whole, ids[:5], whole.of_lists(ids[:2]))
    assert as_dict(got) == {q: v for q, v in as_dict(t).items() if q not in set(ids[2:5].tolist())}
    with pytest.raises(ValueError, match="two parts"):
        listops.assemble(whole, ids[:1], whole.of_lists(ids[1:2]))


def test_top_changed_names_lists_whose_first_k_rows_differ():
    rng = np.random.default_rng(5)
    old = listops.Dense.from_arrow([random_rows(rng, width=6)], 6)
    ids = old.ids
    new = listops.Dense(old.ids.copy(), old.nid.copy(), old.score.copy(), old.length.copy())
    first, fourth, dropped = 0, 1, 2
    new.nid[first, 0] += 1000  # rank 1 changed
    new.score[fourth, 2:] -= 1  # past k = 2 only: no change to the table
    new.length[dropped] -= 1  # its last row gone
    new.nid[dropped, new.length[dropped]], new.score[dropped, new.length[dropped]] = -1, -np.inf
    got = listops.top_changed(old, new, ids, k=2)
    want = {int(ids[first])} | ({int(ids[dropped])} if old.length[dropped] <= 2 else set())
    assert set(got.tolist()) == want
    assert listops.top_changed(old, old, ids, k=2).size == 0
    # A list absent from one side has no rows there.
    assert listops.top_changed(old, new.of_lists(ids[1:]), ids[:1], k=2).tolist() == [ids[0]]


@pytest.mark.parametrize("min_score", [None, 0.0, 0.25])
def test_split_divides_rows_as_the_snapshot_does(min_score):
    rng = np.random.default_rng(6)
    t = random_rows(rng, width=6)
    top, rest = listops.Dense.from_arrow([t], 6).split(3, min_score)
    whole = as_dict(t)
    want_top = {q: [r for r in v if r[0] <= 3 and (min_score is None or r[2] >= min_score)] for q, v in whole.items()}
    want_rest = {q: [r for r in v if r not in want_top[q]] for q, v in whole.items()}
    assert as_dict(top) == {q: v for q, v in want_top.items() if v}
    assert as_dict(rest) == {q: v for q, v in want_rest.items() if v}
    assert top.column("rank").type == pa.int32() and top.column("score").type == pa.float32()


def test_the_nights_old_sample_is_drawn_over_the_whole_store():
    """incremental.old_sample keeps the draw's order: the old images' sample spreads over
    the store, not its lowest positions (with cells numbered in space, one region)."""
    from cbir_lib.neighbors.incremental import old_sample

    rng = np.random.default_rng(0)
    n, half = 100_000, 500
    ids = rng.permutation(n).astype(np.int64) + 10**9  # store position -> image id
    added = np.sort(ids[rng.choice(n, 1_200, replace=False)])
    drawn = rng.choice(n, 2 * half + added.size, replace=False)
    cand = np.sort(drawn)
    got = old_sample(drawn, cand, ids[cand], added, half)
    assert got.size == half and np.all(np.diff(got) > 0)
    assert not np.isin(ids[got], added).any()
    assert got.max() > 0.9 * n and np.median(got) > 0.3 * n  # the sorted draw's first 500: all below ~0.2 n
    new = set(added.tolist())
    assert got.tolist() == sorted([int(p) for p in drawn if int(ids[p]) not in new][:half])


def test_cut_rows_ride_with_the_lists_and_split_out_whole():
    """A search's lists with their shortlist cuts as rows of rank CUT_RANK (none for -inf):
    split_cuts gives back the lists as _topk_batch writes them without cuts, and the cuts."""
    from cbir_lib.neighbors.lists import split_cuts
    from cbir_lib.neighbors.tasks import CUT_RANK, _topk_batch

    rng = np.random.default_rng(3)
    qids = np.array([7, -3, 11, 5], np.int64)
    vals = np.sort(rng.random((4, 5)).astype(np.float32), axis=1)[:, ::-1].copy()
    vals[2, 3:] = -np.inf  # a short list
    ids = rng.integers(-50, 50, (4, 5)).astype(np.int64)
    cuts = np.array([0.25, -np.inf, 0.5, -0.125], np.float32)
    with_cuts = pa.Table.from_batches([_topk_batch(qids, vals, ids, cuts)])
    assert (with_cuts.column("rank").to_numpy() == CUT_RANK).sum() == 3
    lists, got = split_cuts(with_cuts)
    assert lists.equals(pa.Table.from_batches([_topk_batch(qids, vals, ids)]))
    assert dict(zip(got.column("image_id").to_pylist(), got.column("cut").to_pylist(), strict=True)) == {7: 0.25, 11: 0.5, 5: -0.125}


def test_a_nights_cuts_are_the_bases_less_the_replaced_lists_and_tonights():
    from cbir_lib.neighbors.incremental import _next_cuts

    base = (np.array([1, 2, 3, 4, 5], np.int64), np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32))
    fresh = pa.table([pa.array([2, 9], pa.int64()), pa.array([0.7, 0.9], pa.float32())], names=["image_id", "cut"])
    got = _next_cuts(base, np.array([2, 4, 9], np.int64), fresh)
    cut = np.round(got.column("cut").to_numpy().astype(np.float64), 3)
    assert dict(zip(got.column("image_id").to_pylist(), cut.tolist(), strict=True)) == {
        1: 0.1,
        3: 0.3,
        5: 0.5,
        2: 0.7,
        9: 0.9,
    }
    assert _next_cuts(None, np.array([2], np.int64), fresh) is fresh
