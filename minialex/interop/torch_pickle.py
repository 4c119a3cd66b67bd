"""Read files written by `torch.save` without importing torch and without running their pickles.

A .pth file is a pickle, and unpickling runs whatever functions the file names: a downloaded
"weights" file can just as well call os.system. So the unpickler here resolves only the handful
of globals a state_dict is made of (OrderedDict, torch's tensor-rebuild functions, the storage
types, dtypes) to functions of our own that build NumPy arrays; every other global is refused
before anything is called.

Two layouts exist:
- zip (torch >= 1.6): `<archive>/data.pkl` holds the pickle, whose persistent ids name storages
  stored raw as `<archive>/data/<key>`; `<archive>/byteorder` says their endianness.
- legacy (the non-zip serialisation): a stream of pickles — magic number, protocol version, system
  info, the object itself (persistent ids name storages by key), the list of storage keys — then
  each storage raw, as an int64 element count followed by its bytes, in that list's order.

Tensors come back as NumPy arrays (copies, C-contiguous, the storage's dtype; bfloat16 widened to
float32); dicts, OrderedDicts, lists, tuples and plain Python values come back as themselves.
"""
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from minialex.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# numpy dtype names by storage class; "bfloat16" has no numpy dtype and is widened on read.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
# torch.<dtype> globals, as _rebuild_tensor_v3 and typed storages name them.
_TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "bool": "bool", "complex64": "complex64",
    "cfloat": "complex64", "complex128": "complex128", "cdouble": "complex128",
}
_ITEMSIZE = {"bfloat16": 2, **{d: np.dtype(d).itemsize for d in set(_STORAGE_DTYPES.values()) - {"bfloat16"}}}


# Everything the pickle can get hold of is immutable (NamedTuples, bound methods, the OrderedDict
# type): a BUILD opcode cannot plant state in them that outlives or steers this load.
class _StorageType(NamedTuple):
    name: str
    dtype: str


class _DType(NamedTuple):
    name: str


class _StorageRef(NamedTuple):
    key: str
    dtype: str
    offset: int   # in elements, for the views of old legacy files
    numel: int


class _LazyTensor(NamedTuple):
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple
    dtype: str


class _Refused(Exception):
    """A global outside the allow-list; reported as a CheckpointError naming the file."""


def _int_tuple(value, what):
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"bad tensor {what} {value!r}")
    return tuple(value)


class _Reader:
    """One load: the allow-listed globals, the storages seen so far, and their bytes."""

    def __init__(self, path):
        self.path = path
        self.storages = {}      # key -> (dtype, numel)
        self.data = {}          # key -> raw bytes of the whole storage
        self.byteorder = "<"
        self.globals = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor"): self.rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter,
        }
        for name, dtype in _STORAGE_DTYPES.items():
            self.globals[("torch", name)] = _StorageType(name, dtype)
        for module in ("torch.storage", "torch"):
            self.globals[(module, "UntypedStorage")] = _StorageType("UntypedStorage", "uint8")
            self.globals[(module, "_UntypedStorage")] = _StorageType("UntypedStorage", "uint8")
        for name, dtype in _TORCH_DTYPES.items():
            self.globals[("torch", name)] = _DType(dtype)

    # -- what the pickle may call --------------------------------------------------------------
    def rebuild_tensor(self, storage, storage_offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise ValueError("tensor without a storage")
        if not isinstance(storage_offset, int) or storage_offset < 0:
            raise ValueError(f"bad storage offset {storage_offset!r}")
        return _LazyTensor(storage, storage_offset, _int_tuple(size, "size"),
                           _int_tuple(stride, "stride"), storage.dtype)

    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                          backward_hooks=None, metadata=None):
        return self.rebuild_tensor(storage, storage_offset, size, stride)

    def rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                          dtype, metadata=None):
        # v3 stores an untyped (byte) storage and the tensor's dtype separately.
        if not isinstance(dtype, _DType) or not isinstance(storage, _StorageRef):
            raise ValueError("tensor without a dtype")
        if storage.dtype != "uint8" and storage.dtype != dtype.name:
            raise ValueError(f"tensor of {dtype.name} on a {storage.dtype} storage")
        item = _ITEMSIZE[dtype.name]
        if storage.offset % item or storage.numel % item:
            raise ValueError("storage size is not a whole number of elements")
        typed = _StorageRef(storage.key, dtype.name, storage.offset // item, storage.numel // item)
        return self.rebuild_tensor(typed, storage_offset, size, stride)

    def rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, _LazyTensor):
            raise ValueError("parameter without a tensor")
        return data

    def storage_ref(self, storage_type, key, numel, view=None):
        if isinstance(storage_type, _DType):          # TypedStorage pickled with a dtype
            storage_type = _StorageType(storage_type.name, storage_type.name)
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise ValueError(f"bad storage record for key {key!r}")
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"bad storage size {numel!r}")
        if key in self.storages and self.storages[key] != (storage_type.dtype, numel):
            raise ValueError(f"storage {key!r} declared twice with different types or sizes")
        self.storages[key] = (storage_type.dtype, numel)
        ref = _StorageRef(key, storage_type.dtype, 0, numel)
        if view is not None:   # (view_key, offset, size) of legacy files from before torch 1.0
            _, offset, size = view
            if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size < 0 \
                    or offset + size > numel:
                raise ValueError(f"storage view outside storage {key!r}")
            ref = _StorageRef(key, storage_type.dtype, offset, size)
        return ref

    # -- turning lazy tensors into arrays, once every storage's bytes are known ----------------
    def materialize(self, obj, depth=0):
        if depth > 100:
            raise ValueError("nested more than 100 levels deep")
        if isinstance(obj, _LazyTensor):
            return self.array(obj)
        if isinstance(obj, (_StorageRef, _StorageType, _DType)) or callable(obj):
            raise ValueError("holds a bare storage or type, not a tensor")
        if isinstance(obj, OrderedDict):
            return OrderedDict((k, self.materialize(v, depth + 1)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {k: self.materialize(v, depth + 1) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.materialize(v, depth + 1) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.materialize(v, depth + 1) for v in obj)
        return obj

    def array(self, t):
        ref = t.storage
        raw = self.data.get(ref.key)
        if raw is None:
            raise ValueError(f"storage {ref.key!r} has no data")
        item = _ITEMSIZE[t.dtype]
        numel = len(raw) // item
        base = ref.offset + t.offset
        if len(t.size) != len(t.stride):
            raise ValueError(f"tensor size {t.size} and stride {t.stride} differ in length")
        if any(s == 0 for s in t.size):
            return np.zeros(t.size, np.float32 if t.dtype == "bfloat16" else t.dtype)
        last = base + sum((s - 1) * st for s, st in zip(t.size, t.stride))
        if last >= min(numel, ref.offset + ref.numel):
            raise ValueError(f"tensor of size {t.size} reaches past the end of storage {ref.key!r}")
        raw_dtype = np.dtype("uint16" if t.dtype == "bfloat16" else t.dtype).newbyteorder(self.byteorder)
        flat = np.frombuffer(raw, dtype=raw_dtype, count=numel)
        view = np.lib.stride_tricks.as_strided(
            flat[base:], shape=t.size, strides=tuple(st * item for st in t.stride), writeable=False)
        if t.dtype == "bfloat16":   # the top half of a float32
            return (view.astype(np.uint32) << 16).view(np.float32)
        return np.array(view, dtype=raw_dtype.newbyteorder("="), order="C", copy=True)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, reader, persistent_load):
        super().__init__(file)
        self._reader = reader
        self._persistent = persistent_load

    def find_class(self, module, name):
        try:
            return self._reader.globals[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise ValueError("unexpected storage reference")
        return self._persistent(pid)


def _unpickle(f, reader, persistent_load=None):
    return _RestrictedUnpickler(f, reader, persistent_load).load()


# -- the two layouts -----------------------------------------------------------------------------

def _load_zip(path, reader):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names):
            raise CheckpointError(f"{path}: is a TorchScript archive (torch.jit.save); save "
                                  f"model.state_dict() with torch.save instead")
        if not pickles:
            raise CheckpointError(f"{path}: zip archive without data.pkl; not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ValueError(f"unknown byteorder {order!r}")
            reader.byteorder = "<" if order == "little" else ">"

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
                raise ValueError(f"unsupported persistent id {str(pid)[:60]!r}")
            _, storage_type, key, _location, numel = pid
            ref = reader.storage_ref(storage_type, key, numel)
            if key not in reader.data:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise ValueError(f"storage {key!r} missing from the archive")
                raw = archive.read(member)
                if len(raw) < numel * _ITEMSIZE[ref.dtype]:
                    raise ValueError(f"storage {key!r} is truncated")
                reader.data[key] = raw
            return ref

        with archive.open(pickles[0]) as f:
            obj = _unpickle(io.BytesIO(f.read()), reader, persistent_load)
    return reader.materialize(obj)


def _load_legacy(path, reader):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = _unpickle(f, reader)
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"{path}: a pickle, but not one written by torch.save")
        protocol = _unpickle(f, reader)
        if protocol != LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: torch.save protocol {protocol!r} is not supported")
        sys_info = _unpickle(f, reader)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            reader.byteorder = ">"

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
                raise ValueError(f"unsupported persistent id {str(pid)[:60]!r}")
            _, storage_type, key, _location, numel, view = pid
            return reader.storage_ref(storage_type, key, numel, view)

        obj = _unpickle(f, reader, persistent_load)
        keys = _unpickle(f, reader)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("bad storage key list")
        count_format = reader.byteorder + "q"
        for key in keys:
            if key not in reader.storages:
                raise ValueError(f"storage {key!r} is listed but never used")
            dtype, _ = reader.storages[key]
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file ends before all storages")
            (numel,) = struct.unpack(count_format, head)
            nbytes = numel * _ITEMSIZE[dtype]
            if numel < 0 or nbytes > size - f.tell():   # checked before reading: never allocate a lie
                raise ValueError(f"storage {key!r} is truncated")
            reader.data[key] = f.read(nbytes)
    return reader.materialize(obj)


def load_torch_file(path):
    """The object saved in a torch.save file, with tensors as NumPy arrays.

    Raises CheckpointError (one line, naming the file) for a missing, unreadable, damaged or
    unsupported file, and for a pickle that names anything beyond tensors and dicts.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a PyTorch file")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such PyTorch file")
    reader = _Reader(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, reader)
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":   # a zip whose directory at the end is gone
            raise CheckpointError(f"{path}: truncated or damaged torch.save zip archive")
        if tarfile.is_tarfile(path):
            raise CheckpointError(f"{path}: uses the tar format of torch before 0.4, which is not "
                                  f"supported; load and re-save it with a recent torch")
        return _load_legacy(path, reader)
    except CheckpointError:
        raise
    except _Refused as e:
        raise CheckpointError(f"{path}: refuses to load {e} (only tensors and dicts allowed)") from None
    except PermissionError:
        raise CheckpointError(f"{path}: cannot read PyTorch file: permission denied") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: not a PyTorch file, or a damaged one ({e or 'ends too early'})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read PyTorch file: {e.strerror or e}") from None
    except Exception as e:   # a malformed pickle surfaces as whatever its opcodes trip over
        raise CheckpointError(f"{path}: damaged PyTorch file ({type(e).__name__}: {e})") from None
