"""The restricted torch.save reader: same tensors as torch.load, and no code from the file ever runs."""
import io
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from minialex.errors import CheckpointError
from minialex.interop.torch_pickle import load_torch_file

FORMATS = {"zip": True, "legacy": False}


def _same(ours, ref, torch, where="root"):
    """ours (NumPy) equals ref (as torch.load returns it), value for value and dtype for dtype."""
    if isinstance(ref, torch.Tensor):
        ref = ref.detach()
        expected = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == expected.dtype and ours.shape == expected.shape, where
        assert ours.flags.c_contiguous and ours.flags.writeable, where
        np.testing.assert_array_equal(ours, expected, err_msg=where)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref), where
        for k in ref:
            _same(ours[k], ref[k], torch, f"{where}.{k}")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            _same(a, b, torch, f"{where}[{i}]")
    else:
        assert ours == ref, where


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_of_every_kind_read_as_torch_load_reads_them(torch, tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    obj = OrderedDict([
        ("float", base), ("view_row", base[2]), ("transposed", base.t()), ("strided", base[::2, 1::2]),
        ("double", torch.arange(6, dtype=torch.float64).reshape(2, 3)),
        ("half", torch.randn(7, generator=g).half()), ("bfloat16", torch.randn(3, generator=g).bfloat16()),
        ("long", torch.tensor([-3, 2**40])), ("int", torch.tensor([7], dtype=torch.int32)),
        ("uint8", torch.tensor([0, 255], dtype=torch.uint8)), ("bool", torch.tensor([True, False])),
        ("scalar", torch.tensor(5)), ("empty", torch.zeros(0, 3)),
        ("param", torch.nn.Parameter(torch.ones(2, 2))),
    ])
    wrapped = {"epoch": 3, "best": 0.75, "name": "alexnet", "nested": [1, (2.5, None)], "weights": obj}
    path = tmp_path / "x.pth"
    torch.save(wrapped, path, _use_new_zipfile_serialization=FORMATS[fmt])
    _same(load_torch_file(path), torch.load(path, weights_only=True), torch)


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_with_batch_norm_buffers(torch, tmp_path, fmt):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 3))
    path = tmp_path / "sd.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=FORMATS[fmt])
    ours = load_torch_file(path)
    _same(ours, torch.load(path, weights_only=True), torch)
    assert ours["1.num_batches_tracked"].dtype == np.int64


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickle_calling_os_system_is_refused_and_never_runs(torch, tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"features.0.weight": torch.zeros(2), "x": _RunsShell(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=FORMATS[fmt])
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refuses to load ")
    assert "system" in message and "(only tensors and dicts allowed)" in message
    assert "\n" not in message
    assert not marker.exists()


def test_hand_made_zip_calling_builtins_eval_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _RunsEval(str(marker))}, protocol=4))
        z.writestr("archive/byteorder", "little")
    with pytest.raises(CheckpointError, match=r"refuses to load builtins\.eval \(only tensors and dicts"):
        load_torch_file(path)
    assert not marker.exists()


def test_hand_made_legacy_stream_calling_eval_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True},
                 {"w": _RunsEval(str(marker))}, []):
        pickle.dump(part, buf, protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"refuses to load (__builtin__|builtins)\.eval"):
        load_torch_file(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_gets_a_hint(torch, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_torch_file(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_are_reported_not_crashed_on(torch, tmp_path, fmt):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(100)}, good, _use_new_zipfile_serialization=FORMATS[fmt])
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 9):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_torch_file(bad)
        assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)


def test_not_a_torch_file(tmp_path):
    for name, content in [("text.pth", b"hello, not weights\n"), ("empty.pth", b""),
                          ("plain_pickle.pth", pickle.dumps({"w": [1.0, 2.0]}))]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"^{path}: "):
            load_torch_file(path)
    with pytest.raises(CheckpointError, match="no such PyTorch file"):
        load_torch_file(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_torch_file(tmp_path)


def _text(s):
    """A BINUNICODE pickle opcode pushing the string s."""
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _tensor_pickle(numel, size, stride):
    """Protocol-2 pickle, written opcode by opcode, of the tensor torch.save would write for a
    FloatStorage "0" of numel elements viewed with the given size and stride."""
    ints = lambda values: b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"
    return (b"\x80\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"("
            + b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu")
            + b"K" + bytes([numel]) + b"tQ"
            + b"K\x00" + ints(size) + ints(stride) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR.")


def _zip_with_tensor(path, numel, size, stride, stored_floats):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _tensor_pickle(numel, size, stride))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", np.arange(stored_floats, dtype=np.float32).tobytes())


def test_hand_written_tensor_pickle_is_understood(tmp_path):
    path = tmp_path / "ok.pth"
    _zip_with_tensor(path, 6, (2, 3), (3, 1), 6)
    np.testing.assert_array_equal(load_torch_file(path), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_tensor_reaching_past_its_storage_is_rejected(tmp_path):
    path = tmp_path / "overrun.pth"
    _zip_with_tensor(path, 4, (10,), (1,), 4)
    with pytest.raises(CheckpointError, match="reaches past the end of storage"):
        load_torch_file(path)
    _zip_with_tensor(path, 4, (2, 2), (3, 1), 4)   # last element at 1*3 + 1*1 = 4: one too far
    with pytest.raises(CheckpointError, match="reaches past the end of storage"):
        load_torch_file(path)


def test_storage_shorter_than_declared_is_rejected(tmp_path):
    path = tmp_path / "short.pth"
    _zip_with_tensor(path, 8, (8,), (1,), 3)
    with pytest.raises(CheckpointError, match="truncated"):
        load_torch_file(path)


def test_storage_longer_than_declared_is_rejected(tmp_path):
    path = tmp_path / "long.pth"
    _zip_with_tensor(path, 4, (4,), (1,), 5)   # 5 floats stored for a storage of 4
    with pytest.raises(CheckpointError, match="storage '0' holds 20 bytes, 16 expected"):
        load_torch_file(path)


def test_legacy_storage_count_must_match_its_declaration(torch, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert data[-24:-16] == (4).to_bytes(8, "little")   # the element count before the 16 data bytes
    path.write_bytes(data[:-24] + (5).to_bytes(8, "little") + data[-16:] + bytes(4))
    with pytest.raises(CheckpointError, match="holds 5 elements, its tensors declare 4"):
        load_torch_file(path)


def test_legacy_file_is_told_by_its_magic_number_whatever_the_pickle_protocol(torch, tmp_path):
    path = tmp_path / "legacy.pth"
    for protocol in (2, 4):
        torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
        np.testing.assert_array_equal(load_torch_file(path)["w"], np.ones(3, np.float32))


def test_unknown_bytes_and_gzip_are_not_a_pytorch_file(tmp_path):
    import gzip
    path = tmp_path / "x.pth"
    path.write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(CheckpointError, match="not a PyTorch file \\(neither a torch.save zip"):
        load_torch_file(path)
