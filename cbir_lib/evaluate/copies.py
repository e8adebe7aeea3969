"""The embedded sample's own checks (``cbir demo``): do edited copies find their originals?

The sample (:mod:`cbir_lib.sample`) is originals and edited copies of each, in groups
(``groups.csv``). Two checks read the committed tables by path: how many copies have a
picture of their own group as their nearest neighbour, and how many dedup put in their
original's cluster. Outside the sample (no ``groups.csv``) both are ``(0, 0)``.
"""

from __future__ import annotations

import os


def copy_retrieval(spark, neighbors_uri: str, embeddings_uri: str, sample_dir: str) -> tuple[int, int]:
    """(copies whose top-1 neighbour, read from the neighbours table, is in their group, copies)."""
    from pyspark.sql import functions as F

    from cbir_lib.sample import read_groups

    parent = os.path.dirname(sample_dir)
    if not os.path.exists(os.path.join(parent, "groups.csv")):
        return 0, 0  # not the embedded sample: no ground truth to check against
    group_of = {os.path.join(sample_dir, g["file"]): g["group"] for g in read_groups(parent)}
    paths = {r.image_id: r.path.replace("file:", "", 1) for r in spark.read.parquet(embeddings_uri).select("image_id", "path").collect()}
    top1 = spark.read.parquet(neighbors_uri).filter(F.col("rank") == 1).select("image_id", "neighbor_id").collect()
    copies = [
        (paths[r.image_id], paths[r.neighbor_id]) for r in top1 if paths[r.image_id] in group_of and "__original" not in paths[r.image_id]
    ]
    hits = sum(group_of[q] == group_of.get(n) for q, n in copies)
    return hits, len(copies)


def copy_dedup(spark, clusters_uri: str, sample_dir: str) -> tuple[int, int]:
    """(edited copies that dedup put in their own original's cluster, copies)."""
    from cbir_lib.sample import read_groups

    parent = os.path.dirname(sample_dir)
    if not os.path.exists(os.path.join(parent, "groups.csv")):
        return 0, 0
    groups = read_groups(parent)
    cluster_of = {
        r.path.replace("file:", "", 1): r.cluster_id for r in spark.read.parquet(clusters_uri).select("path", "cluster_id").collect()
    }
    original = {g["group"]: os.path.join(sample_dir, g["file"]) for g in groups if g["is_original"] == "1"}
    copies = [(os.path.join(sample_dir, g["file"]), original.get(g["group"])) for g in groups if g["is_original"] != "1"]
    hits = sum(1 for c, o in copies if c in cluster_of and cluster_of[c] == cluster_of.get(o))
    return hits, len(copies)
