"""Pure numpy cores of the neighbour search: scoring, running top-k, exact blocked search.

Conventions used by every method so their outputs compare exactly:

* ``score`` is "higher is closer": cosine for ``angular`` (vectors are L2-normalised
  first), the inner product for ``dot``, and minus the L2 distance for ``euclidean``.
* Ties are broken by the smaller neighbour id, so a top-k is a deterministic function of
  the scores. Every method ranks by ``(-score, neighbor_id)``.
* A query never has itself as a neighbour.
* Nothing here materialises an N x N matrix: exact search walks the collection in
  blocks and keeps a running top-k per query.
"""

from __future__ import annotations

import numpy as np

METRICS = ("angular", "euclidean", "dot")
# Padding of a short top-k: score -inf and this id. Image ids are signed 64-bit hashes, so
# -1 can be a real id: a slot is padding because its score is not finite, never by its id.
NO_ID = -1


def prepare(vectors: np.ndarray, metric: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32, C-contiguous, and unit-length for ``angular``; written into ``out`` (float32
    rows of the same shape) if given, and returned: the same values either way."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "angular":
        # Row blocks: the norm's temporary (x * x) stays small. A row's value does not
        # depend on the others, so the result is the same as in one call.
        out = np.empty_like(x) if out is None else out
        for s in range(0, len(x), 8192):
            block = x[s : s + 8192]
            np.divide(block, np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12), out=out[s : s + 8192])
        return out
    if out is not None:
        out[...] = x
        return out
    return x


def rank_scores(q: np.ndarray, x: np.ndarray, metric: str, x_sqnorm: np.ndarray | None = None) -> np.ndarray:
    """Scores that rank like the final score, cheaply: ``q @ x.T`` (minus ``|x|^2/2`` for euclidean).

    For euclidean, ``q.x - |x|^2/2 = (|q|^2 - |q-x|^2) / 2`` orders candidates exactly
    like ``-|q-x|``; :func:`final_scores` turns it into the distance.
    """
    s = q @ x.T
    if metric == "euclidean":
        if x_sqnorm is None:
            x_sqnorm = np.einsum("ij,ij->i", x, x)
        s -= 0.5 * x_sqnorm[None, :]
    return s


def final_scores(rank: np.ndarray, metric: str, q_sqnorm: np.ndarray | None = None) -> np.ndarray:
    """The reported score from a ranking score of :func:`rank_scores` (rows = queries)."""
    if metric != "euclidean":
        return rank
    if q_sqnorm is None:
        raise ValueError("final_scores: euclidean scores need the queries' squared norms")
    d2 = np.maximum(q_sqnorm[:, None] - 2.0 * rank, 0.0)
    out = -np.sqrt(d2)
    out[~np.isfinite(rank)] = -np.inf
    return out


def where2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-d mask, ``(rows, cols)`` in row-major order, from the flat
    indices: 4x faster than ``nonzero`` on the (queries x cell) masks of the search
    (55 x 405 at 1M: 10 against 40 us a call, 15 % of the dense search's time)."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1]) if mask.shape[1] else (flat, flat)


def empty(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A running top-k for ``m`` queries: scores ``-inf``, ids ``NO_ID``."""
    return np.full((m, k), -np.inf, dtype=np.float32), np.full((m, k), NO_ID, dtype=np.int64)


def select(rows: np.ndarray, scores: np.ndarray, ids: np.ndarray, m: int, k: int, payload: np.ndarray | None = None):
    """Top-k per row of a candidate list ``(row, score, id)``, ranked by ``(-score, id)``.

    Candidates with a non-finite score are dropped (padding, masked self, empty slots);
    rows with fewer than ``k`` candidates are padded with ``-inf`` / ``NO_ID``.
    ``payload``: a value per candidate carried along (padding: ``-inf`` for floats, -1 for
    integers); then ``(scores, ids, payload)`` is returned.

    One sort of a single int64 key (row, then score descending) ranks the candidates, and
    runs of equal keys, rare, are put in id order. Sorting every candidate by three keys
    measured 2-3x slower, and even the three-key ``lexsort`` of only each row's k best
    and their ties took a third of a selection (655k of 4.2M candidates, 0.10 s).
    """
    keep = np.isfinite(scores)
    rows, scores, ids = rows[keep], np.asarray(scores[keep], dtype=np.float32), ids[keep]
    out_v, out_i = empty(m, k)
    out_p = None
    if payload is not None:
        payload = np.asarray(payload)[keep]
        out_p = np.full((m, k), -np.inf if payload.dtype.kind == "f" else -1, dtype=payload.dtype)
    if rows.size == 0:
        return (out_v, out_i) if out_p is None else (out_v, out_i, out_p)
    key = _row_score_key(rows, scores)
    order = _ties_by_id(np.argsort(key), key, ids)
    srows = rows[order]
    starts = np.searchsorted(srows, np.arange(m))
    rank = np.arange(order.size) - starts[srows]
    take = rank < k
    at, rk = srows[take], rank[take]
    order = order[take]
    out_v[at, rk] = scores[order]
    out_i[at, rk] = ids[order]
    if payload is None or out_p is None:
        return out_v, out_i
    out_p[at, rk] = payload[order]
    return out_v, out_i, out_p


def _row_score_key(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """int64 keys whose order is ``(row, -score)`` (rows below 2**31, finite scores; -0.0
    and 0.0 equal, as ``-scores`` compares them)."""
    return (rows.astype(np.int64) << 32) | (0xFFFFFFFF - _sortable(scores + np.float32(0.0))).astype(np.int64)


def _ties_by_id(order: np.ndarray, key: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``order`` (ascending ``key``) with each run of equal keys put in ascending id order."""
    ks = key[order]
    tie = ks[1:] == ks[:-1]
    if not tie.any():
        return order
    at = np.flatnonzero(np.r_[tie, False] | np.r_[False, tie])  # positions in a run of equal keys
    sub = order[at]
    order = order.copy()
    order[at] = sub[np.lexsort((ids[sub], key[sub]))]
    return order


def empty_shortlist(m: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A running shortlist ``(reduced, ids, full)`` for ``m`` queries: nothing found yet."""
    v, i = empty(m, width)
    return v, i, v.copy()


def finish_shortlist(
    red: np.ndarray, ids: np.ndarray, full: np.ndarray, k: int, metric: str, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The final top-k ``(scores, ids)`` of a shortlist: ``(m, L)`` candidates ranked by their
    reduced scores ``red`` (padding: ``-inf``), each with its full-dimension rank score,
    ranked by ``(-full score, id)`` and reported in final-score units (:func:`final_scores`)."""
    m, L = ids.shape
    full = np.where(np.isfinite(red), full, -np.inf).astype(np.float32)
    vals, out_ids = select(np.repeat(np.arange(m), L), full.ravel(), ids.ravel(), m, k)
    q_sq = np.einsum("ij,ij->i", queries, queries) if metric == "euclidean" else None
    return final_scores(vals, metric, q_sq).astype(np.float32), out_ids


# A BLAS product's value for one (query, vector) pair depends on the shape of the call that
# computed it (gemv for one row, edge kernels for thin blocks: up to a few ulps apart). The
# candidates are found with BLAS, then ranked by scores that do not depend on the shape:
# a pairwise sum per pair. So the same pair scores the same whether the store is searched
# whole, in groups (:mod:`cbir_lib.neighbors.budget`) or in other query blocks, and exact
# duplicates stay exactly tied. TIE_SLACK widens every BLAS threshold by more than that
# error, so no candidate is lost to it.
TIE_SLACK = 1e-5


def slack(thr: np.ndarray) -> np.ndarray:
    """A threshold lowered by more than the shape-dependent error of a BLAS score."""
    thr = np.asarray(thr, dtype=np.float32)  # -inf (no bound yet) stays -inf
    return thr - np.float32(TIE_SLACK) * np.maximum(np.float32(1.0), np.abs(thr))


def row_dots(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each row of ``x`` dotted with ``q`` (or with the matching row of ``q``) by a pairwise
    sum per row: a row's value does not depend on which other rows are scored with it."""
    return (np.asarray(x, dtype=np.float32) * q).sum(axis=1, dtype=np.float32)


def pair_scores(
    queries: np.ndarray,
    rows: np.ndarray,
    vectors: np.ndarray,
    pos: np.ndarray,
    metric: str,
    sqnorm: np.ndarray | None = None,
    block_bytes: int = 32 << 20,
) -> np.ndarray:
    """Rank scores (:func:`rank_scores` units) of the pairs ``(queries[rows], vectors[pos])``,
    independent of the shape of any product, in blocks of ``block_bytes``."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, block_bytes // max(1, 4 * vectors.shape[1]))
    for s in range(0, len(rows), step):
        r, p = rows[s : s + step], pos[s : s + step]
        out[s : s + step] = row_dots(vectors[p], queries[r])
    if metric == "euclidean":
        if sqnorm is None:
            sqnorm = np.einsum("ij,ij->i", vectors, vectors)
        out -= np.float32(0.5) * sqnorm[pos]
    return out


def shortlist_scores(
    queries: np.ndarray, vectors: np.ndarray, pos: np.ndarray, metric: str, sqnorm: np.ndarray | None = None, block_bytes: int = 32 << 20
) -> np.ndarray:
    """Rank scores of each query ``i`` against the store rows ``pos[i]`` (``(m, L)``, -1 for
    none: ``-inf``), the same values as :func:`pair_scores` (a pairwise sum per pair), with
    each query's row read once rather than once per candidate."""
    m, L = pos.shape
    out = np.full((m, L), -np.inf, dtype=np.float32)
    if m == 0 or L == 0:
        return out
    step = max(1, block_bytes // max(1, 4 * L * vectors.shape[1]))
    if metric == "euclidean" and sqnorm is None:
        sqnorm = np.einsum("ij,ij->i", vectors, vectors)
    for s in range(0, m, step):
        p = pos[s : s + step]
        g = np.asarray(vectors[np.maximum(p, 0)], dtype=np.float32)  # (b, L, d), a copy
        g *= queries[s : s + step, None, :]  # in place: a second (b, L, d) array cost 5 %
        v = g.sum(axis=2, dtype=np.float32)
        if sqnorm is not None and metric == "euclidean":
            v -= np.float32(0.5) * sqnorm[np.maximum(p, 0)]
        out[s : s + step] = np.where(p >= 0, v, np.float32(-np.inf))
    return out


def reselect(rows: np.ndarray, fast: np.ndarray, cand: np.ndarray, m: int, k: int, rescore, ids_of=None, with_cand: bool = False):
    """Top-k by exact pair scores of candidates found with BLAS scores ``fast``.

    The candidates within :func:`slack` of each row's k-th best ``fast`` score are scored
    again by ``rescore(rows, cand)`` and ranked by ``(-score, id)``, ``ids_of(cand)`` the ids
    (``cand`` itself by default). Returns ``(scores, ids)`` like :func:`select`; with
    ``with_cand``, ``(scores, ids, cand)`` (-1 in padding).
    """
    v, _ = select(rows, fast, cand, m, k)
    near = np.isfinite(fast) & (fast >= slack(v[:, k - 1])[rows])
    rows, cand = rows[near], cand[near]
    exact = rescore(rows, cand)
    return select(rows, exact, cand if ids_of is None else ids_of(cand), m, k, payload=cand if with_cand else None)


def _sortable(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (finite values): negative
    floats have every bit flipped, the others their sign bit (an xor mask, not ``where``:
    7x faster on 4M scores)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    mask = (b >> np.uint32(31)) * np.uint32(0x7FFFFFFF)
    mask |= np.uint32(0x80000000)
    return b ^ mask


def merge_topk(
    vals: np.ndarray, ids: np.ndarray, block: np.ndarray, block_ids: np.ndarray, k: int | None = None, rescore=None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a block of candidate scores into a running top-k.

    Parameters
    ----------
    vals, ids : (m, k) arrays
        The running top-k, sorted by ``(-score, id)`` per row (see :func:`empty`).
    block : (m, n) float array
        Scores of ``n`` candidates for the same ``m`` queries; ``-inf`` masks a candidate
        (a query itself, or padding).
    block_ids : (n,) or (m, n) int array
        The candidates' ids, shared by all rows or per row.

    Only candidates that can still enter the top-k are looked at: the threshold is a
    row's current k-th best score, tightened by the k-th best of a column sample of the
    block, both lower bounds of the final k-th best. That keeps the merge close to one
    comparison per score instead of a partial sort of every row.

    ``rescore(rows, cols)``: the block holds BLAS scores, and its candidates are ranked by
    these exact pair scores instead (:func:`reselect`; ``block_ids`` shared by all rows), so
    the running top-k holds scores that no block shape changes.
    """
    m, n = block.shape
    k = vals.shape[1] if k is None else k
    if m == 0 or n == 0:
        return vals, ids
    thr = vals[:, k - 1].astype(np.float32, copy=True)
    c = min(n, max(32 * k, 256))
    if c > k and np.isneginf(thr).any():
        sub = np.partition(block[:, :c], c - k, axis=1)[:, c - k]
        thr = np.maximum(thr, sub)
    if rescore is not None:
        r, col = where2d(block >= slack(thr)[:, None])
        bv, bi = reselect(r, block[r, col], col, m, k, rescore, lambda cc: block_ids[cc])
        rows = np.repeat(np.arange(m), 2 * k)
        return select(rows, np.concatenate([vals, bv], axis=1).ravel(), np.concatenate([ids, bi], axis=1).ravel(), m, k)
    r, col = where2d(block >= thr[:, None])
    cand_ids = block_ids[col] if block_ids.ndim == 1 else block_ids[r, col]
    rows = np.concatenate([np.repeat(np.arange(m), k), r])
    scores = np.concatenate([vals.ravel(), block[r, col].astype(np.float32, copy=False)])
    all_ids = np.concatenate([ids.ravel(), cand_ids.astype(np.int64, copy=False)])
    return select(rows, scores, all_ids, m, k)


def exact_topk(
    queries: np.ndarray,
    query_ids: np.ndarray,
    base: np.ndarray,
    base_ids: np.ndarray,
    k: int,
    metric: str,
    block_size: int = 16384,
    exclude_self: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every query over ``base``, walking ``base`` in blocks.

    Vectors must already be :func:`prepare`-d. Returns ``(scores, ids)`` of shape
    ``(len(queries), k)`` in final-score units, ranked by ``(-score, id)``; a query's own
    id is excluded when ``exclude_self``. Memory is ``len(queries) x block_size``.
    """
    m = len(queries)
    vals, ids = empty(m, k)
    if m == 0 or len(base) == 0:
        return vals, ids
    base_sq = np.einsum("ij,ij->i", base, base) if metric == "euclidean" else None
    for start in range(0, len(base), block_size):
        stop = min(start + block_size, len(base))
        block = rank_scores(queries, base[start:stop], metric, None if base_sq is None else base_sq[start:stop])
        bids = base_ids[start:stop]
        if exclude_self:
            mask_self(block, query_ids, bids)
        block_x, block_sq = base[start:stop], None if base_sq is None else base_sq[start:stop]
        vals, ids = merge_topk(
            vals, ids, block, bids, k, rescore=lambda rr, cc, x=block_x, sq=block_sq: pair_scores(queries, rr, x, cc, metric, sq)
        )
    q_sq = np.einsum("ij,ij->i", queries, queries) if metric == "euclidean" else None
    return final_scores(vals, metric, q_sq).astype(np.float32), ids


def self_positions(query_ids: np.ndarray, block_ids: np.ndarray, ids_sorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` where ``query_ids[row] == block_ids[col]`` (ids unique in the block).

    ``ids_sorted`` skips the sort when ``block_ids`` is ascending (a cell of the store).
    """
    order = None if ids_sorted else np.argsort(block_ids, kind="stable")
    sorted_ids = block_ids if order is None else block_ids[order]
    n = len(sorted_ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, query_ids), n - 1)
    rows = np.flatnonzero(sorted_ids[pos] == query_ids)
    cols = pos[rows] if order is None else order[pos[rows]]
    return rows, cols


def mask_self(block: np.ndarray, query_ids: np.ndarray, block_ids: np.ndarray) -> None:
    """Set ``block[i, j] = -inf`` wherever ``query_ids[i] == block_ids[j]`` (in place)."""
    rows, cols = self_positions(query_ids, block_ids)
    block[rows, cols] = -np.inf


def brute_force(vectors: np.ndarray, ids: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: one full score matrix and a full sort per row (small inputs only)."""
    x = prepare(vectors, metric)
    if metric == "euclidean":
        d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
        s = -d
    else:  # the pair scores every search ranks by (row_dots), not one product's
        s = np.stack([row_dots(x, x[i]) for i in range(len(x))])
    np.fill_diagonal(s, -np.inf)
    out_v, out_i = empty(len(x), k)
    for i in range(len(x)):
        order = np.lexsort((ids, -s[i]))
        order = [j for j in order if np.isfinite(s[i, j])][:k]
        out_v[i, : len(order)] = s[i, order]
        out_i[i, : len(order)] = ids[order]
    return out_v, out_i


def recall_at_k(
    approx_ids: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray | None = None, approx_scores: np.ndarray | None = None
) -> float:
    """Mean fraction of each query's exact top-k found by the approximate top-k.

    Padding slots are those with a non-finite score (or, without scores, the id
    ``NO_ID``). With scores given, an approximate neighbour whose score equals the exact
    k-th score counts as found: a tie at the boundary is not a miss.
    """
    found, total = _hits(approx_ids, exact_ids, exact_scores, approx_scores)
    return float(found.sum() / total.sum()) if total.sum() else 1.0


def recall_lower_bound(
    approx_ids: np.ndarray,
    exact_ids: np.ndarray,
    exact_scores: np.ndarray | None = None,
    approx_scores: np.ndarray | None = None,
    z: float = 1.645,
) -> float:
    """A one-sided bound (95 % at the default ``z``) on the collection's recall@k from a
    sample of queries: the sample's mean per-query recall less ``z`` standard errors."""
    found, total = _hits(approx_ids, exact_ids, exact_scores, approx_scores)
    per = found[total > 0] / total[total > 0]
    if per.size < 2:
        return float(per.mean()) if per.size else 1.0
    return float(per.mean() - z * per.std(ddof=1) / np.sqrt(per.size))


def _hits(approx_ids, exact_ids, exact_scores, approx_scores) -> tuple[np.ndarray, np.ndarray]:
    """Per query: (exact neighbours found, exact neighbours to find)."""
    k = exact_ids.shape[1]
    t_ok = np.isfinite(exact_scores) if exact_scores is not None else exact_ids != NO_ID
    a_ok = np.isfinite(approx_scores) if approx_scores is not None else approx_ids != NO_ID
    found = np.zeros(len(exact_ids), dtype=np.int64)
    total = np.zeros(len(exact_ids), dtype=np.int64)
    for i in range(len(exact_ids)):
        truth = exact_ids[i][t_ok[i]]
        if truth.size == 0:
            continue
        got = approx_ids[i][a_ok[i]]
        hits = int(np.isin(truth, got).sum())
        if exact_scores is not None and approx_scores is not None and hits < truth.size:
            kth = exact_scores[i][t_ok[i]][-1]
            extra = (approx_scores[i][a_ok[i]] >= kth - 1e-6) & ~np.isin(got, truth)
            hits = min(truth.size, hits + int(extra.sum()))
        found[i] = hits
        total[i] = min(k, truth.size)
    return found, total
