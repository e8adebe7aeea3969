import numpy as np
import pytest

from cbir_lib.features.postprocess import Whitening, mean_threshold_bits
from cbir_lib.vectors.codes import hamming


def test_whitening_decorrelates_its_sample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8)) + 3.0
    w = Whitening.fit(x, shrinkage=0.0)
    z = (x - w.mean) @ w.projection.T
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(8), atol=1e-3)
    out = w.apply(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_whitening_reduces_dimension_and_roundtrips():
    x = np.random.default_rng(1).normal(size=(100, 20))
    w = Whitening.fit(x, dim=5)
    assert w.apply(x).shape == (100, 5)
    w2 = Whitening.from_bytes(w.to_bytes())
    np.testing.assert_array_equal(w2.apply(x), w.apply(x))
    with pytest.raises(ValueError, match=r"\(n, 20\)"):
        w.apply(x[:, :3])


def _cov_fit(x: np.ndarray, dim: int) -> Whitening:
    """The covariance route, written out: what Whitening.fit did for every sample before."""
    mean = x.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    order = np.argsort(eigval)[::-1][:dim]
    eigval, eigvec = eigval[order], eigvec[:, order]
    scale = 1.0 / np.sqrt(eigval + 1e-5 * eigval.max())
    return Whitening(mean, (eigvec * scale).T, eigval)


def test_whitening_fewer_samples_than_dimensions_equals_the_covariance_route_up_to_axis_signs():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 300)) @ rng.normal(size=(300, 300)) * 0.1 + 1.0
    queries = rng.normal(size=(25, 300)) @ rng.normal(size=(300, 300)) * 0.1 + 1.0
    for dim in (None, 16):
        gram, cov = Whitening.fit(x, dim), _cov_fit(x, dim or 59)
        np.testing.assert_allclose(gram.eigenvalues, cov.eigenvalues, rtol=1e-8)
        np.testing.assert_allclose(np.abs(gram.projection), np.abs(cov.projection), rtol=1e-6, atol=1e-9)
        a, b = gram.apply(queries), cov.apply(queries)
        np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-8)  # every cosine the same


def test_whitening_of_a_rank_deficient_sample_keeps_only_its_rank():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 100))  # 40 samples of rank 3
    w = Whitening.fit(x)
    assert w.dim_out == 3 and np.isfinite(w.projection).all()


def test_whitening_never_exceeds_sample_rank():
    x = np.random.default_rng(2).normal(size=(10, 50))
    assert Whitening.fit(x).dim_out == 9


def test_codes_pack_and_hamming_by_hand():
    x = np.array([[0.9, 0.1, 0.5, 0.7, 0.0, 0.0, 0.0, 0.0, 1.0], [0.0] * 8 + [0.0]])
    t = np.full(9, 0.4)
    codes = mean_threshold_bits(x, t)
    assert codes.shape == (2, 2)
    assert codes[0, 0] == 0b10110000 and codes[0, 1] == 0b10000000
    assert hamming(codes, codes).tolist() == [[0, 4], [4, 0]]


def test_hamming_matches_bit_counting():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    naive = [[sum(bin(int(p) ^ int(q)).count("1") for p, q in zip(ra, rb, strict=False)) for rb in b] for ra in a]
    assert hamming(a, b).tolist() == naive
