import numpy as np
import pytest

from cbir_lib.neighbors import rerank


def test_weights_uniform_alpha_and_padding():
    s = np.array([[0.9, 0.5, -0.2, -np.inf]], np.float32)
    np.testing.assert_array_equal(rerank.weights(s, 0.0), [[1, 1, 1, 0]])
    np.testing.assert_allclose(rerank.weights(s, 3.0), [[0.729, 0.125, 0.0, 0.0]], rtol=1e-6)


def test_augment_by_hand():
    x = np.array([[1.0, 0.0]], np.float32)
    y = np.array([[[0.0, 1.0], [0.6, 0.8]]], np.float32)
    s = np.array([[0.0, 0.6]], np.float32)
    # uniform: (1, 0) + (0, 1) + (0.6, 0.8) = (1.6, 1.8)
    np.testing.assert_allclose(rerank.augment(x, y, s, 0.0), [[1.6, 1.8] / np.hypot(1.6, 1.8)], rtol=1e-6)
    # alpha 1: (1, 0) + 0 * (0, 1) + 0.6 * (0.6, 0.8) = (1.36, 0.48)
    np.testing.assert_allclose(rerank.augment(x, y, s, 1.0), [[1.36, 0.48] / np.hypot(1.36, 0.48)], rtol=1e-6)
    with pytest.raises(ValueError):
        rerank.augment(x, y[:, :, :1], s, 1.0)


def test_exact_rerank_modes():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:5] + 0.1
    q0, g0 = rerank.exact_rerank(q, g, "none", 3, 3.0)
    assert q0 is q and g0 is g
    qa, ga = rerank.exact_rerank(q, g, "aqe", 3, 3.0)
    assert ga is g and np.allclose(np.linalg.norm(qa, axis=1), 1)
    # aqe by hand for query 0: itself plus its 3 best gallery rows, uniformly.
    top = np.argsort(-(q[0] @ g.T))[:3]
    want = q[0] + g[top].sum(0)
    np.testing.assert_allclose(qa[0], want / np.linalg.norm(want), rtol=1e-5)
    qd, gd = rerank.exact_rerank(g, g, "dba", 3, 3.0, q_in_g=True)
    assert qd is gd and not np.allclose(gd, g)
    # In the all-pairs case a row is not its own neighbour: row 0 + its 3 best other rows.
    s0 = g[0] @ g.T
    s0[0] = -np.inf
    top = np.argsort(-s0)[:3]
    w = np.maximum(s0[top], 0) ** 3
    want = g[0] + (w[:, None] * g[top]).sum(0)
    np.testing.assert_allclose(gd[0], want / np.linalg.norm(want), rtol=1e-5)
