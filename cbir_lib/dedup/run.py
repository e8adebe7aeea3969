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

from cbir_lib.common import fs, layout, lease, remote, tables
from cbir_lib.common.lineage import timer
from cbir_lib.common.shards import plan_tag
from cbir_lib.config import Config, ConfigError
from cbir_lib.dedup import cache
from cbir_lib.dedup.core import chunk_bounds, flips
from cbir_lib.dedup.signature import SIGNATURE_COLUMNS
from cbir_lib.stage import StageRun

log = logging.getLogger(__name__)

TABLE = layout.DEDUP
VERDICT_DDL = "a long, b long, inliers int, agreement float, unverified string"
MULTI_INDEX_ROW_BYTES = 24  # a stored (chunk, key, id, hash) row of the multi-index, for the broadcast threshold


def _signature_partition(side: int, features: int, photo_side: int, files, carry: tuple[str, ...] = ()):
    """mapInPandas: ``(image_id, path, *carry)`` -> ``(image_id, *carry, <signature>)``; each
    task reads its own files, once. A file gone since ingest, or undecodable, gets a null
    signature."""

    def fn(batches):
        import cv2
        import pandas as pd

        from cbir_lib.common import remote
        from cbir_lib.dedup import signature as sig

        cv2.setNumThreads(1)  # one task per core already
        for pdf in batches:
            rows = []
            for _, content, error in remote.read_many(files, zip(pdf["image_id"], pdf["path"], strict=True)):
                g = sig.decode_gray(content, side) if error is None and content else None
                rows.append(sig.encode(sig.signature(g, features, photo_side)) if g is not None and min(g.shape) >= 8 else None)
            out = {"image_id": pdf["image_id"], **{c: pdf[c] for c in carry}}
            for c in SIGNATURE_COLUMNS:
                out[c] = [r[c] if r is not None else None for r in rows]
            yield pd.DataFrame(out)

    return fn


def signatures(spark, todo, dd, carry: tuple[str, ...] = ()):
    """The copy signature (:mod:`cbir_lib.dedup.signature`) of every row of ``todo(image_id,
    path, *carry)``, checkpointed: each image is read and decoded once per run, whatever the
    number of its candidate pairs. ``carry``: string columns passed through (the cache's
    ``content_sha256``)."""
    from cbir_lib.dedup.signature import SIGNATURE_DDL

    return (
        todo.select("image_id", "path", *carry)
        .repartition(max(1, 2 * spark.sparkContext.defaultParallelism), "image_id")
        .mapInPandas(
            _signature_partition(
                dd.verify_max_side, dd.verify_features, dd.verify_photo_side, remote.settings_from_hadoop(spark), tuple(carry)
            ),
            ", ".join(["image_id long", *(f"{c} string" for c in carry), SIGNATURE_DDL]),
        )
        .localCheckpoint()
    )


def _verify_partition(min_inliers: int, min_agreement: float, early: bool):
    def fn(batches):
        import cv2
        import pandas as pd

        from cbir_lib.dedup import signature as sig
        from cbir_lib.dedup.verify import verify_signatures

        cv2.setNumThreads(1)  # one task per core already
        last_b = (None, None)  # the join hands a task its pairs sorted by b: decode b once for its run
        for pdf in batches:
            inliers, agreement, why = [], [], []
            for b, ra, rb in zip(
                pdf["b"],
                pdf[[f"a_{c}" for c in SIGNATURE_COLUMNS]].itertuples(index=False),
                pdf[[f"b_{c}" for c in SIGNATURE_COLUMNS]].itertuples(index=False),
                strict=True,
            ):
                v, reason = None, None
                if ra[0] is None or rb[0] is None:
                    reason = "unreadable_image: a file of the pair is gone or undecodable"
                else:
                    try:
                        if last_b[0] != b:
                            last_b = (b, sig.decode(dict(zip(SIGNATURE_COLUMNS, rb, strict=True))))
                        v = verify_signatures(
                            sig.decode(dict(zip(SIGNATURE_COLUMNS, ra, strict=True))), last_b[1], min_inliers, min_agreement, early=early
                        )
                    except Exception as e:  # noqa: BLE001 - one pair's failure is that pair's verdict, not the stage's
                        reason = f"verify_error: {type(e).__name__}: {str(e)[:200]}"
                inliers.append(v.inliers if v else 0)
                agreement.append(v.agreement if v else -1.0)
                why.append(reason)
            yield pd.DataFrame({"a": pdf["a"], "b": pdf["b"], "inliers": inliers, "agreement": agreement, "unverified": why})

    return fn


def verified_pairs(spark, pairs, sig, dd, early: bool = True):
    """``(a, b, inliers, agreement, unverified)`` of every pair of ``pairs(a, b)``, each
    checked in the task where the two images' signatures meet (no image is decoded here).
    ``early``: stop at the first attempt that passes (the job's verdicts); without it
    every attempt runs (for an offline sweep of the thresholds)."""
    from pyspark.sql import functions as F

    side = {p: sig.select(F.col("image_id").alias(p), *[F.col(c).alias(f"{p}_{c}") for c in SIGNATURE_COLUMNS]) for p in ("a", "b")}
    return (
        pairs.select("a", "b")
        .distinct()
        .join(side["a"], "a", "left")
        .repartition(4 * spark.sparkContext.defaultParallelism, "b")
        .join(side["b"], "b", "left")
        .mapInPandas(_verify_partition(dd.min_inliers, dd.min_agreement, early), VERDICT_DDL)
    )


def exact_pairs(images):
    """Every member of a content-hash group paired with the group's smallest id."""
    from pyspark.sql import functions as F

    firsts = images.groupBy("content_sha256").agg(F.min("image_id").alias("a"), F.count("*").alias("n")).filter("n > 1")
    return (
        images.join(firsts, "content_sha256")
        .filter(F.col("image_id") != F.col("a"))
        .select(
            "a",
            F.col("image_id").alias("b"),
            F.lit("exact").alias("source"),
            F.lit(0).alias("hamming"),
            F.lit(None).cast("float").alias("score"),
        )
    )


def _multi_index(store, probe, t: int, m: int):
    """``(a, b, hamming)`` of every ``store(a, ha)`` x ``probe(b, hb)`` pair of 64-bit hashes
    within ``t`` bits, through the multi-index (:mod:`cbir_lib.dedup.core`): each stored hash
    sits under its ``m`` chunk values, each probe looks up every value within radius
    ``t // m`` of its chunks, and only hashes meeting under a key are compared."""
    from pyspark.sql import functions as F

    radius = t // m
    stored, probes = [], []
    for j, (shift, width) in enumerate(chunk_bounds(m)):

        def chunk(col: str, shift: int = shift, width: int = width):
            return F.shiftrightunsigned(col, shift).bitwiseAND(F.lit((1 << width) - 1))

        masks = [int(x) for x in flips(width, min(radius, width))]
        stored.append(store.select(F.lit(j).alias("chunk"), chunk("ha").alias("key"), "a", "ha"))
        probes.append(
            probe.select(
                F.lit(j).alias("chunk"), F.explode(F.array(*[F.lit(x) for x in masks])).alias("mask"), chunk("hb").alias("v"), "b", "hb"
            ).select("chunk", F.col("v").bitwiseXOR(F.col("mask")).alias("key"), "b", "hb")
        )
    st, pr = stored[0], probes[0]
    for s, p in zip(stored[1:], probes[1:], strict=True):
        st, pr = st.unionByName(s), pr.unionByName(p)
    # The stored side is the join's build side, never the probes (each hash's thousands of
    # flipped keys): broadcast while it is within the session's broadcast threshold (the
    # user's, if set; -1 never), else hashed in each shuffle partition. Left to the plan's
    # size estimates, a store whose estimate came from a join (the kept signatures) had its
    # probes broadcast instead: 56-68 s against 9 s at 7,981 images.
    limit = int(store.sparkSession._jsparkSession.sessionState().conf().autoBroadcastJoinThreshold())
    small = limit > 0 and store.count() * m * MULTI_INDEX_ROW_BYTES <= limit
    st = st.hint("broadcast") if small else st.hint("shuffle_hash")
    dist = F.bit_count(F.col("ha").bitwiseXOR(F.col("hb")))
    return st.join(pr, ["chunk", "key"]).filter(dist <= t).select("a", "b", dist.cast("int").alias("hamming"))


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
    same = (
        every.join(h.withColumnRenamed("image_id", "a"), "phash")
        .filter(F.col("image_id") != F.col("a"))
        .select(
            "a",
            F.col("image_id").alias("b"),
            F.lit(column).alias("source"),
            F.lit(0).alias("hamming"),
            F.lit(None).cast("float").alias("score"),
        )
    )
    near = (
        _multi_index(
            h.select(F.col("image_id").alias("a"), F.col("phash").alias("ha")),
            h.select(F.col("image_id").alias("b"), F.col("phash").alias("hb")),
            t,
            m,
        )
        .filter(F.col("a") < F.col("b"))
        .select("a", "b", F.lit(column).alias("source"), "hamming", F.lit(None).cast("float").alias("score"))
        .dropDuplicates(["a", "b"])
    )
    return near.unionByName(same)


def dihedral_pairs(sig, t: int, m: int):
    """Pairs whose trimmed pHashes are within ``t`` bits under one of the 8 symmetries of
    the square (:func:`cbir_lib.dedup.signature.dihedral_phashes`): a quarter-turned,
    mirrored or letterboxed copy meets its original here. Each image is stored under its
    identity hash and probes with all 8, through :func:`_multi_index`; ``hamming`` is the
    smallest distance over the symmetries. Images with one identical trimmed hash are
    paired with their group's smallest id (g - 1 pairs, never g^2)."""
    from pyspark.sql import functions as F

    every = sig.filter(F.col("hashes").isNotNull()).select("image_id", F.col("hashes")[0].alias("h0"), "hashes")
    # The group's smallest id probes with its own 8 hashes (first() took any member's: the
    # pairs could differ run to run where members' other symmetries differ).
    h = every.groupBy("h0").agg(F.min("image_id").alias("image_id"), F.min_by("hashes", "image_id").alias("hashes"))
    same = (
        every.join(h.select("h0", F.col("image_id").alias("a")), "h0")
        .filter(F.col("image_id") != F.col("a"))
        .select("a", F.col("image_id").alias("b"), F.lit(0).alias("hamming"))
    )
    variants = h.select(F.col("image_id").alias("b"), F.posexplode("hashes").alias("variant", "hb")).select("b", "hb")
    near = (
        _multi_index(h.select(F.col("image_id").alias("a"), F.col("h0").alias("ha")), variants, t, m)
        .filter(F.col("a") != F.col("b"))
        .select(F.least("a", "b").alias("a"), F.greatest("a", "b").alias("b"), "hamming")
        .groupBy("a", "b")
        .agg(F.min("hamming").alias("hamming"))
    )
    return near.unionByName(same).select("a", "b", F.lit("dihedral").alias("source"), "hamming", F.lit(None).cast("float").alias("score"))


def _cosines(batches):
    """mapInArrow: ``(a, b, ea, eb)`` -> ``(a, b, score)``, the raw cosine of the two
    embeddings in numpy, a batch at a time (Spark SQL's zip_with/aggregate spent about 30 s
    on 52k pairs of 1,280-d vectors)."""
    import numpy as np
    import pyarrow as pa

    def matrix(col) -> np.ndarray:
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), -1)

    for batch in batches:
        if batch.num_rows == 0:
            continue
        x, y = matrix(batch.column("ea")), matrix(batch.column("eb"))
        with np.errstate(invalid="ignore", divide="ignore"):
            score = (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        yield pa.RecordBatch.from_arrays(
            [batch.column("a"), batch.column("b"), pa.array(score.astype(np.float32))], names=["a", "b", "score"]
        )


def embedding_pairs(spark, root: str, tau: float, ok_ids, embeddings, run_cfg):
    """Neighbour pairs whose raw embedding cosine is >= ``tau``.

    The neighbours table proposes the candidates; the score is recomputed from the
    embeddings because a re-ranked run (DBA, QE) reports similarities of augmented
    vectors, which are inflated among merely similar images.
    """
    from pyspark.sql import functions as F

    nb_uri = fs.join(root, layout.NEIGHBORS)
    run = tables.input_run(spark, nb_uri, run_cfg, "neighbors (or use dedup.sources=phash)")
    nb = spark.read.parquet(tables.run_dir(nb_uri, run))
    cand = nb.select(F.least("image_id", "neighbor_id").alias("a"), F.greatest("image_id", "neighbor_id").alias("b")).distinct()
    ea = embeddings.select(F.col("image_id").alias("a"), F.col("embedding").alias("ea"))
    eb = embeddings.select(F.col("image_id").alias("b"), F.col("embedding").alias("eb"))
    pairs = (
        cand.join(ok_ids.select(F.col("image_id").alias("a")), "a")
        .join(ok_ids.select(F.col("image_id").alias("b")), "b")
        .join(ea, "a")
        .join(eb, "b")
        .select("a", "b", "ea", "eb")
        .mapInArrow(_cosines, "a long, b long, score float")
        .filter(F.col("score") >= tau)
    )
    return pairs.select("a", "b", F.lit("embedding").alias("source"), F.lit(None).cast("int").alias("hamming"), "score"), run


DRIVER_COMPONENT_EDGES = 1_000_000  # 16 MB of ids; labelled in numpy in about a second


def connected_components(spark, edges, max_iter: int = 60, driver_edges: int = DRIVER_COMPONENT_EDGES):
    """``(image_id, cluster_id)`` for every node of ``edges(a, b)``, the cluster id being
    the component's smallest image id; returns ``(labels, rounds)``.

    A graph of at most ``driver_edges`` edges is labelled on the driver
    (:func:`cbir_lib.dedup.core.components`, ``rounds`` 0): each Spark round is three
    joins and a checkpoint, about 1.5 s of fixed work, where numpy takes milliseconds. A
    larger one, whatever its size, by min-label propagation with pointer jumping on Spark;
    the driver then holds at most ``driver_edges`` rows, never a whole collection."""
    from pyspark.sql import functions as F

    if driver_edges > 0:
        small = edges.select(F.col("a").cast("long"), F.col("b").cast("long")).limit(driver_edges + 1).toArrow()
        if small.num_rows <= driver_edges:
            return _driver_components(spark, small), 0
    und = (
        edges.select(F.col("a").alias("src"), F.col("b").alias("dst"))
        .unionByName(edges.select(F.col("b").alias("src"), F.col("a").alias("dst")))
        .distinct()
        .localCheckpoint()
    )
    labels = und.groupBy(F.col("src").alias("id")).agg(F.least(F.min("dst"), F.first("src")).alias("label")).localCheckpoint()
    for rounds in range(1, max_iter + 1):
        nbr = und.join(labels.withColumnRenamed("id", "src"), "src").groupBy(F.col("dst").alias("id")).agg(F.min("label").alias("nl"))
        step = labels.join(nbr, "id", "left").select("id", F.least("label", F.coalesce("nl", "label")).alias("label"))
        jump = (
            step.alias("s")
            .join(step.alias("p"), F.col("s.label") == F.col("p.id"), "left")
            .select(F.col("s.id").alias("id"), F.least(F.col("s.label"), F.coalesce(F.col("p.label"), F.col("s.label"))).alias("label"))
            .localCheckpoint()
        )
        changed = jump.alias("n").join(labels.alias("o"), "id").filter(F.col("n.label") != F.col("o.label")).count()
        labels = jump
        if changed == 0:
            return labels.select(F.col("id").alias("image_id"), F.col("label").alias("cluster_id")), rounds
    raise RuntimeError(f"dedup.max_iter: connected components did not converge in {max_iter} rounds")


def _driver_components(spark, table):
    import numpy as np
    import pandas as pd

    from cbir_lib.dedup.core import components

    ab = np.stack([table.column("a").to_numpy(), table.column("b").to_numpy()], 1) if table.num_rows else np.zeros((0, 2), np.int64)
    nodes, at = np.unique(ab, return_inverse=True)
    label = components(len(nodes), at.reshape(-1, 2))
    pdf = pd.DataFrame({"image_id": nodes.astype(np.int64), "cluster_id": nodes[label].astype(np.int64)})
    return spark.createDataFrame(pdf, "image_id long, cluster_id long")


def evidence(pairs, dd, hashes):
    """One row per candidate pair: its strongest source (exact, an ingest hash, the dihedral
    hash, then the embedding) with that source's ``hamming``, the best ``score``, the
    smallest dihedral distance, and ``accepted``: evidence already conclusive (byte-identical;
    an ingest hash within its threshold together with a raw cosine of at least
    ``accept_hash_score``, where a pair outside the neighbour lists has none and is
    verified; or a raw cosine >= ``min_score``). A hash
    alone is not enough: two different photos turned by 15 degrees onto black corners, or
    letterboxed onto one canvas, share a pHash (quality.json: 9 false edges of 1,515)."""
    from pyspark.sql import functions as F

    src = F.col("source")
    prio = F.when(src == "exact", 0).when(src.isin(*hashes), 1).when(src == "dihedral", 2).otherwise(3)
    ev = (
        pairs.withColumn("p", prio)
        .groupBy("a", "b")
        .agg(
            F.min(F.struct("p", "source", "hamming")).alias("best"),
            F.max("score").alias("score"),
            F.min(F.when(src == "dihedral", F.col("hamming"))).alias("dihedral_hamming"),
            F.max(src == "exact").alias("exact"),
            F.max(src.isin(*hashes)).alias("hashed"),
        )
    )
    conclusive = F.col("exact") | (F.col("hashed") & (F.col("score") >= dd.accept_hash_score)) | (F.col("score") >= dd.min_score)
    return ev.withColumn("accepted", F.coalesce(conclusive, F.col("exact"))).select(
        "a", "b", F.col("best.source").alias("source"), F.col("best.hamming").alias("hamming"), "score", "dihedral_hamming", "accepted"
    )


def band_pairs(spark, uncertain, accepted, dd):
    """The uncertain pairs worth verifying, and their counts.

    A pair whose two images the accepted edges already join is skipped (verifying it could
    not change a cluster). Of the rest, each image keeps its ``band_per_image`` best (the
    smallest dihedral distance first, then the highest cosine), and a pair is verified if
    it is among the best of either of its images: at most ``band_per_image`` pairs per
    image, however many images share a look."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    labels, _ = connected_components(spark, accepted.select("a", "b"), dd.max_iter)
    la = labels.select(F.col("image_id").alias("a"), F.col("cluster_id").alias("la"))
    lb = labels.select(F.col("image_id").alias("b"), F.col("cluster_id").alias("lb"))
    open_ = (
        uncertain.join(la, "a", "left")
        .join(lb, "b", "left")
        .filter(F.col("la").isNull() | F.col("lb").isNull() | (F.col("la") != F.col("lb")))
        .drop("la", "lb")
    )
    order = [F.col("dihedral_hamming").asc_nulls_last(), F.col("score").desc_nulls_last(), F.col("a"), F.col("b")]
    ends = open_.select("a", "b", "dihedral_hamming", "score", F.col("a").alias("image")).unionByName(
        open_.select("a", "b", "dihedral_hamming", "score", F.col("b").alias("image"))
    )
    best = (
        ends.withColumn("r", F.row_number().over(Window.partitionBy("image").orderBy(*order)))
        .filter(F.col("r") <= dd.band_per_image)
        .select("a", "b")
        .distinct()
    )
    band = open_.join(best, ["a", "b"], "left_semi").localCheckpoint()
    counts = {"uncertain": uncertain.count(), "open": open_.count(), "verified": band.count()}
    return band, counts


def split_clusters(labels, edges, max_diameter: int):
    """``(image_id, cluster_id, diameter, component_diameter)``: each connected component
    cut by :func:`cbir_lib.dedup.core.split_by_diameter` into pieces of hop diameter at most
    ``max_diameter`` (one task per component; the cluster id is its piece's smallest
    image id). Pieces of one image leave the clusters."""
    import pandas as pd
    from pyspark.sql import functions as F

    def fn(pdf):
        import numpy as np

        from cbir_lib.dedup.core import _adjacency, diameter, split_by_diameter

        nodes = np.unique(np.concatenate([pdf["a"].to_numpy(), pdf["b"].to_numpy()]))
        e = np.stack([np.searchsorted(nodes, pdf["a"].to_numpy()), np.searchsorted(nodes, pdf["b"].to_numpy())], 1)
        lab, before = split_by_diameter(len(nodes), e, max_diameter)
        adj = _adjacency(len(nodes), e)
        rows = []
        for piece in np.unique(lab):
            members = np.flatnonzero(lab == piece)
            if len(members) < 2:
                continue
            d = diameter(adj, members)
            rows += [(int(nodes[m]), int(nodes[piece]), d, int(before[m])) for m in members]
        return pd.DataFrame(rows, columns=["image_id", "cluster_id", "diameter", "component_diameter"])

    grouped = edges.select("a", "b").join(labels.select(F.col("image_id").alias("a"), "cluster_id"), "a")
    return grouped.groupBy("cluster_id").applyInPandas(fn, "image_id long, cluster_id long, diameter int, component_diameter int")


WORST_PAIR_MEMBERS = 1000  # clusters larger than this: the worst pair among their first 1,000 members by id


def worst_pairs(clusters, embeddings):
    """``(cluster_id, worst_score, worst_a, worst_b)``: each cluster's least similar two
    members by raw embedding cosine (fastdup #302: components at 0.97 that hold pairs at
    0.82), over at most :data:`WORST_PAIR_MEMBERS` members."""
    import pandas as pd
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    def fn(pdf):
        import numpy as np

        from cbir_lib.dedup.core import worst_pair

        pdf = pdf.sort_values("image_id")
        x = np.stack([np.asarray(v, np.float32) for v in pdf["embedding"]])
        score, i, j = worst_pair(x)
        ids = pdf["image_id"].to_numpy()
        return pd.DataFrame(
            {"cluster_id": [int(pdf["cluster_id"].iloc[0])], "worst_score": [score], "worst_a": [int(ids[i])], "worst_b": [int(ids[j])]}
        )

    members = (
        clusters.select("cluster_id", "image_id")
        .join(embeddings, "image_id")
        .withColumn("r", F.row_number().over(Window.partitionBy("cluster_id").orderBy("image_id")))
        .filter(F.col("r") <= WORST_PAIR_MEMBERS)
        .drop("r")
    )
    return members.groupBy("cluster_id").applyInPandas(fn, "cluster_id long, worst_score double, worst_a long, worst_b long")


def _unverified(edges):
    """Edges decided without verification: null verdict columns, ``decision`` exact or rule."""
    from pyspark.sql import functions as F

    return (
        edges.withColumn("inliers", F.lit(None).cast("int"))
        .withColumn("agreement", F.lit(None).cast("float"))
        .withColumn("unverified", F.lit(None).cast("string"))
        .withColumn("decision", F.when(F.col("source") == "exact", "exact").otherwise("rule"))
    )


@lease.leased(TABLE, "dedup")
def run_dedup(spark, cfg: Config) -> dict:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    dd = cfg.dedup
    root = fs.qualify(spark, cfg.run.output_root)
    table = fs.join(root, TABLE)
    run = StageRun.start(spark, cfg, "dedup", table, ("dedup",))
    run_id = run.run_id
    img_uri = fs.join(root, layout.IMAGES)
    img_run, img_manifest = run.read_input(spark, img_uri, "images", "ingest")
    images = spark.read.parquet(tables.run_dir(img_uri, img_run))
    status = {r.status: r["count"] for r in images.groupBy("status").count().collect()}
    hashes = ("phash", "ahash", "dhash") if dd.hash == "any" else (dd.hash,)
    embeddings = None
    ok = (
        images.filter(F.col("status") == "ok")
        .select("image_id", "path", "content_sha256", *hashes, "width", "height", "size_bytes")
        .cache()
    )
    parts, lineage, timings, counts_extra = [], {}, {}, {}
    if dd.exact:
        parts.append(exact_pairs(ok))
    if dd.sources in ("phash", "both"):
        for column in hashes:
            parts.append(phash_pairs(ok, getattr(dd, f"{column}_threshold"), dd.phash_chunks, column))
    if dd.sources in ("embedding", "both"):
        emb_uri = fs.join(root, layout.EMBEDDINGS)
        emb_run, _ = run.read_input(spark, emb_uri, "embeddings", "extract (dedup.sources includes embedding)")
        embeddings = spark.read.parquet(tables.run_dir(emb_uri, emb_run)).filter(F.col("status") == "ok").select("image_id", "embedding")
        tau = dd.verify_min_score if dd.verify != "off" else dd.min_score
        emb_pairs, nb_run = embedding_pairs(spark, root, tau, ok.select("image_id"), embeddings, cfg.run)
        parts.append(emb_pairs)
        lineage["neighbors_run_id"] = nb_run
    sig = None
    images_commit = tables.commit_of(img_manifest)
    # What the caches key on (cbir_lib/dedup/cache.py): the content hash, which ingest gives
    # every file it read; a row without one is keyed to this images snapshot alone.
    contents = ok.withColumn(
        "content_sha256", F.coalesce("content_sha256", F.concat(F.lit(f"nohash:{images_commit}:"), F.col("image_id").cast("string")))
    )
    if dd.verify != "off":
        with timer("copy signatures") as t:
            if dd.cache:
                sign = lambda todo: signatures(spark, todo, dd, ("content_sha256",))  # noqa: E731
                sig, lineage["signatures"] = cache.cached_signatures(spark, table, run.base, images_commit, contents, dd, sign)
            else:
                sig = signatures(spark, ok, dd)
            signed = sig.filter(F.col("hashes").isNotNull()).count()
        timings["signatures_s"] = round(t["seconds"], 3)
        counts_extra["signed"] = signed
        parts.append(dihedral_pairs(sig, dd.dihedral_threshold, dd.dihedral_chunks))
    if not parts:
        raise ConfigError("dedup.sources: nothing to find pairs with (exact is off and no source chosen)")
    pairs = parts[0]
    for p in parts[1:]:
        pairs = pairs.unionByName(p)
    with timer("candidate pairs") as t:
        pairs = pairs.localCheckpoint()
        candidates = {r.source: r["count"] for r in pairs.groupBy("source").count().collect()}
    timings["pairs_s"] = round(t["seconds"], 3)
    not_verified, examples = {}, []
    if dd.verify == "off":
        pairs = _unverified(pairs)
        by_source = candidates
    else:
        ev = evidence(pairs, dd, hashes)
        if dd.verify == "band":
            accepted = ev.filter("accepted")
            band, band_counts = band_pairs(spark, ev.filter(~F.col("accepted")), accepted, dd)
            counts_extra["band"] = band_counts
        else:  # all: every candidate but the byte-identical ones is checked
            accepted = ev.filter(F.col("source") == "exact")
            band = ev.filter(F.col("source") != "exact")
        with timer("verifying candidate pairs") as t:
            if dd.cache:
                sha = contents.select("image_id", "content_sha256")
                keyed = band.select("a", "b").join(sha.toDF("a", "sha_a"), "a").join(sha.toDF("b", "sha_b"), "b")
                check = lambda todo: verified_pairs(spark, todo, sig, dd).localCheckpoint()  # noqa: E731
                inputs = plan_tag(sorted(run.inputs.items()), lineage.get("neighbors_run_id"), run.signature)
                verdicts, lineage["verdicts"] = cache.cached_verdicts(
                    spark, table, run.base, inputs, keyed, contents.select("content_sha256").distinct(), dd, check
                )
                verdicts = verdicts.localCheckpoint()
            else:
                verdicts = verified_pairs(spark, band, sig, dd).localCheckpoint()
            not_verified = {
                r.kind: r["count"]
                for r in verdicts.filter(F.col("unverified").isNotNull())
                .groupBy(F.substring_index("unverified", ":", 1).alias("kind"))
                .count()
                .collect()
            }
            examples = [
                {"a": r.a, "b": r.b, "reason": r.unverified}
                for r in verdicts.filter(F.col("unverified").isNotNull()).orderBy("a", "b").limit(5).collect()
            ]
            counts_extra["verified"] = verdicts.count()
        timings["verify_s"] = round(t["seconds"], 3)
        passed = (
            band.join(verdicts, ["a", "b"])
            .filter((F.col("inliers") >= dd.min_inliers) & (F.col("agreement") >= dd.min_agreement))
            .withColumn("decision", F.lit("verified"))
        )
        kept = _unverified(accepted)
        cols = ["a", "b", "source", "hamming", "score", "inliers", "agreement", "unverified", "decision"]
        pairs = kept.select(*cols).unionByName(passed.select(*cols)).localCheckpoint()
        by_source = {r.source: r["count"] for r in pairs.groupBy("source").count().collect()}
    with timer("connected components") as t:
        labels, rounds = connected_components(spark, pairs.select("a", "b"), dd.max_iter)
    timings["components_s"] = round(t["seconds"], 3)
    with timer("cluster diameters") as t:
        pieces = split_clusters(labels, pairs, dd.max_diameter).localCheckpoint()
        over = pieces.filter(F.col("component_diameter") > dd.max_diameter)
        counts_extra["split"] = {
            "components": over.join(labels.withColumnRenamed("cluster_id", "component"), "image_id").select("component").distinct().count(),
            "pieces": over.select("cluster_id").distinct().count(),
        }
    timings["diameters_s"] = round(t["seconds"], 3)
    order = Window.partitionBy("cluster_id").orderBy(
        F.desc(F.col("width").cast("long") * F.col("height")), F.desc("size_bytes"), F.asc("image_id")
    )
    clusters = (
        pieces.join(ok, "image_id")
        .withColumn("is_representative", F.row_number().over(order) == 1)
        .withColumn("size", F.count("*").over(Window.partitionBy("cluster_id")))
    )
    worst_examples = []
    if embeddings is not None:
        with timer("worst pairs") as t:
            worst = worst_pairs(clusters, embeddings).localCheckpoint()
            clusters = clusters.join(worst, "cluster_id", "left")
            worst_examples = [r.asDict() for r in worst.orderBy("worst_score", "cluster_id").limit(5).collect()]
        timings["worst_pairs_s"] = round(t["seconds"], 3)
    else:
        clusters = (
            clusters.withColumn("worst_score", F.lit(None).cast("double"))
            .withColumn("worst_a", F.lit(None).cast("long"))
            .withColumn("worst_b", F.lit(None).cast("long"))
        )
    clusters = (
        clusters.select(
            "cluster_id",
            "image_id",
            "is_representative",
            "size",
            "path",
            "diameter",
            "component_diameter",
            "worst_score",
            "worst_a",
            "worst_b",
        ).withColumn("dedup_run_id", F.lit(run_id))
    ).localCheckpoint()
    stats = clusters.agg(
        F.count_if("is_representative").alias("clusters"),
        F.count("*").alias("images"),
        F.max("size").alias("largest"),
        F.max("diameter").alias("diameter"),
    ).first()
    manifest = run.manifest(
        **lineage,
        params={
            "sources": dd.sources,
            "exact": dd.exact,
            "phash_threshold": dd.phash_threshold,
            **({"hash": dd.hash, **{f"{c}_threshold": getattr(dd, f"{c}_threshold") for c in hashes}} if dd.hash != "phash" else {}),
            "phash_chunks": dd.phash_chunks,
            "min_score": dd.min_score,
            "verify": dd.verify,
            "max_diameter": dd.max_diameter,
            **(
                {
                    "verify_min_score": dd.verify_min_score,
                    "min_inliers": dd.min_inliers,
                    "min_agreement": dd.min_agreement,
                    "verify_max_side": dd.verify_max_side,
                    "verify_features": dd.verify_features,
                    "verify_photo_side": dd.verify_photo_side,
                    "dihedral_threshold": dd.dihedral_threshold,
                    "dihedral_chunks": dd.dihedral_chunks,
                }
                if dd.verify != "off"
                else {}
            ),
            **({"band_per_image": dd.band_per_image} if dd.verify == "band" else {}),
        },
        counts={
            "images": sum(status.values()),
            "ok": status.get("ok", 0),
            "skipped_failed": status.get("failed", 0),
            "candidates": candidates,
            "pairs": by_source,
            "clusters": stats.clusters,
            "images_in_clusters": stats.images or 0,
            "largest_cluster": stats.largest,
            "largest_diameter": stats.diameter,
            "removable": (stats.images or 0) - stats.clusters,
            "not_verified": not_verified,
            **counts_extra,
        },
        not_verified_examples=examples,
        worst_pairs=worst_examples,
        component_rounds=rounds,
        timings=timings,
    )
    manifest["output"] = tables.run_dir(table, run_id)

    def write(tmp: str) -> None:
        clusters.coalesce(1).write.mode("overwrite").parquet(fs.join(tmp, "clusters"))
        pairs.withColumn("dedup_run_id", F.lit(run_id)).coalesce(1).write.mode("overwrite").parquet(fs.join(tmp, "pairs"))

    manifest["wall_seconds"] = run.seconds()
    manifest["cost"] = tables.cost(spark, manifest["wall_seconds"], status.get("ok", 0))  # extract's manifest has the same
    run.commit(spark, write, manifest)
    cache.collect_garbage(spark, table)
    ok.unpersist()
    log.info("dedup %s: %d clusters holding %d images", run_id, stats.clusters, stats.images or 0)
    return manifest
