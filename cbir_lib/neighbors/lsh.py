"""Random-projection LSH (``neighbors.method=lsh``), the seed system's nearpy method, in numpy.

``tables`` hash tables, each of ``bits`` sign bits from random hyperplanes drawn with a fixed
seed (Charikar 2002: two unit vectors at angle theta agree on a bit with probability
1 - theta / pi). A query's candidates are the store rows in its bucket in every table,
and with ``radius`` 1 also in the ``bits`` buckets one bit away; candidates are scored
exactly and the top-k kept (ties by id, as every method). Nothing is approximate but the
candidate set, and the neighbours stage measures the recall of every run as for the other
methods.

A bucket key is the table's bits packed into an int64 (bits <= 62); each table keeps its
store rows sorted by key, so a bucket is a ``searchsorted`` range.
"""

from __future__ import annotations

import numpy as np


class LSHIndex:
    def __init__(self, vectors: np.ndarray, tables: int, bits: int, seed: int = 0):
        if not 1 <= bits <= 62:
            raise ValueError(f"neighbors.lsh_bits must be in 1..62, got {bits}")
        x = np.asarray(vectors, np.float32)
        rng = np.random.default_rng(seed)
        self.planes = rng.standard_normal((tables, bits, x.shape[1])).astype(np.float32)
        self.weights = np.int64(1) << np.arange(bits, dtype=np.int64)
        self.keys, self.order = [], []
        for t in range(tables):
            k = self.codes(x, t)
            o = np.argsort(k, kind="stable")
            self.order.append(o)
            self.keys.append(k[o])

    @property
    def nbytes(self) -> int:
        """The tables' memory: a key and a row number per row and table."""
        return sum(k.nbytes + o.nbytes for k, o in zip(self.keys, self.order, strict=True)) + self.planes.nbytes

    @property
    def tables(self) -> int:
        return len(self.planes)

    @property
    def bits(self) -> int:
        return self.planes.shape[1]

    def codes(self, x: np.ndarray, table: int) -> np.ndarray:
        """Bucket keys of ``x`` in ``table``."""
        return ((np.asarray(x, np.float32) @ self.planes[table].T) > 0).astype(np.int64) @ self.weights

    def candidate_pairs(self, queries: np.ndarray, radius: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(query, store row)`` pairs, each once, sorted by query then row: every store row
        in a query's bucket, and with ``radius`` 1 in the ``bits`` buckets one bit away, in
        any table. Vectorised: bucket ranges become index arrays, no loop over queries."""
        if radius not in (0, 1):
            raise ValueError(f"neighbors.lsh_radius must be 0 or 1, got {radius}")
        q = np.asarray(queries, np.float32)
        probes = [np.int64(0)] + ([self.weights[b] for b in range(self.bits)] if radius else [])
        n = len(self.order[0]) if self.order else 0
        keys_all = []
        for t in range(self.tables):
            base = self.codes(q, t)
            keys, order = self.keys[t], self.order[t]
            for flip in probes:
                k = base ^ flip
                lo = np.searchsorted(keys, k, "left")
                hi = np.searchsorted(keys, k, "right")
                length = hi - lo
                total = int(length.sum())
                if not total:
                    continue
                qi = np.repeat(np.arange(len(q), dtype=np.int64), length)
                start = np.repeat(lo - np.concatenate([[0], np.cumsum(length)[:-1]]), length)
                rows = order[start + np.arange(total)]
                keys_all.append(qi * n + rows)
        if not keys_all:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pairs = np.unique(np.concatenate(keys_all))
        return pairs // n, pairs % n

    def candidates(self, queries: np.ndarray, radius: int = 0) -> list[np.ndarray]:
        """Each query's candidate store rows (sorted, unique)."""
        qi, rows = self.candidate_pairs(queries, radius)
        cuts = np.searchsorted(qi, np.arange(1, len(queries)))
        return np.split(rows, cuts)


def lsh_topk(
    index: LSHIndex, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, query_ids: np.ndarray, k: int, radius: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` of each query among its LSH candidates, scored exactly (the inner product of
    unit vectors, a pairwise sum per pair as every method scores), the query's own id left
    out, ties by id. Returns ``(scores, ids,
    candidates per query)``; short lists are padded with ``-inf`` / ``NO_ID``."""
    from cbir_lib.vectors.topk import NO_ID, row_dots

    vectors = np.asarray(vectors, np.float32)
    ids = np.asarray(ids, np.int64)
    queries = np.asarray(queries, np.float32)
    query_ids = np.asarray(query_ids, np.int64)
    m = len(queries)
    out_s = np.full((m, k), -np.inf, np.float32)
    out_i = np.full((m, k), NO_ID, np.int64)
    qi, rows = index.candidate_pairs(queries, radius)
    keep = ids[rows] != query_ids[qi]
    qi, rows = qi[keep], rows[keep]
    counts = np.bincount(qi, minlength=m).astype(np.int64)
    if not qi.size:
        return out_s, out_i, counts
    step = max(1, (32 << 20) // (4 * vectors.shape[1]))
    s = np.concatenate([row_dots(vectors[rows[j : j + step]], queries[qi[j : j + step]]) for j in range(0, qi.size, step)])
    order = np.lexsort((ids[rows], -s, qi))  # by query, then score down, then id
    qi, rows, s = qi[order], rows[order], s[order]
    first = np.searchsorted(qi, np.arange(m))
    rank = np.arange(qi.size) - first[qi]
    top = rank < k
    out_s[qi[top], rank[top]] = s[top]
    out_i[qi[top], rank[top]] = ids[rows[top]]
    return out_s, out_i, counts
