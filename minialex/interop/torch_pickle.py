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

The layout is told by the file's first bytes (zip's "PK\\3\\4", or the pickled magic number);
anything else, including torch's pre-0.4 tar format, is refused without being handed to another
parser (CPython's tarfile can take minutes and gigabytes on a hostile header).

Tensors come back as NumPy arrays (copies, C-contiguous, the storage's dtype; bfloat16 widened to
float32); dicts, OrderedDicts, lists, tuples and plain Python values come back as themselves.

A file cannot make the reader allocate much more than it holds: pickles are parsed by the
pure-Python unpickler with a bounded memo and atomic dict keys, storages must be exactly as long
as declared and are read with bounded reads, and the arrays built from them may not add up to
more than a few times the storages' bytes, nor more than MAX_TENSOR_BYTES.
"""
import io
import os
import pickle
import reprlib
import struct
import zipfile
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from minialex.errors import CheckpointError
from minialex.files import check_zip_directory, open_input

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# The first bytes of a legacy file: the magic number as pickle.dump writes it, in any protocol.
LEGACY_HEADS = tuple(pickle.dumps(LEGACY_MAGIC, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1))
ZIP_HEAD = b"PK\x03\x04"

# What one file may make the reader allocate. AlexNet's torchvision weights are 244 MB of storages
# in a pickle of a few KB, with about 20 objects to unfold.
MAX_ZIP_MEMBERS = 10_000         # an AlexNet state_dict is a pickle and 16 storages
MAX_ZIP_DIRECTORY_BYTES = 16 << 20
MAX_PICKLE_BYTES = 16 << 20      # data.pkl, or the pickles before a legacy file's storages
MAX_MEMO = 100_000               # pickle memo entries
MAX_OBJECTS = 1_000_000          # containers and values the loaded object unfolds to
MAX_TENSOR_BYTES = 2 << 30       # storage bytes read, and again array bytes built from them
# Arrays may show the same storage bytes more than once (tied weights saved twice, views, bfloat16
# widened to float32), but not more than this many times over; beyond it a file is a bomb of
# stride-0 or overlapping views.
MAX_REPEAT = 4

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


class _TooBig(Exception):
    """The file asks for more than a limit allows; reported as a CheckpointError naming the file."""


# repr of anything a pickle built, bounded in depth and length: a list nested through the memo
# can unfold to billions of items, and a key can be megabytes long.
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlong = 2, 60, 60, 40
_short = _short.repr

# Types a dict key may have: hashing anything else (a tuple of tuples shared through the memo)
# can take exponential time, and no state_dict needs it.
_ATOMS = (str, bytes, int, float, bool, type(None))


def _int_tuple(value, what):
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"bad tensor {what} {_short(value)}")
    return tuple(value)


class _Reader:
    """One load: the allow-listed globals, the storages seen so far, and their bytes."""

    def __init__(self, path):
        self.path = path
        self.storages = {}      # key -> (dtype, numel)
        self.data = {}          # key -> raw bytes of the whole storage
        self.storage_bytes = 0  # read so far, against MAX_TENSOR_BYTES
        self.output_bytes = 0   # of the arrays built so far
        self.objects = 0        # visited by materialize, against MAX_OBJECTS
        self.byteorder = "<"
        self.globals = {
            ("collections", "OrderedDict"): _ordered_dict,
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
            raise ValueError(f"bad storage offset {_short(storage_offset)}")
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
            raise ValueError(f"bad storage record for key {_short(key)}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise ValueError(f"bad storage size {_short(numel)}")
        if key in self.storages and self.storages[key] != (storage_type.dtype, numel):
            raise ValueError(f"storage {key!r} declared twice with different types or sizes")
        self.storages[key] = (storage_type.dtype, numel)
        ref = _StorageRef(key, storage_type.dtype, 0, numel)
        if view is not None:   # (view_key, offset, size) of legacy files from before torch 1.0
            if not isinstance(view, tuple) or len(view) != 3:
                raise ValueError(f"bad storage view {_short(view)}")
            _, offset, size = view
            if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size < 0 \
                    or offset + size > numel:
                raise ValueError(f"storage view outside storage {key!r}")
            ref = _StorageRef(key, storage_type.dtype, offset, size)
        return ref

    def reserve_storage(self, key, nbytes):
        """Count a storage's bytes against MAX_TENSOR_BYTES before they are read."""
        if self.storage_bytes + nbytes > MAX_TENSOR_BYTES:
            raise _TooBig(f"storage {key!r} would take the tensor data past {MAX_TENSOR_BYTES:,} "
                          f"bytes, more than this reader accepts")
        self.storage_bytes += nbytes

    # -- turning lazy tensors into arrays, once every storage's bytes are known ----------------
    def materialize(self, obj, depth=0):
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise _TooBig(f"unfolds to more than {MAX_OBJECTS:,} objects (lists or dicts shared "
                          f"many times over); not a state_dict")
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
            raise ValueError(f"tensor size {_short(t.size)} and stride {_short(t.stride)} differ in length")
        count = 1
        for s in t.size:
            count *= s
        self.output_bytes += count * (4 if t.dtype == "bfloat16" else item)
        budget = min(MAX_TENSOR_BYTES, MAX_REPEAT * self.storage_bytes + (1 << 20))
        if self.output_bytes > budget:
            raise _TooBig(f"its tensors add up to more than {budget:,} bytes from {self.storage_bytes:,} "
                          f"bytes of storage (views repeating the same data); not a state_dict")
        if count == 0:
            return np.zeros(t.size, np.float32 if t.dtype == "bfloat16" else t.dtype)
        last = base + sum((s - 1) * st for s, st in zip(t.size, t.stride))
        if last >= min(numel, ref.offset + ref.numel):
            raise ValueError(f"tensor of size {_short(t.size)} reaches past the end of storage {ref.key!r}")
        raw_dtype = np.dtype("uint16" if t.dtype == "bfloat16" else t.dtype).newbyteorder(self.byteorder)
        flat = np.frombuffer(raw, dtype=raw_dtype, count=numel)
        view = np.lib.stride_tricks.as_strided(
            flat[base:], shape=t.size, strides=tuple(st * item for st in t.stride), writeable=False)
        if t.dtype == "bfloat16":   # the top half of a float32
            return (view.astype(np.uint32) << 16).view(np.float32)
        return np.array(view, dtype=raw_dtype.newbyteorder("="), order="C", copy=True)


def _atom_key(key):
    """`key` if hashing it is cheap (a str, number, None, or a flat tuple of those), else refuse."""
    if isinstance(key, _ATOMS) or (isinstance(key, tuple) and len(key) <= 16
                                   and all(isinstance(k, _ATOMS) for k in key)):
        return key
    raise ValueError(f"dict key {_short(key)} is not a string or number")


def _ordered_dict(*args):
    """collections.OrderedDict, as a pickle may call it: empty, or from (key, value) pairs."""
    if not args:
        return OrderedDict()
    if len(args) != 1 or not isinstance(args[0], (list, tuple)):
        raise ValueError("OrderedDict with unexpected arguments")
    pairs = args[0]
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ValueError("OrderedDict from something other than (key, value) pairs")
    return OrderedDict((_atom_key(k), v) for k, v in pairs)


class _BoundedMemo(dict):
    def __setitem__(self, index, value):
        if len(self) >= MAX_MEMO and index not in self:
            raise _TooBig(f"its pickle keeps more than {MAX_MEMO:,} objects in its memo; not a state_dict")
        super().__setitem__(index, value)


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own (pure-Python) unpickler with the allow-list, a bounded memo, dict keys limited
    to strings and numbers, and no opcodes that allocate a size the pickle merely claims."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, reader, persistent_load):
        super().__init__(file)
        self.memo = _BoundedMemo()
        self._reader = reader
        self._persistent = persistent_load

    def find_class(self, module, name):
        try:
            return self._reader.globals[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"{_short(module)[1:-1]}.{_short(name)[1:-1]}") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise ValueError("unexpected storage reference")
        return self._persistent(pid)

    def _load_dict(self):
        items = self.pop_mark()
        self.append({_atom_key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})

    def _load_setitem(self):
        value = self.stack.pop()
        key = _atom_key(self.stack.pop())
        self.stack[-1][key] = value

    def _load_setitems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items) - 1, 2):
            target[_atom_key(items[i])] = items[i + 1]

    def _unneeded(self):
        raise ValueError("uses sets or out-of-band buffers, which a state_dict never holds")

    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.BYTEARRAY8,
                pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_op[0]] = _unneeded
    del _op


def _unpickle(f, reader, persistent_load=None):
    return _RestrictedUnpickler(f, reader, persistent_load).load()


# -- the two layouts -----------------------------------------------------------------------------

def _read_member(archive, info, size, what):
    """The bytes of zip member `info`, which must be exactly `size` bytes once decompressed.

    The size the archive claims is checked first, and the read stops one byte past `size`
    whatever the claim: a member that inflates further is refused, never held in memory.
    """
    if info.file_size != size:
        raise ValueError(f"{what} holds {info.file_size:,} bytes, {size:,} expected")
    with archive.open(info) as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise ValueError(f"{what} holds {'more' if len(data) > size else 'fewer'} bytes than "
                         f"its zip entry says")
    return data


def _load_zip(f, path, reader):
    check_zip_directory(path, f, MAX_ZIP_MEMBERS, MAX_ZIP_DIRECTORY_BYTES, CheckpointError)
    f.seek(0)
    with zipfile.ZipFile(f) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in infos):
            raise CheckpointError(f"{path}: is a TorchScript archive (torch.jit.save); save "
                                  f"model.state_dict() with torch.save instead")
        if not pickles:
            raise CheckpointError(f"{path}: zip archive without data.pkl; not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in infos:
            info = infos[prefix + "byteorder"]
            if info.file_size > 16:
                raise ValueError("unknown byteorder")
            order = _read_member(archive, info, info.file_size, "byteorder")
            order = order.decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise ValueError(f"unknown byteorder {order!r}")
            reader.byteorder = "<" if order == "little" else ">"

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
                raise ValueError(f"unsupported persistent id {_short(pid)}")
            _, storage_type, key, _location, numel = pid
            ref = reader.storage_ref(storage_type, key, numel)
            if key not in reader.data:
                member = f"{prefix}data/{key}"
                if member not in infos:
                    raise ValueError(f"storage {key!r} missing from the archive")
                nbytes = numel * _ITEMSIZE[ref.dtype]
                if infos[member].file_size < nbytes:
                    raise ValueError(f"storage {key!r} is truncated ({infos[member].file_size:,} "
                                     f"bytes for {numel:,} elements of {ref.dtype})")
                reader.reserve_storage(key, nbytes)
                reader.data[key] = _read_member(archive, infos[member], nbytes, f"storage {key!r}")
            return ref

        info = infos[pickles[0]]
        if info.file_size > MAX_PICKLE_BYTES:
            raise _TooBig(f"its data.pkl is {info.file_size:,} bytes, more than the "
                          f"{MAX_PICKLE_BYTES:,} this reader accepts")
        data = _read_member(archive, info, info.file_size, "data.pkl")
        obj = _unpickle(io.BytesIO(data), reader, persistent_load)
    return reader.materialize(obj)


def _load_legacy(f, path, reader):
    size = os.fstat(f.fileno()).st_size
    # Every pickle comes from a bounded buffer, so no length a pickle claims is read from the file.
    head = io.BytesIO(f.read(MAX_PICKLE_BYTES))
    magic = _unpickle(head, reader)
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{path}: a pickle, but not one written by torch.save")
    protocol = _unpickle(head, reader)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: torch.save protocol {_short(protocol)} is not supported")
    sys_info = _unpickle(head, reader)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        reader.byteorder = ">"

    def persistent_load(pid):
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise ValueError(f"unsupported persistent id {_short(pid)}")
        _, storage_type, key, _location, numel, view = pid
        return reader.storage_ref(storage_type, key, numel, view)

    try:
        obj = _unpickle(head, reader, persistent_load)
        keys = _unpickle(head, reader)
    except EOFError:
        if len(head.getbuffer()) == MAX_PICKLE_BYTES:
            raise _TooBig(f"its pickles take more than the {MAX_PICKLE_BYTES:,} bytes this reader "
                          f"accepts") from None
        raise
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError("bad storage key list")
    f.seek(head.tell())
    count_format = reader.byteorder + "q"
    for key in keys:
        if key not in reader.storages:
            raise ValueError(f"storage {key!r} is listed but never used")
        if key in reader.data:
            raise ValueError(f"storage {key!r} is listed twice")
        dtype, declared = reader.storages[key]
        count = f.read(8)
        if len(count) != 8:
            raise ValueError("file ends before all storages")
        (numel,) = struct.unpack(count_format, count)
        if numel != declared:
            raise ValueError(f"storage {key!r} holds {numel:,} elements, its tensors declare {declared:,}")
        nbytes = numel * _ITEMSIZE[dtype]
        if nbytes > size - f.tell():   # checked before reading: never allocate a lie
            raise ValueError(f"storage {key!r} is truncated")
        reader.reserve_storage(key, nbytes)
        reader.data[key] = f.read(nbytes)
    return reader.materialize(obj)


def load_torch_file(path):
    """The object saved in a torch.save file, with tensors as NumPy arrays.

    Raises CheckpointError (one line, naming the file) for a missing, unreadable, damaged or
    unsupported file, for anything but a regular file (a FIFO or /dev/zero would never end),
    for a pickle that names anything beyond tensors and dicts, and for a file that would take
    more memory than the limits above allow.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a PyTorch file")
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such PyTorch file")
    reader = _Reader(path)
    try:
        with open_input(path, "rb", what="PyTorch file", error=CheckpointError) as f:
            head = f.read(512)
            f.seek(0)
            if head.startswith(ZIP_HEAD):
                try:
                    return _load_zip(f, path, reader)
                except zipfile.BadZipFile as e:
                    raise CheckpointError(f"{path}: truncated or damaged torch.save zip archive "
                                          f"({e})") from None
            if head.startswith(LEGACY_HEADS):
                return _load_legacy(f, path, reader)
            if head[257:262] == b"ustar":
                raise CheckpointError(f"{path}: uses the tar format of torch before 0.4, which is "
                                      f"not supported; load it in a recent torch and re-save it "
                                      f"with torch.save (zip format)")
            raise CheckpointError(f"{path}: not a PyTorch file (neither a torch.save zip archive "
                                  f"nor a legacy torch.save pickle)")
    except CheckpointError:
        raise
    except _Refused as e:
        raise CheckpointError(f"{path}: refuses to load {e} (only tensors and dicts allowed)") from None
    except _TooBig as e:
        raise CheckpointError(f"{path}: {e}") from None
    except MemoryError:
        raise CheckpointError(f"{path}: out of memory reading the PyTorch file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: cannot read PyTorch file: permission denied") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: not a PyTorch file, or a damaged one ({e or 'ends too early'})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read PyTorch file: {e.strerror or e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: damaged PyTorch file (nested too deeply)") from None
    except Exception as e:   # a malformed pickle surfaces as whatever its opcodes trip over
        raise CheckpointError(f"{path}: damaged PyTorch file ({type(e).__name__}: {e})") from None
