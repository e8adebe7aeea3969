"""Spark SQL's ``xxhash64`` of ``long`` columns, in numpy: the same 64-bit values.

A row chosen by a hash must be chosen alike by a Spark filter on the executors (cheap:
the JVM drops the other rows before any reach Python) and by numpy in a process that
reads the table itself (:mod:`cbir_lib.common.inprocess`). ``xxhash64(c1, c2, ...)``
hashes each column with the previous column's hash as its seed, starting from 42; a
``long`` is hashed by XXH64's 8-byte path (Spark's ``XXH64.hashLong``). Checked against
Spark in tests/common/test_sparkhash.py.
"""

from __future__ import annotations

import numpy as np

SEED = 42
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def hash_long(values, seed) -> np.ndarray:
    """XXH64 of each int64 in ``values`` with ``seed`` (a scalar or one per value), as int64."""
    x = np.asarray(values, dtype=np.int64).view(np.uint64)
    s = np.asarray(seed, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):  # wrapping 64-bit arithmetic is the algorithm
        h = s + _P5 + np.uint64(8)
        h = h ^ (_rotl(x * _P2, 31) * _P1)
        h = _rotl(h, 27) * _P1 + _P4
        h = h ^ (h >> np.uint64(33))
        h = h * _P2
        h = h ^ (h >> np.uint64(29))
        h = h * _P3
        h = h ^ (h >> np.uint64(32))
    return h.view(np.int64)


def xxhash64(*columns) -> np.ndarray:
    """``F.xxhash64(*columns)`` of ``long`` columns (arrays, or scalars broadcast)."""
    h = np.asarray(SEED, dtype=np.int64)
    for c in columns:
        h = hash_long(np.broadcast_to(np.asarray(c, np.int64), np.broadcast(np.asarray(c), h).shape), h)
    return h
