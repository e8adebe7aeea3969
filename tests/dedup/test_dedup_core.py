import numpy as np
import pytest

from cbir_lib.dedup import core


def test_hamming64_signed_and_by_hand():
    assert core.hamming64(0, -1) == 64
    assert core.hamming64(0b1011, 0b0001) == 2
    np.testing.assert_array_equal(core.hamming64(np.array([1, 2]), np.array([1, 1])), [0, 2])


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
