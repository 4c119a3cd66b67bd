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

Reading trusts nothing in the file: pickles are never loaded, the archive's total size is capped
before anything is decompressed, the header is validated field by field, and weights holding NaN
or inf are refused (they come from a run that diverged and would only poison the next one).
"""
import json
import math
import os
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError
from .files import write_atomically

FORMAT_VERSION = 1
# The largest real checkpoint (torchvision AlexNet with Adam's two moments) is ~0.75 GB; an archive
# whose members claim more is damaged or hostile (a zip bomb), and is refused before any of it is
# decompressed rather than exhausting memory.
MAX_ARCHIVE_BYTES = 4 * 1024 ** 3
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


def _from_json(value, arrays, path):
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            key = value[_ARRAY_REF]
            if not isinstance(key, str) or key not in arrays:
                raise CheckpointError(f"{path}: damaged checkpoint: header refers to missing array {key!r}")
            return arrays[key]
        if set(value) == {_INT_KEYS}:
            inner = value[_INT_KEYS]
            if not isinstance(inner, dict) or not all(isinstance(k, str) and k.lstrip("-").isdigit()
                                                      for k in inner):
                raise CheckpointError(f"{path}: damaged checkpoint header (bad integer-keyed table)")
            return {int(k): _from_json(v, arrays, path) for k, v in inner.items()}
        return {k: _from_json(v, arrays, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, arrays, path) for v in value]
    return value


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


# -- reading ---------------------------------------------------------------------------------------

def _read_npz(path):
    """Every array of an .npz as a dict; CheckpointError naming the file for anything unreadable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise CheckpointError(f"{path}: not a checkpoint (a single .npy array, not an .npz archive)")
        if not magic.startswith(b"PK"):
            what = "an empty file" if not magic else "not a zip archive"
            raise CheckpointError(f"{path}: not a readable .npz checkpoint ({what})")
        _check_archive_size(path)
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: not a checkpoint (a single .npy array, not an .npz archive)")
        with archive:
            return {name: archive[name] for name in archive.files}
    except CheckpointError:
        raise
    except PermissionError:
        raise CheckpointError(f"{path}: cannot read checkpoint: permission denied") from None
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise CheckpointError(f"{path}: holds pickled objects, which are never loaded "
                                  f"(they could run code); not a minialex checkpoint") from None
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({e})") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}") from None
    except Exception as e:  # numpy reports some damaged archives with other exception types
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({type(e).__name__}: {e})") from None


def _check_archive_size(path):
    with zipfile.ZipFile(path) as z:
        claimed = sum(info.file_size for info in z.infolist())
    if claimed > MAX_ARCHIVE_BYTES:
        raise CheckpointError(f"{path}: archive members claim {claimed:,} bytes, over the limit of "
                              f"{MAX_ARCHIVE_BYTES:,}; damaged, or not a minialex checkpoint")


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


def _header(path, arrays):
    raw = arrays.get(HEADER_KEY)
    if raw is None:
        return None
    try:
        if raw.dtype == np.uint8:
            text = raw.tobytes().decode("utf-8")
        elif raw.dtype.kind == "U" and raw.ndim == 0:
            text = str(raw)
        else:
            raise ValueError(f"header stored as {raw.dtype}")
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint header ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: damaged checkpoint header (nested too deeply)") from None
    return header


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint written by save_checkpoint."""
    path = os.fspath(path)
    try:
        return _load_checkpoint(path)
    except RecursionError:  # JSON nested deeper than the interpreter's stack: hostile, not ours
        raise CheckpointError(f"{path}: damaged checkpoint header (nested too deeply)") from None


def _load_checkpoint(path):
    arrays = _read_npz(path)
    header = _header(path, arrays)
    if header is None:
        raise CheckpointError(f"{path}: not a minialex checkpoint (no {HEADER_KEY} header)")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: damaged checkpoint header (format_version {version!r})")
    if version < 1:
        raise CheckpointError(f"{path}: damaged checkpoint header (format_version {version})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written in checkpoint format {version} by a newer minialex; "
                              f"this one reads up to format {FORMAT_VERSION}, please upgrade")
    for key in ("arch", "normalization"):
        header[key] = _from_json(header.get(key), arrays, path)
    arch, names, norm = _valid_header(path, header)
    state = OrderedDict((k[len("model/"):], v) for k, v in arrays.items() if k.startswith("model/"))
    if not state:
        raise CheckpointError(f"{path}: damaged checkpoint (no model weights)")
    _refuse_non_finite(path, arrays)
    train_state = _from_json(header.get("train_state"), arrays, path)
    if train_state is not None:
        if not isinstance(train_state, dict):
            raise CheckpointError(f"{path}: damaged checkpoint header (training state)")
        epoch = train_state.get("epoch")
        if epoch is not None and (not _is_int(epoch) or epoch < 0):
            raise CheckpointError(f"{path}: damaged checkpoint header (epoch {epoch!r})")
    return Checkpoint(
        version=version, arch=arch, class_names=names, normalization=norm, state_dict=state,
        optimizer_state=_from_json(header.get("optimizer"), arrays, path),
        scheduler_state=_from_json(header.get("scheduler"), arrays, path),
        train_state=train_state, path=path)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_header(path, header):
    """(arch, class_names, normalization) after checking every field a model is built from."""
    def damaged(what):
        return CheckpointError(f"{path}: damaged checkpoint header ({what})")

    arch, names, norm = header.get("arch"), header.get("class_names"), header.get("normalization")
    if not isinstance(arch, dict) or not {"variant", "num_classes"} <= set(arch):
        raise damaged("no architecture")
    if not isinstance(arch["variant"], str) or not _is_int(arch["num_classes"]) or arch["num_classes"] < 1:
        raise damaged(f"architecture {arch['variant']!r} with {arch['num_classes']!r} classes")
    if not isinstance(names, list) or len(names) != arch["num_classes"]:
        raise damaged(f"class names do not match {arch['num_classes']} classes")
    if not all(isinstance(n, str) for n in names):
        raise damaged("class names are not all text")
    if not isinstance(norm, dict) or not {"mean", "std", "resize", "crop"} <= set(norm):
        raise damaged("no normalization")
    for key in ("mean", "std"):
        values = norm[key]
        if isinstance(values, np.ndarray):
            values = values.tolist()
        if (not isinstance(values, list) or len(values) != 3 or not all(_is_number(v) for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            raise damaged(f"normalization {key} {norm[key]!r}, expected 3 finite numbers"
                          + (" above 0" if key == "std" else ""))
    for key in ("resize", "crop"):
        if not _is_int(norm[key]) or not 1 <= norm[key] <= 4096:
            raise damaged(f"normalization {key} {norm[key]!r}")
    if norm["crop"] > norm["resize"]:
        raise damaged(f"crop {norm['crop']} larger than resize {norm['resize']}")
    return arch, names, norm


def load_weights(path):
    """(state_dict, checkpoint or None) from a minialex checkpoint or a plain .npz of named arrays.

    The plain form is what a converted torchvision state_dict looks like (`np.savez(f, **sd)`).
    """
    path = os.fspath(path)
    arrays = _read_npz(path)
    if HEADER_KEY in arrays:
        ckpt = load_checkpoint(path)
        return ckpt.state_dict, ckpt
    if not arrays:
        raise CheckpointError(f"{path}: empty archive, no weights")
    _refuse_non_finite(path, arrays)
    return OrderedDict(arrays), None


def build_model(arch):
    from . import models
    kwargs = {"num_classes": int(arch["num_classes"]), "variant": arch["variant"],
              "batch_norm": bool(arch.get("batch_norm", False))}
    if "dropout" in arch:
        kwargs["dropout"] = float(arch["dropout"])
    return models.alexnet(**kwargs)


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
    """The model described by ckpt.arch, with its weights loaded, in eval mode."""
    try:
        model = build_model(ckpt.arch)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt.path}: unknown architecture {ckpt.arch} ({e})") from None
    load_into(model, ckpt.state_dict, ckpt.path)
    return model.eval()
