"""Random-projection LSH: the bucket rule by hand, and recall on 5k vectors against exact."""

import numpy as np
import pytest

from cbir_lib.neighbors.lsh import LSHIndex, lsh_topk
from cbir_lib.vectors.topk import prepare, recall_at_k


def _clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(np.arange(1, d + 1))
    centres = rng.normal(size=(50, d)) * spectrum
    return prepare((centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, d)) * spectrum).astype(np.float32), "angular")


def test_buckets_are_sign_patterns_and_radius_one_adds_the_neighbouring_buckets():
    x = np.array([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]], np.float32)
    index = LSHIndex(x, tables=1, bits=4, seed=3)
    bits = (x @ index.planes[0].T) > 0
    assert index.codes(x, 0).tolist() == [int(sum(1 << j for j in range(4) if b[j])) for b in bits]
    c0 = index.candidates(x[:1], 0)[0]
    assert 0 in c0 and 2 not in c0  # the opposite vector agrees on no bit
    assert set(index.candidates(x[:1], 1)[0]) >= set(c0)
    with pytest.raises(ValueError, match="lsh_radius"):
        index.candidates(x, 2)


def test_recall_on_5k_vectors_for_16_tables_of_16_bits_radius_1():
    """The configuration the stage's defaults name (neighbors.lsh_tables 16, lsh_bits 16, lsh_radius 1)."""
    x = _clustered(5000, 32, seed=1)
    ids = np.arange(5000, dtype=np.int64) * 3 - 7000
    sims = x @ x.T  # the exact oracle (a plain product: no ties among these floats)
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]
    ev, ei = np.take_along_axis(sims, top, 1), ids[top]
    index = LSHIndex(x, tables=16, bits=16, seed=0)
    v, i, counts = lsh_topk(index, x, ids, x, ids, 10, radius=1)
    r = recall_at_k(i, ei, ev, v)
    assert r >= 0.9, r
    assert counts.mean() < 0.1 * len(x)  # candidates are a small fraction of the collection
    assert not np.any(i == ids[:, None])  # never itself
    # scores are exact for what was found
    np.testing.assert_allclose(v[:, 0], np.einsum("ij,ij->i", x, x[(i[:, 0] + 7000) // 3]), rtol=1e-5)


def test_groups_of_the_store_merged_give_the_whole_stores_top_k():
    """The memory-budget layout: each group's own tables (the same seeded hyperplanes), its
    top-k merged by (-score, id), is the whole store's top-k, bit for bit, ties included."""
    from cbir_lib.neighbors.budget import merge

    x = prepare(_clustered(3000, 24, seed=3), "angular")
    x[:40] = x[40:80]  # exact duplicates: ties broken by id
    ids = np.random.default_rng(1).permutation(10**6)[:3000].astype(np.int64)
    q, qids = x[::7], ids[::7]
    whole = lsh_topk(LSHIndex(x, 8, 10, seed=5), x, ids, q, qids, 10, radius=1)[:2]
    best = None
    for lo, hi in ((0, 700), (700, 1900), (1900, 3000)):
        part = lsh_topk(LSHIndex(x[lo:hi], 8, 10, seed=5), x[lo:hi], ids[lo:hi], q, qids, 10, radius=1)[:2]
        best = merge(best, part, 10)
    assert np.array_equal(best[1], whole[1]) and np.array_equal(best[0], whole[0])
