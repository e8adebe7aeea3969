"""Neighbour lists held in this process, and what an incremental night does to them.

Two shapes:

- :class:`Lists`: rows ``(qid, rank, nid, score)`` sorted by ``(qid, rank)``, as a
  snapshot's files and a search's output hold them;
- :class:`Dense`: one row per list, its neighbours in rank order in slots ``0..length-1``
  of a ``(lists, width)`` array. A night's operations work on whole rows of these, so no
  step sorts the 15M neighbour rows of 1M lists: only list ids (1M) and the night's
  touched lists are sorted.

The operations of :mod:`cbir_lib.neighbors.incremental` on lists held in this process
(``run.execution``: the driver), each the numpy twin of the Spark plan it replaces there,
row for row:

- :func:`list_stats`: each list's length (its largest rank), last score (its smallest)
  and how many of its neighbours are in a removed set (a ``groupBy``);
- :func:`merged`: a list's kept rows and new candidates ranked by ``(-score, neighbour
  id)`` and cut at the width (a window's ``row_number``);
- :func:`top_changed`: the lists whose rows up to rank ``k`` differ between two sets (a
  full outer join on every column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir_lib.vectors.topk import NO_ID, select

# member(): a set this many times smaller than the values is looked up through a bitmap of
# the ids' low bits first, and only the bitmap's hits by binary search.
_BITMAP_SLOTS_PER_ID = 64
# Lists copied at a time where a night assembles its snapshot (a bounded temporary).
_CHUNK_LISTS = 65_536


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_set)`` for a sorted ``sorted_set`` of int64, any shape of
    ``values``. A small set is looked up through a bitmap of the ids' low bits (15M values
    against 4k ids: 0.1 s, one binary search per value 1.0 s); only the bitmap's hits, about
    one in 64 misses, are searched."""
    values = np.asarray(values)
    if not sorted_set.size:
        return np.zeros(values.shape, bool)
    flat = values.ravel()
    if sorted_set.size * _BITMAP_SLOTS_PER_ID * 4 > flat.size:
        return _searched(flat, sorted_set).reshape(values.shape)
    bits = int(sorted_set.size * _BITMAP_SLOTS_PER_ID - 1).bit_length()
    mask = np.int64((1 << bits) - 1)
    table = np.zeros(1 << bits, bool)
    table[sorted_set & mask] = True
    out = table[flat & mask]
    hit = np.flatnonzero(out)
    out[hit] = _searched(flat[hit], sorted_set)
    return out.reshape(values.shape)


def _searched(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[at] == values


@dataclass
class Lists:
    """Neighbour rows sorted by ``(qid, rank)``: ``qid`` the list's image, ``nid`` its neighbour."""

    qid: np.ndarray  # int64
    rank: np.ndarray  # int32, 1.. within a list
    nid: np.ndarray  # int64
    score: np.ndarray  # float32

    @classmethod
    def of(cls, qid, rank, nid, score) -> Lists:
        qid, rank = np.asarray(qid, np.int64), np.asarray(rank, np.int32)
        nid, score = np.asarray(nid, np.int64), np.asarray(score, np.float32)
        if qid.size:
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

    def where(self, mask: np.ndarray) -> Lists:
        return Lists(self.qid[mask], self.rank[mask], self.nid[mask], self.score[mask])


@dataclass
class Dense:
    """Lists as rows: ``ids`` sorted and unique; list ``i``'s neighbours in rank order in
    ``nid[i, :length[i]]`` and ``score[i, :length[i]]``, the slots past it ``NO_ID`` and
    ``-inf``. A list may have no rows (``length`` 0): it writes none."""

    ids: np.ndarray  # int64 (L,)
    nid: np.ndarray  # int64 (L, width)
    score: np.ndarray  # float32 (L, width)
    length: np.ndarray  # int64 (L,)

    @classmethod
    def empty(cls, width: int, n: int = 0) -> Dense:
        return cls(
            np.zeros(n, np.int64), np.full((n, width), NO_ID, np.int64), np.full((n, width), -np.inf, np.float32), np.zeros(n, np.int64)
        )

    @property
    def width(self) -> int:
        return int(self.nid.shape[1])

    def __len__(self) -> int:
        return int(self.ids.size)

    @classmethod
    def from_arrow(cls, tables, width: int) -> Dense:
        """From Arrow tables of rows ``image_id, rank, neighbor_id, score`` (a snapshot's
        files, its ``_reserve/``'s, a search's output), together holding each list's ranks
        ``1..length`` once. A table whose lists come in runs of ascending id (as every
        writer of a snapshot writes them) is placed without a sort; another is sorted first.
        The width grows to the largest rank found."""
        parts = []
        # Batch by batch: a batch's columns are numpy views, where a table's are copies
        # (a list split between batches is two runs, each placed at its ranks).
        for b in (b for t in tables for b in t.select(["image_id", "rank", "neighbor_id", "score"]).to_batches() if b.num_rows):
            c = b.column
            q = c(0).to_numpy().astype(np.int64, copy=False)
            r = c(1).to_numpy().astype(np.int64, copy=False)
            n = c(2).to_numpy().astype(np.int64, copy=False)
            s = c(3).to_numpy().astype(np.float32, copy=False)
            starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
            if starts.size > 1 and not np.all(q[starts[1:]] > q[starts[:-1]]):
                order = np.argsort(q, kind="stable")
                q, r, n, s = q[order], r[order], n[order], s[order]
                starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
            parts.append((q, r, n, s, starts))
        if not parts:
            return cls.empty(width)
        ids = np.unique(np.concatenate([p[0][p[4]] for p in parts]))
        top = max(int(p[1].max()) for p in parts)
        if min(int(p[1].min()) for p in parts) < 1:
            raise ValueError("neighbour lists: a rank below 1")
        out = cls.empty(max(width, top), ids.size)
        out.ids[:] = ids
        w = out.width
        rows = np.zeros(ids.size, np.int64)
        for q, r, n, s, starts in parts:
            at = np.searchsorted(ids, q[starts])
            slot = np.repeat(at * w, np.diff(np.r_[starts, q.size])) + (r - 1)
            out.nid.ravel()[slot] = n
            out.score.ravel()[slot] = s
            rows[at] += np.diff(np.r_[starts, q.size])  # a list is one run of a table: ``at`` is unique
            out.length[at] = np.maximum(out.length[at], np.maximum.reduceat(r, starts))
        if not np.array_equal(rows, out.length) or (out.valid() & ~np.isfinite(out.score)).any():
            raise ValueError("neighbour lists: ranks that are not 1..length, each once")
        return out

    def valid(self) -> np.ndarray:
        """``(L, width)``: the slots that hold a neighbour."""
        return np.arange(self.width)[None, :] < self.length[:, None]

    def of_lists(self, ids: np.ndarray) -> Dense:
        """The lists of ``ids`` (sorted, unique), each as an empty list where absent."""
        at = np.minimum(np.searchsorted(self.ids, ids), max(0, self.ids.size - 1))
        found = self.ids[at] == ids if self.ids.size else np.zeros(ids.size, bool)
        out = Dense.empty(self.width, ids.size)
        out.ids[:] = ids
        rows = at[found]
        out.nid[found], out.score[found], out.length[found] = self.nid[rows], self.score[rows], self.length[rows]
        return out

    def to_lists(self, slots: np.ndarray | None = None) -> Lists:
        """The rows, sorted by ``(qid, rank)``; only those of ``slots`` (a mask of valid
        slots) if given."""
        slots = self.valid() if slots is None else slots
        rank = np.broadcast_to(np.arange(1, self.width + 1, dtype=np.int32), slots.shape)[slots]
        return Lists(np.repeat(self.ids, slots.sum(axis=1)), rank, self.nid[slots], self.score[slots])

    def to_arrow(self):
        return self.to_lists().to_arrow()

    def split(self, k: int, min_score: float | None = None) -> tuple:
        """``(table rows, reserve rows)`` as Arrow tables, as a snapshot divides its rows:
        rank up to ``k`` and score from ``min_score`` (float32), and the rest."""
        valid = self.valid()
        top = valid & (np.arange(self.width)[None, :] < k)
        if min_score is not None:
            top &= self.score >= np.float32(min_score)
        return self.to_lists(top).to_arrow(), self.to_lists(valid & ~top).to_arrow()


def list_stats(lists: Dense, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, length, last, lost)`` of every list: its image, largest rank, smallest score,
    and how many of its neighbours are in ``removed`` (sorted ids). Lists without rows are
    left out (a snapshot has no row for them)."""
    has = lists.length > 0
    valid = lists.valid()
    last = np.where(valid, lists.score, np.float32(np.inf)).min(axis=1) if lists.width else np.zeros(len(lists), np.float32)
    lost = (member(lists.nid, removed) & valid).sum(axis=1).astype(np.int64)
    return lists.ids[has], lists.length[has], last[has].astype(np.float32), lost[has]


def merged(old: Dense, ids: np.ndarray, removed: np.ndarray, extra: Lists, width: int) -> Dense:
    """The lists of ``ids`` (sorted, unique): their rows in ``old`` less the neighbours in
    ``removed`` (sorted), and the candidate rows ``extra`` (of lists in ``ids``), ranked by
    ``(-score, neighbour id)`` and cut at ``width``."""
    sub = old.of_lists(ids)
    keep = sub.valid() & ~member(sub.nid, removed)
    rows = np.r_[np.nonzero(keep)[0], np.searchsorted(ids, extra.qid)]
    v, i = select(rows, np.r_[sub.score[keep], extra.score], np.r_[sub.nid[keep], extra.nid], ids.size, width)
    return Dense(ids.astype(np.int64), i, v, np.isfinite(v).sum(axis=1).astype(np.int64))


def assemble(old: Dense, drop: np.ndarray, *parts: Dense) -> Dense:
    """``old`` less the lists of ``drop`` (sorted), with ``parts`` (lists of other ids, not
    in ``old`` once dropped): one set of lists, ids sorted. The rows are copied once, a
    bounded number of lists at a time."""
    keep = np.flatnonzero(~member(old.ids, drop))
    parts = tuple(p for p in parts if len(p))
    width = max([old.width, *(p.width for p in parts)])
    ids = np.concatenate([old.ids[keep], *(p.ids for p in parts)])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids.size > 1 and not np.all(ids[1:] > ids[:-1]):
        raise ValueError("assemble: a list in two parts")
    dest = np.empty(ids.size, np.int64)
    dest[order] = np.arange(ids.size)
    out = Dense(ids, np.empty((ids.size, width), np.int64), np.empty((ids.size, width), np.float32), np.empty(ids.size, np.int64))
    at = 0
    for src, rows in [(old, keep), *((p, None) for p in parts)]:
        n = src.ids.size if rows is None else rows.size
        for lo in range(0, n, _CHUNK_LISTS):
            sel = slice(lo, min(n, lo + _CHUNK_LISTS))
            r = np.arange(sel.start, sel.stop) if rows is None else rows[sel]
            d = dest[at + sel.start : at + sel.stop]
            out.nid[d, : src.width], out.score[d, : src.width], out.length[d] = src.nid[r], src.score[r], src.length[r]
            if src.width < width:
                out.nid[d, src.width :], out.score[d, src.width :] = NO_ID, -np.inf
        at += n
    return out


def top_changed(old: Dense, new: Dense, ids: np.ndarray, k: int) -> np.ndarray:
    """Of the lists of ``ids`` (sorted), those whose rows up to rank ``k`` (rank, neighbour
    and score) are not the same in ``old`` and ``new`` (a list absent from one has no
    rows there): sorted ids."""
    if not ids.size:
        return np.zeros(0, np.int64)
    a, b = old.of_lists(ids), new.of_lists(ids)
    la, lb = np.minimum(a.length, k), np.minimum(b.length, k)
    kk = min(k, a.width, b.width)
    same = (a.nid[:, :kk] == b.nid[:, :kk]) & (a.score[:, :kk] == b.score[:, :kk])
    same |= np.arange(kk)[None, :] >= la[:, None]
    return ids[(la != lb) | ~same.all(axis=1)]


@dataclass
class Night:
    """What :func:`night` did to a set of lists: the lists, and the sorted ids of those a
    new image entered (``reverse_ids``), of those that only lost a neighbour
    (``lost_only``), of both together (``touched``), and of the touched ones whose top k
    changed (``top_changed``)."""

    lists: Dense
    reverse_ids: np.ndarray
    lost_only: np.ndarray
    touched: np.ndarray
    top_changed: np.ndarray


def night(
    old: Dense,
    fresh: Dense,
    reverse: Lists,
    added: np.ndarray,
    removed: np.ndarray,
    refill: np.ndarray,
    k: int,
    width: int,
    lost_only: np.ndarray | None = None,
) -> Night:
    """An incremental night's merge of last night's lists ``old``: the lists of ``added``,
    ``removed`` and ``refill`` (sorted ids) dropped, and ``fresh`` (tonight's searches of
    the added and refilled) put in their place; every other list that lost a neighbour in
    ``removed`` or gained a candidate row of ``reverse`` re-ranked by :func:`merged`; the
    rest as they were. Any subset of whole lists (a bucket) gives that subset's part of the
    whole collection's result. ``lost_only``: the live lists that lost a neighbour and are
    not refilled, where the caller measured them already (else from :func:`list_stats`)."""
    if lost_only is None:
        ids, _, _, lost = list_stats(old, removed)
        live = ~member(ids, np.union1d(added, removed))
        lost_only = np.setdiff1d(ids[live & (lost > 0)], refill)
    replaced = np.union1d(np.union1d(added, removed), refill)
    reverse = reverse.where(~member(reverse.qid, replaced))
    reverse_ids = np.unique(reverse.qid)
    touched = np.union1d(reverse_ids, lost_only)
    new = merged(old, touched, removed, reverse, width)
    changed = top_changed(old, new, touched, k)
    lists = assemble(old, np.union1d(replaced, touched), new, fresh)
    return Night(lists, reverse_ids, lost_only, touched, changed)
