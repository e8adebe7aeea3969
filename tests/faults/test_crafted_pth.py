"""Crafted legacy ``.pth`` files: a clear error, and nothing in them runs or reads out of bounds."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from cbir_lib.models.torch_legacy import LEGACY_MAGIC, LegacyCheckpointError, load_legacy_state_dict


class _Marker:
    """Unpickling this runs ``os.system``: a file appears if any pickle is loaded unrestricted."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _fake_torch():
    """Modules named like torch's, so that pickle writes the globals a real checkpoint has."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

    def _rebuild_tensor_v2(*args):
        raise AssertionError

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    return torch, utils


class _Tensor:
    def __init__(self, key, offset, shape, stride):
        self.key, self.offset, self.shape, self.stride = key, offset, shape, stride

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, (_StorageRef(self.key), self.offset, self.shape, self.stride, False, {}))


class _StorageRef:
    def __init__(self, key):
        self.key = key


def write_legacy(path, tensors, storages, header=None, keys=None, numel=None):
    """A legacy checkpoint: ``tensors`` name -> (key, offset, shape, stride), ``storages`` key -> float32 array."""
    torch, utils = _fake_torch()
    saved = {n: sys.modules.get(n) for n in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        buf = io.BytesIO()
        for part in header or [LEGACY_MAGIC, 1001, {"little_endian": True}]:
            pickle.dump(part, buf, protocol=2)

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _StorageRef):
                    return ("storage", torch.FloatStorage, obj.key, "cpu", len(storages[obj.key]), None)
                return None

        P(buf, protocol=2).dump({name: _Tensor(*spec) for name, spec in tensors.items()})
        pickle.dump(list(storages) if keys is None else keys, buf, protocol=2)
        for data in storages.values():
            buf.write(struct.pack("<q", len(data) if numel is None else numel))
            buf.write(np.asarray(data, np.float32).tobytes())
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    path.write_bytes(buf.getvalue())
    return str(path)


def test_a_well_formed_file_still_reads(tmp_path):
    data = np.arange(12, dtype=np.float32)
    p = write_legacy(tmp_path / "ok.pth", {"w": ("0", 2, (2, 3), (3, 1)), "t": ("0", 0, (3, 2), (1, 3))}, {"0": data})
    sd = load_legacy_state_dict(p)
    np.testing.assert_array_equal(sd["w"], data[2:8].reshape(2, 3))
    np.testing.assert_array_equal(sd["t"], data[:6].reshape(2, 3).T)


@pytest.mark.parametrize("where", ["magic", "protocol", "sys_info", "keys"])
def test_code_in_any_header_pickle_never_runs(tmp_path, where):
    marker = tmp_path / "ran"
    header = [LEGACY_MAGIC, 1001, {"little_endian": True}]
    keys = None
    if where == "keys":
        keys = [_Marker(marker)]
    else:
        header[["magic", "protocol", "sys_info"].index(where)] = _Marker(marker)
    p = write_legacy(tmp_path / "evil.pth", {"w": ("0", 0, (2,), (1,))}, {"0": np.zeros(2)}, header=header, keys=keys)
    with pytest.raises(LegacyCheckpointError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        load_legacy_state_dict(p)
    assert not marker.exists()


@pytest.mark.parametrize(
    "offset,shape,stride", [(10, (4,), (1,)), (0, (2, 3), (100, 1)), (-1, (2,), (1,)), (0, (2,), (-1,)), (0, (3,), (1, 1))]
)
def test_a_tensor_outside_its_storage_is_refused(tmp_path, offset, shape, stride):
    p = write_legacy(tmp_path / "oob.pth", {"w": ("0", offset, shape, stride)}, {"0": np.zeros(12)})
    with pytest.raises(LegacyCheckpointError, match="storage 0"):
        load_legacy_state_dict(p)


def test_a_lying_element_count_or_key_list_is_refused(tmp_path):
    p = write_legacy(tmp_path / "n.pth", {"w": ("0", 0, (2,), (1,))}, {"0": np.zeros(2)}, numel=-5)
    with pytest.raises(LegacyCheckpointError, match="has -5 elements"):
        load_legacy_state_dict(p)
    p = write_legacy(tmp_path / "k.pth", {"w": ("0", 0, (2,), (1,))}, {"0": np.zeros(2)}, keys=["nope"])
    with pytest.raises(LegacyCheckpointError, match="names a storage the object does not use"):
        load_legacy_state_dict(p)


def test_garbage_is_a_clear_error(tmp_path):
    bad = tmp_path / "g.pth"
    bad.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(LegacyCheckpointError, match="unreadable magic number"):
        load_legacy_state_dict(str(bad))
