"""User-facing errors.

A `MinialexError` is a problem with the user's input (a list file, an image, a checkpoint), not a
bug: the command line prints its message as `minialex: error: <message>` and exits with status 2,
without a traceback. So the message must stand on its own: one line that names the file (and the
line in it, when there is one) and says what is wrong.
"""


class MinialexError(Exception):
    """A problem with the user's input; str() is one line naming the file (and line)."""

    def __init__(self, message: str):
        # Messages often quote text from other libraries (Pillow, zlib) that may span several
        # lines; the CLI promises a single line, so fold them here once for every caller.
        super().__init__(" ".join(str(message).splitlines()))


class DataError(MinialexError):
    """A bad list file, labels file, image or dataset folder."""


class CheckpointError(MinialexError):
    """A checkpoint that is missing, corrupt, from another version or for another model."""


def at_line(path, line: int | None, message: str) -> str:
    """'file:line: message' (or 'file: message' without a line), the format every error uses."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return f"{where}: {message}"
