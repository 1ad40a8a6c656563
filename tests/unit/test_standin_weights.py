"""The torch-free legacy state-dict reader: exact tensors, strided views, and refusal of unsafe pickles."""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy.standin.weights import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    UnsafeWeightsError,
    WeightsFormatError,
    read_legacy_state_dict,
    read_legacy_state_dict_bytes,
)

_SYS_INFO = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True, "type_sizes": {"long": 8}}


class _FakeStorageType:
    """Pickles as a reference to a torch storage class, like ``torch.FloatStorage``."""


class _FakeTensor:
    """Pickles like a torch tensor: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage: _FakeStorage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.args: tuple[object, ...] = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


class _FakeStorage:
    """A storage with its raw values, written after the main pickle like torch's legacy format does."""

    def __init__(self, key: str, storage_type: type, values: np.ndarray[Any, Any]):
        self.key, self.storage_type, self.values = key, storage_type, values


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.values.size, None)
        return None


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    """Importable ``torch`` / ``torch._utils`` stand-ins so pickle can name their globals when writing."""
    torch_module = types.ModuleType("torch")
    utils_module = types.ModuleType("torch._utils")
    storage_types: dict[str, type] = {}
    for name in ("FloatStorage", "LongStorage"):
        storage_type = type(name, (_FakeStorageType,), {"__module__": "torch"})
        setattr(torch_module, name, storage_type)
        storage_types[name] = storage_type

    def _rebuild_tensor_v2(*args: object) -> None:
        raise AssertionError("only used as a name while pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)
    return storage_types


def _legacy_file(state: object, storages: list[_FakeStorage]) -> bytes:
    out = io.BytesIO()
    for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, _SYS_INFO):
        pickle.dump(header, out, protocol=2)
    _LegacyPickler(out, protocol=2).dump(state)
    pickle.dump([s.key for s in storages], out, protocol=2)
    for storage in storages:
        out.write(int(storage.values.size).to_bytes(8, "little", signed=True))
        out.write(storage.values.astype(storage.values.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def test_reads_contiguous_strided_and_shared_storage_tensors(fake_torch: dict[str, type]) -> None:
    floats = _FakeStorage("100", fake_torch["FloatStorage"], np.arange(12, dtype=np.float32))
    counter = _FakeStorage("200", fake_torch["LongStorage"], np.array([7], dtype=np.int64))
    state = collections.OrderedDict(
        [
            ("conv.weight", _FakeTensor(floats, 0, (2, 3), (3, 1))),
            ("conv.weight_t", _FakeTensor(floats, 0, (3, 2), (1, 3))),
            ("tail", _FakeTensor(floats, 8, (4,), (1,))),
            ("bn.num_batches_tracked", _FakeTensor(counter, 0, (), ())),
        ]
    )
    tensors = read_legacy_state_dict_bytes(_legacy_file(state, [floats, counter]))

    assert list(tensors) == ["conv.weight", "conv.weight_t", "tail", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(tensors["conv.weight"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(tensors["conv.weight_t"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(tensors["tail"], [8, 9, 10, 11])
    assert tensors["conv.weight"].dtype == np.float32
    assert tensors["bn.num_batches_tracked"].dtype == np.int64
    assert int(tensors["bn.num_batches_tracked"]) == 7
    assert tensors["conv.weight_t"].flags.c_contiguous


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_refuses_a_pickle_that_calls_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = _legacy_file(collections.OrderedDict([("w", _RunsShell(marker))]), [])

    with pytest.raises(UnsafeWeightsError, match=r"refusing global (os|posix)\.system"):
        read_legacy_state_dict_bytes(blob)
    assert not marker.exists()


def test_refuses_globals_in_the_header_pickles() -> None:
    blob = pickle.dumps(print, protocol=2)
    with pytest.raises(UnsafeWeightsError, match=r"(__builtin__|builtins)\.print"):
        read_legacy_state_dict_bytes(blob)


def test_rejects_a_zip_format_torch_file() -> None:
    with pytest.raises(WeightsFormatError, match="magic number"):
        read_legacy_state_dict_bytes(b"PK\x03\x04" + b"\x00" * 64)


def test_rejects_a_file_truncated_inside_storage_bytes(fake_torch: dict[str, type]) -> None:
    floats = _FakeStorage("1", fake_torch["FloatStorage"], np.arange(6, dtype=np.float32))
    blob = _legacy_file(collections.OrderedDict([("w", _FakeTensor(floats, 0, (6,), (1,)))]), [floats])
    with pytest.raises(WeightsFormatError, match="truncated"):
        read_legacy_state_dict_bytes(blob[:-5])


def test_rejects_a_view_running_past_its_storage(fake_torch: dict[str, type]) -> None:
    floats = _FakeStorage("1", fake_torch["FloatStorage"], np.arange(4, dtype=np.float32))
    blob = _legacy_file(collections.OrderedDict([("w", _FakeTensor(floats, 2, (4,), (1,)))]), [floats])
    with pytest.raises(WeightsFormatError, match="exceeds storage"):
        read_legacy_state_dict_bytes(blob)


def test_reads_the_shipped_efficientnet_lite0_weights_like_torch_load() -> None:
    from deploy.standin.classifier import weights_path

    tensors = read_legacy_state_dict(weights_path())

    assert len(tensors) == 296
    assert tensors["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert tensors["_fc.weight"].shape == (1000, 1280)
    # Reference values printed once by torch.load (torch 2.13) on the same file.
    np.testing.assert_array_equal(
        tensors["_conv_stem.weight"][0, 0, 0],
        np.array([-1.1103360652923584, -1.3087704181671143, -0.010156914591789246], dtype=np.float32),
    )
    np.testing.assert_array_equal(
        tensors["_blocks.15._bn2.running_var"][:3],
        np.array([1.478985071182251, 1.4033255577087402, 1.254407525062561], dtype=np.float32),
    )
    fc_bias_sum = float(tensors["_fc.bias"].astype(np.float64).sum())
    assert fc_bias_sum == pytest.approx(-0.04981697298353538, abs=1e-9)
    assert "torch" not in sys.modules
