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
over the target: a crash or a full disk mid-write leaves the previous checkpoint as it was.
"""
import json
import os
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError

FORMAT_VERSION = 1
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
            if key not in arrays:
                raise CheckpointError(f"{path}: damaged checkpoint: header refers to missing array {key!r}")
            return arrays[key]
        if set(value) == {_INT_KEYS}:
            return {int(k): _from_json(v, arrays, path) for k, v in value[_INT_KEYS].items()}
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
    write_atomically(path, lambda f: _write_arrays(f, arrays))


def write_atomically(path, write):
    """Call write(fileobj) on a temp file next to `path`, fsync it, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write checkpoint: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); a checkpoint should get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write checkpoint: {e.strerror or e}") from None
        raise
    try:  # make the rename itself durable; not every file system lets us open a folder
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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
    return header


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint written by save_checkpoint."""
    path = os.fspath(path)
    arrays = _read_npz(path)
    header = _header(path, arrays)
    if header is None:
        raise CheckpointError(f"{path}: not a minialex checkpoint (no {HEADER_KEY} header)")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: damaged checkpoint header (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written in checkpoint format {version} by a newer minialex; "
                              f"this one reads up to format {FORMAT_VERSION}, please upgrade")
    arch = header.get("arch")
    names = header.get("class_names")
    norm = header.get("normalization")
    if not isinstance(arch, dict) or not {"variant", "num_classes"} <= set(arch):
        raise CheckpointError(f"{path}: damaged checkpoint header (no architecture)")
    if not isinstance(names, list) or len(names) != arch["num_classes"]:
        raise CheckpointError(f"{path}: damaged checkpoint header (class names do not match "
                              f"{arch.get('num_classes')} classes)")
    if not isinstance(norm, dict) or not {"mean", "std", "resize", "crop"} <= set(norm):
        raise CheckpointError(f"{path}: damaged checkpoint header (no normalization)")
    state = OrderedDict((k[len("model/"):], v) for k, v in arrays.items() if k.startswith("model/"))
    if not state:
        raise CheckpointError(f"{path}: damaged checkpoint (no model weights)")
    return Checkpoint(
        version=version, arch=arch, class_names=names, normalization=norm, state_dict=state,
        optimizer_state=_from_json(header.get("optimizer"), arrays, path),
        scheduler_state=_from_json(header.get("scheduler"), arrays, path),
        train_state=_from_json(header.get("train_state"), arrays, path),
        path=path)


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
    return OrderedDict(arrays), None


def build_model(arch):
    from . import models
    kwargs = {"num_classes": int(arch["num_classes"]), "variant": arch["variant"],
              "batch_norm": bool(arch.get("batch_norm", False))}
    if "dropout" in arch:
        kwargs["dropout"] = float(arch["dropout"])
    return models.alexnet(**kwargs)


def load_into(model, state_dict, path):
    """model.load_state_dict, turning a mismatch into a CheckpointError naming the file."""
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
