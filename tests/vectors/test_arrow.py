"""The Arrow codecs of vectors: both round trips, chunked and sliced arrays, and refusals."""

import numpy as np
import pyarrow as pa
import pytest

from cbir_lib.vectors.arrow import binary_to_numpy, to_numpy, vectors_array, vectors_binary


def _x(n=7, d=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_list_round_trip_is_exact():
    x = _x()
    arr = vectors_array(x)
    assert arr.type == pa.list_(pa.float32()) and len(arr) == 7
    np.testing.assert_array_equal(to_numpy(pa.table({"embedding": arr})), x)
    assert to_numpy(pa.table({"embedding": vectors_array(x[:0])}), dim=5).shape == (0, 5)


def test_list_of_chunks_and_a_named_column():
    x = _x(10)
    col = pa.chunked_array([vectors_array(x[:4]), vectors_array(x[4:])])
    np.testing.assert_array_equal(to_numpy(pa.table({"v": col}), "v"), x)


def test_ragged_or_null_lists_are_refused():
    ragged = pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))
    with pytest.raises(ValueError, match="ragged or null"):
        to_numpy(pa.table({"embedding": ragged}), dim=2)


def test_binary_round_trip_is_zero_copy_and_exact():
    x = _x(9, 3)
    arr = vectors_binary(x)
    assert arr.type == pa.binary() and len(arr[0].as_py()) == 12
    back = binary_to_numpy(arr)
    np.testing.assert_array_equal(back, x)
    assert back.dtype == np.float32


def test_binary_of_chunks_slices_and_nothing():
    x = _x(12, 4)
    arr = vectors_binary(x)
    np.testing.assert_array_equal(binary_to_numpy(arr.slice(3, 5)), x[3:8])
    np.testing.assert_array_equal(binary_to_numpy(pa.chunked_array([arr.slice(0, 6), arr.slice(6)])), x)
    assert binary_to_numpy(pa.chunked_array([], pa.binary()), 4).shape == (0, 4)


def test_binary_rows_of_different_lengths_or_nulls_are_refused():
    with pytest.raises(ValueError, match="different byte lengths"):
        binary_to_numpy(pa.array([b"\0" * 8, b"\0" * 4]))
    with pytest.raises(ValueError, match="null"):
        binary_to_numpy(pa.array([b"\0" * 4, None]))
