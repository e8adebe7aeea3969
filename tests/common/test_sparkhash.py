"""numpy's xxhash64 of longs against Spark SQL's own."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_lib.common.sparkhash import xxhash64

EDGES = np.array([0, 1, -1, 2**63 - 1, -(2**63), 42], dtype=np.int64)


def test_a_long_hashes_as_spark_hashes_it_known_value():
    # F.xxhash64(F.lit(7).cast("long")) in Spark 4.0.5
    assert int(xxhash64(7)) == -2864211556195259663


@pytest.mark.slow
def test_columns_chain_as_spark_chains_them(spark):
    from pyspark.sql import functions as F

    ids = np.concatenate([np.random.default_rng(0).integers(-(2**62), 2**62, 500), EDGES]).astype(np.int64)
    df = spark.createDataFrame([(int(i),) for i in ids], "image_id long")
    rows = df.select(F.xxhash64("image_id"), F.xxhash64(F.lit(7).cast("long"), "image_id")).collect()
    assert np.array_equal(xxhash64(ids), np.array([r[0] for r in rows], np.int64))
    assert np.array_equal(xxhash64(7, ids), np.array([r[1] for r in rows], np.int64))


@pytest.mark.slow
@pytest.mark.parametrize("length", [0, 1, 5, 8, 12, 31, 32, 33, 40, 64, 100])
def test_strings_hash_as_spark_hashes_them(spark, length):
    """F.xxhash64 of a string column of one length (content_sha256: 64), every tail path."""
    import hashlib

    import pyarrow as pa
    from pyspark.sql import functions as F

    from cbir_lib.common.sparkhash import hash_strings

    values = [(hashlib.sha256(str(i).encode()).hexdigest() * 2)[:length] for i in range(300)]
    rows = spark.createDataFrame([(v,) for v in values], "s string").select(F.xxhash64("s")).collect()
    assert np.array_equal(hash_strings(pa.array(values)), np.array([r[0] for r in rows], np.int64))


def test_strings_spark_must_hash_are_refused():
    import pyarrow as pa

    from cbir_lib.common.sparkhash import hash_strings

    assert hash_strings(pa.array(["ab", "abc"])) is None  # lengths differ
    assert hash_strings(pa.array(["ab", None])) is None  # Spark hashes null to the seed
    assert np.array_equal(hash_strings(pa.array(["ab", "cd"]).slice(1)), hash_strings(pa.array(["cd"])))  # a slice: its own rows
