"""Read a legacy-format (non-zip) PyTorch state-dict file into numpy arrays, without torch and safely.

The legacy format written by ``torch.save(..., _use_new_zipfile_serialization=False)`` is a concatenation of:

1. a pickled magic number, 2. a pickled protocol version, 3. a pickled dict of system info,
4. the main pickle, whose storages are persistent ids
   ``("storage", StorageClass, key, location, numel, view)``,
5. a pickled list of storage keys, and
6. for each of those keys in order, an int64 element count followed by the storage's raw little-endian bytes.

Only the few globals a state dict needs are resolved, each to one of our own small callables, so a
hostile file cannot run code: any other global raises :class:`UnsafeWeightsError`.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage classes of the legacy format and the numpy dtype of their elements (always little-endian on disk).
_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class WeightsFormatError(ValueError):
    """The file is not a legacy-format torch state dict we can read."""


class UnsafeWeightsError(WeightsFormatError):
    """The pickle references a global outside the small allow-list a state dict needs."""


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a torch storage class (e.g. ``torch.FloatStorage``): only its element dtype matters."""

    name: str
    dtype: np.dtype[Any]


@dataclass
class _Storage:
    """A storage announced by the main pickle; its bytes are filled in after the key list is read."""

    key: str
    dtype: np.dtype[Any]
    numel: int
    data: np.ndarray[Any, Any] | None = None


@dataclass
class _PendingTensor:
    """A tensor whose storage bytes come later in the file: materialised once every storage is read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray[Any, Any]:
        """Copy this tensor's (possibly strided) view of its storage into a fresh contiguous array."""
        data = self.storage.data
        if data is None:
            raise WeightsFormatError(f"storage {self.storage.key} was never read from the file")
        if not self.shape:
            return np.array(data[self.offset], dtype=data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if any(n == 0 for n in self.shape):
            return np.zeros(self.shape, dtype=data.dtype)
        if self.offset < 0 or last >= data.size or any(s < 0 for s in self.stride):
            raise WeightsFormatError(f"tensor view exceeds storage {self.storage.key}")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    _requires_grad: bool = False,
    _backward_hooks: object = None,
    _metadata: object = None,
) -> _PendingTensor:
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing yet."""
    if not isinstance(storage, _Storage):
        raise WeightsFormatError("tensor rebuilt from something that is not a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_tensor(
    storage: _Storage, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> _PendingTensor:
    """Our stand-in for the older ``torch._utils._rebuild_tensor``."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


class _OrderedDict(collections.OrderedDict[Any, Any]):
    """An OrderedDict that tolerates the ``_metadata`` attribute torch state dicts carry (pickle BUILD)."""


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): _OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; collects storages announced through persistent ids."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(stream)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeWeightsError(
                f"refusing global {module}.{name}: a state dict only needs tensors, storages and OrderedDict"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise WeightsFormatError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise WeightsFormatError(f"malformed storage record for key {key!r}")
        if view_metadata is not None:
            raise WeightsFormatError("storage views (pre-2018 torch files) are not supported")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, numel)
        return self.storages[key]


def _load_plain(stream: IO[bytes], what: str) -> Any:
    """Load one of the header pickles, which must hold plain data (no globals at all)."""
    try:
        return _NoGlobalsUnpickler(stream).load()
    except UnsafeWeightsError:
        raise
    except Exception as exc:
        raise WeightsFormatError(f"cannot read the {what} of a legacy torch file") from exc


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeWeightsError(f"refusing global {module}.{name} in a legacy torch file header")


def _check_header(stream: IO[bytes]) -> None:
    magic = _load_plain(stream, "magic number")
    if magic != LEGACY_MAGIC_NUMBER:
        raise WeightsFormatError("not a legacy torch file (bad magic number; zip files are unsupported)")
    protocol = _load_plain(stream, "protocol version")
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise WeightsFormatError(f"unsupported legacy torch protocol version {protocol!r}")
    sys_info = _load_plain(stream, "system info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise WeightsFormatError("only little-endian legacy torch files are supported")


def _read_storage_bytes(stream: IO[bytes], storage: _Storage) -> None:
    header = stream.read(8)
    if len(header) != 8:
        raise WeightsFormatError(f"file truncated before storage {storage.key}")
    numel = int.from_bytes(header, "little", signed=True)
    if numel != storage.numel:
        raise WeightsFormatError(f"storage {storage.key}: {numel} elements on disk, {storage.numel} declared")
    nbytes = numel * storage.dtype.itemsize
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
        raise WeightsFormatError(f"file truncated inside storage {storage.key}")
    storage.data = np.frombuffer(raw, dtype=storage.dtype)


def _collect_tensors(state: Any) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(state, dict):
        raise WeightsFormatError(f"expected a state dict at the top of the file, got {type(state).__name__}")
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, _PendingTensor):
            raise WeightsFormatError(f"state dict entry {name!r} is not a named tensor")
        tensors[name] = value.materialise()
    return tensors


def read_legacy_state_dict_stream(stream: IO[bytes]) -> dict[str, np.ndarray[Any, Any]]:
    """Read a legacy torch state dict from a binary stream into ``{name: contiguous numpy array}``."""
    _check_header(stream)
    unpickler = _StateDictUnpickler(stream)
    try:
        state = unpickler.load()
    except WeightsFormatError:
        raise
    except Exception as exc:
        raise WeightsFormatError("cannot unpickle the state dict of a legacy torch file") from exc
    keys = _load_plain(stream, "storage key list")
    if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
        raise WeightsFormatError("storage key list does not match the storages the state dict uses")
    for key in keys:
        _read_storage_bytes(stream, unpickler.storages[str(key)])
    return _collect_tensors(state)


def read_legacy_state_dict(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Read a legacy-format ``.pth`` state dict file into ``{name: contiguous numpy array}``."""
    with path.open("rb") as handle:
        return read_legacy_state_dict_stream(handle)


def read_legacy_state_dict_bytes(blob: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """Read a legacy torch state dict held in memory (handy for tests and checksummed caches)."""
    return read_legacy_state_dict_stream(io.BytesIO(blob))
