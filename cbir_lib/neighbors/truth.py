"""The exact recall sample carried from run to run: a snapshot's ``_truth/``.

Every neighbours run measures recall against exact search over the whole collection. An
incremental night did that for a sample of new images and one of old images, and both
scanned every vector: at 100M x 1,280 about 1,800 s of a night on 2 slots, the old half
as much as the new. But an old image's exact list changes only by what the night changed.

A run keeps the exact lists of its **members**: the images whose sample key
(:func:`~cbir_lib.common.sampling.sample_key`) lies in a range the full run set: at most a
**bound**, the first :func:`carry_size` images by ``(key, id)``, or, where the full run
calibrated ``nprobe`` on its first images by key, its verification images, after those
(``after``): a night's recall is then not measured on the images ``nprobe`` was chosen
on. Each list is the exact top-``depth``
of its collection (``depth`` up to ``k + reserve``), with the member's vector. A night
then, for each member that stays,

1. drops the neighbours removed tonight. A list that had ``depth`` entries and lost ``r``
   of them is the exact top-``(depth - r)`` of the collection less the removed: anything
   else of the old collection ranked below all of it, in ``(-score, id)`` order. A list
   with fewer entries than its depth held every other image, and still does;
2. merges an exact scan of tonight's **added rows** only (:func:`advance`), which is
   exact at that depth: the collection is the old one less the removed, plus the added;
3. keeps it if the depth is still at least ``k``. A shorter one is searched again over
   everything, with the new sample.

The members added tonight (their key under the bound) get a full exact search, which the
new sample gives them: they are its first images by key. The night's old sample is the
first ``recall_sample / 2`` members by key that were there before tonight, its new
sample the first as many added images. Both are uniform samples: a key does not depend
on a vector or a list. Only the new sample and the few refreshed lists scan every
vector; the old sample costs a scan of the added rows.

Pure numpy; the night's Spark side is in :mod:`~cbir_lib.neighbors.incremental`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from cbir_lib.common import sampling
from cbir_lib.vectors.topk import NO_ID, select

TRUTH = "_truth"
RAW_COLUMNS = ("vector", "scores", "neighbor_ids")  # float bytes: written plain (remote.write_parquet)
# Members past the old sample's half of recall_sample: the images nights remove (0.4 % a
# night in the benchmark's shape) leave the old sample full for many nights.
CARRY_MARGIN = 0.2


def carry_size(recall_sample: int) -> int:
    """The members a full run keeps: the old sample's ``recall_sample // 2`` and a margin."""
    half = int(recall_sample) // 2
    return half + max(1, math.ceil(CARRY_MARGIN * half)) if half else 0


@dataclass(frozen=True)
class Truth:
    """Members' exact lists, in ``(key, id)`` order."""

    ids: np.ndarray  # (m,) int64
    keys: np.ndarray  # (m,) int64: sample_key(ids, seed)
    vectors: np.ndarray  # (m, dim) float32, as the store holds them
    scores: np.ndarray  # (m, width) float32, -inf past a list's end
    nbrs: np.ndarray  # (m, width) int64, NO_ID past a list's end
    depth: np.ndarray  # (m,) int32: each list is its collection's exact top-depth
    seed: int
    bound: tuple[int, int]  # the last member's (key, id) at the full run
    after: tuple[int, int] | None = None  # members come after this (key, id), if any

    @property
    def width(self) -> int:
        return int(self.scores.shape[1])

    def take(self, rows: np.ndarray) -> Truth:
        return replace(
            self,
            ids=self.ids[rows],
            keys=self.keys[rows],
            vectors=self.vectors[rows],
            scores=self.scores[rows],
            nbrs=self.nbrs[rows],
            depth=self.depth[rows],
        )


def in_bound(ids: np.ndarray, seed: int, bound: tuple[int, int], after: tuple[int, int] | None = None) -> np.ndarray:
    """Whether each of ``ids`` is a member: ``(key, id)`` at most ``bound`` (and past ``after``)."""
    ids = np.asarray(ids, np.int64)
    key = sampling.sample_key(ids, seed)
    inside = (key < bound[0]) | ((key == bound[0]) & (ids <= bound[1]))
    if after is not None:
        inside &= (key > after[0]) | ((key == after[0]) & (ids > after[1]))
    return inside


def last_by_key(ids: np.ndarray, seed: int) -> tuple[int, int]:
    """The ``(key, id)`` of the last of ``ids`` (not empty) by ``(key, id)``."""
    ids = np.asarray(ids, np.int64)
    last = int(ids[by_key(ids, seed)[-1]])
    return int(sampling.sample_key(np.array([last]), seed)[0]), last


def by_key(ids: np.ndarray, seed: int) -> np.ndarray:
    """The order of ``ids`` by ``(key, id)``."""
    ids = np.asarray(ids, np.int64)
    return np.lexsort((ids, sampling.sample_key(ids, seed)))


def first(ids: np.ndarray, m: int, seed: int) -> np.ndarray:
    """The ``m`` first of ``ids`` by ``(key, id)``, sorted by id."""
    ids = np.asarray(ids, np.int64)
    return np.sort(ids[by_key(ids, seed)[: max(0, int(m))]])


def from_full(ids, vectors, scores, nbrs, seed: int, m: int, after: tuple[int, int] | None = None) -> Truth | None:
    """A full run's truth: of its exact sample (``ids`` with their vectors and exact lists,
    any order, ``ids`` its first images by key), the first ``m`` by key (past ``after``,
    if given). None without any."""
    ids = np.asarray(ids, np.int64)
    if after is not None:
        take = np.flatnonzero(in_bound(ids, seed, (2**63 - 1, 2**63 - 1), after))
        ids, vectors, scores, nbrs = ids[take], np.asarray(vectors)[take], np.asarray(scores)[take], np.asarray(nbrs)[take]
    if m <= 0 or ids.size == 0:
        return None
    order = by_key(ids, seed)[:m]
    ids = ids[order]
    keys = sampling.sample_key(ids, seed)
    width = int(np.asarray(scores).shape[1])
    return Truth(
        ids,
        keys,
        np.ascontiguousarray(np.asarray(vectors, np.float32)[order]),
        np.asarray(scores, np.float32)[order],
        np.asarray(nbrs, np.int64)[order],
        np.full(ids.size, width, np.int32),
        int(seed),
        (int(keys[-1]), int(ids[-1])),
        after,
    )


def advance(t: Truth, removed: np.ndarray, cand_scores: np.ndarray, cand_ids: np.ndarray, k: int) -> tuple[Truth, np.ndarray]:
    """The members that stay tonight (not in ``removed``), each list less its removed
    neighbours and merged with ``cand_*`` (its exact top-width over tonight's added rows,
    aligned with ``t``'s rows), at the depth that is still exact; and which of them are
    now shorter than ``k`` (to be searched again)."""
    removed = np.asarray(removed, np.int64)
    stay = ~np.isin(t.ids, removed)
    t = t.take(np.flatnonzero(stay))
    cand_scores, cand_ids = np.asarray(cand_scores)[stay], np.asarray(cand_ids)[stay]
    m, w = t.scores.shape
    if m == 0:
        return t, np.zeros(0, bool)
    within = np.arange(w)[None, :] < t.depth[:, None]
    valid = np.isfinite(t.scores) & within
    gone = valid & np.isin(t.nbrs, removed)
    complete = valid.sum(1) < t.depth  # the list held every other image
    depth = np.where(complete, t.depth, t.depth - gone.sum(1)).astype(np.int32)
    keep = valid & ~gone
    rows = np.concatenate([np.repeat(np.arange(m), w)[keep.ravel()], np.repeat(np.arange(m), cand_scores.shape[1])])
    sc = np.concatenate([t.scores[keep], cand_scores.ravel()])
    ids = np.concatenate([t.nbrs[keep], cand_ids.ravel()])
    v, i = select(rows, sc, ids, m, w)
    past = np.arange(w)[None, :] >= depth[:, None]
    v[past], i[past] = -np.inf, NO_ID
    return replace(t, scores=v, nbrs=i, depth=depth), depth < k


def searched(ids, vectors, scores, nbrs, seed: int, bound: tuple[int, int], after: tuple[int, int] | None = None) -> Truth:
    """Members searched whole tonight (their lists at full depth), for :func:`combine`."""
    ids = np.asarray(ids, np.int64)
    w = int(np.asarray(scores).shape[1]) if np.asarray(scores).ndim == 2 else 0
    dim = int(np.asarray(vectors).shape[1]) if np.asarray(vectors).ndim == 2 else 0
    return Truth(
        ids,
        sampling.sample_key(ids, seed),
        np.asarray(vectors, np.float32).reshape(ids.size, dim),
        np.asarray(scores, np.float32).reshape(ids.size, w),
        np.asarray(nbrs, np.int64).reshape(ids.size, w),
        np.full(ids.size, w, np.int32),
        int(seed),
        bound,
        after,
    )


def combine(a: Truth, b: Truth) -> Truth:
    """``a``'s and ``b``'s members (``b``'s lists where both hold one), in ``(key, id)`` order."""
    a = a.take(np.flatnonzero(~np.isin(a.ids, b.ids)))
    ids = np.concatenate([a.ids, b.ids])
    order = by_key(ids, a.seed)
    cat = {f: np.concatenate([getattr(a, f), getattr(b, f)]) for f in ("ids", "keys", "vectors", "scores", "nbrs", "depth")}
    return replace(a, **{f: x[order] for f, x in cat.items()})


def lists_of(t: Truth, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, nbrs)`` of the members ``ids`` (all of them members)."""
    order = np.argsort(t.ids)
    rows = order[np.searchsorted(t.ids, ids, sorter=order)]
    return t.scores[rows], t.nbrs[rows]


def to_arrow(t: Truth):
    """The members as an Arrow table, one row each: the vectors, scores and neighbour ids as
    fixed-width binary (:func:`~cbir_lib.vectors.arrow.vectors_binary`; the ids' bytes viewed as float32)."""
    import pyarrow as pa

    from cbir_lib.vectors.arrow import vectors_binary

    return pa.table(
        {
            "image_id": pa.array(t.ids, pa.int64()),
            "depth": pa.array(t.depth, pa.int32()),
            "vector": vectors_binary(t.vectors),
            "scores": vectors_binary(t.scores.astype("<f4")),
            "neighbor_ids": vectors_binary(np.ascontiguousarray(t.nbrs, "<i8").view("<f4")),
        }
    )


def from_arrow(table, record: dict) -> Truth:
    """:func:`to_arrow`'s table, with the manifest's ``truth`` record (seed, bound, width, dim)."""
    from cbir_lib.vectors.arrow import binary_to_numpy

    seed, w, dim = int(record["seed"]), int(record["width"]), int(record["dim"])
    bound = (int(record["bound"][0]), int(record["bound"][1]))
    after = (int(record["after"][0]), int(record["after"][1])) if record.get("after") else None
    ids = table.column("image_id").to_numpy().astype(np.int64)
    t = Truth(
        ids,
        sampling.sample_key(ids, seed),
        np.array(binary_to_numpy(table.column("vector"), dim), np.float32).reshape(ids.size, dim),
        np.array(binary_to_numpy(table.column("scores"), w), np.float32).reshape(ids.size, w),
        np.ascontiguousarray(binary_to_numpy(table.column("neighbor_ids"), 2 * w), "<f4").view("<i8").astype(np.int64).reshape(ids.size, w),
        table.column("depth").to_numpy().astype(np.int32),
        seed,
        bound,
        after,
    )
    return t.take(by_key(t.ids, seed))


def snapshot_part(files, t: Truth | None) -> tuple | None:
    """The ``extra`` a snapshot's commit writes as ``_truth/`` (:func:`~cbir_lib.neighbors.lists.commit_lists`), or None."""
    return (files, TRUTH, to_arrow(t), RAW_COLUMNS) if t is not None else None


def record(t: Truth) -> dict:
    """The manifest's ``truth`` record of a snapshot's ``_truth/``."""
    return {
        "output": TRUTH,
        "rows": int(t.ids.size),
        "seed": int(t.seed),
        "bound": [int(t.bound[0]), int(t.bound[1])],
        "after": [int(t.after[0]), int(t.after[1])] if t.after is not None else None,
        "width": t.width,
        "dim": int(t.vectors.shape[1]),
    }
