"""Retrieval metrics against cases worked out by hand."""

import numpy as np
import pytest

from cbir_lib.evaluate import metrics


def test_hand_computed_case():
    # Relevant at ranks 1 and 3 of 4, three relevant items exist.
    rel = np.array([[1, 0, 1, 0]], bool)
    assert metrics.precision_at_k(rel, 4)[0] == 0.5
    assert metrics.recall_at_k(rel, [3], 4)[0] == pytest.approx(2 / 3)
    # AP@4 = (1/1 + 2/3) / min(4, 3)
    assert metrics.average_precision(rel, [3], 4)[0] == pytest.approx((1 + 2 / 3) / 3)
    assert metrics.average_precision(rel, [3])[0] == pytest.approx((1 + 2 / 3) / 3)
    assert metrics.precision_at_k(rel, 2)[0] == 0.5 and metrics.average_precision(rel, [3], 2)[0] == pytest.approx(1 / 2)


def test_more_relevant_than_k_and_full_ap():
    rel = np.array([[0, 1, 1, 1, 0]], bool)
    # hits at 2, 3, 4: precisions 1/2, 2/3, 3/4
    s = 1 / 2 + 2 / 3 + 3 / 4
    assert metrics.average_precision(rel, [10], 5)[0] == pytest.approx(s / 5)
    assert metrics.average_precision(rel, [10])[0] == pytest.approx(s / 10)
    # a perfect top-k scores 1 even when more relevant items exist
    assert metrics.average_precision(np.ones((1, 5), bool), [10], 5)[0] == 1.0


def test_short_lists_are_padded_and_empty_classes_are_nan():
    rel = np.array([[1, 1], [0, 0]], bool)
    p = metrics.precision_at_k(rel, 4)
    np.testing.assert_allclose(p, [0.5, 0.0])
    r = metrics.recall_at_k(rel, [2, 0], 4)
    assert r[0] == 1.0 and np.isnan(r[1])
    s = metrics.summarise(metrics.per_query(rel, [2, 0], 4))
    assert s["queries"] == 2 and s["precision_at_k"] == 0.25 and s["recall_at_k"] == 1.0
    assert s["map_at_k"] == 1.0, "the query with nothing relevant is left out of mAP"
    assert s["mean_precision_at_k"] == s["precision_at_k"]


def test_ns_score_and_relevance():
    labels = np.array(["a", "b"])
    ranked = np.array([["a", "a", "c", "a"], ["c", "c", "c", "b"]])
    rel = metrics.relevance(labels, ranked)
    np.testing.assert_array_equal(rel, [[1, 1, 0, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(metrics.ns_score(rel), [3.0, 1.0])
    rel = metrics.relevance(labels, ranked, valid=np.array([[1, 0, 1, 1], [1, 1, 1, 1]], bool))
    assert rel[0].tolist() == [True, False, False, True]


def test_bad_shapes():
    with pytest.raises(ValueError):
        metrics.average_precision(np.ones(3, bool), [1])
    with pytest.raises(ValueError):
        metrics.recall_at_k(np.ones((2, 3), bool), [1], 3)
    with pytest.raises(ValueError):
        metrics.precision_at_k(np.ones((2, 3), bool), 0)
