"""Hostile .pth files through `minialex convert`: each is refused in seconds with one line and
exit 2, under a memory limit, so a reader that lets a file allocate what it likes fails the test
(MemoryError, or the limit's "out of memory") instead of taking the machine down.

Every file is written here, opcode by opcode and zip entry by zip entry: a few KB to a few MB that
claim (or inflate to) gigabytes. torch is not needed.
"""
import io
import os
import resource
import stat
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest

import minialex
from minialex import models

from .conftest import REPO, assert_one_line_error

# Address space for the child: minialex with its compiled kernels needs about 1.5 GB of it (most
# of it reserved, not used); every bomb below asks for 4 GB or more.
MEMORY_LIMIT = 3 << 30


def run_limited(args, cwd, timeout=60):
    """`python -m minialex ARGS` under MEMORY_LIMIT of address space and a time limit."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    env = dict(os.environ, NUMBA_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


# -- writing torch.save files by hand ------------------------------------------------------------

def _int(v):
    if 0 <= v < 1 << 31:
        return b"J" + struct.pack("<i", v)
    data = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data     # LONG1


def _str(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data   # BINUNICODE


def _tuple(values):
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def tensor_pickle(key, numel, size, stride=None, offset=0):
    """Opcodes of the _rebuild_tensor_v2 call torch.save writes for a float32 tensor on storage `key`."""
    if stride is None:
        stride = [int(np.prod(size[i + 1:])) for i in range(len(size))]
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + _str("storage") + b"ctorch\nFloatStorage\n" + _str(key) + _str("cpu") + _int(numel) + b"tQ"
            + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR")


def state_dict_pickle(entries):
    """Protocol-2 pickle of an OrderedDict; entries are (name, opcodes of the value)."""
    return (b"\x80\x02ccollections\nOrderedDict\n)R("
            + b"".join(_str(name) + value for name, value in entries) + b"u.")


def _deflate(data):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


_ZEROS = 1 << 24
_ZEROS_BLOCK = None


def deflated_zeros(nbytes, prefix=b""):
    """Raw deflate data of `prefix` then `nbytes` zeros (a multiple of 16 MB), built from one
    compressed block repeated: after a full flush each block stands alone, so gigabytes of zeros
    cost a few MB and milliseconds."""
    global _ZEROS_BLOCK
    if _ZEROS_BLOCK is None:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        _ZEROS_BLOCK = c.compress(bytes(_ZEROS)) + c.flush(zlib.Z_FULL_FLUSH)
    assert nbytes % _ZEROS == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH) if prefix else b""
    return head + _ZEROS_BLOCK * (nbytes // _ZEROS) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def write_zip(path, members):
    """A zip of (name, data, claimed size) members, written byte by byte so that the sizes a member
    claims can be anything; deflated data is given as ("deflate", raw deflate, crc32)."""
    out, central = io.BytesIO(), []
    for name, data, size in members:
        if isinstance(data, tuple):
            _, data, crc = data
            method = 8
        else:
            method, crc = 0, zlib.crc32(data)
        name_bytes = name.encode()
        offset = out.tell()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(name_bytes), 0)
        out.write(b"PK\x03\x04" + fields + name_bytes + data)
        central.append(b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset)
                       + name_bytes)
    start = out.tell()
    out.write(b"".join(central))
    out.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(central), len(central),
                                          out.tell() - start, start, 0))
    path.write_bytes(out.getvalue())
    return path


def write_pth(path, state, extra=(), replace=None):
    """A zip-format .pth of `state` (name -> float32 array), storages deflated; `replace` maps a
    name to other opcodes for its value, `extra` adds raw zip members."""
    entries, members = [], []
    for i, (name, value) in enumerate(state.items()):
        value = np.ascontiguousarray(value, dtype=np.float32)
        entries.append((name, (replace or {}).get(name) or tensor_pickle(str(i), value.size, value.shape)))
        data = value.tobytes()
        members.append((f"archive/data/{i}", ("deflate", _deflate(data), zlib.crc32(data)), len(data)))
    pkl = state_dict_pickle(entries)
    return write_zip(path, [("archive/data.pkl", pkl, len(pkl)), ("archive/byteorder", b"little", 6),
                            *members, *extra])


@pytest.fixture(scope="module")
def cifar_state():
    minialex.manual_seed(0)
    return models.alexnet(num_classes=10, variant="cifar").state_dict()


def _convert(src, tmp_path, *more):
    r = run_limited(["convert", src, tmp_path / "out.npz", *more], cwd=tmp_path)
    assert not (tmp_path / "out.npz").exists()
    return r


# -- item: memory bombs --------------------------------------------------------------------------

def test_good_file_converts_under_the_memory_limit(cifar_state, tmp_path):
    """The limit the bombs run under leaves room for a real conversion."""
    src = write_pth(tmp_path / "good.pth", cifar_state)
    r = run_limited(["convert", src, tmp_path / "good.npz", "-arch", "cifar"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "good.npz").exists()


def test_stride_zero_tensors_shared_through_the_memo(tmp_path):
    # One float of storage; a 2**15 x 2**15 view of it with stride 0 (4 GB as an array), kept in
    # the memo and put under four names.
    tensor = tensor_pickle("0", 1, (1 << 15, 1 << 15), (0, 0)) + b"q\x05"
    pkl = state_dict_pickle([("a", tensor)] + [(name, b"h\x05") for name in "bcd"])
    src = write_zip(tmp_path / "stride0.pth", [("archive/data.pkl", pkl, len(pkl)),
                                               ("archive/data/0", b"\0\0\0\0", 4)])
    assert src.stat().st_size < 1000
    assert_one_line_error(_convert(src, tmp_path), str(src), "tensors add up to more than")


def test_nested_shared_lists_unfold_to_a_bounded_number_of_objects(tmp_path):
    # l0 = []; l(i+1) = [li, li], each in the memo (and popped): 64 levels unfold to 2**64 lists.
    lists = b"]q\x000" + b"".join(b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1]) + b"0"
                                 for i in range(64))
    pkl = b"\x80\x02ccollections\nOrderedDict\n)R" + _str("w") + lists + b"h\x40s."
    src = write_zip(tmp_path / "lists.pth", [("archive/data.pkl", pkl, len(pkl))])
    assert src.stat().st_size < 1000
    assert_one_line_error(_convert(src, tmp_path), str(src), "more than 1,000,000 objects")


def test_dict_key_of_shared_tuples_is_refused_before_hashing(tmp_path):
    # t0 = (); t(i+1) = (ti, ti): hashing t64 would visit 2**64 tuples.
    tuples = b")q\x000" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
                                  for i in range(64))
    pkl = b"\x80\x02}" + tuples + b"h\x40K\x01s."
    src = write_zip(tmp_path / "tuples.pth", [("archive/data.pkl", pkl, len(pkl))])
    assert_one_line_error(_convert(src, tmp_path), str(src), "is not a string or number")


def test_pickle_memo_is_bounded(tmp_path):
    pkl = b"\x80\x04N" + b"\x94" * 150_000 + b"."     # MEMOIZE the same None 150,000 times
    src = write_zip(tmp_path / "memo.pth", [("archive/data.pkl", pkl, len(pkl))])
    assert_one_line_error(_convert(src, tmp_path), str(src), "more than 100,000 objects in its memo")


def test_archive_of_very_many_members_is_refused_before_it_is_listed(cifar_state, tmp_path):
    """A .pth whose zip holds 20,000 extra empty members: refused from its end record, before
    Python's zipfile builds an object for each (millions would exhaust memory)."""
    from minialex.interop.torch_pickle import MAX_ZIP_MEMBERS
    extra = [(f"archive/extra/{i}", b"", 0) for i in range(20_000)]
    src = write_pth(tmp_path / "many.pth", cifar_state, extra=extra)
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src), "members in a",
                          f"over the limits of {MAX_ZIP_MEMBERS:,}")


def test_data_pkl_inflating_to_gigabytes(tmp_path):
    size = 4000 << 20
    src = write_zip(tmp_path / "pkl_bomb.pth", [("archive/data.pkl", ("deflate", deflated_zeros(size), 0), size)])
    assert src.stat().st_size < 5 << 20
    assert_one_line_error(_convert(src, tmp_path), str(src), "data.pkl is 4,194,304,000 bytes")


def test_storage_inflating_to_gigabytes(cifar_state, tmp_path):
    """Declared as huge as it inflates: refused by the stated cap before a byte is read."""
    size = 4000 << 20
    bomb = ("archive/data/bomb", ("deflate", deflated_zeros(size), 0), size)
    src = write_pth(tmp_path / "storage_bomb.pth", cifar_state, extra=[bomb],
                    replace={"classifier.6.bias": tensor_pickle("bomb", size // 4, (size // 4,))})
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src),
                          "would take the tensor data past")


def test_storage_longer_than_declared(cifar_state, tmp_path):
    """Declared as 10 floats, inflating to gigabytes: refused by its size, and never read past it."""
    size = 4000 << 20
    bomb = ("archive/data/long", ("deflate", deflated_zeros(size), 0), size)
    src = write_pth(tmp_path / "long.pth", cifar_state, extra=[bomb],
                    replace={"classifier.6.bias": tensor_pickle("long", 10, (10,))})
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src),
                          "storage 'long' holds 4,194,304,000 bytes, 40 expected")


def test_storage_whose_zip_entry_lies_about_its_size(cifar_state, tmp_path):
    """Claims 40 bytes, inflates to 16 MB: the read stops at 41 bytes."""
    bomb = ("archive/data/lie", ("deflate", deflated_zeros(_ZEROS), 0), 40)
    src = write_pth(tmp_path / "lie.pth", cifar_state, extra=[bomb],
                    replace={"classifier.6.bias": tensor_pickle("lie", 10, (10,))})
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src))


def test_zero_width_classifier_is_refused_before_a_model_is_built(cifar_state, tmp_path):
    # 100,000 classes (the most a model may have) of zero-width weights: a few bytes of file,
    # 1.6 GB of cifar model and gradients if the model came before the shape check.
    state = dict(cifar_state)
    state["classifier.6.weight"] = np.zeros((100_000, 0), np.float32)
    state["classifier.6.bias"] = np.zeros(100_000, np.float32)
    src = write_pth(tmp_path / "wide.pth", state)
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src), "classifier.6.weight",
                          "(100000, 0)", "(100000, 2048)")


def test_class_count_beyond_the_limit(cifar_state, tmp_path):
    state = dict(cifar_state)
    state["classifier.6.weight"] = np.zeros((2_000_000, 0), np.float32)
    state["classifier.6.bias"] = np.zeros(0, np.float32)
    src = write_pth(tmp_path / "classes.pth", state)
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src), "2,000,000 classes")


# -- item: file formats: zip or the legacy magic number, nothing handed to tarfile ---------------

def test_gzipped_tar_bomb_is_never_opened_as_a_tar(tmp_path):
    # A pax header claiming 4 GB, gzipped: tarfile reads the whole header into memory.
    header = tarfile.TarInfo("pax")
    header.type = tarfile.XHDTYPE
    header.size = 4000 << 20
    block = header.tobuf(format=tarfile.USTAR_FORMAT)
    deflate = deflated_zeros(4000 << 20, prefix=block)
    src = tmp_path / "bomb.pth"
    src.write_bytes(b"\x1f\x8b\x08\x00\0\0\0\0\x00\xff" + deflate + b"\0" * 8)
    assert_one_line_error(_convert(src, tmp_path), str(src), "not a PyTorch file")


def test_tar_format_asks_for_a_resave(tmp_path):
    src = tmp_path / "old.pth"
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sys_info")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert_one_line_error(_convert(src, tmp_path), str(src), "tar format",
                          "re-save it with torch.save (zip format)")


# -- item: inputs that are not regular files -----------------------------------------------------

def test_fifo_and_device_inputs_are_refused(cifar_state, tmp_path):
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    assert_one_line_error(_convert(fifo, tmp_path), str(fifo), "FIFO")
    assert_one_line_error(_convert("/dev/zero", tmp_path), "/dev/zero", "a device")
    src = write_pth(tmp_path / "good.pth", cifar_state)
    labels = tmp_path / "labels.fifo"
    os.mkfifo(labels)
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar", "-labels", labels), str(labels), "FIFO")


# -- item: escapes and long text from the file ---------------------------------------------------

def test_escapes_and_a_10_mb_key_print_as_one_short_line(cifar_state, tmp_path):
    fake = "\x1b[2K\x1b[1Gwrote out.npz: AlexNet cifar\n"
    for key in (fake + "classifier.6.weight", "k" * (10 << 20)):
        state = dict(cifar_state)
        state[key] = np.zeros(1, np.float32)
        src = write_pth(tmp_path / "keys.pth", state)
        r = _convert(src, tmp_path, "-arch", "cifar")
        assert_one_line_error(r, str(src))
        assert "\x1b" not in r.stderr and len(r.stderr) < 5000
        assert r.stdout == "", r.stdout
    r = _convert(tmp_path / "missing\x1b[2J.pth", tmp_path)
    assert "\x1b" not in r.stderr and "\\x1b[2J" in assert_one_line_error(r)


def test_escapes_in_the_output_name_are_not_printed_raw(cifar_state, tmp_path):
    src = write_pth(tmp_path / "good.pth", cifar_state)
    dst = tmp_path / "w\x1b[2J.npz"
    r = run_limited(["convert", src, dst, "-arch", "cifar"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\\x1b[2J" in r.stdout


# -- item: silent acceptance ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_key(cifar_state, tmp_path, bad):
    state = dict(cifar_state)
    state["features.4.weight"] = state["features.4.weight"].copy()
    state["features.4.weight"][1, 2, 3, 4] = bad
    src = write_pth(tmp_path / "nan.pth", state)
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src), "'features.4.weight'",
                          "NaN or inf")


def test_storage_shorter_than_declared_is_refused(cifar_state, tmp_path):
    src = write_pth(tmp_path / "short.pth", cifar_state, extra=[("archive/data/s", b"\0" * 12, 12)],
                    replace={"classifier.6.bias": tensor_pickle("s", 10, (10,))})
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src), "truncated")


def test_view_past_the_storage_end_is_refused(cifar_state, tmp_path):
    src = write_pth(tmp_path / "view.pth", cifar_state, extra=[("archive/data/v", b"\0" * 40, 40)],
                    replace={"classifier.6.bias": tensor_pickle("v", 10, (10,), offset=1)})
    assert_one_line_error(_convert(src, tmp_path, "-arch", "cifar"), str(src), "reaches past the end")


# -- item: output targets checked before the work ------------------------------------------------

@pytest.mark.parametrize("target", ["fifo", "folder", "", "dir/"])
def test_convert_refuses_a_bad_target_before_reading(tmp_path, target):
    (tmp_path / "dir").mkdir()
    if target == "fifo":
        target = tmp_path / "out.npz"
        os.mkfifo(target)
    elif target == "folder":
        target = tmp_path / "dir"
    src = tmp_path / "never_read.pth"   # missing: the target must fail first
    r = run_limited(["convert", src, target], cwd=tmp_path)
    line = assert_one_line_error(r)
    assert "never_read" not in line, line
    assert os.path.isdir(tmp_path / "dir")
    if os.path.lexists(tmp_path / "out.npz"):   # the FIFO case: still a FIFO
        assert stat.S_ISFIFO(os.lstat(tmp_path / "out.npz").st_mode)
