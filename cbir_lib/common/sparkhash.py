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


def _fmix(h: np.ndarray) -> np.ndarray:
    """XXH64's final avalanche (called under errstate(over="ignore"))."""
    h = h ^ (h >> np.uint64(33))
    h = h * _P2
    h = h ^ (h >> np.uint64(29))
    h = h * _P3
    return h ^ (h >> np.uint64(32))


def hash_long(values, seed) -> np.ndarray:
    """XXH64 of each int64 in ``values`` with ``seed`` (a scalar or one per value), as int64."""
    x = np.asarray(values, dtype=np.int64).view(np.uint64)
    s = np.asarray(seed, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):  # wrapping 64-bit arithmetic is the algorithm
        h = s + _P5 + np.uint64(8)
        h = h ^ (_rotl(x * _P2, 31) * _P1)
        h = _rotl(h, 27) * _P1 + _P4
        h = _fmix(h)
    return h.view(np.int64)


def xxhash64(*columns) -> np.ndarray:
    """``F.xxhash64(*columns)`` of ``long`` columns (arrays, or scalars broadcast)."""
    h = np.asarray(SEED, dtype=np.int64)
    for c in columns:
        h = hash_long(np.broadcast_to(np.asarray(c, np.int64), np.broadcast(np.asarray(c), h).shape), h)
    return h


def _round(acc: np.ndarray, lane: np.ndarray) -> np.ndarray:
    return _rotl(acc + lane * _P2, 31) * _P1


def hash_bytes(data: np.ndarray, seed=SEED) -> np.ndarray:
    """XXH64 of each row of ``data`` (``(n, L)`` uint8, every value ``L`` bytes long), as
    Spark's ``XXH64.hashUnsafeBytes`` computes it for a string's UTF-8 bytes: ``F.xxhash64``
    of a string column whose values all have ``L`` bytes (``content_sha256``: 64)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    n, length = data.shape
    s = np.uint64(np.asarray(seed, dtype=np.int64).view(np.uint64))
    words = data[:, : length // 8 * 8].view("<u8") if length >= 8 else np.zeros((n, 0), np.uint64)
    with np.errstate(over="ignore"):
        if length >= 32:
            v = [np.full(n, s + _P1 + _P2), np.full(n, s + _P2), np.full(n, s), np.full(n, s - _P1)]
            stripes = length // 32
            for i in range(stripes):
                for j in range(4):
                    v[j] = _round(v[j], words[:, 4 * i + j])
            h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
            for j in range(4):
                h = (h ^ _round(np.zeros(n, np.uint64), v[j])) * _P1 + _P4
            done = 4 * stripes
        else:
            h = np.full(n, s + _P5)
            done = 0
        h = h + np.uint64(length)
        for w in range(done, length // 8):
            h = _rotl(h ^ _round(np.zeros(n, np.uint64), words[:, w]), 27) * _P1 + _P4
        at = length // 8 * 8
        if at + 4 <= length:
            h = _rotl(h ^ (data[:, at : at + 4].copy().view("<u4")[:, 0].astype(np.uint64) * _P1), 23) * _P2 + _P3
            at += 4
        for b in range(at, length):
            h = _rotl(h ^ (data[:, b].astype(np.uint64) * _P5), 11) * _P1
        h = _fmix(h)
    return h.view(np.int64)


def hash_strings(values, seed=SEED) -> np.ndarray | None:
    """``F.xxhash64`` of a string column (a pyarrow array or list of str) whose values all
    have the same UTF-8 length and none is null; None otherwise (ask Spark)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.chunked_array([values]) if not isinstance(values, pa.ChunkedArray) else values
    if len(arr) == 0:
        return np.zeros(0, np.int64)
    arr = arr.combine_chunks()
    if arr.null_count:
        return None
    lengths = pc.binary_length(arr).to_numpy()
    if lengths.min() != lengths.max():
        return None
    width = int(lengths[0])
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return hash_bytes(raw.reshape(len(arr), width) if width else np.zeros((len(arr), 0), np.uint8), seed)
