"""auto's recall calibration: the smallest ``nprobe`` whose sample recall meets the target.

The neighbours run searches a sample of queries exactly once (its truth), then searches the
sample at growing ``nprobe`` and bisects (:func:`smallest_nprobe`), bounding the
collection's recall from below at 95 % (:func:`~cbir_lib.vectors.topk.recall_lower_bound`).
The nprobe so chosen is then checked on a second sample (:func:`verify`): the calibration
picks the first nprobe its own sample passes, so its recall there leans high (on a 1M
mixture it measured 0.9559 at nprobe 32, where independent samples measured 0.944-0.949).
With the store on every executor, the whole calibration runs in one task that holds the
store; in the grouped layout each nprobe tried is a sweep over the groups.
"""

from __future__ import annotations

import logging

import numpy as np

from cbir_lib.neighbors import budget
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.neighbors.tasks import _search_positions
from cbir_lib.vectors.topk import recall_at_k, recall_lower_bound

log = logging.getLogger(__name__)


def calibrate(sc, spec: SearchSpec, sample_pos, truth, nprobe: int, n_cells: int, target: float, steps: list, k: int) -> tuple[int, float]:
    """The smallest ``nprobe`` (to within 1/8) whose sample recall meets ``target``
    (:func:`smallest_nprobe`), and the sample search's seconds at it.

    With the store on every executor, the whole search for it runs in one task, which
    holds the store: one Spark job instead of one per nprobe tried (each cost ~0.5 s of
    scheduling at 100k here, for 0.1-0.3 s of search). In the grouped layout each nprobe
    tried is a sweep over the groups, from the driver."""
    if spec.groups_uri:

        def measure(p: int) -> tuple[float, float, float]:
            return sample_recall(sc, spec.with_(nprobe=p), sample_pos, truth, with_bound=True)

        best, tried = smallest_nprobe(measure, nprobe, n_cells, target)
    else:
        best, tried = sc.parallelize([0], 1).mapPartitions(_calibrate_task(spec, sample_pos, truth, nprobe, n_cells, target)).collect()[0]
    for p, r, bound, secs in tried:
        steps.append(
            {
                "nprobe": p,
                "shortlist": spec.shortlist,
                "recall": round(r, 4),
                "lower_bound": round(bound, 4),
                "sample_seconds": round(secs, 3),
                "sample": "calibrate",
            }
        )
        log.info(
            "auto: nprobe %d%s gives recall@%d %.4f on the sample (95 %% bound %.4f; %.2f s)",
            p,
            f" (reduced, shortlist {spec.shortlist})" if spec.shortlist else "",
            k,
            r,
            bound,
            secs,
        )
    return best, next(secs for p, _, _, secs in tried if p == best)


def smallest_nprobe(measure, nprobe: int, n_cells: int, target: float) -> tuple[int, list[tuple[int, float, float, float]]]:
    """The smallest ``nprobe`` (to within 1/8) whose ``measure(nprobe) -> (recall, bound,
    seconds)`` bound meets ``target``, and every ``(nprobe, recall, bound, seconds)`` tried.

    Doubles from ``nprobe`` until the target is met, then bisects between the last miss
    and the first hit: doubling alone overshot at 1M (16 -> 32 missed, 64 gave 0.975
    where about 48 would do, at 4/3 of the cost).
    (Halving a start that already met the target was tried on Fashion-MNIST's 70k real
    1,280-d vectors: 16 -> 11 cost four more sample searches, 3.3 s, and saved 0.4 s of
    search; at that size the search hardly depends on nprobe.)

    "Meets" is about the collection, not the sample: the sample's recall less 1.645
    standard errors of its per-query mean (a one-sided 95 % bound) must reach ``target``.
    """
    tried: list[tuple[int, float, float, float]] = []
    bounds: dict[int, float] = {}

    def bound_at(p: int) -> float:
        r, bound, secs = measure(p)
        tried.append((p, float(r), float(bound), float(secs)))
        bounds[p] = bound
        return bound

    lo = 0  # largest nprobe known to miss
    while bound_at(nprobe) < target and nprobe < n_cells:
        lo, nprobe = nprobe, min(n_cells, nprobe * 2)
    hi = nprobe
    if bounds[hi] >= target:
        while lo and hi - lo > max(1, hi // 8):
            mid = (lo + hi) // 2
            if bound_at(mid) >= target:
                hi = mid
            else:
                lo = mid
    return hi, tried


def verify(sc, spec: SearchSpec, sample, truth, nprobe: int, n_cells: int, target: float, steps: list, k: int) -> tuple[int, float, float]:
    """``(nprobe, recall, seconds)``: the calibrated ``nprobe`` checked on queries the
    calibration did not see (:func:`step_up`); the recall and the sample search's seconds
    are theirs at the nprobe returned."""

    def measure(p: int) -> tuple[float, float, float]:
        return sample_recall(sc, spec.with_(nprobe=p), sample, truth, with_bound=True)

    best, tried = step_up(measure, nprobe, n_cells, target)
    for p, r, bound, secs in tried:
        steps.append(
            {
                "nprobe": p,
                "shortlist": spec.shortlist,
                "recall": round(r, 4),
                "lower_bound": round(bound, 4),
                "sample_seconds": round(secs, 3),
                "sample": "verify",
            }
        )
        log.info("auto: nprobe %d gives recall@%d %.4f on the verification sample (%.2f s)", p, k, r, secs)
    _, r, _, secs = tried[-1]
    return best, r, secs


def step_up(measure, nprobe: int, n_cells: int, target: float) -> tuple[int, list[tuple[int, float, float, float]]]:
    """The first of ``nprobe``, then an eighth more at each step, whose ``measure(nprobe)
    -> (recall, bound, seconds)`` recall meets ``target`` (or every cell), and every
    ``(nprobe, recall, bound, seconds)`` tried.

    The point estimate decides, not the bound: the calibration already asked for the bound
    on its own sample, and asking for it twice would buy recall the target does not ask for.
    Stepping up on this sample selects too, but only where the calibration's choice fell
    short, and then by the smallest step."""
    tried: list[tuple[int, float, float, float]] = []
    while True:
        r, bound, secs = measure(nprobe)
        tried.append((nprobe, float(r), float(bound), float(secs)))
        if r >= target or nprobe >= n_cells:
            return nprobe, tried
        nprobe = min(n_cells, nprobe + max(1, nprobe // 8))


def verification_positions(rng: np.random.Generator, n: int, sample_pos: np.ndarray, m: int) -> np.ndarray:
    """Up to ``m`` sorted store positions of ``[0, n)`` drawn by ``rng`` apart from
    ``sample_pos``, without an O(n) array (draws of a few thousand at any n)."""
    m = min(m, n - sample_pos.size)
    if m <= 0:
        return np.zeros(0, np.int64)
    drawn = rng.choice(n, min(n, sample_pos.size + m), replace=False)
    return np.sort(drawn[~np.isin(drawn, sample_pos)][:m]).astype(np.int64)


def rows_of(sample, rows: np.ndarray):
    """The rows of a sample or its truth: an array, or a tuple of row-aligned arrays."""
    return tuple(a[rows] for a in sample) if isinstance(sample, tuple) else sample[rows]


def _calibrate_task(spec: SearchSpec, positions: np.ndarray, truth, nprobe: int, n_cells: int, target: float):
    """RDD partition function: :func:`smallest_nprobe` on this executor's store."""

    def fn(_):
        def measure(p: int) -> tuple[float, float, float]:
            vals, ids, seconds = next(_search_positions(spec.with_(nprobe=p), positions)(None))
            return (*_recall_of(spec, vals, ids, truth), seconds)

        yield smallest_nprobe(measure, nprobe, n_cells, target)

    return fn


def _recall_of(spec: SearchSpec, vals: np.ndarray, ids: np.ndarray, truth) -> tuple[float, float]:
    """Recall@k of a sample's results against its exact ``truth``, and its one-sided 95 %
    lower bound. Lists are searched k + reserve deep; recall is of the top k the table holds."""
    k = spec.k_out or spec.k
    _, tv, ti = truth
    vals, ids, tv, ti = vals[:, :k], ids[:, :k], tv[:, :k], ti[:, :k]
    return recall_at_k(ids, ti, tv, vals), recall_lower_bound(ids, ti, tv, vals)


def sample_recall(sc, spec: SearchSpec, positions, truth, with_bound: bool = False) -> tuple:
    """Recall of the spec's search on the sample (store positions; in the grouped layout the
    sample's ``(vectors, ids, cells)``) and the seconds it took; ``with_bound``: also the
    collection recall's one-sided 95 % lower bound, ``(recall, bound, seconds)``."""
    if spec.groups_uri:
        vals, ids, seconds, _ = budget.sample_search(sc, spec, positions, budget.core(spec))
    else:
        vals, ids, seconds = sc.parallelize([0], 1).mapPartitions(_search_positions(spec, positions)).collect()[0]
    recall, bound = _recall_of(spec, vals, ids, truth)
    return (recall, bound, seconds) if with_bound else (recall, seconds)
