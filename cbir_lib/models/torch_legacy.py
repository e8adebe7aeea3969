"""Read a PyTorch checkpoint saved in the legacy (pre-1.6) format, without torch.

The legacy format is a sequence of pickles in one stream:

1. a magic number, 2. the protocol version, 3. system info (endianness, type sizes),
4. the pickled object, whose tensors refer to storages through ``persistent_id``,
5. the list of storage keys, then for each key in that order: an 8-byte little-endian
   element count followed by the raw elements.

Tensors are rebuilt through ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)``; we resolve that call to a lazy record and materialise it with
``numpy.lib.stride_tricks.as_strided`` once the storages have been read.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class LegacyCheckpointError(ValueError):
    """The file is not a legacy torch checkpoint this reader understands."""


@dataclass
class _Storage:
    key: str
    dtype: Any
    size: int
    data: np.ndarray | None = None


@dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        if self.storage.data is None:
            raise LegacyCheckpointError(f"storage {self.storage.key} was never read")
        base = self.storage.data
        check_extent(self.offset, self.shape, self.stride, len(base), self.storage.key)
        itemsize = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view, copy=True)


def check_extent(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], size: int, key: str) -> None:
    """Refuse a tensor that would read outside its storage (``as_strided`` does not check)."""
    if len(shape) != len(stride) or offset < 0 or any(d < 0 for d in shape) or any(s < 0 for s in stride):
        raise LegacyCheckpointError(f"storage {key}: a tensor with offset {offset}, shape {shape}, stride {stride} is malformed")
    if 0 in shape:
        return
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    if last >= size:
        raise LegacyCheckpointError(f"storage {key}: a tensor reaches element {last} of a storage of {size}")


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int for v in values):
        raise LegacyCheckpointError(f"tensor {what} must be a tuple of ints, got {type(values).__name__}")
    return tuple(values)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage) or type(storage_offset) is not int:
        raise LegacyCheckpointError("a tensor must refer to a storage at an int offset")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    check_extent(storage_offset, shape, strides, storage.size, storage.key)
    return _LazyTensor(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, *_ignored):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: BinaryIO):
        super().__init__(fh)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise LegacyCheckpointError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage_type, root_key, location, numel, view_metadata)
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise LegacyCheckpointError("unexpected persistent id in the checkpoint")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise LegacyCheckpointError("a storage reference in the checkpoint is malformed")
        if view_metadata is not None:
            raise LegacyCheckpointError("storage views are not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = _Storage(key, storage_type.dtype, int(numel))
            self.storages[key] = storage
        return storage


class _DataUnpickler(pickle.Unpickler):
    """For the header pickles and the key list: plain data only, no class, no persistent id."""

    def find_class(self, module: str, name: str):
        raise LegacyCheckpointError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid):
        raise LegacyCheckpointError("unexpected persistent id in the checkpoint header")


def _data(fh: BinaryIO, kind, what: str, path: str):
    """One data-only pickle from ``fh``, checked to be of ``kind``."""
    try:
        value = _DataUnpickler(fh).load()
    except LegacyCheckpointError:
        raise
    except Exception as e:  # a malformed stream: the pickle module raises many types
        raise LegacyCheckpointError(f"{path}: unreadable {what} ({type(e).__name__})") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LegacyCheckpointError(f"{path}: the {what} is a {type(value).__name__}")
    return value


def _resolve(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def load_legacy_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Load a legacy-format ``.pth`` state dict as an ordered mapping of numpy arrays.

    Parameters
    ----------
    path:
        Local path of the checkpoint.

    Raises
    ------
    LegacyCheckpointError
        If the file is a zip-format (torch >= 1.6) checkpoint or otherwise not understood.
    """
    with open(path, "rb") as fh:
        head = fh.read(2)
        if head == b"PK":
            raise LegacyCheckpointError(f"{path} is a zip-format torch checkpoint; only the legacy format is supported")
        fh.seek(0)
        # Every pickle goes through a restricted unpickler: the header and key list admit
        # plain data only, the object only tensor rebuilds, storages and OrderedDict.
        magic = _data(fh, int, "magic number", path)
        if magic != LEGACY_MAGIC:
            raise LegacyCheckpointError(f"{path}: bad magic number")
        _data(fh, int, "protocol version", path)
        sys_info = _data(fh, dict, "system info", path)
        if not sys_info.get("little_endian", True):
            raise LegacyCheckpointError(f"{path}: big-endian checkpoints are not supported")
        unpickler = _Unpickler(fh)
        try:
            obj = unpickler.load()
        except LegacyCheckpointError:
            raise
        except Exception as e:
            raise LegacyCheckpointError(f"{path}: unreadable object ({type(e).__name__})") from None
        keys = _data(fh, list, "storage key list", path)
        for key in keys:
            storage = unpickler.storages.get(key) if isinstance(key, str) else None
            if storage is None:
                raise LegacyCheckpointError(f"{path}: the key list names a storage the object does not use")
            raw = fh.read(8)
            if len(raw) != 8:
                raise LegacyCheckpointError(f"{path}: truncated storage {key}")
            (numel,) = struct.unpack("<q", raw)
            if numel != storage.size:
                raise LegacyCheckpointError(f"{path}: storage {key} has {numel} elements, its reference says {storage.size}")
            nbytes = numel * np.dtype(storage.dtype).itemsize
            buf = fh.read(nbytes)
            if len(buf) != nbytes:
                raise LegacyCheckpointError(f"{path}: truncated storage {key}")
            storage.data = np.frombuffer(buf, dtype=storage.dtype)
    return _resolve(obj)
