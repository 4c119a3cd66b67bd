"""List files and labels files.

`images.list` has one sample a line, `class_id image_path`, as the C AlexNet reads it:

    # comments and blank lines are skipped
    0 n01440764/img 001.jpeg
    3 /data/extra/photo.png

The line is split on the first run of spaces or tabs only, so paths may contain spaces; leading
and trailing spaces of the path are dropped. Relative paths resolve against the folder of the list
file, so a dataset folder can be moved as a whole. Class ids are decimal integers 0..N-1, where N
is the number of names in the labels file when one is given, else the largest id + 1.

A labels file has `class_id name` lines (names may contain spaces); every id 0..N-1 must appear
exactly once. Without one, classes are named `class_<id>`.

Both files are UTF-8 (a leading byte-order mark is allowed), with Unix or Windows line endings,
and must be regular files: a FIFO or a device is refused before it is opened (it could block or
never end). Every problem is a `DataError` whose message names `file:line`.
"""
import os
import re
from typing import NamedTuple

from minialex.errors import DataError, at_line
from minialex.files import open_input

# Paths are at most a few thousand bytes on every system we target; a longer "line" means the
# file is not a list file at all (an image or a tarball passed by mistake), and reading it whole
# would only waste memory before failing.
MAX_LINE_BYTES = 16384
# An id of a billion would make us allocate a billion class names and a classifier to match.
# ImageNet-21k has 21,841 classes; 100,000 keeps the largest classifier (torchvision's, 4096 inputs)
# at 1.6 GB, so that its checkpoint stays under checkpoint.MAX_ARCHIVE_BYTES.
MAX_CLASSES = 100_000
# A class name is printed in tables and stored in every checkpoint; longer is not a name.
MAX_CLASS_NAME_CHARS = 256

_ID_AND_REST = re.compile(r"([^ \t]+)(?:[ \t]+(.*))?\Z", re.DOTALL)
_DECIMAL = re.compile(r"[0-9]+\Z")
# C0 and C1 control characters other than tab: none belongs in a path or a class name, and they
# are the first sign of a binary file or of old Mac (CR-only) line endings.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class Sample(NamedTuple):
    label: int
    path: str   # resolved against the list file's folder
    line: int   # where it came from, for error messages later (a bad image names its list line)
    list_path: str | None = None  # the list file it came from (None: made in code, not read)

    def where(self, message: str) -> str:
        """'list:line: message' when the sample came from a list file, else the message alone."""
        return at_line(self.list_path, self.line, message) if self.list_path is not None else message


def _text_lines(path, what: str):
    """Yield (line_number, text) for every non-blank, non-comment line of a UTF-8 text file."""
    f = open_input(path, "rb", what=what, error=DataError)
    with f:
        number = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 2)
            except IsADirectoryError:
                raise DataError(at_line(path, None, f"is a folder, not a {what}")) from None
            except OSError as e:
                raise DataError(at_line(path, None, f"cannot read {what}: {e.strerror or e}")) from None
            if not raw:
                return
            number += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(at_line(path, number, f"line longer than {MAX_LINE_BYTES} bytes; "
                                        f"is this really a {what}?"))
            if b"\0" in raw:
                raise DataError(at_line(path, number, f"binary data (NUL byte); is this really a {what}?"))
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(at_line(path, number, f"not UTF-8 text (byte 0x{raw[e.start]:02x} "
                                        f"at column {e.start + 1})")) from None
            bad = _CONTROL.search(text)
            if bad:
                hint = " (old Mac line endings?)" if bad.group() == "\r" else ""
                raise DataError(at_line(path, number, f"control character U+{ord(bad.group()):04X} "
                                        f"at column {bad.start() + 1}{hint}"))
            text = text.strip(" \t")
            if not text or text.startswith("#"):
                continue
            yield number, text


def _parse_id(path, number: int, token: str, limit: int | None) -> int:
    if not _DECIMAL.match(token):
        if token.startswith("-") and _DECIMAL.match(token[1:]):
            raise DataError(at_line(path, number, f"class id {token} is negative"))
        raise DataError(at_line(path, number, f"class id {_short(token)!r} is not an integer"))
    digits = token.lstrip("0") or "0"
    # Compare long digit strings by length instead of converting them: int() of a
    # many-thousand-digit string is slow and, past 4300 digits, an error of its own.
    value = int(digits) if len(digits) <= 12 else 10 ** 12
    if limit is not None and value >= limit:
        raise DataError(at_line(path, number, f"class id {_short(digits)} is out of range: "
                                f"{limit} classes means ids 0..{limit - 1}"))
    if value >= MAX_CLASSES:
        raise DataError(at_line(path, number, f"class id {_short(digits)} is out of range "
                                f"(at most {MAX_CLASSES} classes)"))
    return value


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def read_list(path, num_classes: int | None = None) -> list[Sample]:
    """Parse an images.list file. With `num_classes`, ids must be below it (a labels file's size)."""
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    samples = []
    for number, text in _text_lines(path, "list file"):
        id_token, rest = _ID_AND_REST.match(text).groups()
        label = _parse_id(path, number, id_token, num_classes)
        image = (rest or "").strip(" \t")
        if not image:
            raise DataError(at_line(path, number, f"no image path after class id {label}"))
        samples.append(Sample(label, os.path.join(base, image), number, os.fspath(path)))
    if not samples:
        raise DataError(at_line(path, None, "the list is empty (no 'class_id image_path' lines)"))
    return samples


def read_labels(path) -> list[str]:
    """Parse a labels file of `class_id name` lines into names indexed by class id."""
    names: dict[int, str] = {}
    for number, text in _text_lines(path, "labels file"):
        id_token, rest = _ID_AND_REST.match(text).groups()
        class_id = _parse_id(path, number, id_token, None)
        name = (rest or "").strip(" \t")
        if not name:
            raise DataError(at_line(path, number, f"no class name after class id {class_id}"))
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise DataError(at_line(path, number, f"class name of {len(name)} characters, over the "
                                    f"limit of {MAX_CLASS_NAME_CHARS}"))
        if class_id in names:
            raise DataError(at_line(path, number, f"class id {class_id} named twice "
                                    f"({names[class_id]!r} and {name!r})"))
        names[class_id] = name
    if not names:
        raise DataError(at_line(path, None, "the labels file is empty (no 'class_id name' lines)"))
    missing = [i for i in range(max(names) + 1) if i not in names]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(at_line(path, None, f"class ids must run 0..{max(names)} without gaps; "
                                f"no name for {shown}"))
    return [names[i] for i in range(len(names))]


def duplicate_lines(samples):
    """([(line, first_line)], [(line, first_line, label, first_label)]) for images listed again:
    repeats with the same class id, and repeats with a different one (conflicts)."""
    first = {}
    repeats, conflicts = [], []
    for s in samples:
        seen = first.setdefault(os.path.normpath(s.path), s)
        if seen is s:
            continue
        if seen.label == s.label:
            repeats.append((s.line, seen.line))
        else:
            conflicts.append((s.line, seen.line, s.label, seen.label))
    return repeats, conflicts


def default_class_names(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def read_dataset(list_path, labels_path=None, num_classes: int | None = None):
    """(samples, class_names) for a list file and its optional labels file.

    The number of classes is, in order of preference: the labels file's size, `num_classes`
    (e.g. the training list's, when reading a test list that may not use every class), or the
    list's largest id + 1.
    """
    if labels_path is not None:
        names = read_labels(labels_path)
        if num_classes is not None and num_classes != len(names):
            raise DataError(at_line(labels_path, None, f"names {len(names)} classes but the model "
                                    f"has {num_classes}"))
        return read_list(list_path, len(names)), names
    samples = read_list(list_path, num_classes)
    count = num_classes if num_classes is not None else max(s.label for s in samples) + 1
    return samples, default_class_names(count)
