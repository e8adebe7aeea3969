"""Samples chosen by an id hash: the same images on every run, whoever draws them.

An image is in a sample when the low bits of ``xxhash64(seed, image_id)`` fall under the
sampled fraction. A Spark filter (:func:`sample_filter`, in the JVM, before any row
reaches Python) and numpy (:func:`sampled`, in a process that reads the table itself)
pick the same rows, whatever the partitioning; Spark's ``sample`` depends on it. And a
collection that changed by a few percent keeps nearly all of its sample: an image's key
does not depend on the others, where ``rng.choice(n, m)`` over store positions drew
another sample whenever ``n`` or the store's order moved.
"""

from __future__ import annotations

import numpy as np

from cbir_lib.common.sparkhash import xxhash64

SAMPLE_BITS = 53  # a hash's low bits compared with the sampled fraction of 2**53


def sample_fraction(n_rows: int, n: int) -> float:
    """The share of rows hashed into the sample: 20 % over ``n_rows``, so that ``n_rows`` are nearly always there."""
    return min(1.0, 1.2 * n_rows / max(1, n))


def sample_threshold(fraction: float) -> int:
    return int(min(1.0, fraction) * 2**SAMPLE_BITS)


def sample_key(ids: np.ndarray, seed: int) -> np.ndarray:
    """Each image's key in ``[0, 2**SAMPLE_BITS)``: the low bits of ``xxhash64(seed, image_id)``."""
    return xxhash64(seed, np.asarray(ids, np.int64)) & (2**SAMPLE_BITS - 1)


def sampled(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each image is in the sample of ``fraction``: its :func:`sample_key` under
    ``fraction`` of the keys' range. :func:`sample_filter` is the same test as a Spark column."""
    return sample_key(ids, seed) < sample_threshold(fraction)


def sample_filter(fraction: float, seed: int):
    """:func:`sampled` as a Spark column: rows leave the JVM only if sampled."""
    from pyspark.sql import functions as F

    h = F.xxhash64(F.lit(seed).cast("long"), F.col("image_id").cast("long"))
    return h.bitwiseAND(F.lit(2**SAMPLE_BITS - 1)) < F.lit(sample_threshold(fraction))


def first_by_key(ids: np.ndarray, m: int, seed: int) -> np.ndarray:
    """The indices into ``ids`` of the ``m`` images with the smallest keys (ties by id), in
    key order: a sample of ``m`` that a few added or removed images change by about as few."""
    ids = np.asarray(ids, np.int64)
    return np.lexsort((ids, sample_key(ids, seed)))[: max(0, m)]
