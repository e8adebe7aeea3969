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
