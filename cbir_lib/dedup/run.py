"""Spark adapter of the dedup stage: candidate pairs, connected components, clusters.

Edges between images come from up to three sources (``dedup.sources``):

- ``exact``: the same ``content_sha256`` (always on: it is free);
- ``phash``: perceptual-hash Hamming distance <= the hash's threshold, found with a
  multi-index on ``dedup.phash_chunks`` chunks (see :mod:`cbir_lib.dedup.core`): each
  image is stored under its chunk values and probes every value within radius
  ``t // chunks``; only images meeting under a key are compared. ``dedup.hash`` picks the
  hash: ``phash`` (DCT, ``phash_threshold``), ``ahash`` (mean, ``ahash_threshold``),
  ``dhash`` (gradient, ``dhash_threshold``) or ``any`` (the union of the three); a pair's
  ``source`` names the hash that found it;
- ``embedding``: pairs of neighbours (the latest neighbours table proposes them) whose
  raw embedding cosine is >= ``dedup.min_score``.

With ``dedup.verify`` every candidate pair but the exact ones is checked by
:mod:`cbir_lib.dedup.verify` (local features + RANSAC, then photometric agreement) and only
pairs with ``inliers >= min_inliers`` and ``agreement >= min_agreement`` become edges;
embedding candidates then start at ``verify_min_score``.

Connected components of the edge graph are computed on Spark by min-label propagation
with pointer jumping (each round a node takes the smallest label among itself and its
neighbours, then its label's label), until no label changes. A component's id is its
smallest ``image_id``; its representative is the image with the most pixels, then the
most bytes, then the smallest id.

Output ``dedup/run=<id>/clusters/`` ``(cluster_id, image_id, is_representative, size)``
for every image in a component of two or more, ``pairs/`` ``(a, b, source, hamming,
score, inliers, agreement)`` with ``a < b``, and counts in the manifest. Only images with status ``ok`` take
part; failed ones are counted and left out.
"""

from __future__ import annotations

import logging
import time

from cbir_lib.common import fs, lease, remote, tables
from cbir_lib.common.lineage import new_run_id, package_versions, timer
from cbir_lib.config import Config, ConfigError
from cbir_lib.dedup.core import chunk_bounds, flips

log = logging.getLogger(__name__)

TABLE = "dedup"
VERDICT_DDL = "a long, b long, inliers int, agreement float, unverified string"


def _prepare_partition(max_side: int, files):
    """mapInPandas: ``(image_id, path)`` -> ``(image_id, payload)``; each task reads its own files."""

    def fn(batches):
        import pandas as pd

        from cbir_lib.common import remote
        from cbir_lib.dedup.verify import prepare

        for pdf in batches:
            payloads = []
            for _, content, error in remote.read_many(files, zip(pdf["image_id"], pdf["path"], strict=True)):
                payloads.append(prepare(content, max_side) if error is None else None)
            yield pd.DataFrame({"image_id": pdf["image_id"], "payload": payloads})

    return fn


def _verify_partition(features: int):
    def fn(batches):
        import cv2
        import pandas as pd

        from cbir_lib.dedup.verify import gray, verify

        cv2.setNumThreads(1)  # one task per core already
        for pdf in batches:
            inliers, agreement, why = [], [], []
            for pa, pb in zip(pdf["pa"], pdf["pb"], strict=True):
                v, reason = None, None
                if pa is None or pb is None:
                    reason = "unreadable_image: a file of the pair is gone or undecodable"
                else:
                    try:
                        v = verify(gray(pa), gray(pb), features)
                    except Exception as e:  # noqa: BLE001 - one pair's failure is that pair's verdict, not the stage's
                        reason = f"verify_error: {type(e).__name__}: {str(e)[:200]}"
                inliers.append(v.inliers if v else 0)
                agreement.append(v.agreement if v else -1.0)
                why.append(reason)
            yield pd.DataFrame({"a": pdf["a"], "b": pdf["b"], "inliers": inliers, "agreement": agreement, "unverified": why})

    return fn


def verified_pairs(spark, candidates, ok, dd):
    """``(a, b, inliers, agreement)`` of every candidate pair (:mod:`cbir_lib.dedup.verify`).

    Each image in a candidate pair is read and prepared once (grayscale PNG, at most
    ``dedup.verify_max_side`` px); each pair is then checked in the task where its two
    payloads meet. A file gone since ingest, or undecodable, verifies nothing.
    """
    from pyspark.sql import functions as F

    pairs = candidates.select("a", "b").distinct()
    ids = pairs.select(F.col("a").alias("image_id")).union(pairs.select(F.col("b").alias("image_id"))).distinct()
    todo = ok.select("image_id", "path").join(ids, "image_id")
    # Each task reads the files of its own rows: no path list on the driver, no bytes shuffled.
    payload = (todo.repartition(max(1, 2 * spark.sparkContext.defaultParallelism), "image_id")
               .mapInPandas(_prepare_partition(dd.verify_max_side, remote.settings_from_hadoop(spark)), "image_id long, payload binary")
               .localCheckpoint())
    pa = payload.select(F.col("image_id").alias("a"), F.col("payload").alias("pa"))
    pb = payload.select(F.col("image_id").alias("b"), F.col("payload").alias("pb"))
    return (pairs.join(pa, "a", "left").join(pb, "b", "left")
            .repartition(4 * spark.sparkContext.defaultParallelism)
            .mapInPandas(_verify_partition(dd.verify_features), VERDICT_DDL))


def exact_pairs(images):
    """Every member of a content-hash group paired with the group's smallest id."""
    from pyspark.sql import functions as F

    firsts = images.groupBy("content_sha256").agg(F.min("image_id").alias("a"), F.count("*").alias("n")).filter("n > 1")
    return (images.join(firsts, "content_sha256").filter(F.col("image_id") != F.col("a"))
            .select("a", F.col("image_id").alias("b"), F.lit("exact").alias("source"), F.lit(0).alias("hamming"), F.lit(None).cast("float").alias("score")))


def phash_pairs(images, t: int, m: int, column: str = "phash"):
    """Pairs with ``bit_count(h_a ^ h_b) <= t`` of the 64-bit hash ``column`` (phash, ahash
    or dhash) through the multi-index; ``source`` is the column's name.

    Images sharing one pHash (placeholders, blank frames: thousands of them) are paired with
    their group's smallest id, as exact duplicates are, and only one image per distinct hash
    goes through the multi-index: a group of g identical hashes gives g - 1 pairs, not
    g (g - 1) / 2, and the same connected components.
    """
    from pyspark.sql import functions as F

    every = images.select("image_id", F.col(column).alias("phash")).filter(F.col("phash").isNotNull())
    h = every.groupBy("phash").agg(F.min("image_id").alias("image_id"))
    same = (every.join(h.withColumnRenamed("image_id", "a"), "phash").filter(F.col("image_id") != F.col("a"))
            .select("a", F.col("image_id").alias("b"), F.lit(column).alias("source"), F.lit(0).alias("hamming"),
                    F.lit(None).cast("float").alias("score")))
    radius = t // m
    stored, probes = [], []
    for j, (shift, width) in enumerate(chunk_bounds(m)):
        value = F.shiftrightunsigned("phash", shift).bitwiseAND(F.lit((1 << width) - 1))
        stored.append(h.select(F.lit(j).alias("chunk"), value.alias("key"), F.col("image_id").alias("a"), F.col("phash").alias("ha")))
        masks = [int(x) for x in flips(width, min(radius, width))]
        probes.append(h.select(F.lit(j).alias("chunk"), F.explode(F.array(*[F.lit(x) for x in masks])).alias("mask"),
                               value.alias("v"), F.col("image_id").alias("b"), F.col("phash").alias("hb"))
                      .select("chunk", F.col("v").bitwiseXOR(F.col("mask")).alias("key"), "b", "hb"))
    store = stored[0]
    probe = probes[0]
    for s, p in zip(stored[1:], probes[1:], strict=True):
        store, probe = store.unionByName(s), probe.unionByName(p)
    dist = F.bit_count(F.col("ha").bitwiseXOR(F.col("hb")))
    near = (store.join(probe, ["chunk", "key"]).filter((F.col("a") < F.col("b")) & (dist <= t))
            .select("a", "b", F.lit(column).alias("source"), dist.cast("int").alias("hamming"), F.lit(None).cast("float").alias("score"))
            .dropDuplicates(["a", "b"]))
    return near.unionByName(same)


def embedding_pairs(spark, root: str, tau: float, ok_ids, embeddings, run_cfg):
    """Neighbour pairs whose raw embedding cosine is >= ``tau``.

    The neighbours table proposes the candidates; the score is recomputed from the
    embeddings because a re-ranked run (DBA, QE) reports similarities of augmented
    vectors, which are inflated among merely similar images.
    """
    from pyspark.sql import functions as F

    nb_uri = fs.join(root, "neighbors")
    run = tables.input_run(spark, nb_uri, run_cfg, "neighbors (or use dedup.sources=phash)")
    nb = spark.read.parquet(tables.run_dir(nb_uri, run))
    cand = nb.select(F.least("image_id", "neighbor_id").alias("a"), F.greatest("image_id", "neighbor_id").alias("b")).distinct()
    ea = embeddings.select(F.col("image_id").alias("a"), F.col("embedding").alias("ea"))
    eb = embeddings.select(F.col("image_id").alias("b"), F.col("embedding").alias("eb"))
    dot = F.aggregate(F.zip_with("ea", "eb", lambda x, y: x * y), F.lit(0.0).cast("double"), lambda acc, v: acc + v)
    norm = F.sqrt(F.aggregate("ea", F.lit(0.0).cast("double"), lambda acc, v: acc + v * v)) * \
        F.sqrt(F.aggregate("eb", F.lit(0.0).cast("double"), lambda acc, v: acc + v * v))
    pairs = (cand.join(ok_ids.select(F.col("image_id").alias("a")), "a").join(ok_ids.select(F.col("image_id").alias("b")), "b")
             .join(ea, "a").join(eb, "b").select("a", "b", (dot / norm).cast("float").alias("score"))
             .filter(F.col("score") >= tau))
    return pairs.select("a", "b", F.lit("embedding").alias("source"), F.lit(None).cast("int").alias("hamming"), "score"), run


def connected_components(spark, edges, max_iter: int = 60):
    """``(image_id, cluster_id)`` for every node of ``edges(a, b)``: min-label propagation
    with pointer jumping; returns ``(labels, rounds)``."""
    from pyspark.sql import functions as F

    und = edges.select(F.col("a").alias("src"), F.col("b").alias("dst")).unionByName(
        edges.select(F.col("b").alias("src"), F.col("a").alias("dst"))).distinct().localCheckpoint()
    labels = und.groupBy(F.col("src").alias("id")).agg(F.least(F.min("dst"), F.first("src")).alias("label")).localCheckpoint()
    for rounds in range(1, max_iter + 1):
        nbr = und.join(labels.withColumnRenamed("id", "src"), "src").groupBy(F.col("dst").alias("id")).agg(F.min("label").alias("nl"))
        step = labels.join(nbr, "id", "left").select("id", F.least("label", F.coalesce("nl", "label")).alias("label"))
        jump = step.alias("s").join(step.alias("p"), F.col("s.label") == F.col("p.id"), "left").select(
            F.col("s.id").alias("id"), F.least(F.col("s.label"), F.coalesce(F.col("p.label"), F.col("s.label"))).alias("label")).localCheckpoint()
        changed = jump.alias("n").join(labels.alias("o"), "id").filter(F.col("n.label") != F.col("o.label")).count()
        labels = jump
        if changed == 0:
            return labels.select(F.col("id").alias("image_id"), F.col("label").alias("cluster_id")), rounds
    raise RuntimeError(f"dedup.max_iter: connected components did not converge in {max_iter} rounds")


@lease.leased(TABLE, "dedup")
def run_dedup(spark, cfg: Config) -> dict:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    started = time.time()
    dd = cfg.dedup
    run_id = cfg.run.run_id or new_run_id()
    root = fs.qualify(spark, cfg.run.output_root)
    img_uri = fs.join(root, "images")
    img_run = tables.input_run(spark, img_uri, cfg.run, "ingest")
    images = spark.read.parquet(tables.run_dir(img_uri, img_run))
    status = {r.status: r["count"] for r in images.groupBy("status").count().collect()}
    hashes = ("phash", "ahash", "dhash") if dd.hash == "any" else (dd.hash,)
    ok = images.filter(F.col("status") == "ok").select("image_id", "path", "content_sha256", *hashes, "width", "height", "size_bytes").cache()
    parts, lineage, timings = [], {"images_run_id": img_run}, {}
    if dd.exact:
        parts.append(exact_pairs(ok))
    if dd.sources in ("phash", "both"):
        for column in hashes:
            parts.append(phash_pairs(ok, getattr(dd, f"{column}_threshold"), dd.phash_chunks, column))
    if dd.sources in ("embedding", "both"):
        emb_uri = fs.join(root, "embeddings")
        emb_run = tables.input_run(spark, emb_uri, cfg.run, "extract (dedup.sources includes embedding)")
        embeddings = spark.read.parquet(tables.run_dir(emb_uri, emb_run)).filter(F.col("status") == "ok").select("image_id", "embedding")
        tau = dd.verify_min_score if dd.verify else dd.min_score
        emb_pairs, nb_run = embedding_pairs(spark, root, tau, ok.select("image_id"), embeddings, cfg.run)
        lineage["embeddings_run_id"] = emb_run
        parts.append(emb_pairs)
        lineage["neighbors_run_id"] = nb_run
    if not parts:
        raise ConfigError("dedup.sources: nothing to find pairs with (exact is off and no source chosen)")
    pairs = parts[0]
    for p in parts[1:]:
        pairs = pairs.unionByName(p)
    with timer("candidate pairs") as t:
        pairs = pairs.localCheckpoint()
        candidates = {r.source: r["count"] for r in pairs.groupBy("source").count().collect()}
    timings["pairs_s"] = round(t["seconds"], 3)
    if dd.verify:
        with timer("verifying candidate pairs") as t:
            exact = pairs.filter(F.col("source") == "exact").select("a", "b")
            verdicts = verified_pairs(spark, pairs.filter(F.col("source") != "exact").join(exact, ["a", "b"], "left_anti"), ok, dd).localCheckpoint()
            not_verified = {r.kind: r["count"] for r in verdicts.filter(F.col("unverified").isNotNull())
                            .groupBy(F.substring_index("unverified", ":", 1).alias("kind")).count().collect()}
            examples = [{"a": r.a, "b": r.b, "reason": r.unverified}
                        for r in verdicts.filter(F.col("unverified").isNotNull()).orderBy("a", "b").limit(5).collect()]
            pairs = pairs.join(verdicts, ["a", "b"], "left").filter(
                (F.col("source") == "exact") | ((F.col("inliers") >= dd.min_inliers) & (F.col("agreement") >= dd.min_agreement))
            ).localCheckpoint()
            by_source = {r.source: r["count"] for r in pairs.groupBy("source").count().collect()}
        timings["verify_s"] = round(t["seconds"], 3)
    else:
        pairs = (pairs.withColumn("inliers", F.lit(None).cast("int")).withColumn("agreement", F.lit(None).cast("float"))
                 .withColumn("unverified", F.lit(None).cast("string")))
        by_source = candidates
        not_verified, examples = {}, []
    with timer("connected components") as t:
        labels, rounds = connected_components(spark, pairs.select("a", "b"), dd.max_iter)
    timings["components_s"] = round(t["seconds"], 3)
    order = Window.partitionBy("cluster_id").orderBy(
        F.desc(F.col("width").cast("long") * F.col("height")), F.desc("size_bytes"), F.asc("image_id"))
    clusters = (labels.join(ok, "image_id")
                .withColumn("is_representative", F.row_number().over(order) == 1)
                .withColumn("size", F.count("*").over(Window.partitionBy("cluster_id")))
                .select("cluster_id", "image_id", "is_representative", "size", "path")
                .withColumn("dedup_run_id", F.lit(run_id))).localCheckpoint()
    stats = clusters.agg(F.count_if("is_representative").alias("clusters"), F.count("*").alias("images"),
                         F.max("size").alias("largest")).first()
    table = fs.join(root, TABLE)
    manifest = {
        "stage": "dedup",
        "run_id": run_id,
        **lineage,
        "params": {"sources": dd.sources, "exact": dd.exact, "phash_threshold": dd.phash_threshold,
                   **({"hash": dd.hash, **{f"{c}_threshold": getattr(dd, f"{c}_threshold") for c in hashes}} if dd.hash != "phash" else {}),
                   "phash_chunks": dd.phash_chunks, "min_score": dd.min_score, "verify": dd.verify,
                   **({"verify_min_score": dd.verify_min_score, "min_inliers": dd.min_inliers, "min_agreement": dd.min_agreement,
                       "verify_max_side": dd.verify_max_side, "verify_features": dd.verify_features} if dd.verify else {})},
        "counts": {
            "images": sum(status.values()), "ok": status.get("ok", 0), "skipped_failed": status.get("failed", 0),
            "candidates": candidates, "pairs": by_source, "clusters": stats.clusters, "images_in_clusters": stats.images or 0,
            "largest_cluster": stats.largest, "removable": (stats.images or 0) - stats.clusters,
            "not_verified": not_verified,
        },
        "not_verified_examples": examples,
        "component_rounds": rounds,
        "timings": timings,
        "config": cfg.to_dict(),
        "packages": package_versions(),
    }
    manifest["output"] = tables.run_dir(table, run_id)

    def write(tmp: str) -> None:
        clusters.coalesce(1).write.mode("overwrite").parquet(fs.join(tmp, "clusters"))
        pairs.withColumn("dedup_run_id", F.lit(run_id)).coalesce(1).write.mode("overwrite").parquet(fs.join(tmp, "pairs"))

    manifest["wall_seconds"] = round(time.time() - started, 3)
    tables.commit_dir(spark, write, table, run_id, manifest, keep=cfg.run.keep_snapshots, forward_only=cfg.run.pin_inputs)
    ok.unpersist()
    log.info("dedup %s: %d clusters holding %d images", run_id, stats.clusters, stats.images or 0)
    return manifest
