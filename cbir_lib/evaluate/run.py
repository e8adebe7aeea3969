"""Spark adapter of the evaluate stage: retrieval quality against ground truth.

Two modes (``evaluate.mode``):

- ``neighbors``: the latest neighbours table, every labelled image a query against the
  whole collection (what downstream systems read). Only its top-k is known, so full mAP
  is not defined here.
- ``split``: queries from one split (``evaluate.query_split``, default ``test``) against a
  gallery split (``train``), ranked exactly over the whole gallery, with the neighbours
  stage's re-ranking (``neighbors.rerank``) applied the same way. The gallery is
  broadcast (at most ``evaluate.max_gallery`` images); queries are spread over tasks.

Per-query metrics come from :mod:`cbir_lib.evaluate.metrics` run inside ``mapInArrow``;
means, the per-class breakdown, the precision@i curve and the score histograms are Spark
aggregations. Output: ``evaluation/run=<id>/`` with ``per_query/`` and ``per_class/``
Parquet, ``metrics.json`` and ``report.html`` (the gallery), plus the manifest.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from cbir_lib.common import fs, layout, lease, tables
from cbir_lib.common.lineage import timer
from cbir_lib.config import Config, ConfigError
from cbir_lib.evaluate import metrics
from cbir_lib.evaluate.groundtruth import ground_truth
from cbir_lib.neighbors.rerank import expands_queries, mode_alpha, split_mode
from cbir_lib.stage import StageRun

log = logging.getLogger(__name__)

TABLE = layout.EVALUATION
PER_QUERY_DDL = (
    "image_id long, label string, n_relevant int, precision_at_k double, recall_at_k double, ap_at_k double, "
    "ap double, hits_at_k int, cum_hits array<int>, neighbor_ids array<long>, scores array<float>, relevant array<boolean>"
)
HIST_BINS = 40


def _per_query_rows(ids, labels, n_rel, rel, nid, score, full_ap=None):
    import pyarrow as pa

    k = rel.shape[1]
    m = metrics.per_query(rel, n_rel, k)
    cum = np.cumsum(rel, axis=1).astype(np.int32)
    ap = full_ap if full_ap is not None else np.full(len(ids), np.nan)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids, pa.int64()),
            pa.array(labels, pa.string()),
            pa.array(n_rel.astype(np.int32)),
            pa.array(m["precision_at_k"]),
            pa.array(m["recall_at_k"], from_pandas=True),
            pa.array(m["ap_at_k"], from_pandas=True),
            pa.array(ap, from_pandas=True),
            pa.array(m["hits_at_k"]),
            pa.array(list(cum), pa.list_(pa.int32())),
            pa.array(list(nid), pa.list_(pa.int64())),
            pa.array([list(s) for s in score], pa.list_(pa.float32())),
            pa.array(list(rel), pa.list_(pa.bool_())),
        ],
        schema=_schema(),
    )


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("label", pa.string()),
            ("n_relevant", pa.int32()),
            ("precision_at_k", pa.float64()),
            ("recall_at_k", pa.float64()),
            ("ap_at_k", pa.float64()),
            ("ap", pa.float64()),
            ("hits_at_k", pa.int32()),
            ("cum_hits", pa.list_(pa.int32())),
            ("neighbor_ids", pa.list_(pa.int64())),
            ("scores", pa.list_(pa.float32())),
            ("relevant", pa.list_(pa.bool_())),
        ]
    )


def _from_lists(k: int):
    """mapInArrow: one row per query with its sorted neighbour list -> per-query metrics."""

    def fn(batches):
        for b in batches:
            d = b.to_pydict()
            m = len(d["image_id"])
            rel = np.zeros((m, k), bool)
            nid = np.full((m, k), -1, np.int64)
            score = np.full((m, k), np.nan, np.float32)
            for i, items in enumerate(d["items"]):
                for it in items or []:
                    r = it["rank"] - 1
                    if 0 <= r < k:
                        rel[i, r] = bool(it["rel"])
                        nid[i, r] = it["neighbor_id"]
                        score[i, r] = it["score"]
            yield _per_query_rows(np.asarray(d["image_id"], np.int64), d["label"], np.asarray(d["n_relevant"], np.int64), rel, nid, score)

    return fn


def _neighbors_mode(spark, cfg: Config, universe, k_default: int | None):
    from pyspark.sql import functions as F

    root = fs.qualify(spark, cfg.run.output_root)
    nb_uri = fs.join(root, layout.NEIGHBORS)
    nb_run = tables.input_run(spark, nb_uri, cfg.run, "neighbors (or use evaluate.mode=split)")
    nb_manifest = tables.read_manifest(spark, nb_uri, nb_run) or {}
    k = cfg.evaluate.k or nb_manifest.get("k") or k_default
    nb = spark.read.parquet(tables.run_dir(nb_uri, nb_run)).filter(F.col("rank") <= k)
    q = universe.select("image_id", F.col("label"))
    counts = q.groupBy("label").agg((F.count("*") - 1).alias("n_relevant"))
    n_lab = q.select(F.col("image_id").alias("neighbor_id"), F.col("label").alias("nlabel"))
    rows = (
        nb.join(q, "image_id")
        .join(n_lab, "neighbor_id", "left")
        .select("image_id", "rank", "neighbor_id", "score", F.coalesce(F.col("nlabel") == F.col("label"), F.lit(False)).alias("rel"))
    )
    lists = rows.groupBy("image_id").agg(F.collect_list(F.struct("rank", "neighbor_id", "score", "rel")).alias("items"))
    queries = q.join(counts, "label").join(lists, "image_id", "left")
    per_query = queries.mapInArrow(_from_lists(k), PER_QUERY_DDL)
    lineage = {
        "neighbors_run_id": nb_run,
        "neighbors": {
            key: nb_manifest.get(key)
            for key in ("method", "nprobe", "k", "recall_at_k", "recall_of", "rerank", "index_run_id", "embeddings_run_id")
        },
    }
    return per_query, k, lineage


def _gallery_dba(g_b, n: int, alpha: float):
    """mapInArrow over gallery positions: each row augmented with its top-n other rows."""

    def fn(batches):
        import pyarrow as pa

        from cbir_lib.neighbors.rerank import augment_against
        from cbir_lib.vectors.arrow import vectors_binary

        g = g_b.value
        for b in batches:
            pos = b.column("pos").to_numpy()
            y = augment_against(g[pos], g, n, alpha, self_rows=pos)
            yield pa.RecordBatch.from_arrays([pa.array(pos), vectors_binary(y)], names=["pos", "vector"])

    return fn


def _split_queries(g_b, g_labels_b, label_names: list[str], k: int, mode: str, n: int, alpha: float, kr_b=None):
    """mapInArrow over query rows: expansion (when asked), exact ranking of the whole gallery;
    with ``kr_b`` (query id -> (expanded vector, re-ranked head of gallery positions)), the
    k-reciprocal head first, then the rest of the gallery by score."""

    def fn(batches):
        from cbir_lib.neighbors.rerank import augment_against
        from cbir_lib.vectors.arrow import to_numpy

        g, g_ids = g_b.value
        g_lab = g_labels_b.value
        code = {name: i for i, name in enumerate(label_names)}
        n_per = np.bincount(g_lab, minlength=len(label_names))
        for b in batches:
            if b.num_rows == 0:
                continue
            ids = b.column("image_id").to_numpy()
            labels = b.column("label").to_pylist()
            lab = np.array([code.get(x, -1) for x in labels])
            q = to_numpy(b, "embedding")
            if kr_b is not None:
                q = np.stack([kr_b.value[int(i)][0] for i in ids])
            elif expands_queries(mode):
                q = augment_against(q, g, n, alpha)
            s = q @ g.T
            order = np.lexsort((np.broadcast_to(g_ids, s.shape), -s), axis=1)
            if kr_b is not None:
                from cbir_lib.neighbors.kreciprocal import with_head

                order = np.stack([with_head(order[j], kr_b.value[int(i)][1], len(g_ids)) for j, i in enumerate(ids)])
            rel_full = g_lab[order] == lab[:, None]
            n_rel = np.where(lab >= 0, n_per[np.maximum(lab, 0)], 0)
            ap = metrics.average_precision(rel_full, n_rel)
            top = order[:, :k]
            yield _per_query_rows(ids, labels, n_rel, rel_full[:, :k], g_ids[top], np.take_along_axis(s, top, 1).astype(np.float32), ap)

    return fn


def _split_mode(spark, cfg: Config, universe, emb):
    from pyspark.sql import functions as F

    from cbir_lib.vectors.arrow import binary_to_numpy, to_numpy

    ev, nb = cfg.evaluate, cfg.neighbors
    k = ev.k or nb.k
    with_vec = emb.select("image_id", "embedding").join(universe, "image_id")
    gallery = with_vec.filter(F.col("split") == ev.gallery_split)
    n_gallery = gallery.count()
    if n_gallery == 0:
        splits = [r.split for r in universe.select("split").distinct().collect()]
        raise ConfigError(f"evaluate.gallery_split: no labelled images in split {ev.gallery_split!r} (splits found: {splits})")
    if n_gallery > ev.max_gallery:
        raise ConfigError(f"evaluate.max_gallery: the gallery has {n_gallery} images, above {ev.max_gallery}; use evaluate.mode=neighbors")
    dim = gallery.select(F.size("embedding").alias("d")).first().d
    gallery_mb = n_gallery * dim * 4 / 2**20
    if gallery_mb > ev.max_gallery_mb:
        raise ConfigError(
            f"evaluate.max_gallery_mb: the gallery is {n_gallery} x {dim} float32 = {gallery_mb:.0f} MB, above "
            f"{ev.max_gallery_mb} MB (it is collected on the driver and broadcast); use evaluate.mode=neighbors"
        )
    t = gallery.orderBy("image_id").toArrow()
    g = to_numpy(t, "embedding")
    g_ids = t.column("image_id").to_numpy()
    label_names = sorted(set(t.column("label").to_pylist()))
    code = {name: i for i, name in enumerate(label_names)}
    g_lab = np.array([code[x] for x in t.column("label").to_pylist()])
    (mode, kr_on), n, alpha = split_mode(nb.rerank), nb.rerank_n, mode_alpha(nb.rerank, nb.alpha)
    sc = spark.sparkContext
    if mode.startswith("dba"):
        # Database-side augmentation of the gallery, distributed over gallery rows.
        gb = sc.broadcast(g)
        pos = spark.createDataFrame([(int(i),) for i in range(len(g))], "pos long").repartition(max(1, sc.defaultParallelism))
        aug = pos.mapInArrow(_gallery_dba(gb, min(n, len(g) - 1), alpha), "pos long, vector binary").toArrow()
        g2 = np.empty_like(g)
        g2[aug.column("pos").to_numpy()] = binary_to_numpy(aug.column("vector"), g.shape[1])
        gb.unpersist()
        g = g2
    queries = with_vec.filter(F.col("split") == ev.query_split)
    if queries.limit(1).count() == 0:
        raise ConfigError(f"evaluate.query_split: no labelled images in split {ev.query_split!r}")
    g_b = sc.broadcast((g, g_ids))
    lab_b = sc.broadcast(g_lab)
    kr_b = _split_k_reciprocal(spark, queries, g, g_ids, mode, min(n, len(g)), alpha, nb, ev) if kr_on else None
    per_query = queries.repartition(max(1, sc.defaultParallelism)).mapInArrow(
        _split_queries(g_b, lab_b, label_names, k, mode, min(n, len(g)), alpha, kr_b), PER_QUERY_DDL
    )
    lineage = {
        "gallery_split": ev.gallery_split,
        "query_split": ev.query_split,
        "gallery_size": int(n_gallery),
        "rerank": (
            {
                "mode": nb.rerank,
                "n": n,
                "alpha": alpha,
                **({"k_reciprocal": {"k1": nb.kr_k1, "k2": nb.kr_k2, "lambda": nb.kr_lambda, "depth": nb.kr_depth}} if kr_on else {}),
            }
            if nb.rerank != "none"
            else None
        ),
    }
    return per_query, k, lineage


def _union_lists(x_b, depth: int):
    """mapInArrow over union positions: each row's exact top-``depth`` other rows (by image id)."""

    def fn(batches):
        import pyarrow as pa

        from cbir_lib.vectors.topk import exact_topk

        x, ids = x_b.value
        for b in batches:
            pos = b.column("pos").to_numpy()
            if not pos.size:
                continue
            sc, nbr = exact_topk(x[pos], ids[pos], x, ids, depth, "angular")
            d = nbr.shape[1]
            keep = np.isfinite(sc.ravel())  # a union smaller than the depth pads its lists
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(np.repeat(ids[pos], d)[keep]),
                    pa.array(np.tile(np.arange(1, d + 1, dtype=np.int32), len(pos))[keep]),
                    pa.array(nbr.ravel()[keep]),
                    pa.array(sc.ravel()[keep]),
                ],
                names=["image_id", "rank", "neighbor_id", "score"],
            )

    return fn


def _split_k_reciprocal(spark, queries, g, g_ids, mode: str, n: int, alpha: float, nb, ev):
    """k-reciprocal re-ranking for the split evaluation, as the paper ranks a probe set: the
    lists are over queries and gallery together (what the neighbours stage's all-pairs lists
    are over the collection), each ``kr_depth`` deep, re-ranked by
    :func:`~cbir_lib.neighbors.kreciprocal.rerank_frame`. Returns a broadcast of query id ->
    (its expanded vector, its re-ranked head as gallery positions)."""
    from pyspark.sql import functions as F

    from cbir_lib.neighbors.kreciprocal import LISTS_DDL, rerank_frame
    from cbir_lib.neighbors.rerank import augment_against
    from cbir_lib.vectors.arrow import to_numpy

    sc = spark.sparkContext
    t = queries.select("image_id", "embedding").orderBy("image_id").toArrow()
    q = to_numpy(t, "embedding")
    q_ids = t.column("image_id").to_numpy()
    union_mb = (len(q) + len(g)) * g.shape[1] * 4 / 2**20
    if union_mb > ev.max_gallery_mb:
        raise ConfigError(
            f"evaluate.max_gallery_mb: k-reciprocal re-ranking holds queries and gallery together, "
            f"{len(q) + len(g)} x {g.shape[1]} float32 = {union_mb:.0f} MB, above {ev.max_gallery_mb} MB"
        )
    if expands_queries(mode):
        q = augment_against(q, g, n, alpha)
    x = np.concatenate([g, q])
    ids = np.concatenate([g_ids, q_ids])
    x_b = sc.broadcast((x, ids))
    pos = spark.createDataFrame([(int(i),) for i in range(len(x))], "pos long").repartition(max(1, sc.defaultParallelism))
    lists = pos.mapInArrow(_union_lists(x_b, nb.kr_depth), LISTS_DDL)
    heads = (
        rerank_frame(lists, nb.kr_k1, nb.kr_k2, nb.kr_lambda)
        .join(queries.select("image_id"), "image_id")
        .groupBy("image_id")
        .agg(F.collect_list(F.struct("rank", "neighbor_id")).alias("ranked"))
        .collect()
    )
    x_b.unpersist()
    g_pos = {int(i): p for p, i in enumerate(g_ids)}
    row = {int(i): r for r, i in enumerate(q_ids)}
    out = {}
    for h in heads:
        ranked = [g_pos.get(int(nid), -1) for _, nid in sorted(h.ranked)]
        out[int(h.image_id)] = (q[row[int(h.image_id)]], np.array(ranked, np.int64))
    for i in q_ids:
        out.setdefault(int(i), (q[row[int(i)]], np.zeros(0, np.int64)))
    return sc.broadcast(out)


def summary(per_query, k: int) -> dict:
    """Overall means, per-class means, the precision@i curve and score histograms (Spark)."""
    from pyspark.sql import functions as F

    aggs = [
        F.count("*").alias("queries"),
        F.avg("precision_at_k").alias("precision_at_k"),
        F.avg("ap_at_k").alias("map_at_k"),
        F.avg("recall_at_k").alias("recall_at_k"),
        F.avg("ap").alias("map"),
        F.min("n_relevant").alias("_min_rel"),
        F.max("n_relevant").alias("_max_rel"),
        F.avg(1 + F.element_at("cum_hits", F.least(F.lit(3), F.size("cum_hits")))).alias("_ns"),
    ]
    overall = per_query.agg(*aggs).first().asDict()
    by_class = per_query.groupBy("label").agg(*aggs[:5]).orderBy("label").collect()
    curve = (
        per_query.select(F.posexplode("cum_hits").alias("pos", "hits"))
        .groupBy("pos")
        .agg(F.avg(F.col("hits") / (F.col("pos") + 1)).alias("p"))
        .orderBy("pos")
        .collect()
    )
    scored = (
        per_query.select(F.explode(F.arrays_zip("scores", "relevant")).alias("z"))
        .select(F.col("z.scores").alias("s"), F.col("z.relevant").alias("r"))
        .filter(F.col("s").isNotNull() & ~F.isnan("s"))
    )
    lo_hi = scored.agg(F.min("s"), F.max("s")).first()
    lo = float(np.floor((lo_hi[0] if lo_hi[0] is not None else 0.0) * 20) / 20)
    hi = float(np.ceil((lo_hi[1] if lo_hi[1] is not None else 1.0) * 20) / 20)
    hi = hi if hi > lo else lo + 0.05
    hist = (
        scored.select(F.least(F.floor((F.col("s") - lo) / (hi - lo) * HIST_BINS), F.lit(HIST_BINS - 1)).alias("bin"), "r")
        .groupBy("bin", "r")
        .count()
        .collect()
    )

    def r6(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 6)

    out = {
        "k": k,
        "queries": overall["queries"],
        "precision_at_k": r6(overall["precision_at_k"]),
        "map_at_k": r6(overall["map_at_k"]),
        "map": r6(overall["map"]),
        "recall_at_k": r6(overall["recall_at_k"]),
        "mean_precision_at_k": r6(overall["precision_at_k"]),
        # N-S is defined for groups of four: every query has exactly three relevant others.
        "ns_score": r6(overall["_ns"]) if overall["_min_rel"] == 3 and overall["_max_rel"] == 3 else None,
        "precision_curve": [r6(r.p) for r in curve],
        "per_class": {
            r.label: {
                "queries": r.queries,
                "precision_at_k": r6(r.precision_at_k),
                "map_at_k": r6(r.map_at_k),
                "recall_at_k": r6(r.recall_at_k),
                "map": r6(r.map),
            }
            for r in by_class
        },
        "score_histogram": {
            "bins": HIST_BINS,
            "range": [round(lo, 2), round(hi, 2)],
            "relevant": _hist(hist, True),
            "irrelevant": _hist(hist, False),
        },
        "definitions": metrics.DEFINITIONS,
    }
    return out


def _hist(rows, rel: bool) -> list[int]:
    h = [0] * HIST_BINS
    for r in rows:
        if bool(r.r) == rel and 0 <= int(r.bin) < HIST_BINS:
            h[int(r.bin)] += r["count"]
    return h


@lease.leased(TABLE, "evaluate")
def run_evaluate(spark, cfg: Config) -> dict:
    """Evaluate the latest outputs against the ground truth; return the manifest."""
    from pyspark.sql import functions as F

    from cbir_lib.index.store import embeddings_table_uri

    ev = cfg.evaluate
    root = fs.qualify(spark, cfg.run.output_root)
    table = fs.join(root, TABLE)
    run = StageRun.start(spark, cfg, "evaluate", table, ("evaluate",))
    run_id = run.run_id
    emb_uri = embeddings_table_uri(spark, cfg)
    emb_run, emb_manifest = run.read_input(spark, emb_uri, "embeddings", "extract")
    emb = spark.read.parquet(tables.run_dir(emb_uri, emb_run)).filter(F.col("status") == "ok")
    labels = ground_truth(spark, emb.select("image_id", "path"), ev.labels, ev.labels_base, root)
    universe = emb.select("image_id").join(labels, "image_id").dropDuplicates(["image_id"]).cache()
    n_labelled = universe.count()
    if n_labelled == 0:
        raise ConfigError(f"evaluate.labels: {ev.labels!r} labels none of the {emb.count()} embedded images")
    with timer(f"per-query metrics ({ev.mode})") as t:
        if ev.mode == "neighbors":
            per_query, k, lineage = _neighbors_mode(spark, cfg, universe, cfg.neighbors.k)
        else:
            per_query, k, lineage = _split_mode(spark, cfg, universe, emb)
        per_query = per_query.cache()
        summ = summary(per_query, k)
    summ["labelled_images"] = n_labelled
    manifest = run.manifest(
        mode=ev.mode,
        labels=ev.labels,
        model=emb_manifest.get("model"),
        pooling=(emb_manifest.get("config") or {}).get("extract", {}).get("pooling"),
        **lineage,
        metrics={
            key: summ[key]
            for key in ("k", "queries", "precision_at_k", "map_at_k", "map", "recall_at_k", "mean_precision_at_k", "ns_score")
        },
        timings={"metrics_s": round(t["seconds"], 3)},
    )
    manifest["output"] = tables.run_dir(table, run_id)
    report = None
    if ev.report:
        from cbir_lib.evaluate.report import render_report

        with timer("rendering the HTML report"):
            report = render_report(spark, per_query, emb, summ, manifest, ev.report_queries, ev.seed)

    def write(tmp: str) -> None:
        per_query.coalesce(max(1, min(8, n_labelled // 200_000 + 1))).write.mode("overwrite").parquet(fs.join(tmp, "per_query"))
        rows = [(c, v["queries"], v["precision_at_k"], v["map_at_k"], v["recall_at_k"], v["map"]) for c, v in summ["per_class"].items()]
        spark.createDataFrame(
            rows, "label string, queries long, precision_at_k double, map_at_k double, recall_at_k double, map double"
        ).coalesce(1).write.mode("overwrite").parquet(fs.join(tmp, "per_class"))

    manifest["wall_seconds"] = run.seconds()
    extra = {
        "metrics.json": json.dumps(
            {**summ, "lineage": {k_: manifest[k_] for k_ in manifest if k_ not in ("config", "metrics")}}, indent=2
        ).encode()
    }
    if report is not None:
        extra["report.html"] = report.encode("utf-8")
        manifest["report"] = fs.join(manifest["output"], "report.html")
    run.commit(spark, write, manifest, extra)
    per_query.unpersist()
    universe.unpersist()
    log.info(
        "evaluate %s: P@%d %.4f mAP@%d %.4f over %d queries",
        run_id,
        k,
        summ["precision_at_k"] or 0,
        k,
        summ["map_at_k"] or 0,
        summ["queries"],
    )
    return manifest
