"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of neighbour lists, in numpy and on Spark.

Zhong's method, restated on the kNN graph this stage already builds. For an image ``p``
with its ranked list ``N(p)`` (``p`` itself first, as at distance 0):

1. ``R(p, k)``: the ``g`` in ``N(p, k)`` that have ``p`` in ``N(g, k)`` (``p`` included).
2. Expansion ``R*(p)``: ``R(p, k1)`` plus every ``R(q, round(k1 / 2))``, ``q`` in
   ``R(p, k1)``, that shares more than 2/3 of its members with ``R(p, k1)``.
3. Encoding ``V_p``: weights ``exp(-d(p, g))`` on ``R*(p)``, summing to 1.
4. Local query expansion: ``V_p`` becomes the mean of ``V_q`` over ``N(p, k2)``.
5. Jaccard distance ``d_J = 1 - m / (2 - m)``, ``m = sum_j min(V_p[j], V_g[j])``, and the
   final distance ``(1 - lambda) d_J + lambda d(p, g)`` re-orders ``p``'s candidates.

Two choices differ from the paper's code, which holds the whole distance matrix:

- ``d(p, g) = 1 - s(p, g)`` (half the squared distance of unit vectors). Zhong divides each
  row of squared distances by its maximum, a quantity a top-K list does not have; for
  embeddings whose cosines are mostly positive (post-ReLU CNN features) that maximum is
  about 2, so the scales agree.
- Only the pairs a list holds have a score: an expansion member ``g`` that is not in
  ``p``'s own list (searched ``neighbors.kr_depth`` deep) gets no weight. With lists over
  the whole collection this is the paper's method exactly (the tests check that against
  a dense transcription of the paper's code); ``dropped`` counts what it leaves out.

Candidates are ``p``'s list; ties of the final distance go to the smaller id. Scores out
are ``1 - final distance`` (a similarity, like every other list's). Every sum runs in a
fixed order over sorted ids, so the Spark path (:func:`rerank_frame`) gives bit for bit
what :func:`rerank_graph` gives on the same lists.
"""

from __future__ import annotations

import numpy as np


def half(k1: int) -> int:
    """The expansion sets' depth: ``round(k1 / 2)`` as the paper's code (numpy's rounding)."""
    return int(np.around(k1 / 2.0))


def expand(p: int, r_p: np.ndarray, halves: list[np.ndarray]) -> np.ndarray:
    """``R*(p)``, sorted: ``r_p`` (``R(p, k1)``, ``p`` included) and each half set (``R(q, k1/2)``,
    ``q`` included) that has more than 2/3 of its members in ``r_p``."""
    parts = [np.asarray(r_p, np.int64), np.array([p], np.int64)]
    for h in halves:
        h = np.asarray(h, np.int64)
        if h.size and np.intersect1d(h, r_p).size > 2.0 / 3.0 * h.size:
            parts.append(h)
    return np.unique(np.concatenate(parts))


def encode(p: int, members: np.ndarray, list_ids: np.ndarray, list_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``V_p`` on ``members`` (sorted ids): ``(ids, weights, dropped)``. ``p`` has score 1;
    members without a score in ``p``'s list are dropped."""
    members = np.asarray(members, np.int64)
    lid = np.asarray(list_ids, np.int64)
    ls = np.asarray(list_scores, np.float64)
    keep = np.isfinite(ls) & (lid != p)  # padding has a non-finite score (ids are signed)
    lid, ls = lid[keep], ls[keep]
    order = np.argsort(lid, kind="stable")
    lid, ls = lid[order], ls[order]
    at = np.minimum(np.searchsorted(lid, members), max(lid.size - 1, 0))
    found = lid[at] == members if lid.size else np.zeros(members.size, bool)
    is_self = members == p
    ok = found | is_self
    s = np.where(is_self, 1.0, ls[at] if lid.size else 0.0)
    ids = members[ok]
    w = np.exp(-(1.0 - s[ok]))
    return ids, w / w.sum(), int((~ok).sum())


def mean_encoding(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean of sparse encodings (each ``(sorted ids, weights)``), summed in the given order."""
    ids = np.concatenate([np.asarray(a, np.int64) for a, _ in parts])
    w = np.concatenate([np.asarray(b, np.float64) for _, b in parts])
    uniq, inv = np.unique(ids, return_inverse=True)
    acc = np.zeros(uniq.size, np.float64)
    np.add.at(acc, inv, w)  # in input order: deterministic
    return uniq, acc / len(parts)


def jaccard(va: tuple[np.ndarray, np.ndarray], vb: tuple[np.ndarray, np.ndarray]) -> float:
    """``1 - m / (2 - m)`` with ``m`` the sum of the element-wise minimum of two encodings."""
    _, ia, ib = np.intersect1d(va[0], vb[0], assume_unique=True, return_indices=True)
    m = float(np.minimum(va[1][ia], vb[1][ib]).sum()) if ia.size else 0.0
    return 1.0 - m / (2.0 - m)


def final_order(cand_ids: np.ndarray, cand_scores: np.ndarray, v_p, v_cands: list, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``p``'s candidates re-ordered by ``(1 - lam) d_J + lam (1 - s)``, ties by id:
    ``(ids, 1 - distance)``."""
    cand_ids = np.asarray(cand_ids, np.int64)
    d_orig = 1.0 - np.asarray(cand_scores, np.float64)
    d_j = np.array([jaccard(v_p, v) for v in v_cands], np.float64)
    dist = (1.0 - lam) * d_j + lam * d_orig
    order = np.lexsort((cand_ids, dist))
    return cand_ids[order], (1.0 - dist[order]).astype(np.float32)


# ----------------------------------------------------------------------------- whole graph


def reciprocal_mask(ids: np.ndarray, nbr: np.ndarray, k: int, valid: np.ndarray) -> np.ndarray:
    """``mask[i, j]``: ``nbr[i, j]`` is in row i's top ``k`` and row i's id in its top ``k``
    (``valid``: the entries that are not padding)."""
    ids = np.asarray(ids, np.int64)
    nbr = np.asarray(nbr, np.int64)
    top = nbr[:, :k]
    src = np.repeat(ids, top.shape[1])
    dst = top.ravel()
    valid = np.asarray(valid)[:, :k].ravel()
    fwd = set(zip(src[valid].tolist(), dst[valid].tolist(), strict=True))
    out = np.zeros(nbr.shape, bool)
    flat = np.array([(g, p) in fwd for p, g in zip(src.tolist(), dst.tolist(), strict=True)], bool) & valid
    out[:, :k] = flat.reshape(top.shape)
    return out


def rerank_graph(ids, nbr, scores, k1: int = 20, k2: int = 6, lam: float = 0.3, stats: dict | None = None):
    """Every row's list re-ranked: ``(nbr', scores')`` with the same shape (padding, a
    non-finite score, kept last with id -1). ``ids`` (n,), ``nbr`` (n, K) neighbour ids ranked
    by score (not the row itself), ``scores`` (n, K). Ids are any int64, negative included."""
    ids = np.asarray(ids, np.int64)
    nbr = np.asarray(nbr, np.int64)
    scores = np.asarray(scores, np.float32)
    valid = np.isfinite(scores)
    h = half(k1)
    m1, mh = reciprocal_mask(ids, nbr, k1, valid), reciprocal_mask(ids, nbr, h, valid)
    r = {int(p): np.sort(np.append(nbr[i][m1[i]], p)) for i, p in enumerate(ids)}
    hs = {int(p): np.sort(np.append(nbr[i][mh[i]], p)) for i, p in enumerate(ids)}
    v, dropped = {}, 0
    for i, p in enumerate(ids.tolist()):
        members = expand(p, r[p], [hs[q] for q in r[p].tolist() if q != p])
        a, b, d = encode(p, members, nbr[i], scores[i])
        v[p] = (a, b)
        dropped += d
    row = {p: i for i, p in enumerate(ids.tolist())}
    vq = {}
    for i, p in enumerate(ids.tolist()):
        qs = [p] + nbr[i, : k2 - 1][valid[i, : k2 - 1]].tolist()
        vq[p] = mean_encoding([v[q] for q in qs]) if k2 > 1 else v[p]
    out_ids = np.full_like(nbr, -1)
    out_s = np.full(scores.shape, -np.inf, np.float32)
    for i, p in enumerate(ids.tolist()):
        ok = valid[i]
        c = nbr[i][ok]
        oi, os_ = final_order(c, scores[i][ok], vq[p], [vq[g] for g in c.tolist()], lam)
        out_ids[i, : oi.size] = oi
        out_s[i, : oi.size] = os_
    if stats is not None:
        stats.update({"dropped_members": dropped, "rows": len(row)})
    return out_ids, out_s


def split_order(q: np.ndarray, g: np.ndarray, depth: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """Every query's ranking of the whole gallery (positions): the k-reciprocal re-ranking of
    its top-``depth`` list over queries and gallery together (the paper's probe + gallery
    graph, and what the neighbours stage's all-pairs lists are), gallery members first,
    then the rest of the gallery by score. Ties by gallery position."""
    q = np.asarray(q, np.float32)
    g = np.asarray(g, np.float32)
    nq, ng = len(q), len(g)
    ids = np.arange(ng + nq, dtype=np.int64)  # gallery 0..ng-1, then the queries
    from cbir_lib.vectors.topk import exact_topk

    x = np.concatenate([g, q])
    sc, nbr = exact_topk(x, ids, x, ids, depth, "angular")  # ties by id; padding -inf
    out, _ = rerank_graph(ids, nbr, sc, k1, k2, lam)
    s = q @ g.T
    base = np.lexsort((np.broadcast_to(np.arange(ng), s.shape), -s), axis=1)
    return np.stack([with_head(base[i], out[ng + i], ng) for i in range(nq)]) if nq else np.zeros((0, ng), np.int64)


def with_head(base: np.ndarray, head: np.ndarray, ng: int) -> np.ndarray:
    """A query's gallery ranking: the re-ranked ``head``'s gallery positions (``0..ng-1``;
    others and padding skipped), then the rest of ``base`` in its order."""
    head = head[(head >= 0) & (head < ng)]
    return np.concatenate([head, base[~np.isin(base, head)]])


# ----------------------------------------------------------------------------- Spark

LISTS_DDL = "image_id long, rank int, neighbor_id long, score float"
ENCODING_DDL = "image_id long, v_ids array<long>, v_w array<double>, dropped int"


def _encode_rows(batches):
    import pyarrow as pa

    for b in batches:
        out = {"image_id": [], "v_ids": [], "v_w": [], "dropped": []}
        for row in b.to_pylist():
            p = row["image_id"]
            items = sorted(row["items"], key=lambda it: it["rank"])
            r_p = np.sort(np.array((row["r"] or []) + [p], np.int64))
            halves = [np.sort(np.array((h["hs"] or []) + [h["q"]], np.int64)) for h in (row["halves"] or []) if h["q"] != p]
            members = expand(p, r_p, halves)
            ids, w, d = encode(
                p, members, np.array([it["neighbor_id"] for it in items], np.int64), np.array([it["score"] for it in items], np.float32)
            )
            out["image_id"].append(p)
            out["v_ids"].append(ids.tolist())
            out["v_w"].append(w.tolist())
            out["dropped"].append(d)
        yield pa.RecordBatch.from_pydict(out, schema=_encoding_schema())


def _encoding_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.int64()), ("v_ids", pa.list_(pa.int64())), ("v_w", pa.list_(pa.float64())), ("dropped", pa.int32())])


def _mean_rows(batches):
    import pyarrow as pa

    for b in batches:
        out = {"image_id": [], "v_ids": [], "v_w": [], "dropped": []}
        for row in b.to_pylist():
            parts = sorted(row["parts"], key=lambda it: it["rank"])
            ids, w = mean_encoding([(np.array(it["v_ids"], np.int64), np.array(it["v_w"], np.float64)) for it in parts])
            out["image_id"].append(row["image_id"])
            out["v_ids"].append(ids.tolist())
            out["v_w"].append(w.tolist())
            out["dropped"].append(0)
        yield pa.RecordBatch.from_pydict(out, schema=_encoding_schema())


def _final_rows(lam: float):
    def fn(batches):
        import pyarrow as pa

        empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
        for b in batches:
            out = {"image_id": [], "rank": [], "neighbor_id": [], "score": []}
            for row in b.to_pylist():
                cands = sorted(row["cands"], key=lambda it: it["rank"])
                v_p = (np.array(row["p_ids"], np.int64), np.array(row["p_w"], np.float64)) if row["p_ids"] is not None else empty
                v_c = [(np.array(c["v_ids"], np.int64), np.array(c["v_w"], np.float64)) if c["v_ids"] is not None else empty for c in cands]
                ids, sc = final_order(
                    np.array([c["neighbor_id"] for c in cands], np.int64), np.array([c["score"] for c in cands], np.float32), v_p, v_c, lam
                )
                out["image_id"] += [row["image_id"]] * len(ids)
                out["rank"] += list(range(1, len(ids) + 1))
                out["neighbor_id"] += ids.tolist()
                out["score"] += sc.tolist()
            yield pa.RecordBatch.from_pydict(
                out,
                schema=pa.schema([("image_id", pa.int64()), ("rank", pa.int32()), ("neighbor_id", pa.int64()), ("score", pa.float32())]),
            )

    return fn


def encodings(lists, k1: int):
    """Every image's encoding ``V_p`` before the query expansion (``ENCODING_DDL``; ``dropped``
    counts the expansion members its list held no score for): the reciprocal pairs (a
    self-join of the top-k1 edges), then each reciprocal neighbour's half set."""
    from pyspark.sql import functions as F

    h = half(k1)
    edges = lists.filter(F.col("rank") <= k1).select(
        F.col("image_id").alias("p"), F.col("neighbor_id").alias("g"), F.col("rank").alias("r1")
    )
    back = edges.select(F.col("g").alias("p"), F.col("p").alias("g"), F.col("r1").alias("r2"))
    sets = (
        edges.join(back, ["p", "g"])
        .groupBy("p")
        .agg(F.collect_list("g").alias("r"), F.collect_list(F.when((F.col("r1") <= h) & (F.col("r2") <= h), F.col("g"))).alias("hs"))
    )
    halves = (
        sets.select("p", F.explode("r").alias("q"))
        .join(sets.select(F.col("p").alias("q"), "hs"), "q")
        .groupBy("p")
        .agg(F.collect_list(F.struct("q", "hs")).alias("halves"))
    )
    items = lists.groupBy(F.col("image_id").alias("p")).agg(F.collect_list(F.struct("rank", "neighbor_id", "score")).alias("items"))
    nodes = items.join(sets, "p", "left").join(halves, "p", "left").select(F.col("p").alias("image_id"), "items", "r", "halves")
    return nodes.mapInArrow(_encode_rows, ENCODING_DDL)


def rerank_frame(lists, k1: int, k2: int, lam: float, base=None):
    """:func:`rerank_graph` as Spark joins: ``lists`` (``LISTS_DDL``, rank from 1, every image
    that appears as a neighbour having a list of its own) re-ranked, same schema.

    Shuffles of ids and sparse encodings, never vectors: :func:`encodings` (or ``base``, its
    result already computed), the query expansion (the top-(k2-1)'s encodings) and the
    Jaccard step (every candidate's encoding).
    """
    from pyspark.sql import functions as F

    base = encodings(lists, k1) if base is None else base
    enc = base
    if k2 > 1:
        qe = (
            lists.filter(F.col("rank") <= k2 - 1)
            .select(F.col("image_id").alias("p"), F.col("neighbor_id").alias("q"), "rank")
            .unionByName(base.select(F.col("image_id").alias("p"), F.col("image_id").alias("q"), F.lit(0).alias("rank")))
        )
        enc = (
            qe.join(base.select(F.col("image_id").alias("q"), "v_ids", "v_w"), "q")
            .groupBy(F.col("p").alias("image_id"))
            .agg(F.collect_list(F.struct("rank", "v_ids", "v_w")).alias("parts"))
            .mapInArrow(_mean_rows, ENCODING_DDL)
        )
    cands = (
        lists.select(F.col("image_id").alias("p"), F.col("neighbor_id"), "rank", "score")
        .join(enc.select(F.col("image_id").alias("neighbor_id"), "v_ids", "v_w"), "neighbor_id", "left")
        .groupBy("p")
        .agg(F.collect_list(F.struct("rank", "neighbor_id", "score", "v_ids", "v_w")).alias("cands"))
        .join(enc.select(F.col("image_id").alias("p"), F.col("v_ids").alias("p_ids"), F.col("v_w").alias("p_w")), "p", "left")
        .select(F.col("p").alias("image_id"), "cands", "p_ids", "p_w")
    )
    return cands.mapInArrow(_final_rows(lam), LISTS_DDL)
