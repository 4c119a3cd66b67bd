"""Versioned checkpoints: one .npz holding the weights, the optimiser and everything needed to resume.

Layout of the archive (every member a plain array; nothing is pickled, so loading never runs code):

    __minialex__        UTF-8 JSON as a uint8 array: format_version, arch, class_names,
                        normalization, train_state (epoch, history, RNG state, ...),
                        and the non-array parts of the optimiser and scheduler state
    model/<key>         the model's state_dict, with torchvision's keys
    optim/<path>        optimiser arrays (momentum buffers, Adam moments)
    sched/<path>        scheduler arrays, if a scheduler ever keeps any

JSON rather than a pickled dict so that a checkpoint from a stranger is safe to open. PCG64's state
holds 128-bit integers, which JSON (unlike a uint64 array) carries exactly.

Writes go to a temporary file in the target's folder, which is flushed, fsync'd and then renamed
over the target: a crash or a full disk mid-write leaves the previous checkpoint as it was. A process
killed outright (SIGKILL, power loss) may leave its temporary `.NAME.*.tmp` behind; the next run
that saves to NAME removes it.

Reading trusts nothing in the file, and reads nothing before it knows the cost: only regular files
are opened (a FIFO or a device is refused, never waited on); pickles are never loaded; the archive's
total size is capped before anything is decompressed, the header's size before it is decoded; every
header field is validated (arch, class names, normalisation, the training state, the optimiser and
schedule state) and each array's shape is compared with what the declared architecture needs before
its data is read, so a hostile header cannot make us allocate a model or a buffer. Weights holding
NaN or inf are refused (they come from a run that diverged and would only poison the next one).
Every problem is a CheckpointError naming the file and, for the header, the field. Header keys this
version does not know are ignored.

int8 checkpoints (written by `minialex quantize`, read by `inference` and `eval` alike) hold no
float weights, no optimiser and no training state; the same header carries arch, class_names and
normalization, plus the section

    "int8": {"version": 1,
             "criterion": "max" | "percentile" | "mse" | "entropy"   (the calibration that won),
             "calibration": {"list": path or null, "images": n, "seed": s,
                             "results": [{"criterion", "agreement", "logit_mse"}, ...]},
             "input": {"scale": s0, "zero_point": 128},
             "activations": {"<layer key>": scale, ...}}   one per quantisation point: each
                             convolution and hidden FC (its rectified output) and each LRN (its
                             output), keyed by the layer's torchvision prefix ("features.0")

and, per convolution and FC layer, the arrays

    int8/<key>.weight         int8 in -127..127, torch layout (BatchNorm folded in)
    int8/<key>.weight_scale   float32 (out,): the per-output-channel scale s_w
    int8/<key>.bias           int32 (out,): rint(b / (s_x * s_w)), without the input's zero-point
                              correction (the model adds it), |bias| small enough that no int32 sum
                              can overflow

Scales must lie in models.quantized's ACTIVATION_SCALE_RANGE / WEIGHT_SCALE_RANGE. The arithmetic
is models/quantized.py's. A file with an int8 section must not hold model/ weights, and int8/
arrays without the section are refused. Commands that need float weights (train -resume and
-load_pretrained, export, compare, quantize) refuse an int8 file: `load_checkpoint(path)` does,
unless called with int8=True.
"""
import json
import math
import os
import zipfile
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import models
from .config import check_resumable
from .data.listfile import MAX_CLASS_NAME_CHARS
from .errors import CheckpointError, MinialexError
from .files import check_zip_directory, open_input, write_atomically

FORMAT_VERSION = 1
INT8_VERSION = 1   # of the header's "int8" section
# The largest real checkpoint (torchvision AlexNet with Adam's two moments) is ~0.75 GB; an archive
# whose members claim more is damaged or hostile (a zip bomb), and is refused before any of it is
# decompressed rather than exhausting memory.
MAX_ARCHIVE_BYTES = 4 * 1024 ** 3
# The header is JSON: class names (at most MAX_CLASSES of MAX_CLASS_NAME_CHARS), the epoch history and
# the optimiser's settings; decoded, JSON takes several times its size, so a bigger one is refused
# unread.
MAX_HEADER_BYTES = 64 * 1024 ** 2
# Python builds an object per archive member when it opens a zip, from the central directory,
# before anything can be checked: a checkpoint has a few hundred members at most, so the counts an
# archive's end record declares are bounded first.
MAX_MEMBERS = 10_000
MAX_DIRECTORY_BYTES = 16 * 1024 ** 2
# A resumed run allocates batches of this many images; more is a damaged header, not a setting.
HEADER_KEY = "__minialex__"
_ARRAY_REF = "__array__"   # a JSON leaf standing for an array stored beside the header
_INT_KEYS = "__int_keys__"  # a dict whose keys were ints (optimiser state is indexed by parameter)


@dataclass
class Checkpoint:
    version: int
    arch: dict
    class_names: list
    normalization: dict
    state_dict: OrderedDict
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    train_state: dict | None = None
    path: str = field(default="", compare=False)
    # An int8 checkpoint's section: {"version", "criterion", "calibration", "params"
    # (models.quantized.Int8Params)}; None for a float checkpoint (whose state_dict it replaces).
    int8: dict | None = None


# -- turning nested state into JSON plus arrays ---------------------------------------------------

def _to_json(value, prefix, arrays):
    """JSON-able copy of `value`; arrays (and only arrays) move into `arrays` under `prefix/...`."""
    if isinstance(value, np.ndarray):
        arrays[prefix] = value
        return {_ARRAY_REF: prefix}
    if isinstance(value, dict):
        if value and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in value):
            return {_INT_KEYS: {str(int(k)): _to_json(v, f"{prefix}/{int(k)}", arrays)
                                for k, v in value.items()}}
        return {str(k): _to_json(v, f"{prefix}/{k}", arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{prefix}/{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {prefix} in a checkpoint")


# -- writing ---------------------------------------------------------------------------------------

def _write_arrays(fileobj, arrays):
    """Write the archive body; uncompressed, as weights barely compress and saving must be quick."""
    np.savez(fileobj, **arrays)


def save_checkpoint(path, model, *, arch, class_names, normalization, optimizer=None, scheduler=None,
                    train_state=None):
    """Write model (+ optimiser, scheduler, training state) to `path` atomically."""
    path = os.fspath(path)
    arrays = OrderedDict()
    header = {
        "format_version": FORMAT_VERSION,
        "arch": _to_json(dict(arch), "arch", arrays),
        "class_names": [str(n) for n in class_names],
        "normalization": _to_json(dict(normalization), "normalization", arrays),
        "train_state": _to_json(train_state, "train_state", arrays) if train_state is not None else None,
        "optimizer": _to_json(optimizer.state_dict(), "optim", arrays) if optimizer is not None else None,
        "scheduler": _to_json(scheduler.state_dict(), "sched", arrays) if scheduler is not None else None,
    }
    for key, value in model.state_dict().items():
        arrays[f"model/{key}"] = np.asarray(value)
    text = json.dumps(header, ensure_ascii=False, allow_nan=True)
    arrays[HEADER_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_atomically(path, lambda f: _write_arrays(f, arrays), what="checkpoint", error=CheckpointError)


def save_int8_checkpoint(path, qmodel, *, class_names, normalization):
    """Write QuantizedAlexNet `qmodel` (its arch, scales, int8 weights, the criterion and calibration
    it was made with) with the float checkpoint's class names and normalisation, atomically."""
    path = os.fspath(path)
    from .models.quantized import INPUT_ZERO_POINT
    p = qmodel.params
    arrays = OrderedDict()
    header = {
        "format_version": FORMAT_VERSION,
        "arch": qmodel.arch.to_dict(),
        "class_names": [str(n) for n in class_names],
        "normalization": _to_json(dict(normalization), "normalization", arrays),
        "int8": {"version": INT8_VERSION, "criterion": qmodel.criterion,
                 "calibration": _to_json(qmodel.calibration, "calibration", arrays),
                 "input": {"scale": float(p.input_scale), "zero_point": INPUT_ZERO_POINT},
                 "activations": {k: float(v) for k, v in p.activation_scales.items()}},
    }
    for key, layer in p.layers.items():
        for part in layer._fields:
            arrays[f"int8/{key}.{part}"] = np.asarray(getattr(layer, part))
    text = json.dumps(header, ensure_ascii=False, allow_nan=False)
    arrays[HEADER_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_atomically(path, lambda f: _write_arrays(f, arrays), what="checkpoint", error=CheckpointError)


# -- reading ---------------------------------------------------------------------------------------
#
# Nothing is read before it is known to be small or to have the size the architecture dictates:
# the archive's total, then the header member's size, then the header's fields, then each array's
# .npy header (shape and dtype) against the shapes the declared architecture has, and only then
# the array's data.

# What zipfile and numpy raise for a damaged member: a bad CRC or deflate stream, an unsupported
# compression method or encryption flag (NotImplementedError, RuntimeError), a mangled .npy header.
_DAMAGED_MEMBER = (ValueError, SyntaxError, EOFError, OSError, zipfile.BadZipFile, zlib.error,
                   NotImplementedError, RuntimeError, TypeError, KeyError)


class _Archive:
    """The .npy members of an opened .npz, each read only on request, after its header is checked."""

    def __init__(self, path, fileobj):
        self.path = path
        self.zip = zipfile.ZipFile(fileobj)
        infos = self.zip.infolist()
        claimed = sum(info.file_size for info in infos)
        if claimed > MAX_ARCHIVE_BYTES:
            raise CheckpointError(f"{path}: archive members claim {claimed:,} bytes, over the limit of "
                                  f"{MAX_ARCHIVE_BYTES:,}; damaged, or not a minialex checkpoint")
        self.members = {}
        for info in infos:
            name = info.filename
            if not name.endswith(".npy"):
                raise CheckpointError(f"{path}: not a minialex checkpoint: archive member {name!r} "
                                      f"is not a .npy array")
            if name[:-4] in self.members:
                raise CheckpointError(f"{path}: damaged checkpoint: archive member {name!r} appears twice")
            self.members[name[:-4]] = info

    def close(self):
        self.zip.close()

    def describe(self, name):
        """(shape, dtype) from the member's .npy header, without reading its data."""
        info = self.members[name]
        try:
            with self.zip.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
        except _DAMAGED_MEMBER as e:
            raise CheckpointError(f"{self.path}: damaged checkpoint: member {name!r} is not a readable "
                                  f".npy array ({e})") from None
        shape = tuple(shape)
        if dtype.hasobject:
            raise CheckpointError(f"{self.path}: holds pickled objects, which are never loaded "
                                  f"(they could run code); not a minialex checkpoint")
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise CheckpointError(f"{self.path}: damaged checkpoint: {name!r} claims shape {shape} "
                                  f"but holds only {info.file_size:,} bytes")
        return shape, dtype

    def read(self, name):
        """The member's array (after `describe`, so its size is known to be honest)."""
        self.describe(name)
        try:
            with self.zip.open(self.members[name]) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        except _DAMAGED_MEMBER as e:
            raise CheckpointError(f"{self.path}: truncated or corrupt checkpoint ({name}: {e})") from None


@contextmanager
def _open_archive(path):
    """The checkpoint file as an _Archive; CheckpointError naming the file for anything unreadable."""
    path = os.fspath(path)
    # Regular files only: a FIFO would block forever and a device would be read without end.
    f = open_input(path, "rb", what="checkpoint", error=CheckpointError)
    try:
        magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise CheckpointError(f"{path}: not a checkpoint (a single .npy array, not an .npz archive)")
        if not magic.startswith(b"PK"):
            what = "an empty file" if not magic else "not a zip archive"
            raise CheckpointError(f"{path}: not a readable .npz checkpoint ({what})")
        check_zip_directory(path, f, MAX_MEMBERS, MAX_DIRECTORY_BYTES, CheckpointError)
        f.seek(0)
        archive = _Archive(path, f)
    except CheckpointError:
        f.close()
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError, RuntimeError) as e:
        f.close()
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    except OSError as e:
        f.close()
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from None
    try:
        yield archive
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from None
    except RecursionError:  # JSON nested deeper than the interpreter's stack: hostile, not ours
        raise CheckpointError(f"{path}: damaged checkpoint header (nested too deeply)") from None
    finally:
        archive.close()
        f.close()


def first_non_finite(arrays, chunk=1 << 20):
    """Name of the first floating-point array holding NaN or inf, or None.

    Chunked, so checking 240 MB of weights never makes a 60 MB boolean temporary.
    """
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fc":
            continue
        flat = a.reshape(-1)
        for i in range(0, flat.size, chunk):
            if not np.isfinite(flat[i:i + chunk]).all():
                return name
    return None


def _refuse_non_finite(path, arrays):
    bad = first_non_finite(arrays)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad!r} holds NaN or inf values (saved from a run that "
                              f"diverged?); refusing to load it")


def _read_header(archive):
    """The header's JSON object; its size is checked before a byte of it is decoded."""
    path = archive.path
    info = archive.members[HEADER_KEY]
    if info.file_size > MAX_HEADER_BYTES + 4096:
        raise CheckpointError(f"{path}: damaged checkpoint header ({info.file_size:,} bytes, over the "
                              f"limit of {MAX_HEADER_BYTES:,})")
    shape, dtype = archive.describe(HEADER_KEY)
    if not (dtype == np.uint8 and len(shape) == 1) and not (dtype.kind == "U" and shape == ()):
        raise CheckpointError(f"{path}: damaged checkpoint header (stored as {dtype} {shape})")
    raw = archive.read(HEADER_KEY)
    try:
        text = raw.tobytes().decode("utf-8") if raw.dtype == np.uint8 else str(raw)
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged checkpoint header (not a JSON object)")
    return header


def load_checkpoint(path, int8=False) -> Checkpoint:
    """Read and validate a checkpoint written by save_checkpoint or save_int8_checkpoint;
    CheckpointError for anything else. An int8 checkpoint is refused unless `int8` is true (the
    caller can run one: inference, eval), since it holds no float weights."""
    path = os.fspath(path)
    with _open_archive(path) as archive:
        if HEADER_KEY not in archive.members:
            raise CheckpointError(f"{path}: not a minialex checkpoint (no {HEADER_KEY} header)")
        return _load_checkpoint(archive, int8)


def refuse_int8(path):
    """The one-line refusal of an int8 checkpoint where float weights are needed."""
    return CheckpointError(f"{path}: is an int8 checkpoint (written by minialex quantize), which only "
                           f"inference and eval take; this needs the float checkpoint it was quantised from")


def _load_checkpoint(archive, int8=False):
    path = archive.path
    header = _read_header(archive)
    if header.get("int8") is not None and not int8:
        raise refuse_int8(path)
    fields = _Fields(path, archive)
    version = header.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: damaged checkpoint header (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written in checkpoint format {version} by a newer minialex; "
                              f"this one reads up to format {FORMAT_VERSION}, please upgrade")
    arch = fields.arch(header.get("arch"))
    names = fields.class_names(header.get("class_names"), arch["num_classes"])
    norm = fields.normalization(header.get("normalization"), arch)
    train_state = fields.train_state(header.get("train_state"))
    if header.get("int8") is not None:
        floats = [name for name in archive.members if name.startswith("model/")]
        if floats:
            raise CheckpointError(f"{path}: damaged checkpoint: float weights ({floats[0]!r}) beside the "
                                  f"header's int8 section; a checkpoint is float or int8, not both")
        section = fields.int8(header["int8"], arch)
        for key in ("optimizer", "scheduler"):
            if header.get(key) is not None:
                fields.fail(key, "is present in an int8 checkpoint, which cannot be trained")
        return Checkpoint(version=version, arch=arch, class_names=names, normalization=norm,
                          state_dict=OrderedDict(), train_state=train_state, path=path, int8=section)
    stray = [name for name in archive.members if name.startswith("int8/")]
    if stray:
        raise CheckpointError(f"{path}: damaged checkpoint: int8 weights ({stray[0]!r}) without the "
                              f"header's int8 section")
    config = (train_state or {}).get("config") or {}
    state = _read_weights(archive, arch)   # first: "another architecture" says most
    params = models.parameter_shapes(models.Arch.from_dict(arch))
    optimizer_state = fields.optimizer(header.get("optimizer"), list(params.values()), config)
    scheduler_state = fields.scheduler(header.get("scheduler"), optimizer_state, config)
    return Checkpoint(version=version, arch=arch, class_names=names, normalization=norm,
                      state_dict=state, optimizer_state=optimizer_state,
                      scheduler_state=scheduler_state, train_state=train_state, path=path)


def _read_weights(archive, arch):
    """The model/ members, each checked against the architecture's shape before it is read."""
    path = archive.path
    expected = models.state_shapes(models.Arch.from_dict(arch))
    stored = [name[len("model/"):] for name in archive.members if name.startswith("model/")]
    if not stored:
        raise CheckpointError(f"{path}: damaged checkpoint (no model weights)")
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights are for another architecture than the header's "
                              f"{_describe(arch)}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    state = OrderedDict()
    for key, want in expected.items():
        shape, dtype = archive.describe(f"model/{key}")
        if shape != want:
            raise CheckpointError(f"{path}: weights are for another architecture than the header's "
                                  f"{_describe(arch)}: {key!r} has shape {shape}, expected {want}")
        integer = key.endswith("num_batches_tracked")
        if (dtype.kind not in "iu") if integer else (dtype.kind != "f"):
            raise CheckpointError(f"{path}: {key!r} is stored as {dtype}, expected "
                                  f"{'integers' if integer else 'floating point'}")
        state[key] = archive.read(f"model/{key}")
        _refuse_non_finite(path, {f"model/{key}": state[key]})
    return state


def _read_int8_arrays(archive, arch):
    """The int8/ members, each checked against the architecture's shape and dtype before it is read."""
    from .models.quantized import QuantLayer, int8_arrays
    path = archive.path
    expected = int8_arrays(arch)
    stored = [name[len("int8/"):] for name in archive.members if name.startswith("int8/")]
    unexpected = [k for k in stored if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: damaged int8 section: unexpected array 'int8/{unexpected[0]}' for the "
                              f"header's {_describe(arch)}")
    values = {}
    for name, (want_shape, want_dtype) in expected.items():
        member = f"int8/{name}"
        if member not in archive.members:
            raise CheckpointError(f"{path}: damaged int8 section: array {member!r} is missing")
        shape, dtype = archive.describe(member)
        if shape != want_shape or dtype != want_dtype:
            raise CheckpointError(f"{path}: damaged int8 section: {member!r} is {dtype} {shape}, expected "
                                  f"{want_dtype} {want_shape} for the header's {_describe(arch)}")
        values[name] = archive.read(member)
    layers = OrderedDict()
    for name in expected:
        key = name.rsplit(".", 1)[0]
        if key not in layers:
            layers[key] = QuantLayer(*(values[f"{key}.{part}"] for part in QuantLayer._fields))
    return layers


def _describe(arch):
    return (f"{arch['variant']}{' +BN' if arch.get('batch_norm') else ''} "
            f"with {arch['num_classes']} classes")


def load_weights(path):
    """(state_dict, checkpoint or None) from a minialex checkpoint or a plain .npz of named arrays.

    The plain form is what a converted torchvision state_dict looks like (`np.savez(f, **sd)`); its
    arrays are checked against a model by `load_into`.
    """
    path = os.fspath(path)
    with _open_archive(path) as archive:
        if HEADER_KEY in archive.members:
            ckpt = _load_checkpoint(archive)   # an int8 checkpoint is refused: no float weights
            return ckpt.state_dict, ckpt
        if not archive.members:
            raise CheckpointError(f"{path}: empty archive, no weights")
        arrays = OrderedDict((name, archive.read(name)) for name in archive.members)
    _refuse_non_finite(path, arrays)
    return arrays, None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Keys of each schedule's state_dict (lr_scheduler.*.state_dict()) -> (check, what).
_NONNEG_INT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_SCHEDULER_RULES = {
    "step_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "gamma": (lambda v: _is_number(v) and v > 0, "a number above 0"),
    "milestones": (lambda v: isinstance(v, list) and all(_is_int(m) and m >= 0 for m in v),
                   "a list of integers >= 0"),
    "last_epoch": _NONNEG_INT,
    "base_lrs": (lambda v: isinstance(v, list) and all(_is_number(x) and x >= 0 for x in v), "a list of numbers >= 0"),
    "min_lrs": (lambda v: isinstance(v, list) and all(_is_number(x) and x >= 0 for x in v), "a list of numbers >= 0"),
    "mode": (lambda v: isinstance(v, str) and v in ("min", "max"), "min or max"),
    "factor": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "patience": _NONNEG_INT, "cooldown": _NONNEG_INT, "num_bad_epochs": _NONNEG_INT,
    "cooldown_counter": _NONNEG_INT,
    "threshold": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "threshold_mode": (lambda v: isinstance(v, str) and v in ("rel", "abs"), "rel or abs"),
    "eps": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "best": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
             "a number (or +-Infinity)"),
}
_SCHEDULER_KEYS = {
    "step": {"step_size", "gamma", "base_lrs", "last_epoch"},
    "multistep": {"milestones", "gamma", "base_lrs", "last_epoch"},
    "plateau": {"mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "eps",
                "min_lrs", "best", "num_bad_epochs", "cooldown_counter", "last_epoch"},
}

# Per-parameter-group hyper-parameters and per-parameter state of each optimiser's state_dict.
_GROUP_RULES = {
    "lr": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "initial_lr": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "dampening": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "betas": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1)"),
    "eps": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
}
# kind -> (group settings, per-parameter entries allowed, entries required). SGD without momentum
# keeps an empty entry per parameter.
_OPTIMIZER_KEYS = {
    "sgd": ({"lr", "momentum", "dampening", "weight_decay", "nesterov"}, {"momentum_buffer"}, set()),
    "adam": ({"lr", "betas", "eps", "weight_decay"}, {"step", "exp_avg", "exp_avg_sq"},
             {"step", "exp_avg", "exp_avg_sq"}),
}

_HISTORY_KEYS_LIMIT = 64


class _Fields:
    """Field-by-field validation of a header; every failure names the file and the field."""

    def __init__(self, path, archive):
        self.path, self.archive = path, archive

    def fail(self, field, problem):
        raise CheckpointError(f"{self.path}: damaged checkpoint header: {field} {problem}")

    def check(self, field, value, rule):
        ok, what = rule
        if not ok(value):
            self.fail(field, f"is {_shown(value)}, expected {what}")
        return value

    def dict(self, field, value, required=()):
        if not isinstance(value, dict):
            self.fail(field, f"is {_shown(value)}, expected an object")
        for key in required:
            if key not in value:
                self.fail(f"{field}.{key}", "is missing")
        return value

    def small_array(self, field, value, shape):
        """A value saved as a list or as an array member (resolved here, its shape checked first)."""
        if isinstance(value, dict) and set(value) == {_ARRAY_REF}:
            key = value[_ARRAY_REF]
            if not isinstance(key, str) or key not in self.archive.members:
                self.fail(field, f"refers to a missing array {_shown(key)}")
            stored, dtype = self.archive.describe(key)
            if stored != shape or dtype.kind not in "fiu":
                self.fail(field, f"is a {dtype} array of shape {stored}, expected shape {shape}")
            value = self.archive.read(key).tolist()
        try:
            array = np.array(value, dtype=np.float64) if _numbers_only(value) else None
        except (ValueError, OverflowError):
            array = None
        if array is None or array.shape != shape or not np.isfinite(array).all():
            self.fail(field, f"is {_shown(value)}, expected finite numbers of shape {shape}")
        return array

    # -- the model ---------------------------------------------------------------------------------

    def arch(self, arch):
        """The header's architecture, checked by the models registry (models.Arch)."""
        try:
            return models.Arch.from_dict(arch).to_dict()
        except ValueError as e:   # the registry's messages start with the field's name
            raise CheckpointError(f"{self.path}: damaged checkpoint header: arch.{e}") from None

    def class_names(self, names, num_classes):
        if not isinstance(names, list) or len(names) != num_classes:
            count = f"{len(names)} names" if isinstance(names, list) else _shown(names)
            self.fail("class_names", f"is {count}, expected a list of {num_classes} names (arch.num_classes)")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not 0 < len(name) <= MAX_CLASS_NAME_CHARS:
                self.fail(f"class_names[{i}]", f"is {_shown(name)}, expected text of 1 to "
                                               f"{MAX_CLASS_NAME_CHARS} characters")
        return names

    def normalization(self, norm, arch):
        from .data.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC, MAX_RESIZE_RATIO
        norm = self.dict("normalization", norm, required=("mean", "std", "resize", "crop"))
        out = dict(norm)
        for key in ("mean", "std"):
            values = self.small_array(f"normalization.{key}", norm[key], (3,))
            if key == "std" and not (values > 0).all():
                self.fail("normalization.std", f"is {_shown(values.tolist())}, expected 3 finite numbers above 0")
            out[key] = values.tolist()
        crop = _input_size(arch["variant"])
        self.check("normalization.crop", norm["crop"],
                   (lambda v: _is_int(v) and v == crop, f"{crop}, the input size of {arch['variant']}"))
        self.check("normalization.resize", norm["resize"],
                   (lambda v: _is_int(v) and crop <= v <= MAX_RESIZE_RATIO * crop,
                    f"an integer from the crop {crop} to {MAX_RESIZE_RATIO * crop}"))
        # The PCA colour noise's components: absent from checkpoints written before they were
        # measured on the training data, which used ImageNet's.
        eigval = norm.get("pca_eigval", list(IMAGENET_EIGVAL))
        eigvec = norm.get("pca_eigvec", [list(row) for row in IMAGENET_EIGVEC])
        eigval = self.small_array("normalization.pca_eigval", eigval, (3,))
        if not (eigval >= 0).all():
            self.fail("normalization.pca_eigval", f"is {_shown(eigval.tolist())}, expected 3 numbers >= 0")
        out["pca_eigval"] = eigval.tolist()
        out["pca_eigvec"] = self.small_array("normalization.pca_eigvec", eigvec, (3, 3)).tolist()
        return out

    # -- the int8 section ---------------------------------------------------------------------------

    def int8(self, section, arch):
        """The int8 section and its arrays: {"version", "criterion", "calibration", "params"}."""
        from .models.quantized import (CRITERIA, INPUT_ZERO_POINT, Int8Params, check_params,
                                       check_scale, quantisation_points)
        sec = self.dict("int8", section, required=("version", "criterion", "input", "activations"))
        version = sec["version"]
        if _is_int(version) and version > INT8_VERSION:
            self.fail("int8.version", f"is {version}: written by a newer minialex (this one reads int8 "
                                      f"section version {INT8_VERSION}), please upgrade")
        self.check("int8.version", version, (lambda v: _is_int(v) and v == INT8_VERSION, str(INT8_VERSION)))
        self.check("int8.criterion", sec["criterion"], (lambda v: isinstance(v, str) and v in CRITERIA,
                                                        "one of " + ", ".join(CRITERIA)))
        calibration = self.calibration(sec.get("calibration"), CRITERIA)
        inp = self.dict("int8.input", sec["input"], required=("scale", "zero_point"))
        self.check("int8.input.zero_point", inp["zero_point"],
                   (lambda v: _is_int(v) and v == INPUT_ZERO_POINT, str(INPUT_ZERO_POINT)))
        points = quantisation_points(arch)
        acts = self.dict("int8.activations", sec["activations"], required=points)
        if len(acts) != len(points):
            extra = sorted(set(acts) - set(points))
            self.fail("int8.activations", f"has the unexpected key {_shown(extra[0])}, expected {points}")
        try:
            input_scale = check_scale("int8.input.scale", inp["scale"])
            scales = {k: check_scale(f"int8.activations.{k}", acts[k]) for k in points}
        except ValueError as e:
            raise CheckpointError(f"{self.path}: damaged checkpoint header: {e}") from None
        params = Int8Params(input_scale, scales, _read_int8_arrays(self.archive, arch))
        try:
            check_params(arch, params)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: damaged int8 section: {e}") from None
        return {"version": version, "criterion": sec["criterion"], "calibration": calibration,
                "params": params}

    def calibration(self, info, criteria):
        """What the int8 section says about its calibration (reported, not computed with)."""
        if info is None:
            return None
        info = self.dict("int8.calibration", info)
        if info.get("list") is not None:
            self.check("int8.calibration.list", info["list"], (lambda v: isinstance(v, str), "a file name"))
        for key, rule in (("images", (lambda v: _is_int(v) and v >= 1, "an integer >= 1")), ("seed", _NONNEG_INT)):
            if key in info:
                self.check(f"int8.calibration.{key}", info[key], rule)
        results = info.get("results", [])
        if not isinstance(results, list) or len(results) > len(criteria):
            self.fail("int8.calibration.results", f"is {_shown(results)}, expected a list of at most "
                                                  f"{len(criteria)} results")
        for i, r in enumerate(results):
            field = f"int8.calibration.results[{i}]"
            self.dict(field, r, required=("criterion", "agreement", "logit_mse"))
            self.check(f"{field}.criterion", r["criterion"], (lambda v: v in criteria, "one of " + ", ".join(criteria)))
            self.check(f"{field}.agreement", r["agreement"], (lambda v: _is_number(v) and 0 <= v <= 1,
                                                              "a number in [0, 1]"))
            self.check(f"{field}.logit_mse", r["logit_mse"], (lambda v: _is_number(v) and v >= 0, "a number >= 0"))
        return info

    # -- the training state (only `train -resume` uses it, but a damaged one is refused anywhere) --

    def train_state(self, ts):
        if ts is None:
            return None
        ts = self.dict("train_state", ts, required=("epoch",))
        self.check("train_state.epoch", ts["epoch"], _NONNEG_INT)
        history = ts.get("history", [])
        if not isinstance(history, list):
            self.fail("train_state.history", f"is {_shown(history)}, expected a list of epoch records")
        for i, record in enumerate(history):
            field = f"train_state.history[{i}]"
            self.dict(field, record, required=("epoch",))
            if len(record) > _HISTORY_KEYS_LIMIT:
                self.fail(field, f"has {len(record)} entries, expected at most {_HISTORY_KEYS_LIMIT}")
            self.check(f"{field}.epoch", record["epoch"], (lambda v: _is_int(v) and v >= 1, "an integer >= 1"))
            for key, value in record.items():
                self.check(f"{field}.{key}", value, (lambda v: v is None or (
                    isinstance(v, (int, float)) and not isinstance(v, bool)), "a number or null"))
        if ts.get("best_val_top1") is not None:
            self.check("train_state.best_val_top1", ts["best_val_top1"],
                       (lambda v: _is_number(v) and 0 <= v <= 1, "null or a number in [0, 1]"))
        if ts.get("config") is not None:
            config = self.dict("train_state.config", ts["config"])
            try:  # every value a resumed run takes passes the rule its command-line option has
                check_resumable(config)
            except MinialexError as e:   # names the option: "-lr: nan is not a finite number"
                raise CheckpointError(f"{self.path}: damaged checkpoint header: train_state.config {e}") from None
        if ts.get("rng") is not None:
            try:  # exactly what restoring it does, on a throw-away generator
                np.random.PCG64().state = ts["rng"]
            except (ValueError, KeyError, TypeError, OverflowError):
                self.fail("train_state.rng", f"is {_shown(ts['rng'])}, expected a PCG64 state")
        if ts.get("interrupted") is not None:
            stop = self.dict("train_state.interrupted", ts["interrupted"], required=("epoch", "batch"))
            self.check("train_state.interrupted.epoch", stop["epoch"], (lambda v: _is_int(v) and v >= 1,
                                                                        "an integer >= 1"))
            self.check("train_state.interrupted.batch", stop["batch"], _NONNEG_INT)
        if ts.get("world_size") is not None:
            self.check("train_state.world_size", ts["world_size"], (lambda v: _is_int(v) and v >= 1,
                                                                    "an integer >= 1"))
        if ts.get("lists") is not None:
            lists = self.dict("train_state.lists", ts["lists"])
            for key, value in lists.items():
                self.check(f"train_state.lists.{key}", value,
                           (lambda v: v is None or isinstance(v, str), "a file name or null"))
        return ts

    def optimizer(self, state, param_shapes, config):
        """The optimiser's state_dict, its arrays read after their shapes match the parameters'."""
        if state is None:
            return None
        state = self.dict("optimizer", state, required=("state", "param_groups"))
        groups = state["param_groups"]
        if not isinstance(groups, list) or not groups:
            self.fail("optimizer.param_groups", f"is {_shown(groups)}, expected a list of groups")
        kind = config.get("optimizer")
        if kind is None:
            kind = "adam" if isinstance(groups[0], dict) and "betas" in groups[0] else "sgd"
        hyper, per_param, required = _OPTIMIZER_KEYS[kind]
        numbered = []
        for g, group in enumerate(groups):
            field = f"optimizer.param_groups[{g}]"
            self.dict(field, group, required=("params", *sorted(hyper)))
            for key, value in group.items():
                if key == "params":
                    continue
                if key not in _GROUP_RULES or (key not in hyper and key != "initial_lr"):
                    self.fail(f"{field}.{key}", f"is not a {kind} setting")
                self.check(f"{field}.{key}", value, _GROUP_RULES[key])
            if not isinstance(group["params"], list) or not all(_is_int(i) for i in group["params"]):
                self.fail(f"{field}.params", f"is {_shown(group['params'])}, expected parameter numbers")
            numbered += group["params"]
        if sorted(numbered) != list(range(len(param_shapes))):
            self.fail("optimizer.param_groups", f"number {len(numbered)} parameters, expected each of the "
                                                 f"model's {len(param_shapes)} exactly once")
        entries = state["state"]
        if isinstance(entries, dict) and set(entries) == {_INT_KEYS}:
            entries = entries[_INT_KEYS]
        entries = self.dict("optimizer.state", entries)
        resolved = {}
        for key, entry in entries.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < len(param_shapes)):
                self.fail("optimizer.state", f"has an entry for parameter {_shown(key)}, expected "
                                             f"0..{len(param_shapes) - 1}")
            i = int(key)
            field = f"optimizer.state.{i}"
            entry = self.dict(field, entry, required=sorted(required))
            resolved[i] = {}
            for name, value in entry.items():
                if name not in per_param:
                    self.fail(f"{field}.{name}", f"is not {kind} state")
                if name == "step":
                    resolved[i][name] = self.check(f"{field}.step", value, _NONNEG_INT)
                else:
                    resolved[i][name] = self.parameter_array(f"{field}.{name}", value, param_shapes[i])
        groups = [dict(g, params=list(g["params"])) for g in groups]
        return {"state": resolved, "param_groups": groups}

    def parameter_array(self, field, value, shape):
        if not (isinstance(value, dict) and set(value) == {_ARRAY_REF} and isinstance(value[_ARRAY_REF], str)
                and value[_ARRAY_REF] in self.archive.members):
            self.fail(field, f"is {_shown(value)}, expected an array stored beside the header")
        key = value[_ARRAY_REF]
        stored, dtype = self.archive.describe(key)
        if stored != tuple(shape) or dtype.kind != "f":
            self.fail(field, f"is a {dtype} array of shape {stored}, expected floats of the parameter's "
                             f"shape {tuple(shape)}")
        array = self.archive.read(key)
        _refuse_non_finite(self.path, {key: array})
        return array

    def scheduler(self, state, optimizer_state, config):
        if state is None:
            return None
        state = self.dict("scheduler", state)
        schedule = config.get("schedule")  # validated: one of the names, or absent
        keys = _SCHEDULER_KEYS.get(schedule)
        if keys is None:  # no schedule recorded: the keys must be one schedule's, whichever
            keys = next((k for k in _SCHEDULER_KEYS.values() if set(state) == k), None)
        if keys is None or set(state) != keys:
            self.fail("scheduler", f"has the fields {sorted(state)[:12]}, expected those of the "
                                   f"{schedule or 'step, multistep or plateau'} schedule")
        for key in sorted(keys):
            self.check(f"scheduler.{key}", state[key], _SCHEDULER_RULES[key])
        groups = len(optimizer_state["param_groups"]) if optimizer_state else None
        for key in ("base_lrs", "min_lrs"):
            if key in state and groups is not None and len(state[key]) != groups:
                self.fail(f"scheduler.{key}", f"has {len(state[key])} values, expected one per "
                                              f"parameter group ({groups})")
        return state


def _input_size(variant):
    return models.INPUT_SIZE[variant]


def _numbers_only(value):
    if isinstance(value, list):
        return all(_numbers_only(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value, limit=60):
    """A header value, cut short, for an error message."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_into(model, state_dict, path):
    """model.load_state_dict, turning a mismatch into a CheckpointError naming the file.

    dtypes are checked first: load_state_dict casts, and a cast would quietly truncate integer
    "weights", drop imaginary parts or fail on text with a message about something else.
    """
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            continue
        got, want = np.asarray(value).dtype, np.asarray(own[key]).dtype
        fits = got.kind == "f" if want.kind == "f" else got.kind in "iu"
        if not fits:
            raise CheckpointError(f"{path}: {key!r} is stored as {got}, expected "
                                  f"{'floating point' if want.kind == 'f' else 'integers'}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights are for another architecture: {e}") from None


def model_from_checkpoint(ckpt: Checkpoint):
    """The model described by ckpt.arch, with its weights loaded, in eval mode: a float AlexNet, or
    a models.quantized.QuantizedAlexNet for an int8 checkpoint."""
    if ckpt.int8 is not None:
        from .models.quantized import QuantizedAlexNet
        try:
            return QuantizedAlexNet(ckpt.arch, ckpt.int8["params"], criterion=ckpt.int8["criterion"],
                                    calibration=ckpt.int8["calibration"])
        except ValueError as e:   # checked when read; a Checkpoint made in code may still be wrong
            raise CheckpointError(f"{ckpt.path}: damaged int8 section: {e}") from None
    model = models.build(models.Arch.from_dict(ckpt.arch))  # validated when the header was read
    load_into(model, ckpt.state_dict, ckpt.path)
    return model.eval()
