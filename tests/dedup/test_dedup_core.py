import numpy as np
import pytest

from cbir_lib.dedup import core


def test_chunks_cover_all_bits():
    for m in (1, 3, 4, 9):
        b = core.chunk_bounds(m)
        assert sum(w for _, w in b) == 64 and b[0][0] == 0
    h = np.array([-1, 0, 0x0123456789ABCDEF], dtype=np.int64)
    vals = core.chunk_values(h, 4)
    assert vals[0].tolist() == [0xFFFF] * 4 and vals[1].tolist() == [0] * 4
    assert vals[2].tolist() == [0xCDEF, 0x89AB, 0x4567, 0x0123]
    assert len(core.flips(16, 2)) == 1 + 16 + 120


@pytest.mark.parametrize("t,m", [(0, 4), (3, 4), (8, 4), (10, 4), (6, 3)])
def test_multi_index_finds_exactly_the_brute_force_pairs(t, m):
    rng = np.random.default_rng(t)
    base = rng.integers(-(2**63), 2**63 - 1, size=60, dtype=np.int64)
    # near copies: flip 0..12 random bits of each base hash
    copies = []
    for h in base:
        for _ in range(3):
            bits = rng.choice(64, rng.integers(0, 13), replace=False)
            copies.append(np.int64(h) ^ np.int64(sum(1 << int(b) for b in bits) - (2**64 if any(b == 63 for b in bits) else 0)))
    h = np.concatenate([base, np.array(copies, dtype=np.int64)])
    assert core.near_pairs(h, t, m) == core.brute_pairs(h, t)


def test_components_by_hand():
    labels = core.components(6, np.array([[1, 2], [4, 2], [5, 3]]))
    assert labels.tolist() == [0, 1, 1, 3, 1, 3]
    assert core.components(3, np.zeros((0, 2))).tolist() == [0, 1, 2]


def _union_find(n: int, edges) -> np.ndarray:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def test_vectorised_components_equal_a_union_find_on_random_graphs_and_long_chains():
    rng = np.random.default_rng(11)
    for t in range(200):
        n = int(rng.integers(1, 300))
        e = rng.integers(0, n, (int(rng.integers(0, 400)), 2))
        if t % 3 == 0:  # a shuffled chain: many rounds of propagation
            e = np.concatenate([e, np.stack([np.arange(n - 1), np.arange(1, n)], 1)[rng.permutation(max(0, n - 1))]])
        assert np.array_equal(core.components(n, e), _union_find(n, e)), t


def test_edge_betweenness_of_a_path_counts_the_pairs_each_edge_separates():
    from cbir_lib.dedup.core import _adjacency, edge_betweenness

    e = np.array([(0, 1), (1, 2), (2, 3)])
    bet = edge_betweenness(_adjacency(4, e), np.arange(4))
    # both directions of every pair: (0,1) separates 3 pairs, (1,2) 4
    assert bet == {(0, 1): 6.0, (1, 2): 8.0, (2, 3): 6.0}


def test_split_by_diameter_cuts_bridges_and_bounds_every_piece():
    from cbir_lib.dedup.core import _adjacency, diameter, split_by_diameter

    # two stars joined by one edge: the bridge goes, each star stays whole
    e = np.array([(0, i) for i in range(1, 6)] + [(10, i) for i in range(11, 16)] + [(5, 15)])
    lab, before = split_by_diameter(16, e, 4)
    assert set(lab[:6]) == {0} and set(lab[10:]) == {10} and before[0] == 5
    assert list(lab[6:10]) == [6, 7, 8, 9]  # isolated nodes are their own
    rng = np.random.default_rng(0)
    for _ in range(150):
        n = int(rng.integers(2, 40))
        e = rng.integers(0, n, (int(rng.integers(1, 3 * n)), 2))
        d = int(rng.integers(1, 6))
        lab, before = split_by_diameter(n, e, d)
        comp = core.components(n, e[e[:, 0] != e[:, 1]])
        adj = _adjacency(n, e[e[:, 0] != e[:, 1]])
        for label in np.unique(lab):
            part = np.flatnonzero(lab == label)
            assert part.min() == label and len(set(comp[part])) == 1
            if len(part) > 1:
                assert diameter(adj, part) <= d
        for c in np.unique(comp):  # a component within the bound is one piece
            part = np.flatnonzero(comp == c)
            if len(part) > 1 and diameter(adj, part) <= d:
                assert len(set(lab[part])) == 1


def test_worst_pair_is_the_least_similar_two():
    from cbir_lib.dedup.core import worst_pair

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8))
    s, i, j = worst_pair(x)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    np.fill_diagonal(c, np.inf)
    assert i < j and abs(s - c.min()) < 1e-12 and abs(c[i, j] - c.min()) < 1e-12


def test_cosines_of_embedding_pairs_in_numpy():
    import pyarrow as pa

    from cbir_lib.dedup.run import _cosines

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    y[3] = x[3] * 2.5  # the same direction: cosine 1
    batch = pa.RecordBatch.from_arrays(
        [pa.array(np.arange(50)), pa.array(np.arange(50) + 100), pa.array(list(x)), pa.array(list(y))], names=["a", "b", "ea", "eb"]
    )
    got = pa.Table.from_batches(list(_cosines(iter([batch.slice(0, 20), batch.slice(20)]))))
    want = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-6)
    assert got["b"].to_pylist() == list(range(100, 150)) and abs(got["score"][3].as_py() - 1.0) < 1e-6
