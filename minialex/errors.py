"""User-facing errors.

A `MinialexError` is a problem with the user's input (a list file, an image, a checkpoint), not a
bug: the command line prints its message as `minialex: error: <message>` and exits with status 2,
without a traceback. So the message must stand on its own: one line that names the file (and the
line in it, when there is one) and says what is wrong.

Text from a file (a class name, a key, a path in a list) can hold terminal escapes or be megabytes
long; `printable` makes any such text safe to print, and every MinialexError message goes through it.
"""
import re
import unicodedata

# Longest message an error prints; a hostile file's key can be megabytes long.
MAX_MESSAGE_CHARS = 2000
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _escape(match):
    c = match.group()
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def printable(text, limit: int | None = 200) -> str:
    """`text` with control and format characters escaped (\\x1b, \\u202e) and cut to `limit` chars."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}...({len(text) - limit:,} more characters)"
    text = _UNPRINTABLE.sub(_escape, text)
    if any(unicodedata.category(c) == "Cf" for c in text):  # other invisible format characters
        text = "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) == "Cf" else c for c in text)
    return text


class MinialexError(Exception):
    """A problem with the user's input; str() is one line naming the file (and line)."""

    def __init__(self, message: str):
        # Messages often quote text from other libraries (Pillow, zlib) that may span several
        # lines; the CLI promises a single line, so fold them here once for every caller, and
        # escape what a hostile file could use to rewrite the screen.
        super().__init__(printable(" ".join(str(message).splitlines()), MAX_MESSAGE_CHARS))


class DataError(MinialexError):
    """A bad list file, labels file, image or dataset folder."""


class CheckpointError(MinialexError):
    """A checkpoint that is missing, corrupt, from another version or for another model."""


def at_line(path, line: int | None, message: str) -> str:
    """'file:line: message' (or 'file: message' without a line), the format every error uses."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return f"{where}: {message}"
