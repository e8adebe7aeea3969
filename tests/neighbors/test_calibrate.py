"""auto's nprobe search (smallest_nprobe), on a recall curve known in advance."""

import numpy as np

from cbir_lib.common.sampling import first_by_key, sample_fraction, sampled
from cbir_lib.neighbors.calibrate import rows_of, smallest_nprobe, step_up


def _curve(needed: int):
    """A monotone recall curve that meets 0.95 from ``needed`` cells on (bound = recall - 0.01)."""

    def measure(p: int):
        r = 0.96 if p >= needed else 0.90
        return r, r - 0.01, 0.1 * p

    return measure


def test_doubles_then_bisects_to_within_an_eighth():
    best, tried = smallest_nprobe(_curve(40), 16, 1000, 0.95)
    assert [p for p, *_ in tried] == [16, 32, 64, 48, 40, 36]
    assert best == 40
    assert tried[4] == (40, 0.96, 0.95, 4.0)


def test_a_start_that_meets_the_target_is_kept():
    best, tried = smallest_nprobe(_curve(8), 16, 1000, 0.95)
    assert best == 16 and [p for p, *_ in tried] == [16]


def test_stops_at_every_cell_when_nothing_meets_the_target():
    best, tried = smallest_nprobe(_curve(10_000), 16, 100, 0.95)
    assert best == 100 and [p for p, *_ in tried] == [16, 32, 64, 100]


def test_verification_keeps_a_choice_its_own_sample_confirms():
    best, tried = step_up(_curve(32), 32, 1000, 0.95)
    assert best == 32 and [p for p, *_ in tried] == [32]


def test_verification_steps_up_by_an_eighth_until_its_sample_meets_the_target():
    """A calibration that chose 32 on a lucky sample, where this sample needs 40."""
    best, tried = step_up(_curve(40), 32, 1000, 0.95)
    assert [p for p, *_ in tried] == [32, 36, 40] and best == 40
    assert tried[-1][2] >= 0.95 > tried[-2][2]


def test_verification_decides_on_the_bound_and_stops_at_every_cell():
    """A point estimate at the target is not enough: the promise is the 95 % bound's."""

    def measure(p: int):
        return (0.951, 0.94, 1.0) if p < 10 else (0.97, 0.955, 1.0)

    best, tried = step_up(measure, 8, 100, 0.95)
    assert best == 10 and [p for p, *_ in tried] == [8, 9, 10]
    best, tried = step_up(_curve(10_000), 64, 80, 0.95)
    assert best == 80 and [p for p, *_ in tried] == [64, 72, 80]


def test_a_sample_by_key_keeps_its_images_when_the_collection_changes_a_little():
    """The first m images by id hash: a collection that lost 0.4 % and gained 1 % keeps
    nearly all of its sample (drawing m of n positions keeps about m / n of it)."""
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(-(2**62), 2**62, 200_010))[:200_000].astype(np.int64)
    m = 1500
    before = ids[first_by_key(ids, m, 7)]
    kept = np.delete(ids, rng.choice(ids.size, 800, replace=False))
    now = np.concatenate([kept, np.arange(2000, dtype=np.int64) * 104_729 + 11])[::-1]  # and in another order
    after = now[first_by_key(now, m, 7)]
    assert before.size == after.size == m and np.unique(after).size == m
    assert np.isin(before, after).mean() > 0.98
    # In key order, so that a sample's first images are a smaller sample of it ...
    np.testing.assert_array_equal(ids[first_by_key(ids, 500, 7)], before[:500])
    # ... made of the images a fraction's hash filter keeps, and of another seed apart.
    assert sampled(before, sample_fraction(m, ids.size), 7).all()
    assert np.isin(ids[first_by_key(ids, m, 8)], before).mean() < 0.05
    assert first_by_key(ids[:3], 5, 7).size == 3 and first_by_key(ids, 0, 7).size == 0


def test_rows_of_takes_the_same_rows_of_an_array_or_a_tuple():
    rows = np.array([True, False, True])
    assert rows_of(np.array([5, 6, 7]), rows).tolist() == [5, 7]
    a, b = rows_of((np.array([1, 2, 3]), np.array([[1], [2], [3]])), rows)
    assert a.tolist() == [1, 3] and b.tolist() == [[1], [3]]
