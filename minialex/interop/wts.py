"""The plain-text .wts weights format of the TensorRT AlexNet samples (tensorrtx).

    <number of tensors>
    <name> <count> <hex> <hex> ...        one line per tensor, torchvision's names

Each value is a float32 written as the 8 hex digits of its big-endian bytes, as tensorrtx's
gen_wts.py does with struct.pack('>f', v).hex(); the C++ loader reads them back with `std::hex`
into a uint32 and reinterprets the bits, so values round-trip exactly. Integer tensors (batch
norm's num_batches_tracked) are converted to float32, as gen_wts.py's float(v) does; anything
that float32 cannot hold (complex numbers, text, values beyond float32's range, NaN or inf) is
refused rather than written wrong. Names must be printable and free of whitespace: the format is
split on whitespace and lines.

AlexNet has 61 million weights, so both directions work on whole tensors in NumPy, in chunks,
rather than one Python string per value.
"""
import os
from collections import OrderedDict

import numpy as np

from minialex.files import write_atomically
from minialex.errors import CheckpointError

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# ASCII code -> value of that hex digit (either case); 255 marks anything else.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_CHUNK = 1 << 20   # values per write: ~9 MB of text at a time
_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)   # nibbles, most significant first


def _hex_words(values):
    """float32 values -> bytes ' xxxxxxxx xxxxxxxx ...' (each value preceded by a space)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    text = np.empty((bits.size, 9), dtype=np.uint8)
    text[:, 0] = ord(" ")
    text[:, 1:] = _HEX_DIGITS[(bits[:, None] >> _SHIFTS) & 0xF]
    return text.tobytes()


def _check_entry(path, name, value):
    """CheckpointError unless `name` and `value` can be written to a .wts file as they are."""
    if not isinstance(name, str) or not name or not name.isprintable() or any(c.isspace() for c in name):
        raise CheckpointError(f"{path}: tensor name {name!r} cannot be written to a .wts file "
                              f"(it must be printable, without spaces or line breaks)")
    value = np.asarray(value)
    if value.dtype.kind not in "fiub":
        raise CheckpointError(f"{path}: {name!r} is {value.dtype}; a .wts file holds float32 only")
    if value.dtype.kind == "f":
        for start in range(0, value.size, _CHUNK):
            chunk = value.reshape(-1)[start:start + _CHUNK]
            if not np.isfinite(chunk).all():
                raise CheckpointError(f"{path}: {name!r} holds NaN or inf values")
            with np.errstate(over="ignore"):
                if not np.isfinite(chunk.astype(np.float32)).all():
                    raise CheckpointError(f"{path}: {name!r} holds values beyond float32's range")


def write_wts(state_dict, path):
    """Write name -> array (every entry, in order) as a .wts file at `path`, atomically.

    CheckpointError (naming `path`) for a name or a dtype the format cannot carry, before the
    file is touched.
    """
    path = os.fspath(path)
    for name, value in state_dict.items():
        _check_entry(path, name, value)

    def write(f):
        f.write(f"{len(state_dict)}\n".encode("ascii"))
        for name, value in state_dict.items():
            flat = np.asarray(value).reshape(-1).astype(np.float32)
            f.write(f"{name} {flat.size}".encode("utf-8"))
            for start in range(0, flat.size, _CHUNK):
                f.write(_hex_words(flat[start:start + _CHUNK]))
            f.write(b"\n")

    write_atomically(path, write, what=".wts file")


def _parse_values(path, number, body: bytes, count: int):
    """`count` float32 values from the hex words of one line (after the name and count)."""
    body = body.strip()
    if count == 0:
        if body:
            raise CheckpointError(f"{path}:{number}: values after a count of 0")
        return np.zeros(0, np.float32)
    raw = np.frombuffer(body, dtype=np.uint8)
    # The usual layout, single spaces between 8-digit words, is decoded without splitting.
    if raw.size == 9 * count - 1 and np.all(raw[8::9] == ord(" ")):
        digits = np.lib.stride_tricks.as_strided(raw, shape=(count, 8), strides=(9, 1))
    else:   # any other whitespace (gen_wts.py puts two spaces after the count)
        words = body.split()
        if len(words) != count:
            raise CheckpointError(f"{path}:{number}: expected {count} values, found {len(words)}")
        if any(len(w) != 8 for w in words):
            raise CheckpointError(f"{path}:{number}: values must be 8 hex digits each")
        digits = np.frombuffer(b"".join(words), dtype=np.uint8).reshape(count, 8)
    nibbles = _NIBBLE[digits]
    if nibbles.max() > 15:
        raise CheckpointError(f"{path}:{number}: values must be 8 hex digits each")
    # Two nibbles make a byte; four bytes, most significant first, are the big-endian float.
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(">f4").reshape(count).astype(np.float32)


def read_wts(path) -> OrderedDict:
    """name -> flat float32 array from a .wts file; CheckpointError naming file:line on bad input."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such .wts file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read .wts file: {e.strerror or e}") from None
    tensors = OrderedDict()
    with f:
        first = f.readline().strip()
        if not first.isdigit():
            raise CheckpointError(f"{path}:1: first line must be the number of tensors")
        expected = int(first)
        number = 1
        for line in f:
            number += 1
            if not line.strip():
                continue
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise CheckpointError(f"{path}:{number}: expected 'name count hex ...'")
            name = parts[0].decode("utf-8", "replace")
            if name in tensors:
                raise CheckpointError(f"{path}:{number}: tensor {name!r} appears twice")
            body = parts[2] if len(parts) == 3 else b""
            tensors[name] = _parse_values(path, number, body, int(parts[1]))
    if len(tensors) != expected:
        raise CheckpointError(f"{path}: header says {expected} tensors, found {len(tensors)}")
    return tensors
