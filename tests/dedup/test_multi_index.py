"""The hash multi-index's join, whichever build side the session allows (local[2])."""

from __future__ import annotations

import numpy as np

from cbir_lib.dedup.run import phash_pairs


def _pairs(spark, rows):
    df = spark.createDataFrame(rows, "image_id long, phash long")
    return {(r.a, r.b) for r in phash_pairs(df, 4, 4).collect() if r.hamming > 0}


def test_the_same_pairs_as_brute_force_with_broadcasts_allowed_or_turned_off(spark):
    rng = np.random.default_rng(0)
    base = rng.integers(-(2**62), 2**62, 60, dtype=np.int64)

    # Each base hash and a copy with 1-5 bits flipped: pairs within 4 bits and some beyond.
    def flipped(h: int, n: int) -> int:
        x = (h & (2**64 - 1)) ^ sum(1 << int(b) for b in rng.choice(64, n, replace=False))
        return x - 2**64 if x >= 2**63 else x

    hashes = [int(h) for h in base] + [flipped(int(h), 1 + i % 5) for i, h in enumerate(base)]
    rows = list(enumerate(hashes))
    truth = {(a, b) for a, ha in rows for b, hb in rows if a < b and 0 < bin((ha ^ hb) & (2**64 - 1)).count("1") <= 4}
    assert len(truth) >= 40
    assert _pairs(spark, rows) == truth
    before = spark.conf.get("spark.sql.autoBroadcastJoinThreshold")
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")  # a cluster that turned broadcasts off
    try:
        assert _pairs(spark, rows) == truth
    finally:
        spark.conf.set("spark.sql.autoBroadcastJoinThreshold", before)


def test_dihedral_groups_probe_with_their_smallest_ids_own_hashes(spark):
    """Images 1 and 2 share their identity hash; only image 1's quarter-turn hash is image
    3's identity hash. The group (its smallest id, 1) probes with image 1's hashes, whatever
    order the rows come in: the pair (1, 3) is found on every run."""
    from cbir_lib.dedup.run import dihedral_pairs

    rng = np.random.default_rng(1)
    far = [int(h) for h in rng.integers(-(2**62), 2**62, 30, dtype=np.int64)]
    h0, turned = far.pop(), far.pop()
    rows = [(2, [h0, *far[0:7]]), (3, [turned, *far[7:14]]), (1, [h0, turned, *far[14:20]])]
    for order in (rows, rows[::-1]):
        sig = spark.createDataFrame(order, "image_id long, hashes array<long>").repartition(3)
        got = {(r.a, r.b, r.hamming) for r in dihedral_pairs(sig, 4, 5).collect()}
        assert got == {(1, 2, 0), (1, 3, 0)}, got
