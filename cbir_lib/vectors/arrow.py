"""Arrow codecs of vectors, the bottom layer every stage reads and writes vectors through.

- ``list<float>`` (the embeddings table's ``embedding`` column): :func:`vectors_array`
  writes one without Python objects, :func:`to_numpy` reads one back as ``(n, d)``;
- ``binary`` of ``4 d`` little-endian bytes per row (the index store's ``vector``, which
  Spark moves an order of magnitude cheaper than arrays): :func:`vectors_binary` and
  :func:`binary_to_numpy`, zero-copy both ways.
"""

from __future__ import annotations

import numpy as np


def to_numpy(table, column: str = "embedding", dim: int | None = None) -> np.ndarray:
    """A list<float> column of an Arrow table or batch as an ``(n, dim)`` float32 array."""
    import pyarrow as pa

    col = table.column(column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=pa.list_(pa.float32()))
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if dim is None:
        dim = flat.size // n if n else 0
    if flat.size != n * dim:
        raise ValueError(f"{column}: expected {n} vectors of dim {dim}, got {flat.size} values (ragged or null vectors)")
    return flat.reshape(n, dim)


def vectors_binary(x: np.ndarray):
    """An ``(n, d)`` float32 array as an Arrow binary array of ``4 d`` bytes per row (zero-copy)."""
    import pyarrow as pa

    x = np.ascontiguousarray(x, dtype="<f4")
    n, d = x.shape
    offsets = np.arange(0, (n + 1) * 4 * d, 4 * d, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(x)])


def binary_to_numpy(col, dim: int | None = None) -> np.ndarray:
    """The inverse of :func:`vectors_binary` for an Arrow binary array or chunked array."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        chunks = [binary_to_numpy(c, dim) for c in col.chunks]
        return np.concatenate(chunks) if chunks else np.zeros((0, dim or 0), np.float32)
    n = len(col)
    if n == 0:
        return np.zeros((0, dim or 0), np.float32)
    if col.null_count:
        raise ValueError("vector: null vectors in the store")
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + n + 1]
    width = int(offsets[1] - offsets[0])
    if not (np.diff(offsets) == width).all() or width % 4:
        raise ValueError("vector: rows of different byte lengths in the store")
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view("<f4").reshape(n, width // 4).astype(np.float32, copy=False)


def vectors_array(x: np.ndarray):
    """An ``(n, d)`` float32 array as an Arrow ``list<float>`` array (no Python objects)."""
    import pyarrow as pa

    n, d = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel()))
