"""index.reduce.fit: the top-r principal directions of a sample, signs fixed."""

from __future__ import annotations

import numpy as np

from cbir_lib.index import reduce


def test_fit_spans_the_exact_top_directions_with_fixed_signs():
    rng = np.random.default_rng(3)
    scales = np.r_[np.linspace(5.0, 2.0, 6), np.full(26, 0.3)]
    x = (rng.normal(size=(4000, 32)) * scales) @ np.linalg.qr(rng.normal(size=(32, 32)))[0]
    basis, energy = reduce.fit(x.astype(np.float32), 6)
    w, v = np.linalg.eigh(x.T @ x / len(x))  # the oracle, all in float64
    top = v[:, np.argsort(w)[::-1][:6]]
    cos = np.linalg.svd(top.T @ basis.astype(np.float64), compute_uv=False)
    assert basis.shape == (32, 6) and basis.dtype == np.float32 and cos.min() > 1 - 1e-5
    assert abs(energy - np.sort(w)[::-1][:6].sum() / w.sum()) < 1e-5
    assert (basis[np.abs(basis).argmax(axis=0), np.arange(6)] > 0).all()  # each direction's largest entry positive
    again, _ = reduce.fit(x.astype(np.float32), 6)
    assert np.array_equal(again, basis)


def test_lift_gives_each_cells_mean_of_its_members_in_full_dimension():
    """lift: the full-dimension mean of the members each reduced centroid takes (the same
    assignment as kmeans.assign in the reduced space), normalised for angular. Oracle: float64 means of the members, row by row."""
    from cbir_lib.index.kmeans import assign

    rng = np.random.default_rng(8)
    x = rng.normal(size=(3000, 48)).astype(np.float32)
    basis, _ = reduce.fit(x, 8)
    xr = reduce.project(x, basis)
    reduced_centroids = xr[rng.choice(3000, 20, replace=False)]
    for metric in ("angular", "euclidean"):
        got = reduce.lift(x, xr, reduced_centroids, metric)
        labels = assign(xr, reduced_centroids, metric)[:, 0]
        want = np.stack([x[labels == c].astype(np.float64).mean(axis=0) for c in np.unique(labels)])
        if metric == "angular":
            want /= np.linalg.norm(want, axis=1, keepdims=True)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)
