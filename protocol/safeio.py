"""Opening the files of a run directory safely, for reading and for writing.

A run dir may come from someone else (a tarball) or be damaged: `steps.msgpack` may be a
symlink to `~/.bashrc`, `events.jsonl` a FIFO that blocks any reader forever, `run.json`
a link to `/dev/zero`. Every file protocol opens in a run dir goes through `open_run_fd`
(or `open_run_file`), which opens it only as a regular file inside the run dir:

- the run dir itself is opened first (a symlink to it, like `runs/latest`, is followed:
  that is how runs are named); every directory below it on the way to the file is opened
  with `O_NOFOLLOW`, relative to the previous one, so the file is inside the run dir
  whatever is renamed meanwhile, and `..` is refused;
- the file is opened with `O_NOFOLLOW` (a symlink as the last component is refused, even a
  dangling one with `O_CREAT`: nothing is created through it) and `O_NONBLOCK` (opening a
  FIFO or a device never blocks), then `fstat` must say regular file, then `O_NONBLOCK`
  is cleared;
- a file opened for writing must have one link (a hard link into another tree would be
  written through).

A refusal raises `RunFileError` (a `RunDirError`, and an `OSError` so code that already
handles I/O errors keeps working) whose message is one line naming the file. A missing
file raises the usual `FileNotFoundError`.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
from typing import IO, Any

from .text import safe_text

StrPath = str | os.PathLike[str]

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # a directory handle that needs no read permission
_O_DIR = _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK
_SYMLINK_ERRNOS = {errno.ELOOP, errno.EMLINK, getattr(errno, "EFTYPE", errno.ELOOP)}


class RunDirError(Exception):
    """A problem with a run directory a user can fix; its message is one line."""


class RunFileError(RunDirError, OSError):
    """A run-dir file refused or unopenable (a symlink, a FIFO, outside the run dir, ...)."""

    def __init__(self, message: str) -> None:
        RunDirError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# mode string -> os.open flags; "w" truncates only after the checks (never O_TRUNC a FIFO)
MODES: dict[str, int] = {
    "r": os.O_RDONLY,
    "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "r+": os.O_RDWR,
    "w": os.O_WRONLY | os.O_CREAT,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


def _display(root: StrPath, rel: list[str] | None, name: StrPath) -> str:
    if rel:
        return safe_text(os.path.join(os.fspath(root), *rel))
    return safe_text(os.fspath(name))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"


def run_relative(root: StrPath, name: StrPath) -> list[str]:
    """The path components of `name` below the run dir `root`.

    `name` may be a path under `root` as callers build it (`paths.steps`, relative to the
    working directory or absolute), or a path relative to `root` (`"steps.msgpack"`,
    `"checkpoints/step_000010/meta.json"`). Raises `RunFileError` if it escapes `root`.
    """
    r, n = os.fspath(root), os.fspath(name)
    ar = os.path.abspath(r)
    an = os.path.abspath(n)
    prefix = ar if ar.endswith(os.sep) else ar + os.sep
    if an.startswith(prefix):
        rel = an[len(prefix) :]
    elif not os.path.isabs(n):
        rel = n  # relative to the run dir
    else:
        real_root = os.path.realpath(ar)
        real_parent = os.path.realpath(os.path.dirname(an))
        rel_parent = os.path.relpath(real_parent, real_root)
        if rel_parent == ".." or rel_parent.startswith(".." + os.sep):
            raise RunFileError(f"{safe_text(n)} is outside the run dir {safe_text(r)}; refusing to open it")
        rel = os.path.join(rel_parent, os.path.basename(an))
    parts = [p for p in rel.split(os.sep) if p not in ("", ".")]
    if not parts or ".." in parts:
        raise RunFileError(f"{safe_text(n)} is not a file inside the run dir {safe_text(r)}; refusing to open it")
    return parts


def open_run_fd(root: StrPath, name: StrPath, flags: int = os.O_RDONLY, perms: int = 0o644) -> int:
    """`os.open` of `name` inside the run dir `root`, only as a regular file (see the module doc).

    `root` is the run dir (a `RunPaths` works: it is path-like); `name` a path under it or
    relative to it. `flags` are `os.open` flags (`O_NOFOLLOW`, `O_NONBLOCK` during the
    checks, `O_CLOEXEC` and `O_NOCTTY` are added; `O_TRUNC` is applied only after the
    checks). Returns a blocking fd the caller closes. Raises `FileNotFoundError` for a
    missing file (or run dir), `FileExistsError` with `O_EXCL`, and `RunFileError` (one line
    naming the file) for anything else.
    """
    writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
    verb = "write" if writing else "read"
    truncate = bool(flags & os.O_TRUNC)
    flags &= ~os.O_TRUNC
    parts = run_relative(root, name)
    shown = _display(root, parts, name)
    try:
        dfd = os.open(os.fspath(root), _O_DIR)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunFileError(f"cannot open run dir {safe_text(os.fspath(root))}: {e.strerror}") from None
    try:
        for i, comp in enumerate(parts[:-1]):
            try:
                nfd = os.open(comp, _O_DIR | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                raise
            except OSError as e:
                if e.errno in (errno.ENOTDIR, *_SYMLINK_ERRNOS):
                    where = safe_text(os.path.join(*parts[: i + 1]))
                    raise RunFileError(
                        f"{shown}: {where} is a symlink or not a directory; refusing to {verb} through it"
                    ) from None
                raise RunFileError(f"cannot {verb} {shown}: {e.strerror}") from None
            os.close(dfd)
            dfd = nfd
        last = parts[-1]
        open_flags = flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(last, open_flags, perms, dir_fd=dfd)
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError as e:
            raise _refusal(e, dfd, last, shown, verb) from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunFileError(f"{shown} is {_kind(st.st_mode)}, not a regular file; refusing to {verb} it")
        if writing and st.st_nlink > 1:
            raise RunFileError(f"{shown} has {st.st_nlink} hard links; refusing to write through it")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if truncate:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(e: OSError, dfd: int, last: str, shown: str, verb: str) -> RunFileError:
    if e.errno in _SYMLINK_ERRNOS:
        try:
            is_link = stat.S_ISLNK(os.stat(last, dir_fd=dfd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            return RunFileError(f"{shown} is a symlink; refusing to {verb} through it")
    if e.errno == errno.EISDIR:
        return RunFileError(f"{shown} is a directory, not a regular file; refusing to {verb} it")
    if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):
        return RunFileError(f"{shown} is a FIFO, socket or device, not a regular file; refusing to {verb} it")
    return RunFileError(f"cannot {verb} {shown}: {e.strerror}")


def open_run_file(
    root: StrPath, name: StrPath, mode: str = "rb", *, perms: int = 0o644, buffering: int = -1
) -> IO[Any]:
    """A file object for `name` inside the run dir `root`, opened by `open_run_fd`'s rules.

    `mode`: "rb" read; "ab" append (created if missing); "r+b" read and write an existing
    file; "wb" write (created if missing, truncated after the checks); "xb" create a new
    file (`FileExistsError` if there is one). Without "b", text in UTF-8 (bad bytes read
    as U+FFFD). `buffering` as for `open` (0 only in binary mode).
    """
    binary = "b" in mode
    key = mode.replace("b", "").replace("t", "")
    if key not in MODES:
        raise ValueError(f"unsupported mode {mode!r} (use r, a, r+, w or x, with or without b)")
    flags = MODES[key] | (os.O_TRUNC if key == "w" else 0)
    fd = open_run_fd(root, name, flags, perms)
    pymode = {"r": "rb", "a": "ab", "r+": "r+b", "w": "wb", "x": "wb"}[key]
    try:
        f = open(fd, pymode, buffering=buffering, closefd=True)
    except BaseException:
        os.close(fd)
        raise
    if binary:
        return f
    return io.TextIOWrapper(f, encoding="utf-8", errors="replace")


def read_run_file(root: StrPath, name: StrPath, limit: int) -> bytes:
    """The whole of a small run-dir file, refused (one line) if it is larger than `limit` bytes."""
    fd = open_run_fd(root, name)
    try:
        size = os.fstat(fd).st_size
        shown = _display(root, run_relative(root, name), name)
        if size > limit:
            raise RunFileError(f"{shown} is too large ({size} bytes, the limit is {limit})")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            b = os.read(fd, limit + 1 - got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise RunFileError(f"{shown} is too large (over {limit} bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)


def run_dir_fd(root: StrPath) -> int:
    """A directory fd on the run dir (or runs dir) `root`, for `*_dir_fd` calls (rename, symlink)."""
    try:
        return os.open(os.fspath(root), _O_DIR)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunFileError(f"cannot open {safe_text(os.fspath(root))}: {e.strerror}") from None
