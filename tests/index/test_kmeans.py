"""The coarse quantiser: routing order, balance, and the choice of P."""

from __future__ import annotations

import numpy as np

from cbir_lib.index.kmeans import assign, choose_n_cells, kmeans, train_balanced
from cbir_lib.vectors.topk import prepare


def test_assign_is_nearest_first_with_ties_to_the_lower_cell():
    c = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    x = np.array([[0.9, 0.0], [4.0, 0.0]], dtype=np.float32)
    got = assign(x, c, "euclidean", nprobe=3)
    assert got[0].tolist() == [1, 2, 0]
    assert got[1].tolist() == [3, 1, 2]
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    assert (np.take_along_axis(d, got, 1) == np.sort(d, 1)[:, :3]).all()


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8)) * 10
    x = (centres[rng.integers(0, 5, 2000)] + rng.normal(size=(2000, 8))).astype(np.float32)
    c = kmeans(x, 5, "euclidean", seed=0)
    d = ((centres[:, None, :] - c[None]) ** 2).sum(-1)
    assert np.sqrt(d.min(1)).max() < 0.5


def test_train_balanced_splits_a_dominant_cluster():
    rng = np.random.default_rng(0)
    # 80% of the points in one tight-ish blob, the rest spread over 15 small ones.
    big = rng.normal(size=(8000, 16)) * 0.3 + 5
    small = rng.normal(size=(15, 16)) * 10
    rest = small[rng.integers(0, 15, 2000)] + rng.normal(size=(2000, 16))
    x = prepare(np.vstack([big, rest]), "angular")
    n_cells = 16
    plain = kmeans(x, n_cells, "angular", seed=0)
    plain_counts = np.bincount(assign(x, plain, "dot")[:, 0], minlength=len(plain))
    c = train_balanced(x, n_cells, "angular", balance=2.0, seed=0)
    counts = np.bincount(assign(x, c, "dot")[:, 0], minlength=len(c))
    assert counts.min() > 0, "no empty cells survive"
    assert counts.max() <= 2.0 * len(x) / n_cells + 1
    assert counts.max() < plain_counts.max()


def test_choose_n_cells_bounds():
    assert choose_n_cells(0, 256) == 1
    assert choose_n_cells(10, 256) == 1
    assert choose_n_cells(1_000_000, 256) == 2000
    assert choose_n_cells(100, 256) <= 100 // 8
    # A small executor forces smaller cells, hence more of them.
    assert choose_n_cells(1_000_000, 256, executor_memory_bytes=64 << 20, cores_per_executor=4) > 2000


def test_order_in_space_numbers_nearby_centroids_nearby():
    """A permutation, a function of the centroids alone, and local: consecutive centroids
    in the order are far closer than in k-means label order, and a run of consecutive
    numbers (a group of the budgeted layout) covers one region."""
    from cbir_lib.index.kmeans import order_in_space

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(16, 24)) * 4
    c = (centres[rng.integers(0, 16, 800)] + rng.normal(size=(800, 24))).astype(np.float32)
    o = order_in_space(c)
    assert sorted(o.tolist()) == list(range(800))
    assert np.array_equal(o, order_in_space(c.copy()))
    step = lambda a: float(np.linalg.norm(np.diff(a, axis=0), axis=1).mean())  # noqa: E731
    assert step(c[o]) < 0.5 * step(c)
    # Cut into 16 runs of 50 numbers: each run's rows come from few of the 16 blobs.
    blob = np.argmin(((c[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)[o]
    assert np.mean([len(np.unique(blob[s : s + 50])) for s in range(0, 800, 50)]) <= 3
    assert order_in_space(c[:5]).tolist() == [0, 1, 2, 3, 4]
