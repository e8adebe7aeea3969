"""The dedup stage on the imagededup fixtures (real photos, copies, formats, a corrupt JPEG).

The whole pipeline runs once for the module (ingest, extract, index, neighbours), then
dedup with each source; pairs are checked against the ground truth the file names give.
"""

from __future__ import annotations

import os
import re
from itertools import combinations

import numpy as np
import pytest

from cbir_lib import config
from cbir_lib.common import tables
from cbir_lib.dedup.core import components
from cbir_lib.dedup.run import connected_components, run_dedup

pytestmark = pytest.mark.slow


def group_of(path: str) -> str | None:
    """The ukbench photo a file shows (copies and formats share it); None for other photos.
    (``alpha_channel_image.png`` is ukbench00120 with an alpha channel: its pHash is identical.)"""
    if os.path.basename(path) == "alpha_channel_image.png":
        return "ukbench00120"
    m = re.search(r"(ukbench\d+)", os.path.basename(path))
    return m.group(1) if m else None


def _clusters(spark, manifest):
    return spark.read.parquet(os.path.join(manifest["output"], "clusters")).toPandas()


def _pair_scores(df, all_paths):
    truth = {frozenset(p) for p in combinations(all_paths, 2) if group_of(p[0]) and group_of(p[0]) == group_of(p[1])}
    found = set()
    for _, g in df.groupby("cluster_id"):
        found |= {frozenset(p) for p in combinations(g["path"], 2)}
    tp = len(found & truth)
    return tp / max(1, len(found)), tp / max(1, len(truth)), found, truth


@pytest.mark.parametrize("sources", ["phash", "both"])
def test_fixture_clusters(spark, fixtures_run, sources):
    out, cfg = fixtures_run
    m = run_dedup(spark, config.load(None, [f"run.output_root={out}", f"dedup.sources={sources}", "run.keep_snapshots=10"]))
    c = m["counts"]
    assert c["skipped_failed"] >= 2, "the corrupt JPEGs are failed rows, skipped"
    assert c["pairs"].get("exact", 0) >= 3, "the fixture folders repeat files byte for byte"
    df = _clusters(spark, m)
    assert not df.image_id.duplicated().any() and (df.groupby("cluster_id").is_representative.sum() == 1).all()
    assert not df.path.str.contains("corrupt").any()
    assert (df.cluster_id == df.groupby("cluster_id").image_id.transform("min")).all()
    assert (df.diameter <= m["params"]["max_diameter"]).all() and (df.diameter >= 1).all()
    assert (df.worst_score.notna() if sources == "both" else df.worst_score.isna()).all()
    assert m["counts"]["largest_diameter"] == df.diameter.max()
    images = spark.read.parquet(
        tables.run_dir(os.path.join(str(out), "images"), tables.latest_run_id(spark, os.path.join(str(out), "images")))
    )
    ok_paths = [r.path for r in images.filter("status = 'ok'").select("path").collect()]
    precision, recall, found, truth = _pair_scores(df, ok_paths)
    assert precision == 1.0, sorted(map(sorted, found - truth))[:5]
    # pHash misses the flipped and rotated copies; embeddings add the flips (rotations stay
    # missed at the default cosine 0.95: see benchmarks/results/quality.json).
    assert recall >= (0.5 if sources == "phash" else 0.7), (recall, sorted(map(sorted, truth - found))[:8])
    if sources == "both":
        assert m["counts"]["pairs"].get("embedding", 0) > 0 and m["neighbors_run_id"]
        hflip = df[df.path.str.contains("ukbench00120_hflip")].cluster_id.unique()
        assert len(hflip) == 1 and (df[df.cluster_id == hflip[0]].path.str.contains("ukbench00120.jpg")).any()
    if sources == "phash":
        return
    # A rerun of the same run id replaces its snapshot: same clusters, no duplicates.
    again = run_dedup(spark, config.load(None, [f"run.output_root={out}", f"dedup.sources={sources}", f"run.run_id={m['run_id']}"]))
    df2 = _clusters(spark, again)
    assert sorted(df2.image_id) == sorted(df.image_id)


def test_each_hash_finds_the_rescaled_copy_and_with_embeddings_the_flip(spark, fixtures_run):
    """dedup.hash: each perceptual hash alone pairs the rescaled copy with its original (no
    64-bit hash of a photo survives a mirror: the flip comes from the embedding source).
    One run of hash=any with verify=off (the rules alone, one row per source of a pair) holds
    every hash's own pairs, each named by its source."""
    import pyspark.sql.functions as F

    out, _ = fixtures_run

    def cluster_with_original(m, name):
        df = _clusters(spark, m)
        c = df[df.path.str.contains(name)].cluster_id.unique()
        return len(c) == 1 and (df[df.cluster_id == c[0]].path.str.contains("ukbench00120.jpg")).any(), df

    alone = run_dedup(
        spark,
        config.load(None, [f"run.output_root={out}", "dedup.sources=phash", "dedup.hash=any", "dedup.verify=off", "run.keep_snapshots=20"]),
    )
    found, df = cluster_with_original(alone, "ukbench00120_resize")
    assert found, df.path.tolist()
    assert alone["params"]["hash"] == "any" and set(alone["counts"]["candidates"]) <= {"phash", "ahash", "dhash", "exact"}
    ids = spark.read.parquet(os.path.join(alone["output"], "clusters")).select("image_id", "path")
    orig = ids.filter(F.col("path").endswith("mixed_images/ukbench00120.jpg")).select("image_id").collect()
    resized = ids.filter(F.col("path").endswith("mixed_images/ukbench00120_resize.jpg")).select("image_id").collect()
    pairs = spark.read.parquet(os.path.join(alone["output"], "pairs")).select("a", "b", "source").toPandas()
    for source in ("phash", "ahash", "dhash"):  # each hash's edges alone (and exact copies) join the two
        edges = pairs[pairs.source.isin([source, "exact"])]
        nodes = sorted(set(edges.a) | set(edges.b) | {orig[0].image_id, resized[0].image_id})
        at = {n: i for i, n in enumerate(nodes)}
        label = components(len(nodes), np.array([[at[x], at[y]] for x, y in zip(edges.a, edges.b, strict=True)], np.int64))
        assert label[at[orig[0].image_id]] == label[at[resized[0].image_id]], source
    both = run_dedup(spark, config.load(None, [f"run.output_root={out}", "dedup.hash=any", "run.keep_snapshots=20"]))
    assert cluster_with_original(both, "ukbench00120_hflip")[0] and cluster_with_original(both, "ukbench00120_resize")[0]


def test_verified_edges_add_the_rotations_and_keep_precision(spark, fixtures_run):
    """dedup.verify=all (true): looser candidates, each checked by ORB + RANSAC + agreement;
    the rotated copies the rules alone (verify=off) miss are found, and nothing false gets in.
    The default, verify=band, finds the same pairs while verifying only the uncertain ones,
    at most band_per_image per image."""
    out, _ = fixtures_run
    base = [f"run.output_root={out}", "dedup.sources=both", "run.keep_snapshots=10"]
    plain = run_dedup(spark, config.load(None, [*base, "dedup.verify=false"]))
    m = run_dedup(spark, config.load(None, [*base, "dedup.verify=true"]))
    band = run_dedup(spark, config.load(None, base))
    assert m["params"]["verify"] == "all" and band["params"]["verify"] == "band" and plain["params"]["verify"] == "off"
    assert m["timings"]["verify_s"] > 0 and "signatures_s" in band["timings"] and "verify_s" not in plain["timings"]
    assert sum(m["counts"]["candidates"].values()) > sum(m["counts"]["pairs"].values())  # some candidates were refused
    pairs = spark.read.parquet(os.path.join(m["output"], "pairs")).toPandas()
    checked = pairs[pairs.source != "exact"]
    assert len(checked) and (checked.inliers >= 15).all() and (checked.agreement >= 0.8).all()
    assert (checked.decision == "verified").all() and pairs[pairs.source == "exact"].inliers.isna().all()
    images = spark.read.parquet(
        tables.run_dir(os.path.join(str(out), "images"), tables.latest_run_id(spark, os.path.join(str(out), "images")))
    )
    ok_paths = [r.path for r in images.filter("status = 'ok'").select("path").collect()]
    p0, r0, _, _ = _pair_scores(_clusters(spark, plain), ok_paths)
    precision, recall, found, truth = _pair_scores(_clusters(spark, m), ok_paths)
    assert precision == 1.0, sorted(map(sorted, found - truth))[:5]
    assert recall > r0 and any("rotation" in p for pair in found for p in pair), (recall, r0)
    pb, rb, found_b, _ = _pair_scores(_clusters(spark, band), ok_paths)
    assert pb == 1.0 and rb >= recall, (pb, rb, recall)
    c = band["counts"]
    assert c["band"]["verified"] <= c["band"]["open"] <= c["band"]["uncertain"] and c["band"]["verified"] <= 6 * c["ok"]
    assert c["verified"] < m["counts"]["verified"], "band verifies fewer pairs than all"
    assert band["cost"]["core_seconds_per_image"] > 0 and band["cost"]["cores"] >= 1


def test_spark_components_match_union_find(spark):
    rng = np.random.default_rng(3)
    n = 400
    # long chains (many propagation rounds) plus random edges
    chain = np.stack([np.arange(0, 120), np.arange(1, 121)], 1)
    rand = rng.integers(150, n, size=(150, 2))
    edges = np.concatenate([chain, rand])
    ids = np.unique(rng.integers(-(2**62), 2**62, size=n + 10))[:n]
    df = spark.createDataFrame([(int(ids[a]), int(ids[b])) for a, b in edges], "a long, b long")
    want = components(n, edges)
    nodes = np.unique(edges)
    for driver_edges in (0, 10_000):  # on Spark, then on the driver
        labels, rounds = connected_components(spark, df, driver_edges=driver_edges)
        got = {r.image_id: r.cluster_id for r in labels.collect()}
        # the same partition, each labelled by its smallest image_id
        for v in nodes:
            members = nodes[want[nodes] == want[v]]
            assert got[int(ids[v])] == int(ids[members].min())
        assert len(got) == len(nodes) and (0 < rounds < 60 if driver_edges == 0 else rounds == 0)
    empty, rounds = connected_components(spark, df.limit(0))
    assert empty.count() == 0 and rounds == 0
    # one edge past the limit: Spark's rounds
    assert connected_components(spark, df, driver_edges=len(edges) - 1)[1] > 0


def test_spark_cluster_split_and_worst_pairs_match_the_cores(spark):
    """Two groups joined by one false edge, and a long chain: the Spark split is the core's,
    every cluster within the diameter, and each cluster's worst pair is its least similar two."""
    from cbir_lib.dedup.core import split_by_diameter, worst_pair
    from cbir_lib.dedup.run import split_clusters, worst_pairs

    star = [(0, i) for i in range(1, 6)] + [(10, i) for i in range(11, 16)] + [(5, 15)]
    chain = [(20 + i, 21 + i) for i in range(12)]
    edges = np.array(star + chain)
    ids = np.sort(np.random.default_rng(4).choice(10**12, 40, replace=False)).astype(np.int64) - 5 * 10**11
    df = spark.createDataFrame([(int(ids[a]), int(ids[b])) for a, b in edges], "a long, b long")
    labels, _ = connected_components(spark, df)
    got = split_clusters(labels, df, 4).toPandas().set_index("image_id")
    want, before = split_by_diameter(40, edges, 4)
    nodes = np.unique(edges)
    for v in nodes:
        same = [u for u in nodes if want[u] == want[v]]
        if len(same) > 1:
            assert got.loc[ids[v], "cluster_id"] == ids[min(same)] and got.loc[ids[v], "component_diameter"] == before[v]
        else:
            assert ids[v] not in got.index  # a piece of one image leaves the clusters
    assert (got["diameter"] <= 4).all() and got["component_diameter"].max() == 12
    x = np.random.default_rng(5).normal(size=(40, 6)).astype(np.float32)
    emb = spark.createDataFrame([(int(ids[i]), x[i].tolist()) for i in nodes], "image_id long, embedding array<float>")
    clusters = spark.createDataFrame(got.reset_index()[["cluster_id", "image_id"]])
    worst = worst_pairs(clusters, emb).toPandas().set_index("cluster_id")
    for c, members in got.reset_index().groupby("cluster_id"):
        pos = [int(np.flatnonzero(ids == m)[0]) for m in sorted(members.image_id)]
        s, i, j = worst_pair(x[pos])
        assert abs(worst.loc[c, "worst_score"] - s) < 1e-5 and (worst.loc[c, "worst_a"], worst.loc[c, "worst_b"]) == (
            ids[pos[i]],
            ids[pos[j]],
        )
