"""Files the user names: what may be read, what may be written over, and how writes stay whole.

Every command reads and writes through these three rules:
- an input must be a regular file (or a symlink to one): a FIFO blocks forever, a device such as
  /dev/zero reads without end, so both are refused before anything is read (`open_input` opens
  without blocking and checks the opened descriptor, so the check and the read see the same file);
- an output target may be a regular file, a symlink to one, or a name that does not exist yet, in a
  folder that exists: anything else (a device, a FIFO, a folder, "") is refused before the work
  that would produce it starts (`check_output_target`);
- a write goes to a temporary file beside the target, is fsync'd and renamed over it
  (`write_atomically`): a crash mid-write leaves the previous file as it was. A process killed
  outright may leave its `.NAME.*.tmp` behind; `remove_stale_temps` deletes those.
"""
import os
import stat
import struct
import tempfile

from .errors import MinialexError


def _kind(mode):
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_input_file(path, what="file", error=MinialexError):
    """Raise `error` naming `path` unless it is an existing regular file (symlinks followed)."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path}: {what} is a broken symbolic link") from None
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: {what} is {_kind(mode)}, not a regular file")
    return path


def open_input(path, mode="rb", what="file", error=MinialexError, **kw):
    """open(path, mode) for reading, refusing anything but a regular file without blocking on it."""
    path = os.fspath(path)
    check_input_file(path, what, error)
    try:
        # O_NONBLOCK: if the name was swapped for a FIFO since the check, open returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def check_output_target(path, what="output", error=MinialexError):
    """Raise `error` unless `path` can be (re)written by `write_atomically`; returns the path.

    Called before the work that produces the file, so that a bad target fails in a second, not
    after an epoch of training.
    """
    if path is None or os.fspath(path) == "":
        raise error(f"{what}: give a file name, such as alexnet.npz")
    path = os.fspath(path)
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise error(f"{path}: {what} names a folder; give a file name")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
        if os.path.islink(path):
            raise error(f"{path}: {what} is a broken symbolic link") from None
    except OSError as e:
        raise error(f"{path}: {what}: {e.strerror or e}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise error(f"{path}: {what} names a folder; give a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise error(f"{path}: {what} is {_kind(mode)}; refusing to replace it with a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise error(f"{path}: {what} folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise error(f"{path}: {what} folder {folder} is not writable")
    return path


def _final_target(path):
    """The file a rename should replace: a symlink's (possibly relative) target, else `path`."""
    return os.path.realpath(path) if os.path.islink(path) else path


def write_atomically(path, write, what="file", error=MinialexError):
    """Call write(fileobj) on a temp file next to `path`, fsync it, then rename it over `path`.

    A symlink to a regular file is followed (the link stays, its target is replaced); a target that
    exists and is not a regular file is refused, also when it appeared during the write.
    """
    check_output_target(path, what, error)
    target = _final_target(path)
    folder = os.path.dirname(os.path.abspath(target))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise error(f"{path}: cannot write {what}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); the result should get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise error(f"{path}: {what} became {_kind(mode)} during the write; not replacing it")
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise error(f"{path}: cannot write {what}: {e.strerror or e}") from None
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


def remove_stale_temps(path):
    """Delete temporary files a killed `write_atomically(path)` left behind; returns how many."""
    if not path:
        return 0
    target = _final_target(os.fspath(path))
    folder = os.path.dirname(os.path.abspath(target))
    prefix = f".{os.path.basename(target)}."
    if prefix == "..":
        return 0
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            full = os.path.join(folder, name)
            try:
                if stat.S_ISREG(os.lstat(full).st_mode):
                    os.unlink(full)
                    removed += 1
            except OSError:
                pass
    return removed


_ZIP_END = struct.Struct("<4s4H2LH")          # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")       # zip64 end of central directory locator
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")       # zip64 end of central directory record


def check_zip_directory(path, f, max_members, max_bytes, error):
    """`error` unless the zip archive open as binary file `f` declares at most `max_members` members
    in a central directory of at most `max_bytes` (its end record, read from the file's tail).
    Python's zipfile builds an object per member before anything else can be checked, so an
    archive of millions of tiny members would otherwise exhaust memory on opening."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _ZIP_END.size - 0xFFFF))   # the record, then a comment of up to 64 KB
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _ZIP_END.size:
        raise error(f"{path}: truncated or corrupt zip archive (no end record)")
    members, directory = _ZIP_END.unpack_from(tail, at)[4:6]
    if at >= _ZIP64_LOCATOR.size and tail[at - _ZIP64_LOCATOR.size:at].startswith(b"PK\x06\x07"):
        offset = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)[2]
        f.seek(min(offset, size))
        record = f.read(_ZIP64_END.size)
        if len(record) < _ZIP64_END.size or not record.startswith(b"PK\x06\x06"):
            raise error(f"{path}: truncated or corrupt zip archive (no zip64 end record)")
        members, directory = _ZIP64_END.unpack(record)[7:9]
    if members > max_members or directory > max_bytes:
        raise error(f"{path}: archive declares {members:,} members in a {directory:,}-byte directory, "
                    f"over the limits of {max_members:,} and {max_bytes:,}; damaged, or not what it "
                    f"should be")
