"""auto's nprobe search (smallest_nprobe), on a recall curve known in advance."""

from cbir_lib.neighbors.calibrate import smallest_nprobe


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
