"""Read PyTorch checkpoints (``.pth``) into numpy arrays, without torch and without running pickled code.

``torch.save`` writes a Python pickle in which every tensor is the call
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)``
and every ``storage`` is a *persistent id*, a reference to raw bytes kept outside the pickle. Two
containers exist:

**Legacy format** (``torch.save(..., _use_new_zipfile_serialization=False)``, the only one before
PyTorch 1.6): a sequence of pickles in one file,

1. the magic number ``0x1950a86a20f9469cfc6c``;
2. the protocol version ``1001``;
3. system info, ``{"protocol_version": 1001, "little_endian": True, "type_sizes": {...}}``;
4. the object itself (usually an ``OrderedDict`` state dict). Each storage is the persistent id
   ``("storage", storage_type, root_key, location, numel, view_metadata)``, where ``storage_type`` is
   a class such as ``torch.FloatStorage`` (it gives the dtype), ``root_key`` names the storage,
   ``numel`` counts its elements and ``view_metadata`` is ``None`` or ``(view_key, offset, size)`` for
   a view into another storage (files from PyTorch < 0.4);
5. the list of storage keys, in the order in which their data follows;
6. for each key, an int64 element count and then the storage's raw bytes. Both are little-endian:
   PyTorch converts on big-endian machines.

**Zip format** (the default since PyTorch 1.6): a zip archive ``<name>/data.pkl`` holding the pickle,
``<name>/data/<key>`` holding each storage's raw bytes, and ``<name>/byteorder`` (``little`` or
``big``; little when absent). The persistent id is ``("storage", storage_type, key, location, numel)``.

A tensor is element ``storage[storage_offset + sum_i index_i * stride_i]`` for each index with
``0 <= index_i < size_i`` (offset and strides count elements, not bytes). Tensors that share a storage
come back as separate, contiguous, writable copies in native byte order.

Security: unpickling calls whatever callable the file names. :class:`_RestrictedUnpickler` resolves
only the few names a tensor checkpoint needs (``collections.OrderedDict``, the tensor rebuild
functions, the storage classes, ``torch.Size``), each mapped to a harmless local stand-in, and raises
:class:`ValueError` naming any other global (``os.system``, ``builtins.eval``, a model class ...). So
whole pickled modules (``torch.save(model)``) are refused too; save ``model.state_dict()`` instead.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO, Literal

import numpy as np

__all__ = ["load", "load_state_dict"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}


def _numpy_dtype(code: str) -> np.dtype:
    if code == "bfloat16":
        try:
            import ml_dtypes  # ships with jax
        except ImportError as error:  # jax depends on ml_dtypes, so only without jax
            raise ValueError("bfloat16 tensors need the ml_dtypes package (pip install ml_dtypes)") from error
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(code)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a class such as ``torch.FloatStorage``: only its dtype matters."""

    name: str
    code: str  # numpy dtype string, resolved when a storage of this type is met


@dataclasses.dataclass(eq=False)
class _Storage:
    """A flat buffer of ``numel`` elements; ``data`` is filled once its bytes have been read."""

    key: str
    dtype: np.dtype
    numel: int
    data: bytes | None = None
    byteorder: Literal["<", ">"] = "<"
    root: _Storage | None = None  # legacy views: ``numel`` elements of ``root`` from ``offset``
    offset: int = 0

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise ValueError(f"storage {self.key!r}: its data was never found in the file")
        itemsize = self.dtype.itemsize
        if len(self.data) < self.numel * itemsize:
            raise ValueError(
                f"storage {self.key!r}: {len(self.data)} bytes for {self.numel} elements of {self.dtype}"
            )
        return np.frombuffer(self.data, dtype=self.dtype.newbyteorder(self.byteorder), count=self.numel)


@dataclasses.dataclass(eq=False)
class _TensorRef:
    """A tensor waiting for its storage's bytes (the legacy format stores them after the pickle)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    metadata: Any = None


def _check_ints(name: str, values: Any) -> tuple[int, ...]:
    values = tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"tensor {name} must be non-negative integers, got {values!r}")
    return values


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    (offset,) = _check_ints("offset", (storage_offset,))
    shape, strides = _check_ints("size", size), _check_ints("stride", stride)
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    return _TensorRef(storage, offset, shape, strides)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    tensor.metadata = metadata
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name, code) for name, code in _STORAGE_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :data:`_ALLOWED_GLOBALS`, to local stand-ins.

    ``storage_for`` turns a storage persistent id (without its leading ``"storage"``) into a
    :class:`_Storage`; ``None`` refuses persistent ids (the header pickles have none).
    """

    def __init__(self, file: BinaryIO, storage_for=None):
        super().__init__(file, encoding="utf-8")
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ValueError(
                f"refusing to unpickle the global {module}.{name}: a checkpoint read by jaxdtd may only "
                "hold tensors, storages and (ordered) dicts; anything else could run arbitrary code. "
                "Save model.state_dict(), not the model object."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_for is None:
            raise ValueError(f"unexpected persistent id {pid!r} outside the checkpoint's main pickle")
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"malformed persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise ValueError(
                f"refusing persistent id of type {typename!r}: only tensor storages are supported "
                "(a 'module' id means the whole model object was pickled; save its state_dict() instead)"
            )
        return self._storage_for(pid[1:])


def _unpickle(file: BinaryIO, storage_for=None) -> Any:
    try:
        return _RestrictedUnpickler(file, storage_for).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"malformed PyTorch checkpoint: {type(error).__name__}: {error}") from error


def _storage_args(args: tuple, n: int) -> tuple:
    if len(args) != n:
        raise ValueError(f"storage persistent id has {len(args) + 1} fields, expected {n + 1}")
    storage_type, key = args[0], args[1]
    if not isinstance(storage_type, _StorageType):
        raise ValueError(f"storage type {storage_type!r} is not a torch storage class")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    (numel,) = _check_ints("storage size", (args[3],))
    return _numpy_dtype(storage_type.code), key, numel


def _load_legacy(file: BinaryIO) -> Any:
    try:
        magic = _RestrictedUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"not a PyTorch checkpoint (neither a zip archive nor a pickle): {error}") from None
    if magic != MAGIC_NUMBER:
        raise ValueError("not a PyTorch checkpoint: the first pickle is not torch's magic number")
    version = _unpickle(file)
    if version != PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy checkpoint protocol {version!r}, expected {PROTOCOL_VERSION}")
    _unpickle(file)  # system info; legacy storages are little-endian whatever it says

    storages: dict[str, _Storage] = {}

    def storage_for(args: tuple) -> _Storage:
        dtype, key, numel = _storage_args(args, 5)
        root = storages.setdefault(key, _Storage(key, dtype, numel))
        view = args[4]
        if view is None:
            return root
        view_key, offset, size = view
        (offset, size) = _check_ints("storage view", (offset, size))
        if offset + size > root.numel:
            raise ValueError(f"storage view {view_key!r} reaches past its storage {key!r}")
        view_key = str(view_key)
        return storages.setdefault(view_key, _Storage(view_key, dtype, size, root=root, offset=offset))

    obj = _unpickle(file, storage_for)
    keys = _unpickle(file)
    if not isinstance(keys, list):
        raise ValueError(f"expected the list of storage keys after the object, got {type(keys).__name__}")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None or storage.root is not None:
            raise ValueError(f"storage key {key!r} listed in the file but never referenced by a tensor")
        header = file.read(8)
        if len(header) != 8:
            raise ValueError(f"file ends before the data of storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise ValueError(f"storage {key!r} holds {numel} elements, the pickle said {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        storage.data = file.read(nbytes)
        if len(storage.data) != nbytes:
            raise ValueError(f"file ends inside the data of storage {key!r}")
    return _materialize(obj)


def _load_zip(file: BinaryIO) -> Any:
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"zip checkpoint must hold exactly one '<name>/data.pkl', found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder: Literal["<", ">"] = "<"
        if f"{prefix}byteorder" in names:
            mark = archive.read(f"{prefix}byteorder")
            if mark not in (b"little", b"big"):
                raise ValueError(f"unknown byte order mark {mark!r}")
            byteorder = "<" if mark == b"little" else ">"
        storages: dict[str, _Storage] = {}

        def storage_for(args: tuple) -> _Storage:
            dtype, key, numel = _storage_args(args, 4)
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise ValueError(f"zip checkpoint lacks the storage record {record!r}")
                storages[key] = _Storage(key, dtype, numel, archive.read(record), byteorder)
            return storages[key]

        obj = _unpickle(io.BytesIO(archive.read(pickles[0])), storage_for)
    return _materialize(obj)


def _tensor_array(ref: _TensorRef) -> np.ndarray:
    base = ref.storage.array()
    dtype = base.dtype.newbyteorder("=")
    if math.prod(ref.shape) == 0:
        return np.zeros(ref.shape, dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= base.size:  # as_strided would read memory outside the buffer
        raise ValueError(
            f"tensor of size {ref.shape}, stride {ref.stride} at offset {ref.offset} reaches element "
            f"{last} of a storage with {base.size} elements"
        )
    strides = tuple(s * base.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(base[ref.offset :], ref.shape, strides, writeable=False)
    out = np.array(view, dtype=dtype, order="C")
    metadata = ref.metadata or {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"tensor metadata must be a dict, got {metadata!r}")
    for flag, value in metadata.items():
        if flag == "neg" and value:
            out = -out
        elif flag == "conj" and value:
            out = np.conj(out)
        elif value:
            raise ValueError(f"unsupported tensor metadata {flag!r}={value!r}")
    return out


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj)
    if isinstance(obj, _Storage):
        return np.array(obj.array(), dtype=obj.dtype.newbyteorder("="), order="C")
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def load(path: str | os.PathLike | BinaryIO) -> Any:
    """Read the object saved by ``torch.save`` with every tensor as a numpy array.

    ``path`` is a file name or a binary file object open for reading. Both the zip format and the
    legacy format are read (see the module docstring). Dicts, ordered dicts, lists, tuples and plain
    Python scalars come back as they were saved; tensors become C-contiguous numpy arrays of the same
    dtype (``float32``, ``float16``, ``int64``, ``bool``, ...; ``bfloat16`` through ``ml_dtypes``).

    Raises:
        ValueError: the file is not a PyTorch checkpoint, is truncated, or names a Python global other
            than the few a tensor checkpoint needs (a pickled model object, or a malicious payload).
    """
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as file:
            return load(file)
    start = path.tell()
    head = path.read(4)
    path.seek(start)
    if head == b"PK\x03\x04":
        return _load_zip(path)
    return _load_legacy(path)


def _flatten(tree: Mapping, prefix: str, out: dict[str, np.ndarray]) -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{name}.", out)
        elif isinstance(value, np.ndarray):
            out[name] = value
        else:
            raise ValueError(
                f"entry {name!r} is a {type(value).__name__}, not a tensor; for checkpoints that hold "
                "more than a state dict use jaxdtd.models.torch_pickle.load"
            )


def load_state_dict(path: str | os.PathLike | BinaryIO) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (``torch.save(model.state_dict(), path)``) as ``{name: numpy array}``.

    Names are PyTorch's (``"_blocks.0._bn1.running_mean"``), in the saved order; arrays keep torch's
    layout (convolution kernels ``(out, in, h, w)``, linear weights ``(out, in)``). Nested dicts are
    flattened with ``"."``.

    Raises:
        ValueError: as :func:`load`, or when the file does not hold a mapping of tensors.
    """
    obj = load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"expected a state dict (a mapping of tensors), the file holds a {type(obj).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out
