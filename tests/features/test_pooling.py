import numpy as np
import pytest

from cbir_lib.features import pooling


def _fmap():
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(size=(3, 7, 7, 16)), 0).astype(np.float32)


def test_gap_and_mac_by_hand():
    x = np.zeros((1, 2, 2, 2), np.float32)
    x[0, :, :, 0] = [[1, 2], [3, 6]]
    x[0, :, :, 1] = [[0, 0], [0, 4]]
    # means (3, 1) -> normalised; maxima (6, 4) -> normalised
    np.testing.assert_allclose(pooling.gap(x), [[3 / np.sqrt(10), 1 / np.sqrt(10)]], rtol=1e-6)
    np.testing.assert_allclose(pooling.mac(x), [[6 / np.sqrt(52), 4 / np.sqrt(52)]], rtol=1e-6)


def test_gem_interpolates_between_gap_and_mac():
    x = _fmap()
    np.testing.assert_allclose(pooling.gem(x, 1.0), pooling.gap(x), atol=1e-5)
    assert np.abs(pooling.gem(x, 60.0) - pooling.mac(x)).max() < 0.02


@pytest.mark.parametrize("method", ["gap", "mac", "gem", "crow", "rmac"])
def test_every_pooling_is_unit_norm_and_finite(method):
    out = pooling.pool(_fmap(), method)
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(out).all()


def test_crow_weights_by_hand():
    x = np.zeros((1, 1, 2, 2), np.float32)
    x[0, 0, 0] = [1, 1]  # location 0: both channels fire
    x[0, 0, 1] = [1, 0]  # location 1: only channel 0
    # spatial S = (2, 1) / ||(2,1)||_2 then sqrt; channel sparsity Q = (1, .5), weight log(1.5/Q)
    s = np.sqrt(np.array([2, 1]) / np.sqrt(5))
    pooled = np.array([s[0] + s[1], s[0]])
    w = np.log(1.5 / np.array([1.0, 0.5]))
    expect = pooled * w / np.linalg.norm(pooled * w)
    np.testing.assert_allclose(pooling.crow(x)[0], expect, rtol=1e-5)


def test_rmac_regions_cover_the_map_at_every_level():
    regions = pooling.rmac_regions(7, 7, levels=3)
    assert [r[2] for r in regions] == [7] + [4] * 4 + [3] * 9
    for top, left, side in regions:
        assert 0 <= top and 0 <= left and top + side <= 7 and left + side <= 7
    wide = pooling.rmac_regions(7, 10, levels=2)
    assert len({r[1] for r in wide}) > len({r[0] for r in wide})  # more steps along the long side


def test_vectors_are_only_normalised():
    v = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(pooling.pool(v, "rmac"), [[0.6, 0.8]])


def test_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        pooling.gap(np.zeros((2, 3, 4)))


def test_pwa_by_hand():
    from cbir_lib.features.pooling import pwa, pwa_select

    # a 1 x 2 x 2 map with 3 channels; part channel 0 has responses 3 (top-left) and 4 (bottom-right)
    f = np.zeros((1, 2, 2, 3), np.float32)
    f[0, 0, 0] = [3, 1, 0]
    f[0, 1, 1] = [4, 0, 2]
    # w = (f_0 / ||f_0||_2) ** (1/2): ||(3, 4)|| = 5, so w = sqrt(0.6), sqrt(0.8) at those cells
    part = np.sqrt(0.6) * np.array([3, 1, 0]) + np.sqrt(0.8) * np.array([4, 0, 2])
    np.testing.assert_allclose(pwa(f, [0])[0], part / np.linalg.norm(part), rtol=1e-6)
    two = pwa(f, [0, 2])[0]  # channel 2 fires only bottom-right: w = 1 there
    want = np.concatenate([part, [4, 0, 2]])
    np.testing.assert_allclose(two, want / np.linalg.norm(want), rtol=1e-6)
    sums = np.array([[1, 5, 2], [1, 1, 2], [1, 9, 2.5]])  # channel 1 varies most, then 2
    assert pwa_select(sums, 2).tolist() == [1, 2] and pwa_select(sums, 1).tolist() == [1]
