"""Binary codes: packing, Hamming distance, the multi-index against a brute-force scan, and
hierarchical search against exact ranking."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.vectors.codes import MultiIndex, hamming, hamming64, hamming_rank, hierarchical_search, pack, threshold, unpack


def _codes(rng, n, bits, clusters=0):
    if clusters:  # clustered codes: many near ties, like learned codes of a few classes
        centres = rng.random((clusters, bits)) > 0.5
        flips = rng.random((n, bits)) < 0.08
        return pack(centres[rng.integers(0, clusters, n)] ^ flips)
    return pack(rng.random((n, bits)) > 0.5)


def test_pack_threshold_and_hamming_by_hand():
    bits = np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=bool)
    codes = pack(bits)
    assert codes.shape == (2, 2) and codes[0, 0] == 0b10110000 and codes[0, 1] == 0b10000000
    assert (unpack(codes, 9) == bits).all()
    assert hamming(codes, codes).tolist() == [[0, 4], [4, 0]]
    assert (threshold(np.array([[0.2, 0.7, 0.5, 0.51]])) == pack(np.array([[0, 1, 0, 1]]))).all()
    assert (threshold(np.array([[1.0, 2.0]]), np.array([1.5, 1.5])) == pack(np.array([[0, 1]]))).all()


@pytest.mark.parametrize("bits", [48, 128])
def test_hamming_equals_bit_count(bits):
    rng = np.random.default_rng(bits)
    a, b = rng.random((7, bits)) > 0.5, rng.random((11, bits)) > 0.5
    expect = (a[:, None, :] != b[None, :, :]).sum(axis=2)
    assert (hamming(pack(a), pack(b)) == expect).all()


@pytest.mark.parametrize("bits,clusters,n_chunks", [(48, 0, None), (48, 5, 6), (128, 0, None), (128, 10, 16), (64, 3, 3)])
def test_multi_index_finds_exactly_the_hamming_nearest(bits, clusters, n_chunks):
    rng = np.random.default_rng(bits + clusters)
    both = _codes(rng, 3025, bits, clusters)  # queries from the same clusters as the gallery
    g, q = both[:3000], both[3000:]
    index = MultiIndex(g, n_chunks)
    d_all = hamming(q, g)
    for i in range(len(q)):
        for n in (1, 10, 150):
            probe = index.search(q[i], n)
            expect = np.lexsort((np.arange(len(g)), d_all[i]))[:n]
            assert probe.distances.tolist() == d_all[i][expect].tolist()
            assert probe.positions.tolist() == expect.tolist()
            assert probe.distances.max() <= probe.radius
    # Clustered codes are found after looking at far fewer than all of them.
    if clusters:
        assert index.search(q[0], 10).looked_at < len(g)


def test_multi_index_edge_cases():
    rng = np.random.default_rng(0)
    g = _codes(rng, 5, 48)
    probe = MultiIndex(g).search(g[2], 50)  # more asked than there are
    assert len(probe.positions) == 5 and probe.positions[0] == 2 and probe.distances[0] == 0
    with pytest.raises(ValueError, match="n_chunks"):
        MultiIndex(g, 7)
    with pytest.raises(ValueError, match="24 bits"):
        MultiIndex(_codes(rng, 5, 128), 2)
    assert hamming_rank(g[:1], g, 3)[0][0, 0] == 0


def test_hierarchical_search_against_exact_ranking():
    rng = np.random.default_rng(7)
    n, dim, bits, k = 1200, 32, 48, 10
    centres = rng.normal(size=(12, dim))
    labels = rng.integers(0, 12, n)
    vec = centres[labels] + 0.6 * rng.normal(size=(n, dim))
    vec = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
    proj = rng.normal(size=(dim, bits))
    codes = threshold(vec @ proj, 0.0)  # sign of a random projection: close vectors, close codes
    index = MultiIndex(codes)
    q = np.arange(0, n, 37)
    exact = np.argsort(-(vec[q] @ vec.T), axis=1, kind="stable")

    # With every code as a candidate it is exact search.
    pos, score, scored = hierarchical_search(vec[q], codes[q], vec, index, k, n)
    assert (pos == exact[:, :k]).all() and (scored == n).all()
    assert np.allclose(score, np.take_along_axis(vec[q] @ vec.T, pos, axis=1))

    # With fewer, it is exactly: float re-ranking of the Hamming-nearest candidates.
    n_cand = 120
    pos, score, scored = hierarchical_search(vec[q], codes[q], vec, index, k, n_cand, exclude=q)
    d = hamming(codes[q], codes)
    for i, qi in enumerate(q):
        order = np.lexsort((np.arange(n), d[i]))
        cand = order[order != qi][:n_cand]
        s = vec[cand] @ vec[qi]
        expect = cand[np.lexsort((cand, -s))[:k]]
        assert pos[i].tolist() == expect.tolist()
        assert qi not in pos[i]
    assert (scored == n_cand).all()
    # ... and it recovers most of the exact top-k while scoring 10 % of the gallery.
    exact_wo_self = [[p for p in row if p != qi][:k] for row, qi in zip(exact, q, strict=True)]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(pos.tolist(), exact_wo_self, strict=True)])
    assert recall > 0.8


def test_hamming64_signed_and_by_hand():
    assert hamming64(0, -1) == 64
    assert hamming64(0b1011, 0b0001) == 2
    np.testing.assert_array_equal(hamming64(np.array([1, 2]), np.array([1, 1])), [0, 2])
