"""Neighbour lists as sorted numpy columns, and what an incremental night does to them.

A set of lists is four aligned arrays sorted by ``(image_id, rank)``: :class:`Lists`. These
are the operations of :mod:`cbir_lib.neighbors.incremental` on lists held in this process
(``run.execution``: the driver), each the numpy twin of the Spark plan it replaces there,
row for row:

- :func:`list_stats`: each list's length (its largest rank), last score (its smallest)
  and how many of its neighbours are in a removed set (a ``groupBy``);
- :func:`ranked`: candidate rows re-ranked by ``(-score, neighbour id)`` per list and cut
  at a width (a window's ``row_number``);
- :func:`top_changed`: the lists whose rows up to rank ``k`` differ between two sets (a
  full outer join on every column).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for a sorted ``sorted_set``: one binary search per
    value (15M values against 4k ids: a fraction of ``np.isin``'s sort of both)."""
    if not sorted_set.size:
        return np.zeros(values.shape, bool)
    at = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[at] == values


@dataclass
class Lists:
    """Neighbour rows sorted by ``(qid, rank)``: ``qid`` the list's image, ``nid`` its neighbour."""

    qid: np.ndarray  # int64
    rank: np.ndarray  # int32, 1.. within a list
    nid: np.ndarray  # int64
    score: np.ndarray  # float32
    _lists: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls) -> Lists:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def of(cls, qid, rank, nid, score, is_sorted: bool = False) -> Lists:
        qid, rank = np.asarray(qid, np.int64), np.asarray(rank, np.int32)
        nid, score = np.asarray(nid, np.int64), np.asarray(score, np.float32)
        if not is_sorted and qid.size:
            # A stable sort by list keeps each list's rows in the order they came, which is
            # rank order for every writer of a snapshot (0.7 s for 15M rows, the two-key
            # lexsort 2.2 s); where it is not, the lexsort.
            order = np.argsort(qid, kind="stable")
            q, r = qid[order], rank[order]
            if not np.all((r[1:] > r[:-1]) | (q[1:] != q[:-1])):
                order = np.lexsort((rank, qid))
            qid, rank, nid, score = qid[order], rank[order], nid[order], score[order]
        return cls(qid, rank, nid, score)

    @classmethod
    def from_arrow(cls, table) -> Lists:
        """From an Arrow table with ``image_id, rank, neighbor_id, score``, in any order."""
        col = table.column
        return cls.of(col("image_id").to_numpy(), col("rank").to_numpy(), col("neighbor_id").to_numpy(), col("score").to_numpy())

    def to_arrow(self):
        import pyarrow as pa

        return pa.table(
            [pa.array(self.qid), pa.array(self.rank), pa.array(self.nid), pa.array(self.score)],
            names=["image_id", "rank", "neighbor_id", "score"],
        )

    def __len__(self) -> int:
        return int(self.qid.size)

    def where(self, mask: np.ndarray) -> Lists:
        return Lists(self.qid[mask], self.rank[mask], self.nid[mask], self.score[mask])

    def of_lists(self, ids: np.ndarray, keep: bool = True) -> Lists:
        """The rows of the lists of ``ids`` (sorted), or (``keep=False``) of every other list.
        Decided list by list, then spread over the rows (1M lookups, not 15M)."""
        _, list_ids, lengths = self.lists()
        hit = np.repeat(member(list_ids, ids), lengths)
        return self.where(hit if keep else ~hit)

    def lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, ids, lengths)``: each list's first row, image and rows (kept)."""
        if self._lists is None:
            if not self.qid.size:
                z = np.zeros(0, np.int64)
                self._lists = (z, z, z)
            else:
                s = np.flatnonzero(np.r_[True, self.qid[1:] != self.qid[:-1]])
                self._lists = (s, self.qid[s], np.diff(np.r_[s, self.qid.size]))
        return self._lists

    def starts(self) -> np.ndarray:
        """The first row of each list."""
        return self.lists()[0]


def concat(*parts: Lists) -> Lists:
    """Lists of disjoint images, together, sorted by ``(qid, rank)`` (each part is: a stable
    sort of sorted runs by list is a merge)."""
    parts = tuple(p for p in parts if len(p))
    if not parts:
        return Lists.empty()
    qid = np.concatenate([p.qid for p in parts])
    order = np.argsort(qid, kind="stable")
    return Lists(qid[order], *(np.concatenate([getattr(p, f) for p in parts])[order] for f in ("rank", "nid", "score")))


def list_stats(lists: Lists, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, length, last, lost)`` of every list: its image, largest rank, smallest score,
    and how many of its neighbours are in ``removed`` (sorted ids)."""
    s = lists.starts()
    if not s.size:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32), z
    length = np.maximum.reduceat(lists.rank, s).astype(np.int64)
    last = np.minimum.reduceat(lists.score, s)
    lost = np.add.reduceat(member(lists.nid, removed).astype(np.int64), s)
    return lists.qid[s], length, last, lost


def ranked(qid: np.ndarray, nid: np.ndarray, score: np.ndarray, width: int) -> Lists:
    """Candidate rows ranked per list by ``(-score, nid)``, the first ``width`` of each kept."""
    qid, nid, score = np.asarray(qid, np.int64), np.asarray(nid, np.int64), np.asarray(score, np.float32)
    if not qid.size:
        return Lists.empty()
    order = np.lexsort((nid, -score, qid))
    qid, nid, score = qid[order], nid[order], score[order]
    first = np.r_[True, qid[1:] != qid[:-1]]
    starts = np.flatnonzero(first)
    rank = np.arange(qid.size, dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, qid.size])) + 1
    keep = rank <= width
    return Lists(qid[keep], rank[keep].astype(np.int32), nid[keep], score[keep])


def top_changed(old: Lists, new: Lists, ids: np.ndarray, k: int) -> np.ndarray:
    """Of the lists of ``ids`` (sorted), those whose rows up to rank ``k`` (rank, neighbour
    and score) are not the same in ``old`` and ``new``: sorted ids."""
    if not ids.size:
        return np.zeros(0, np.int64)
    a, b = old.of_lists(ids), new.of_lists(ids)
    a, b = a.where(a.rank <= k), b.where(b.rank <= k)
    ia, ib = np.searchsorted(ids, a.qid), np.searchsorted(ids, b.qid)
    ca, cb = np.bincount(ia, minlength=ids.size), np.bincount(ib, minlength=ids.size)
    differ = ca != cb
    # Lists of equal length line up row for row (both sorted by list, then rank).
    sa, sb = ~differ[ia], ~differ[ib]
    rows = ia[sa]
    neq = (a.rank[sa] != b.rank[sb]) | (a.nid[sa] != b.nid[sb]) | (a.score[sa] != b.score[sb])
    differ[rows[neq]] = True
    return ids[differ]
